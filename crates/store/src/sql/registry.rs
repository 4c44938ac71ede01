//! Running services: heartbeats, deregistration, the list (stale entries pruned), and the relay
//! checks the CLI asks them to run.

use super::*;
use crate::{Result, from_ms};

impl SqlStore {
    pub async fn heartbeat(&self, s: &ServiceInfo, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO services (id, kind, host, pid, version, started_at, heartbeat_at, listen, wake_port,
                                   config_file, authorities, config_note)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, listen = excluded.listen,
                                            wake_port = excluded.wake_port, config_file = excluded.config_file,
                                            authorities = excluded.authorities, config_note = excluded.config_note",
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
        .bind(&s.config_file)
        .bind(serde_json::to_string(&s.authorities).expect("strings serialize"))
        .bind(&s.config_note)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets services whose last heartbeat is older than `before` (they died without
    /// deregistering). Done by the heartbeats, not by the readers.
    pub async fn prune_services(&self, before: i64) -> Result<()> {
        sqlx::query("DELETE FROM services WHERE heartbeat_at < $1").bind(before).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn deregister(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM services WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Services that heartbeat at or after `fresh_after`: a plain read (every enqueue asks).
    pub async fn services(&self, fresh_after: i64) -> Result<Vec<ServiceRow>> {
        let rows = sqlx::query("SELECT * FROM services WHERE heartbeat_at >= $1 ORDER BY started_at")
            .bind(fresh_after)
            .fetch_all(&self.pool)
            .await?;
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
                        config_file: cell(&r, "services", "config_file")?,
                        authorities: json(&cell::<String>(&r, "services", "authorities")?)?,
                        config_note: cell(&r, "services", "config_note")?,
                    },
                    heartbeat_at: from_ms(cell(&r, "services", "heartbeat_at")?),
                })
            })
            .collect()
    }
}

/// A check request not taken within this long is abandoned (its CLI ran the check itself).
const CHECK_CLAIM_WINDOW_MS: i64 = 60_000;

impl SqlStore {
    /// Asks the running services for a relay check; returns the request's id. Requests older
    /// than a day go at the same time.
    pub async fn request_check(&self, by: &str, now: i64) -> Result<i64> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM check_requests WHERE requested_at < $1")
            .bind(now - 86_400_000)
            .execute(&mut *tx)
            .await?;
        let id: i64 =
            sqlx::query_scalar("INSERT INTO check_requests (requested_at, requested_by) VALUES ($1, $2) RETURNING id")
                .bind(now)
                .bind(by)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Takes the oldest open check request for `service`, if any; exactly one service gets it
    /// (the update re-checks that nobody claimed it first).
    pub async fn claim_check(&self, service: &str, now: i64) -> Result<Option<i64>> {
        // Asked on every idle turn of every worker: a plain read, and the write lock (which
        // enqueues wait for on SQLite) only when there is a request to take.
        let open: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM check_requests WHERE claimed_by IS NULL AND requested_at >= $1 ORDER BY id LIMIT 1",
        )
        .bind(now - CHECK_CLAIM_WINDOW_MS)
        .fetch_optional(&self.pool)
        .await?;
        let Some(id) = open else { return Ok(None) };
        let mut tx = self.write().await?;
        let taken = sqlx::query(
            "UPDATE check_requests SET claimed_by = $1, claimed_at = $2 WHERE id = $3 AND claimed_by IS NULL",
        )
        .bind(service)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((taken.rows_affected() == 1).then_some(id))
    }

    pub async fn finish_check(&self, id: i64, report: &str, now: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE check_requests SET report = $1, finished_at = $2 WHERE id = $3")
            .bind(report)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Who took request `id` (if anyone yet) and the report (once finished).
    pub async fn check_request(&self, id: i64) -> Result<Option<(Option<String>, Option<String>)>> {
        Ok(sqlx::query_as("SELECT claimed_by, report FROM check_requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Withdraws an unclaimed request (the CLI stopped waiting and checks by itself).
    pub async fn withdraw_check(&self, id: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query("DELETE FROM check_requests WHERE id = $1 AND claimed_by IS NULL")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }
}
