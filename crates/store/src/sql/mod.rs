//! The SQL store, one implementation for both backends through sqlx's `Any` driver: the
//! queries are shared, and the few places where SQLite and PostgreSQL differ ask `Dialect`.
//!
//! SQLite: WAL, `synchronous = FULL` (a commit survives power loss), every write transaction
//! taken with `BEGIN IMMEDIATE` so concurrent processes queue on the write lock instead of
//! failing on a read-to-write upgrade. PostgreSQL: read-committed transactions, with row locks
//! (`FOR UPDATE`, `SKIP LOCKED`) where several services compete, and migrations serialized by an
//! advisory lock.

use std::time::Duration;

use panel_domain::{FailureClass, MessageState, Origin, OutgoingMessage, RetryPolicy, SettingsDoc, Settlement};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::model::*;
use crate::{Result, StoreError, from_ms};

/// Reads `column` of a row from `table`: a column that is missing, NULL where a value is
/// needed, or of another type is a store error naming both, never a panic (in the worker, a
/// panic would stop delivery for every message).
pub(crate) fn cell<'r, T>(row: &'r AnyRow, table: &'static str, column: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt(format!("{table}.{column}: {e}")))
}

mod accounts;
mod automation;
mod secrets;

const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_core.sql")),
    (2, include_str!("../../migrations/sqlite/0002_licenses_credentials_audit.sql")),
    (3, include_str!("../../migrations/sqlite/0003_metrics.sql")),
    (4, include_str!("../../migrations/sqlite/0004_idempotency.sql")),
    (5, include_str!("../../migrations/sqlite/0005_automation.sql")),
    (6, include_str!("../../migrations/sqlite/0006_admins.sql")),
];

const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_core.sql")),
    (2, include_str!("../../migrations/postgres/0002_licenses_credentials_audit.sql")),
    (3, include_str!("../../migrations/postgres/0003_metrics.sql")),
    (4, include_str!("../../migrations/postgres/0004_idempotency.sql")),
    (5, include_str!("../../migrations/postgres/0005_automation.sql")),
    (6, include_str!("../../migrations/postgres/0006_admins.sql")),
];

/// The PostgreSQL notification channel that wakes idle workers on every service.
const WAKE_CHANNEL: &str = "panel_wake";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn migrations(self) -> &'static [(i64, &'static str)] {
        match self {
            Dialect::Sqlite => SQLITE_MIGRATIONS,
            Dialect::Postgres => POSTGRES_MIGRATIONS,
        }
    }

    /// Appended to a SELECT whose rows the transaction is about to change, where another
    /// service may compete for them. SQLite's write lock already serializes writers.
    fn lock_rows(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// SQLite has no statistics unless ANALYZE runs, and then prefers the state index and sorts
    /// every due row per claim; naming the partial index keeps a claim O(batch) at any depth.
    fn use_index(self, index: &'static str) -> String {
        match self {
            Dialect::Sqlite => format!(" INDEXED BY {index}"),
            Dialect::Postgres => String::new(),
        }
    }

    fn concat_addresses(self) -> &'static str {
        match self {
            Dialect::Sqlite => "group_concat(address, ',')",
            Dialect::Postgres => "string_agg(address, ',' ORDER BY position)",
        }
    }
}

#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    pub(crate) dialect: Dialect,
    url: String,
}

type Tx = sqlx::Transaction<'static, sqlx::Any>;

