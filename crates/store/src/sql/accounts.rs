//! Admin accounts, browser sessions and API tokens (audited where an admin changes them).

use super::{Dialect, SqlStore, audit, cell};
use crate::model::*;
use crate::{Result, from_ms};

fn admin_from_row(r: &sqlx::any::AnyRow) -> Result<AdminRow> {
    Ok(AdminRow {
        name: cell(r, "admins", "name")?,
        role: cell(r, "admins", "role")?,
        password_hash: cell(r, "admins", "password_hash")?,
        created_at: from_ms(cell(r, "admins", "created_at")?),
        updated_at: from_ms(cell(r, "admins", "updated_at")?),
    })
}

/// A token's id: the start of its stored digest. It names the token in lists and revocations
/// and tells nothing about the token itself.
pub const TOKEN_ID_CHARS: usize = 12;

fn token_from_row(r: &sqlx::any::AnyRow) -> Result<TokenRow> {
    let hash: String = cell(r, "auth_tokens", "token_hash")?;
    Ok(TokenRow {
        id: hash.chars().take(TOKEN_ID_CHARS).collect(),
        admin: cell(r, "auth_tokens", "admin")?,
        label: cell(r, "auth_tokens", "label")?,
        created_at: from_ms(cell(r, "auth_tokens", "created_at")?),
        last_used_at: cell::<Option<i64>>(r, "auth_tokens", "last_used_at")?.map(from_ms),
    })
}

