//! The relay settings, versioned: the current version, the generation workers compare before
//! each claim, and a save that fails on a concurrent change instead of overwriting it.

use panel_domain::{FailureClass, RetryPolicy, SettingsDoc, Stage};

use super::*;
use crate::{Result, StoreError, from_ms};

impl SqlStore {
    pub async fn current_settings(&self) -> Result<Option<StoredSettings>> {
        let row =
            sqlx::query("SELECT version, doc, saved_at, saved_by FROM relay_settings ORDER BY version DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(stored_settings).transpose()
    }

    /// Saved versions, newest first, at most `limit`.
    pub async fn settings_versions(&self, limit: i64) -> Result<Vec<StoredSettings>> {
        let rows =
            sqlx::query("SELECT version, doc, saved_at, saved_by FROM relay_settings ORDER BY version DESC LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(stored_settings).collect()
    }

    pub async fn settings_version(&self, version: i64) -> Result<Option<StoredSettings>> {
        let row = sqlx::query("SELECT version, doc, saved_at, saved_by FROM relay_settings WHERE version = $1")
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(stored_settings).transpose()
    }

    /// The current settings and the definitions generation, in one read: an event needs both
    /// before it knows whether the workflows it keeps in memory are current.
    pub async fn settings_and_definitions(&self) -> Result<(Option<StoredSettings>, i64)> {
        let row = sqlx::query(
            "SELECT g.value AS definitions, s.version, s.doc, s.saved_at, s.saved_by
             FROM generations g
             LEFT JOIN (SELECT version, doc, saved_at, saved_by FROM relay_settings ORDER BY version DESC LIMIT 1) s
                 ON 1 = 1
             WHERE g.name = 'definitions'",
        )
        .fetch_one(&self.pool)
        .await?;
        let version: Option<i64> = cell(&row, "relay_settings", "version")?;
        let settings = version.is_some().then(|| stored_settings(&row)).transpose()?;
        Ok((settings, cell(&row, "generations", "definitions")?))
    }

    pub async fn config_generation(&self) -> Result<ConfigGeneration> {
        let row =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {GENERATION_COLUMNS}"))).fetch_one(&self.pool).await?;
        generation_from_row(&row)
    }

    pub async fn save_settings(
        &self,
        expected: i64,
        doc: &SettingsDoc,
        by: &str,
        now: i64,
        events: &[AuditEvent],
    ) -> Result<i64> {
        let mut tx = self.write().await?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM relay_settings").fetch_one(&mut *tx).await?;
        if current != expected {
            return Err(StoreError::SettingsConflict { current });
        }
        let version = current + 1;
        sqlx::query("INSERT INTO relay_settings (version, doc, saved_at, saved_by) VALUES ($1, $2, $3, $4)")
            .bind(version)
            .bind(serde_json::to_string(doc).expect("settings serialize"))
            .bind(now)
            .bind(by)
            .execute(&mut *tx)
            .await
            .map_err(|e| match &e {
                // Another service saved the same version first (PostgreSQL; SQLite's write lock
                // makes this impossible there).
                sqlx::Error::Database(d) if d.is_unique_violation() => {
                    StoreError::SettingsConflict { current: version }
                }
                _ => e.into(),
            })?;
        audit(&mut tx, by, now, events).await?;
        requeue_configuration_failures(&mut tx, doc, now, Release::All).await?;
        tx.commit().await?;
        Ok(version)
    }
}

impl SqlStore {
    /// Gives messages held by a configuration error another chance without a new settings
    /// version (a save that changed nothing, after the admin fixed what lies outside Panel).
    pub async fn release_held(&self, doc: &SettingsDoc, now: i64, scope: Release) -> Result<u64> {
        let mut tx = self.write().await?;
        let n = requeue_configuration_failures(&mut tx, doc, now, scope).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Makes due at once the retrying messages whose last attempt could not reach the relay
    /// (the stages of `Stage::REACHING`, or a 421): they waited for the relay, not for a
    /// recipient's own 4xx, and the relay is back.
    pub async fn release_outage(&self, now: i64) -> Result<u64> {
        let sql = format!(
            "UPDATE messages SET next_attempt_at = $1
             WHERE state = 'retrying' AND next_attempt_at > $1 AND EXISTS (
                 SELECT 1 FROM attempts a
                 WHERE a.id = (SELECT MAX(id) FROM attempts WHERE message_id = messages.id)
                   AND a.outcome = 'temporary_failure' AND (a.stage IN ({}) OR a.code = 421))",
            stage_list(&Stage::REACHING)
        );
        let mut tx = self.write().await?;
        let done = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// The settings version and the secrets generation, as the columns of a SELECT: read on their
/// own, or with a claim (`generation_from_row` reads them back).
pub(super) const GENERATION_COLUMNS: &str =
    "(SELECT COALESCE(MAX(version), 0) FROM relay_settings) AS settings_generation,
     (SELECT value FROM generations WHERE name = 'secrets') AS secrets_generation";

pub(super) fn generation_from_row(row: &sqlx::any::AnyRow) -> Result<ConfigGeneration> {
    Ok(ConfigGeneration {
        settings: cell(row, "relay_settings", "settings_generation")?,
        secrets: cell(row, "generations", "secrets_generation")?,
    })
}

fn stored_settings(r: &sqlx::any::AnyRow) -> Result<StoredSettings> {
    Ok(StoredSettings {
        version: cell(r, "relay_settings", "version")?,
        doc: json(&cell::<String>(r, "relay_settings", "doc")?)?,
        saved_at: from_ms(cell(r, "relay_settings", "saved_at")?),
        saved_by: cell(r, "relay_settings", "saved_by")?,
    })
}

/// `'dns', 'tcp', ...`: stage names are the domain's constants, never input.
fn stage_list(stages: &[Stage]) -> String {
    stages.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ")
}

/// Messages stopped by a configuration error get another chance after the configuration changed
/// (settings saved, license added, credential stored), within their retry window. With
/// `Release::SessionFailures` only those stopped before their own MAIL FROM: what a later
/// attempt that got further proves fixed, while a refusal of one message's sender stays held.
pub(super) async fn requeue_configuration_failures(
    tx: &mut Tx,
    doc: &SettingsDoc,
    now: i64,
    scope: Release,
) -> Result<u64> {
    let window = RetryPolicy::from_doc(doc.retry_schedule.as_deref(), doc.give_up_after.as_deref())
        .unwrap_or_default()
        .give_up_after;
    let stages = match scope {
        Release::All => String::new(),
        Release::SessionFailures => format!(
            " AND (SELECT stage FROM attempts WHERE message_id = messages.id ORDER BY id DESC LIMIT 1) IN ({})",
            stage_list(&Stage::SESSION)
        ),
    };
    let sql = format!(
        "UPDATE messages SET state = 'retrying', next_attempt_at = $1, updated_at = $1, failure_class = NULL
         WHERE state = 'failed' AND failure_class = $2 AND window_start >= $3{stages}"
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(FailureClass::Configuration.as_str())
        .bind(now - window.as_millis() as i64)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected())
}
