//! Running services: heartbeats, deregistration, and the list (stale entries pruned).

use super::*;
use crate::{Result, from_ms};

impl SqlStore {
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
}
