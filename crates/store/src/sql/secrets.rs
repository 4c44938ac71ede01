//! License keys, stored credentials and the audit log. Every change writes its audit entry in
//! the same transaction and bumps the secrets generation, so workers rebuild their relay state.

use sqlx::any::AnyRow;

use super::{Dialect, SqlStore, Tx, audit, cell, json, requeue_configuration_failures};
use crate::model::*;
use crate::{Result, StoreError, from_ms};

async fn bump(tx: &mut Tx) -> Result<()> {
    sqlx::query("UPDATE generations SET value = value + 1 WHERE name = 'secrets'").execute(&mut **tx).await?;
    Ok(())
}

async fn current_doc(tx: &mut Tx) -> Result<Option<panel_domain::SettingsDoc>> {
    let doc: Option<String> = sqlx::query_scalar("SELECT doc FROM relay_settings ORDER BY version DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await?;
    doc.map(|d| json(&d)).transpose()
}

/// After a fix (license added, credential stored), messages failed by configuration go again.
async fn requeue(tx: &mut Tx, now: i64) -> Result<()> {
    if let Some(doc) = current_doc(tx).await? {
        requeue_configuration_failures(tx, &doc, now, Release::All).await?;
    }
    Ok(())
}

/// The current master key id, locked until the transaction ends, so a credential write and a
/// rotation never interleave (SQLite's write lock gives the same).
async fn master_key_id(tx: &mut Tx, dialect: Dialect) -> Result<Option<String>> {
    let sql = format!("SELECT key_id FROM master_key WHERE id = 1{}", dialect.lock_rows());
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_optional(&mut **tx).await?)
}