impl SqlStore {
    /// Opens `url` (`sqlite://PATH` or `postgres://...`) and applies pending migrations.
    pub async fn open(url: &str, dialect: Dialect) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let pool = match dialect {
            Dialect::Sqlite => {
                let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
                let options: AnyConnectOptions = format!("sqlite://{path}?mode=rwc").parse()?;
                AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA busy_timeout = 15000; PRAGMA journal_mode = WAL; PRAGMA mmap_size = 268435456; PRAGMA cache_size = -16000; \
                                 PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
                            )
                            .await
                            .map(|_| ())
                        })
                    })
                    .connect_with(options)
                    .await?
            }
            Dialect::Postgres => {
                let options: AnyConnectOptions = url.parse()?;
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(15))
                    .connect_with(options)
                    .await?
            }
        };
        let store = SqlStore { pool, dialect, url: url.to_string() };
        store.migrate().await?;
        Ok(store)
    }

    async fn write(&self) -> Result<Tx> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.write().await?;
        if self.dialect == Dialect::Postgres {
            // Several services may start at once: one migrates, the others wait and see it done.
            sqlx::query("SELECT pg_advisory_xact_lock(7215013)").execute(&mut *tx).await?;
        }
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetch_one(&mut *tx).await?;
        for (version, sql) in self.dialect.migrations().iter().filter(|(v, _)| *v > current) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(chrono::Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The newest migration applied, and the newest this build knows.
    pub async fn schema_version(&self) -> Result<(i64, i64)> {
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetch_one(&self.pool).await?;
        Ok((current, self.dialect.migrations().last().map_or(0, |m| m.0)))
    }

    /// A dedicated connection listening for wake-ups (PostgreSQL only).
    pub async fn listen_wakes(&self) -> Result<Option<sqlx::postgres::PgListener>> {
        if self.dialect != Dialect::Postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
        listener.listen(WAKE_CHANNEL).await?;
        Ok(Some(listener))
    }

    /// Wakes idle workers of every service (PostgreSQL NOTIFY); SQLite services are woken locally.
    pub async fn notify_wake(&self) -> Result<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, '')").bind(WAKE_CHANNEL).execute(&self.pool).await?;
        }
        Ok(())
    }

    pub async fn current_settings(&self) -> Result<Option<StoredSettings>> {
        let row =
            sqlx::query("SELECT version, doc, saved_at, saved_by FROM relay_settings ORDER BY version DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(StoredSettings {
                version: cell(&r, "relay_settings", "version")?,
                doc: json(&cell::<String>(&r, "relay_settings", "doc")?)?,
                saved_at: from_ms(cell(&r, "relay_settings", "saved_at")?),
                saved_by: cell(&r, "relay_settings", "saved_by")?,
            })
        })
        .transpose()
    }

    pub async fn config_generation(&self) -> Result<ConfigGeneration> {
        let (settings, secrets): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COALESCE(MAX(version), 0) FROM relay_settings),
                    (SELECT value FROM generations WHERE name = 'secrets')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(ConfigGeneration { settings, secrets })
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
        requeue_configuration_failures(&mut tx, doc, now).await?;
        tx.commit().await?;
        Ok(version)
    }

    pub async fn enqueue(
        &self,
        origin: Origin,
        m: &OutgoingMessage,
        now: i64,
        key: Option<&str>,
    ) -> Result<(i64, bool)> {
        let mut tx = self.write().await?;
        let Some(id) = insert_message(&mut tx, origin, m, now, key, None).await? else {
            let existing: i64 = sqlx::query_scalar("SELECT id FROM messages WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok((existing, false));
        };
        tx.commit().await?;
        Ok((id, true))
    }

    /// Many messages in one transaction: one commit (one fsync) for the whole batch.
    pub async fn enqueue_many(&self, items: &[(Origin, OutgoingMessage)], now: i64) -> Result<Vec<i64>> {
        let mut tx = self.write().await?;
        let mut ids = Vec::with_capacity(items.len());
        for (origin, m) in items {
            ids.push(insert_message(&mut tx, *origin, m, now, None, None).await?.expect("no key, no conflict"));
        }
        tx.commit().await?;
        Ok(ids)
    }

    pub async fn claim(&self, owner: &str, now: i64, lease_ms: i64, limit: u32) -> Result<Vec<Claim>> {
        let mut tx = self.write().await?;
        // Several services may look at once: each takes the expired leases it can lock.
        let sql = format!(
            "SELECT id, lease_owner FROM messages{} WHERE state = 'sending' AND lease_expires_at < $1{}",
            self.dialect.use_index("messages_leased"),
            self.dialect.skip_locked()
        );
        let expired = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).fetch_all(&mut *tx).await?;
        for row in &expired {
            let id: i64 = cell(row, "messages", "id")?;
            let previous: Option<String> = cell(row, "messages", "lease_owner")?;
            let taken = sqlx::query(
                "UPDATE messages SET state = 'retrying', interrupted = interrupted + 1, attempts = attempts + 1,
                        lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = $2, updated_at = $2
                 WHERE id = $1 AND state = 'sending'",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if taken.rows_affected() == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO attempts (message_id, started_at, finished_at, service_id, relay, settings_version,
                                       outcome, stage, detail, hint, recipients)
                 VALUES ($1, $2, $2, $3, '', 0, 'interrupted', 'unknown', $4, $5, '[]')",
            )
            .bind(id)
            .bind(now)
            .bind(previous.unwrap_or_default())
            .bind("the worker holding this message stopped before recording an outcome")
            .bind("the relay may already have accepted it; a duplicate delivery is possible")
            .execute(&mut *tx)
            .await?;
        }
        // SKIP LOCKED (PostgreSQL): N services claiming at once each get different steps, no waiting.
        let sql = format!(
            "UPDATE messages SET state = 'sending', lease_owner = $1, lease_expires_at = $2,
                    claim_token = claim_token + 1, updated_at = $3
             WHERE id IN (SELECT id FROM messages{} WHERE state IN ('queued', 'retrying') AND next_attempt_at <= $3
                          ORDER BY next_attempt_at, id LIMIT $4{})
             RETURNING id, origin, content, claim_token, attempts, window_start",
            self.dialect.use_index("messages_due"),
            self.dialect.skip_locked()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(now + lease_ms)
            .bind(now)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        let mut claims = rows.iter().map(claim_from_row).collect::<Result<Vec<_>>>()?;
        if !claims.is_empty() {
            // The ids are integers read from the database: safe to list in the statement.
            let ids = claims.iter().map(|c| c.reference.id.to_string()).collect::<Vec<_>>().join(",");
            let sql = format!(
                "SELECT message_id, position, address FROM recipients
                 WHERE message_id IN ({ids}) AND state = 'pending' ORDER BY message_id, position"
            );
            let pending = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *tx).await?;
            for row in pending {
                let id: i64 = cell(&row, "recipients", "message_id")?;
                if let Some(c) = claims.iter_mut().find(|c| c.reference.id == id) {
                    c.pending.push(PendingRecipient {
                        position: cell(&row, "recipients", "position")?,
                        address: cell(&row, "recipients", "address")?,
                    });
                }
            }
        }
        tx.commit().await?;
        claims.sort_by_key(|c| c.reference.id);
        Ok(claims)
    }

    pub async fn renew_lease(&self, claim: &ClaimRef, until: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE messages SET lease_expires_at = $1 WHERE id = $2 AND claim_token = $3 AND state = 'sending'",
        )
        .bind(until)
        .bind(claim.id)
        .bind(claim.token)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records several attempts in one transaction (one commit, one fsync, for all of them).
    /// Each is fenced by its claim token on its own: a stale one is skipped, the others kept.
    pub async fn record_attempts(&self, batch: &[(ClaimRef, AttemptMeta, Settlement)]) -> Result<Vec<bool>> {
        let mut tx = self.write().await?;
        let mut recorded = Vec::with_capacity(batch.len());
        for (claim, meta, s) in batch {
            recorded.push(record_one(&mut tx, claim, meta, s).await?);
        }
        tx.commit().await?;
        Ok(recorded)
    }

    pub async fn list_messages(&self, f: &MessageFilter) -> Result<Vec<MessageSummary>> {
        let sql = format!(
            "SELECT m.*, (SELECT {} FROM recipients r WHERE r.message_id = m.id) AS rcpts
             FROM messages m WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR origin = $2)
               AND ($4 IS NULL OR EXISTS (SELECT 1 FROM recipients r2 WHERE r2.message_id = m.id AND lower(r2.address) LIKE $4))
               AND ($5 IS NULL OR m.created_at >= $5)
             ORDER BY id DESC LIMIT $3",
            self.dialect.concat_addresses()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.origin.map(|o| o.as_str()))
            .bind(if f.limit == 0 { 100 } else { f.limit as i64 })
            .bind(f.recipient.as_ref().map(|r| format!("%{}%", r.trim().to_lowercase().replace(['%', '_'], ""))))
            .bind(f.since.map(crate::ms))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let state = parse_state(r)?;
                Ok(MessageSummary {
                    id: cell(r, "messages", "id")?,
                    state,
                    origin: parse_origin(r)?,
                    from: cell(r, "messages", "from_addr")?,
                    to: cell::<Option<String>>(r, "messages", "rcpts")?
                        .map(|s| s.split(',').map(String::from).collect())
                        .unwrap_or_default(),
                    subject: cell(r, "messages", "subject")?,
                    created_at: from_ms(cell(r, "messages", "created_at")?),
                    updated_at: from_ms(cell(r, "messages", "updated_at")?),
                    attempt_count: cell(r, "messages", "attempts")?,
                    next_attempt_at: if waiting(state) {
                        Some(from_ms(cell(r, "messages", "next_attempt_at")?))
                    } else {
                        None
                    },
                    failure_class: cell(r, "messages", "failure_class")?,
                    last_error: cell(r, "messages", "last_error")?,
                })
            })
            .collect()
    }

    /// The message as queued: text, HTML and attachments (what was sent).
    pub async fn message_content(&self, id: i64) -> Result<Option<OutgoingMessage>> {
        let content: Option<String> = sqlx::query_scalar("SELECT content FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        content.map(|c| json(&c)).transpose()
    }

    pub async fn hourly_counts(&self, since: i64) -> Result<Vec<HourlyCount>> {
        let rows = sqlx::query(
            "SELECT (updated_at / 3600000) AS hour, state, COUNT(*) AS n FROM messages
             WHERE updated_at >= $1 AND state IN ('delivered', 'retrying', 'failed')
             GROUP BY (updated_at / 3600000), state ORDER BY 1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HourlyCount {
                    hour: from_ms(cell::<i64>(r, "messages", "hour")? * 3_600_000),
                    state: parse_state(r)?,
                    count: cell(r, "messages", "n")?,
                })
            })
            .collect()
    }

    pub async fn last_relay_error(&self) -> Result<Option<RelayError>> {
        let Some(a) = sqlx::query(
            "SELECT * FROM attempts WHERE outcome NOT IN ('delivered', 'interrupted') ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let id: i64 = cell(&a, "attempts", "id")?;
        let delivered_since: Option<i64> =
            sqlx::query_scalar("SELECT id FROM attempts WHERE id > $1 AND outcome = 'delivered' LIMIT 1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(Some(RelayError {
            message_id: cell(&a, "attempts", "message_id")?,
            at: from_ms(cell(&a, "attempts", "finished_at")?),
            relay: cell(&a, "attempts", "relay")?,
            outcome: cell(&a, "attempts", "outcome")?,
            stage: cell(&a, "attempts", "stage")?,
            code: cell(&a, "attempts", "code")?,
            reply: cell(&a, "attempts", "reply")?,
            detail: cell(&a, "attempts", "detail")?,
            hint: cell(&a, "attempts", "hint")?,
            current: delivered_since.is_none(),
        }))
    }

    pub async fn message(&self, id: i64) -> Result<Option<MessageDetail>> {
        let Some(r) = sqlx::query("SELECT * FROM messages WHERE id = $1").bind(id).fetch_optional(&self.pool).await?
        else {
            return Ok(None);
        };
        let content: OutgoingMessage = json(&cell::<String>(&r, "messages", "content")?)?;
        let names = |list: &[panel_domain::Mailbox]| list.iter().map(|m| m.to_string()).collect::<Vec<_>>();
        let recipients =
            sqlx::query("SELECT kind, address, state, reply FROM recipients WHERE message_id = $1 ORDER BY position")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(|r| {
                    Ok(RecipientRow {
                        kind: cell(&r, "recipients", "kind")?,
                        address: cell(&r, "recipients", "address")?,
                        state: cell(&r, "recipients", "state")?,
                        reply: cell(&r, "recipients", "reply")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        let attempts = sqlx::query("SELECT * FROM attempts WHERE message_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|a| {
                Ok(AttemptRow {
                    at: from_ms(cell(&a, "attempts", "started_at")?),
                    finished_at: from_ms(cell(&a, "attempts", "finished_at")?),
                    outcome: cell(&a, "attempts", "outcome")?,
                    stage: cell(&a, "attempts", "stage")?,
                    code: cell(&a, "attempts", "code")?,
                    enhanced_code: cell(&a, "attempts", "enhanced_code")?,
                    reply: cell(&a, "attempts", "reply")?,
                    detail: cell(&a, "attempts", "detail")?,
                    hint: cell(&a, "attempts", "hint")?,
                    relay: cell(&a, "attempts", "relay")?,
                    service_id: cell(&a, "attempts", "service_id")?,
                    settings_version: cell(&a, "attempts", "settings_version")?,
                    recipients: json(&cell::<String>(&a, "attempts", "recipients")?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let state = parse_state(&r)?;
        Ok(Some(MessageDetail {
            id,
            state,
            origin: parse_origin(&r)?,
            from: content.from.to_string(),
            to: names(&content.to),
            cc: names(&content.cc),
            bcc: names(&content.bcc),
            reply_to: content.reply_to.as_ref().map(|m| m.to_string()),
            subject: content.subject.clone(),
            message_id: content.message_id.clone(),
            used_fallback_recipient: content.used_fallback_recipient,
            created_at: from_ms(cell(&r, "messages", "created_at")?),
            updated_at: from_ms(cell(&r, "messages", "updated_at")?),
            next_attempt_at: if waiting(state) {
                Some(from_ms(cell(&r, "messages", "next_attempt_at")?))
            } else {
                None
            },
            failure_class: cell(&r, "messages", "failure_class")?,
            last_error: cell(&r, "messages", "last_error")?,
            interrupted: cell(&r, "messages", "interrupted")?,
            recipients,
            attempts,
        }))
    }

    pub async fn retry_message(&self, id: i64, now: i64) -> Result<RetryResult> {
        let mut tx = self.write().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM messages WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?;
        let Some(state) = state else { return Ok(RetryResult::NotFound) };
        let state = MessageState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("state '{state}'")))?;
        if state != MessageState::Failed {
            return Ok(RetryResult::NotFailed { state });
        }
        sqlx::query("UPDATE recipients SET state = 'pending' WHERE message_id = $1 AND state = 'failed'")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE messages SET state = 'retrying', next_attempt_at = $2, updated_at = $2, window_start = $2,
                    failure_class = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RetryResult::Requeued)
    }

    pub async fn retry_failed(&self, since: i64, now: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE recipients SET state = 'pending' WHERE state = 'failed'
             AND message_id IN (SELECT id FROM messages WHERE state = 'failed' AND updated_at >= $1)",
        )
        .bind(since)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "UPDATE messages SET state = 'retrying', next_attempt_at = $2, updated_at = $2, window_start = $2,
                    failure_class = NULL WHERE state = 'failed' AND updated_at >= $1",
        )
        .bind(since)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    pub async fn heartbeat(&self, s: &ServiceInfo, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO services (id, kind, host, pid, version, started_at, heartbeat_at, listen, wake_port)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, listen = excluded.listen,
                                            wake_port = excluded.wake_port",
        )
        .bind(&s.id)
        .bind(&s.kind)
        .bind(&s.host)
        .bind(s.pid)
        .bind(&s.version)
        .bind(s.started_at.timestamp_millis())
        .bind(now)
        .bind(&s.listen)
        .bind(s.wake_port.map(i64::from))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn deregister(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM services WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn services(&self, prune_before: i64) -> Result<Vec<ServiceRow>> {
        sqlx::query("DELETE FROM services WHERE heartbeat_at < $1").bind(prune_before).execute(&self.pool).await?;
        let rows = sqlx::query("SELECT * FROM services ORDER BY started_at").fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|r| {
                Ok(ServiceRow {
                    info: ServiceInfo {
                        id: cell(&r, "services", "id")?,
                        kind: cell(&r, "services", "kind")?,
                        host: cell(&r, "services", "host")?,
                        pid: cell(&r, "services", "pid")?,
                        version: cell(&r, "services", "version")?,
                        started_at: from_ms(cell(&r, "services", "started_at")?),
                        listen: cell(&r, "services", "listen")?,
                        wake_port: cell::<Option<i64>>(&r, "services", "wake_port")?
                            .and_then(|p| u16::try_from(p).ok()),
                    },
                    heartbeat_at: from_ms(cell(&r, "services", "heartbeat_at")?),
                })
            })
            .collect()
    }

    pub async fn queue_stats(&self, now: i64) -> Result<QueueStats> {
        let mut stats = QueueStats::default();
        for (state, n) in sqlx::query_as::<_, (String, i64)>("SELECT state, COUNT(*) FROM messages GROUP BY state")
            .fetch_all(&self.pool)
            .await?
        {
            match state.as_str() {
                "queued" => stats.queued = n,
                "retrying" => stats.retrying = n,
                "sending" => stats.sending = n,
                "delivered" => stats.delivered = n,
                "failed" => stats.failed = n,
                _ => {}
            }
        }
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM messages WHERE state IN ('queued', 'retrying') AND next_attempt_at <= $1",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        stats.oldest_due_age_secs = oldest.map(|t| (now - t) / 1000);
        Ok(stats)
    }

    pub async fn interrupted_attempts(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM attempts WHERE outcome = 'interrupted'")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn message_state(&self, id: i64) -> Result<Option<MessageState>> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM messages WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(state.and_then(|s| MessageState::parse(&s)))
    }
}

fn claim_from_row(r: &AnyRow) -> Result<Claim> {
    Ok(Claim {
        reference: ClaimRef { id: cell(r, "messages", "id")?, token: cell(r, "messages", "claim_token")? },
        origin: parse_origin(r)?,
        message: json(&cell::<String>(r, "messages", "content")?)?,
        attempts: cell(r, "messages", "attempts")?,
        created_at: from_ms(cell(r, "messages", "window_start")?),
        pending: Vec::new(),
    })
}

fn waiting(state: MessageState) -> bool {
    matches!(state, MessageState::Queued | MessageState::Retrying)
}

/// Inserts a message and its recipients; `None` when `key` is already taken (nothing written).
/// With a key, a concurrent insert of the same key waits for the other and then does nothing.
async fn insert_message(
    tx: &mut Tx,
    origin: Origin,
    m: &OutgoingMessage,
    now: i64,
    key: Option<&str>,
    run_id: Option<i64>,
) -> Result<Option<i64>> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO messages (origin, state, content, from_addr, subject, message_id, used_fallback,
                               created_at, updated_at, next_attempt_at, window_start, idempotency_key, run_id)
         VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $7, $7, $7, $8, $9)
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(origin.as_str())
    .bind(serde_json::to_string(m).expect("message serializes"))
    .bind(m.from.to_string())
    .bind(&m.subject)
    .bind(&m.message_id)
    .bind(m.used_fallback_recipient)
    .bind(now)
    .bind(key)
    .bind(run_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(id) = inserted else { return Ok(None) };
    for (position, (kind, address)) in m.recipients().into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO recipients (message_id, position, kind, address, state) VALUES ($1, $2, $3, $4, 'pending')",
        )
        .bind(id)
        .bind(position as i64)
        .bind(kind.as_str())
        .bind(address.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(Some(id))
}

/// One attempt's outcome, fenced by the claim token: false (nothing written) when another
/// worker has claimed the message since.
async fn record_one(tx: &mut Tx, claim: &ClaimRef, meta: &AttemptMeta, s: &Settlement) -> Result<bool> {
    let finished = meta.finished_at.timestamp_millis();
    let next = s.retry_after.map(|d| finished + d.as_millis() as i64);
    let updated = sqlx::query(
        "UPDATE messages SET state = $1, attempts = attempts + 1, updated_at = $2,
                next_attempt_at = COALESCE($3, next_attempt_at), lease_owner = NULL, lease_expires_at = NULL,
                failure_class = $4, last_error = $5
         WHERE id = $6 AND claim_token = $7 AND state = 'sending'",
    )
    .bind(s.state.as_str())
    .bind(finished)
    .bind(next)
    .bind(s.failure_class.map(FailureClass::as_str))
    .bind(&s.last_error)
    .bind(claim.id)
    .bind(claim.token)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        return Ok(false);
    }
    let pending: Vec<(i64, String)> = sqlx::query_as(
        "SELECT position, address FROM recipients WHERE message_id = $1 AND state = 'pending' ORDER BY position",
    )
    .bind(claim.id)
    .fetch_all(&mut **tx)
    .await?;
    let mut per_recipient = Vec::with_capacity(pending.len());
    for ((position, address), r) in pending.iter().zip(&s.recipients) {
        sqlx::query(
            "UPDATE recipients SET state = $1, reply = COALESCE($2, reply) WHERE message_id = $3 AND position = $4",
        )
        .bind(r.state.as_str())
        .bind(&r.reply)
        .bind(claim.id)
        .bind(position)
        .execute(&mut **tx)
        .await?;
        per_recipient.push(serde_json::json!({
            "address": address, "state": r.state, "stage": r.stage, "reply": r.reply,
        }));
    }
    sqlx::query(
        "INSERT INTO attempts (message_id, started_at, finished_at, service_id, relay, settings_version, outcome,
                               stage, code, enhanced_code, reply, detail, hint, recipients)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(claim.id)
    .bind(meta.started_at.timestamp_millis())
    .bind(finished)
    .bind(&meta.service_id)
    .bind(&meta.relay)
    .bind(meta.settings_version)
    .bind(s.outcome.as_str())
    .bind(s.stage.as_str())
    .bind(s.reply.as_ref().map(|r| r.code as i64))
    .bind(s.reply.as_ref().and_then(|r| r.enhanced.clone()))
    .bind(s.reply.as_ref().map(|r| r.text.clone()))
    .bind(&s.detail)
    .bind(&s.hint)
    .bind(serde_json::Value::Array(per_recipient).to_string())
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// Messages stopped by a configuration error get another chance after the configuration changed
/// (settings saved, license added, credential stored), within their retry window.
async fn requeue_configuration_failures(tx: &mut Tx, doc: &SettingsDoc, now: i64) -> Result<u64> {
    let window = RetryPolicy::from_doc(doc.retry_schedule.as_deref(), doc.give_up_after.as_deref())
        .unwrap_or_default()
        .give_up_after;
    let done = sqlx::query(
        "UPDATE messages SET state = 'retrying', next_attempt_at = $1, updated_at = $1, failure_class = NULL
         WHERE state = 'failed' AND failure_class = $2 AND window_start >= $3",
    )
    .bind(now)
    .bind(FailureClass::Configuration.as_str())
    .bind(now - window.as_millis() as i64)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

async fn audit(tx: &mut Tx, actor: &str, now: i64, events: &[AuditEvent]) -> Result<()> {
    for e in events {
        sqlx::query("INSERT INTO audit_log (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(now)
            .bind(actor)
            .bind(&e.action)
            .bind(&e.subject)
            .bind(&e.detail)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

fn parse_state(r: &AnyRow) -> Result<MessageState> {
    let s: String = cell(r, "messages", "state")?;
    MessageState::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("messages.state: unknown message state '{s}'")))
}

fn parse_origin(r: &AnyRow) -> Result<Origin> {
    let s: String = cell(r, "messages", "origin")?;
    Origin::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("messages.origin: unknown message origin '{s}'")))
}

fn json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}