impl SqlStore {
    /// Creates or (with `replace`) updates an account; false when it exists and `replace` is off.
    pub async fn put_admin(
        &self,
        name: &str,
        role: &str,
        hash: &str,
        replace: bool,
        by: &str,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM admins WHERE name = $1").bind(name).fetch_optional(&mut *tx).await?;
        if exists.is_some() && !replace {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO admins (name, role, password_hash, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, password_hash = excluded.password_hash,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(role)
        .bind(hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut detail = format!("role {role}");
        if exists.is_some() {
            // A new password ends every session and API token of the account: whoever had the
            // old password may have made one.
            let ended = sqlx::query("DELETE FROM auth_tokens WHERE admin = $1").bind(name).execute(&mut *tx).await?;
            detail.push_str(&format!("; {} sessions and API tokens ended", ended.rows_affected()));
        }
        let action = if exists.is_some() { "admin.updated" } else { "admin.created" };
        audit(&mut tx, by, now, &[AuditEvent::new(action, name, detail)]).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The first account, made only while there is none (the first-run setup link); false
    /// once any account exists.
    pub async fn create_first_admin(&self, name: &str, role: &str, hash: &str, by: &str, now: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        if self.dialect == Dialect::Postgres {
            // Two services' setup links used at the same moment: the second waits here and
            // then finds the first one's account. (SQLite's BEGIN IMMEDIATE serializes already.)
            sqlx::query("LOCK TABLE admins IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
        }
        let any: Option<i64> = sqlx::query_scalar("SELECT 1 FROM admins LIMIT 1").fetch_optional(&mut *tx).await?;
        if any.is_some() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO admins (name, role, password_hash, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(name)
        .bind(role)
        .bind(hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let detail = format!("role {role}; the first account, made with the setup link");
        audit(&mut tx, by, now, &[AuditEvent::new("admin.created", name, detail)]).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn admin(&self, name: &str) -> Result<Option<AdminRow>> {
        let row = sqlx::query("SELECT * FROM admins WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        row.map(|r| admin_from_row(&r)).transpose()
    }

    pub async fn admins(&self) -> Result<Vec<AdminRow>> {
        let rows = sqlx::query("SELECT * FROM admins ORDER BY name").fetch_all(&self.pool).await?;
        // Lists never carry password hashes.
        rows.iter().map(|r| Ok(AdminRow { password_hash: String::new(), ..admin_from_row(r)? })).collect()
    }

    pub async fn delete_admin(&self, name: &str, by: &str, now: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM auth_tokens WHERE admin = $1").bind(name).execute(&mut *tx).await?;
        let deleted = sqlx::query("DELETE FROM admins WHERE name = $1").bind(name).execute(&mut *tx).await?;
        if deleted.rows_affected() == 1 {
            audit(&mut tx, by, now, &[AuditEvent::new("admin.deleted", name, "")]).await?;
        }
        tx.commit().await?;
        Ok(deleted.rows_affected() == 1)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn add_token(
        &self,
        token_hash: &str,
        kind: &str,
        admin: &str,
        label: &str,
        csrf: Option<&str>,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM auth_tokens WHERE expires_at IS NOT NULL AND expires_at < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO auth_tokens (token_hash, kind, admin, label, csrf, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(token_hash)
        .bind(kind)
        .bind(admin)
        .bind(label)
        .bind(csrf)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        if kind == "token" {
            audit(&mut tx, admin, now, &[AuditEvent::new("token.created", admin, label.to_string())]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The owner of an unexpired session or token.
    pub async fn token_owner(&self, token_hash: &str, now: i64) -> Result<Option<TokenOwner>> {
        let mut conn = self.pool.acquire().await?;
        Ok(self.token_owners(&mut conn, &[(token_hash, now)]).await?.remove(0))
    }

    /// `token_owner` for several tokens (each with its request's time) in one statement, on a
    /// connection `held` keeps: concurrent requests on PostgreSQL share a read instead of each
    /// paying a round trip and the pool's ping (`Store::token_owner`).
    pub async fn token_owners_held(
        &self,
        held: &mut super::Held,
        lookups: &[(&str, i64)],
    ) -> Result<Vec<Option<TokenOwner>>> {
        let owners = self.token_owners(held.get(&self.pool).await?, lookups).await;
        if owners.is_err() {
            held.failed();
        }
        owners
    }

    async fn token_owners(
        &self,
        conn: &mut sqlx::AnyConnection,
        lookups: &[(&str, i64)],
    ) -> Result<Vec<Option<TokenOwner>>> {
        // Each digest once (concurrent requests often bring the same token), its statement
        // text the same for as many.
        let mut hashes: Vec<&str> = lookups.iter().map(|&(hash, _)| hash).collect();
        hashes.sort_unstable();
        hashes.dedup();
        let list = (1..=hashes.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT t.token_hash, t.kind, t.admin, t.csrf, t.last_used_at, t.expires_at, a.role,
                    (SELECT COALESCE(MAX(version), 0) FROM relay_settings) AS settings_version,
                    (SELECT value FROM generations WHERE name = 'definitions') AS definitions
             FROM auth_tokens t JOIN admins a ON a.name = t.admin
             WHERE t.token_hash IN ({list})"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for hash in &hashes {
            query = query.bind(*hash);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let hash: String = cell(r, "auth_tokens", "token_hash")?;
            let expires_at: Option<i64> = cell(r, "auth_tokens", "expires_at")?;
            let last_used: Option<i64> = cell(r, "auth_tokens", "last_used_at")?;
            let owner = TokenOwner {
                admin: cell(r, "auth_tokens", "admin")?,
                role: cell(r, "admins", "role")?,
                kind: cell(r, "auth_tokens", "kind")?,
                csrf: cell(r, "auth_tokens", "csrf")?,
                settings_version: cell(r, "relay_settings", "settings_version")?,
                definitions: cell(r, "generations", "definitions")?,
                expires_at: expires_at.map(from_ms),
            };
            found.insert(hash, (owner, expires_at, last_used));
        }
        let mut touched = std::collections::HashSet::new();
        let mut owners = Vec::with_capacity(lookups.len());
        for &(hash, now) in lookups {
            let Some((owner, expires_at, last_used)) = found.get(hash) else {
                owners.push(None);
                continue;
            };
            // Expired as of the request's own time (a session or a token with an end).
            if expires_at.is_some_and(|end| end <= now) {
                owners.push(None);
                continue;
            }
            // An API token's last use, for the list an admin revokes from: written at most once a
            // minute per token, and only best-effort, so that reading a token never depends on
            // being able to write.
            if owner.kind == "token" && last_used.is_none_or(|t| t < now - 60_000) && touched.insert(hash) {
                let _ = sqlx::query("UPDATE auth_tokens SET last_used_at = $1 WHERE token_hash = $2")
                    .bind(now)
                    .bind(hash)
                    .execute(&mut *conn)
                    .await;
            }
            owners.push(Some(owner.clone()));
        }
        Ok(owners)
    }

    pub async fn delete_token(&self, token_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM auth_tokens WHERE token_hash = $1").bind(token_hash).execute(&self.pool).await?;
        Ok(())
    }

    /// API tokens (not sessions), of `admin` or of every account, oldest first.
    pub async fn tokens(&self, admin: Option<&str>) -> Result<Vec<TokenRow>> {
        let rows = sqlx::query(
            "SELECT * FROM auth_tokens WHERE kind = 'token' AND ($1 IS NULL OR admin = $1) ORDER BY created_at, admin",
        )
        .bind(admin)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Deletes the API token whose id (`TokenRow::id`) is `id` and audits it; `None` when no
    /// token has that id. The next request with it fails on every service: each request looks
    /// its token up.
    pub async fn revoke_token(&self, id: &str, by: &str, now: i64) -> Result<Option<TokenRow>> {
        let mut tx = self.write().await?;
        let sql = format!(
            "SELECT * FROM auth_tokens WHERE kind = 'token' AND substr(token_hash, 1, {TOKEN_ID_CHARS}) = $1{}",
            self.dialect.lock_rows()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_all(&mut *tx).await?;
        let [row] = &rows[..] else { return Ok(None) };
        let token = token_from_row(row)?;
        let hash: String = cell(row, "auth_tokens", "token_hash")?;
        sqlx::query("DELETE FROM auth_tokens WHERE token_hash = $1").bind(&hash).execute(&mut *tx).await?;
        let detail = format!("token {} ({})", token.id, token.label);
        audit(&mut tx, by, now, &[AuditEvent::new("token.revoked", &token.admin, detail)]).await?;
        tx.commit().await?;
        Ok(Some(token))
    }

    /// Reserves one sign-in attempt under each of `keys` (the account name, the client address)
    /// unless one of them already has `max` attempts at or after `since`; then returns
    /// `Blocked` with the oldest of that key's attempts. Counting and reserving are one
    /// serialized transaction (SQLite's write lock; an advisory lock on PostgreSQL), so parallel
    /// attempts cannot all pass the check before any is counted, on any number of services.
    pub async fn reserve_sign_in(&self, keys: &[(String, i64)], since: i64, now: i64) -> Result<SignInReservation> {
        let mut tx = self.write().await?;
        if self.dialect == super::Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(7215014)").execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM sign_in_attempts WHERE at < $1").bind(since).execute(&mut *tx).await?;
        for (key, max) in keys {
            let (count, oldest): (i64, Option<i64>) =
                sqlx::query_as("SELECT COUNT(*), MIN(at) FROM sign_in_attempts WHERE key = $1")
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?;
            if count >= *max {
                tx.commit().await?;
                return Ok(SignInReservation::Blocked { oldest: from_ms(oldest.unwrap_or(now)) });
            }
        }
        let mut ids = Vec::with_capacity(keys.len());
        for (key, _) in keys {
            let id: i64 = sqlx::query_scalar("INSERT INTO sign_in_attempts (key, at) VALUES ($1, $2) RETURNING id")
                .bind(key)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(SignInReservation::Reserved(ids))
    }

    /// After a successful sign-in: its reserved attempts are not failures, the failures under
    /// `forgiven` keys go, and `known` (name, client) is remembered as the account's address.
    pub async fn forgive_sign_in(
        &self,
        reserved: &[i64],
        forgiven: &[String],
        known: (&str, &str),
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        for id in reserved {
            sqlx::query("DELETE FROM sign_in_attempts WHERE id = $1").bind(id).execute(&mut *tx).await?;
        }
        for key in forgiven {
            sqlx::query("DELETE FROM sign_in_attempts WHERE key = $1").bind(key).execute(&mut *tx).await?;
        }
        sqlx::query(
            "INSERT INTO sign_in_known (name, client, at) VALUES ($1, $2, $3)
             ON CONFLICT (name, client) DO UPDATE SET at = excluded.at",
        )
        .bind(known.0)
        .bind(known.1)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether account `name` signed in successfully from `client` before.
    pub async fn is_known_client(&self, name: &str, client: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sign_in_known WHERE name = $1 AND client = $2")
            .bind(name)
            .bind(client)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Removes the counted failures of every key starting with one of `prefixes` (an unlock),
    /// audited as `admin.unlocked` of `name` by `by`; returns how many went.
    pub async fn clear_sign_in(&self, prefixes: &[String], name: &str, by: &str, now: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let mut n = 0;
        for p in prefixes {
            let done = sqlx::query("DELETE FROM sign_in_attempts WHERE substr(key, 1, length($1)) = $1")
                .bind(p)
                .execute(&mut *tx)
                .await?;
            n += done.rows_affected();
        }
        let event = AuditEvent::new("admin.unlocked", name, format!("{n} counted failed sign-in(s) forgotten"));
        super::audit(&mut tx, by, now, &[event]).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Counted attempts under `key` since `since`, and the oldest of them.
    pub async fn sign_in_count(&self, key: &str, since: i64) -> Result<(i64, Option<i64>)> {
        Ok(sqlx::query_as("SELECT COUNT(*), MIN(at) FROM sign_in_attempts WHERE key = $1 AND at >= $2")
            .bind(key)
            .bind(since)
            .fetch_one(&self.pool)
            .await?)
    }
}