async fn set_master_key_id(tx: &mut Tx, key_id: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO master_key (id, key_id) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET key_id = excluded.key_id",
    )
    .bind(key_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn credential_from_row(r: &AnyRow) -> Result<CredentialRow> {
    Ok(CredentialRow {
        id: cell(r, "credentials", "id")?,
        name: cell(r, "credentials", "name")?,
        kind: cell(r, "credentials", "kind")?,
        username: cell(r, "credentials", "username")?,
        attributes: json(&cell::<String>(r, "credentials", "attributes")?)?,
        master_key_id: cell(r, "credentials", "master_key_id")?,
        wrapped_key: cell(r, "credentials", "wrapped_key")?,
        ciphertext: cell(r, "credentials", "ciphertext")?,
        created_at: from_ms(cell(r, "credentials", "created_at")?),
        created_by: cell(r, "credentials", "created_by")?,
        updated_at: from_ms(cell(r, "credentials", "updated_at")?),
        updated_by: cell(r, "credentials", "updated_by")?,
        first_used_at: cell::<Option<i64>>(r, "credentials", "first_used_at")?.map(from_ms),
    })
}

const CREDENTIAL_COLUMNS: &str = "id, name, kind, username, attributes, master_key_id, wrapped_key, ciphertext,
     created_at, created_by, updated_at, updated_by, first_used_at";

impl SqlStore {
    pub async fn add_license(&self, id: &str, key: &str, by: &str, now: i64, event: &AuditEvent) -> Result<bool> {
        let mut tx = self.write().await?;
        let added = sqlx::query(
            "INSERT INTO licenses (id, key, added_at, added_by) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(key)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if added {
            audit(&mut tx, by, now, std::slice::from_ref(event)).await?;
            bump(&mut tx).await?;
            requeue(&mut tx, now).await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    pub async fn licenses(&self) -> Result<Vec<LicenseRow>> {
        let rows = sqlx::query("SELECT id, key, added_at, added_by FROM licenses ORDER BY added_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LicenseRow {
                    id: cell(r, "licenses", "id")?,
                    key: cell(r, "licenses", "key")?,
                    added_at: from_ms(cell(r, "licenses", "added_at")?),
                    added_by: cell(r, "licenses", "added_by")?,
                })
            })
            .collect()
    }

    pub async fn remove_license(&self, id: &str, by: &str, now: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let removed =
            sqlx::query("DELETE FROM licenses WHERE id = $1").bind(id).execute(&mut *tx).await?.rows_affected() == 1;
        if removed {
            audit(&mut tx, by, now, &[AuditEvent::new("license.removed", id, "")]).await?;
            bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    pub async fn credential(&self, name: &str) -> Result<Option<CredentialRow>> {
        let sql = format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE name = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(name).fetch_optional(&self.pool).await?;
        row.as_ref().map(credential_from_row).transpose()
    }

    pub async fn credentials(&self) -> Result<Vec<CredentialRow>> {
        let sql = format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(credential_from_row).collect()
    }

    pub async fn put_credential(&self, c: &NewCredential, by: &str, now: i64) -> Result<PutOutcome> {
        let mut tx = self.write().await?;
        match master_key_id(&mut tx, self.dialect).await? {
            Some(current) if current != c.master_key_id => return Err(StoreError::MasterKeyChanged { current }),
            Some(_) => {}
            None => set_master_key_id(&mut tx, &c.master_key_id).await?,
        }
        let existing: Option<String> = sqlx::query_scalar("SELECT id FROM credentials WHERE name = $1")
            .bind(&c.name)
            .fetch_optional(&mut *tx)
            .await?;
        let attributes = serde_json::Value::Object(c.attributes.clone()).to_string();
        let outcome = match existing {
            Some(id) if id != c.id => {
                return Err(StoreError::Conflict(format!(
                    "credential {} was replaced concurrently; try again",
                    c.name
                )));
            }
            Some(_) => PutOutcome::Replaced,
            None => PutOutcome::Created,
        };
        // One statement for both: a replacement keeps the id and creation, and is unused again.
        sqlx::query(
            "INSERT INTO credentials (id, name, kind, username, attributes, master_key_id, wrapped_key,
                                      ciphertext, created_at, created_by, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $9, $10)
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, username = excluded.username,
                 attributes = excluded.attributes, master_key_id = excluded.master_key_id,
                 wrapped_key = excluded.wrapped_key, ciphertext = excluded.ciphertext,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by, first_used_at = NULL",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.kind)
        .bind(&c.username)
        .bind(&attributes)
        .bind(&c.master_key_id)
        .bind(&c.wrapped_key)
        .bind(&c.ciphertext)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        let action = if outcome == PutOutcome::Created { "credential.stored" } else { "credential.replaced" };
        let detail = format!("kind {}, username {}", c.kind, c.username);
        audit(&mut tx, by, now, &[AuditEvent::new(action, &c.name, detail)]).await?;
        bump(&mut tx).await?;
        requeue(&mut tx, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Deletes a credential unless the relay settings in force reference it (checked in the
    /// same transaction, so a concurrent settings save cannot slip between check and delete).
    pub async fn delete_credential(&self, name: &str, by: &str, now: i64) -> Result<DeleteOutcome> {
        let mut tx = self.write().await?;
        // The primary or any standby route may send it.
        let named = |d: &panel_domain::SettingsDoc| d.credential.as_deref() == Some(name);
        if current_doc(&mut tx)
            .await?
            .is_some_and(|d| named(&d) || d.routes.iter().flatten().any(|r| named(&r.settings)))
        {
            return Ok(DeleteOutcome::InUse);
        }
        let deleted =
            sqlx::query("DELETE FROM credentials WHERE name = $1").bind(name).execute(&mut *tx).await?.rows_affected()
                == 1;
        if !deleted {
            return Ok(DeleteOutcome::NotFound);
        }
        audit(&mut tx, by, now, &[AuditEvent::new("credential.deleted", name, "")]).await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted)
    }

    /// Replaces wrapped data keys (each only if its row still has the old master key id) and
    /// makes `new_master_key_id` the current one; fails with `MasterKeyChanged` if any row is
    /// left under another key. Returns how many rows changed.
    pub async fn rewrap_credentials(
        &self,
        updates: &[Rewrapped],
        new_master_key_id: &str,
        by: &str,
        now: i64,
        event: &AuditEvent,
    ) -> Result<u64> {
        let mut tx = self.write().await?;
        master_key_id(&mut tx, self.dialect).await?;
        let mut changed = 0;
        for u in updates {
            changed += sqlx::query(
                "UPDATE credentials SET master_key_id = $3, wrapped_key = $4 WHERE id = $1 AND master_key_id = $2",
            )
            .bind(&u.id)
            .bind(&u.old_master_key_id)
            .bind(&u.master_key_id)
            .bind(&u.wrapped_key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials WHERE master_key_id != $1")
            .bind(new_master_key_id)
            .fetch_one(&mut *tx)
            .await?;
        if left > 0 {
            // A credential was stored under the old key meanwhile: the caller re-reads and retries.
            tx.rollback().await?;
            return Err(StoreError::MasterKeyChanged { current: new_master_key_id.to_string() });
        }
        set_master_key_id(&mut tx, new_master_key_id).await?;
        audit(&mut tx, by, now, std::slice::from_ref(event)).await?;
        bump(&mut tx).await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Records the first successful use of a credential; true only for the first.
    pub async fn mark_credential_used(&self, id: &str, by: &str, now: i64, event: &AuditEvent) -> Result<bool> {
        let mut tx = self.write().await?;
        let first = sqlx::query("UPDATE credentials SET first_used_at = $2 WHERE id = $1 AND first_used_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if first {
            audit(&mut tx, by, now, std::slice::from_ref(event)).await?;
        }
        tx.commit().await?;
        Ok(first)
    }

    pub async fn current_master_key_id(&self) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT key_id FROM master_key WHERE id = 1").fetch_optional(&self.pool).await?)
    }

    /// Records the master key in force when no credential is stored (a new key file).
    pub async fn adopt_master_key_id(&self, key_id: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials").fetch_one(&mut *tx).await?;
        if count > 0 {
            return Err(StoreError::Conflict(
                "credentials are stored; the master key cannot be replaced, only rotated".into(),
            ));
        }
        set_master_key_id(&mut tx, key_id).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        let rows =
            sqlx::query("SELECT id, at, actor, action, subject, detail FROM audit_log ORDER BY id DESC LIMIT $1")
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    id: cell(r, "audit_log", "id")?,
                    at: from_ms(cell(r, "audit_log", "at")?),
                    actor: cell(r, "audit_log", "actor")?,
                    action: cell(r, "audit_log", "action")?,
                    subject: cell(r, "audit_log", "subject")?,
                    detail: cell(r, "audit_log", "detail")?,
                })
            })
            .collect()
    }
}
