//! Service registry: each Panel Service and worker heartbeats into the store, so the CLI can tell
//! whether anything will process a queued step, and `panel services list` can show who runs.

use std::time::Duration;

use chrono::Utc;
use panel_store::{ServiceInfo, Store};
use tokio::task::JoinHandle;

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// A service whose last heartbeat is older than this is considered not running.
pub fn liveness_window() -> chrono::Duration {
    chrono::Duration::seconds(10)
}

pub struct ServiceHandle {
    pub info: ServiceInfo,
    task: JoinHandle<()>,
    store: Store,
}

impl ServiceHandle {
    /// Registers this process and keeps its heartbeat going until `stop`.
    pub async fn register(
        store: Store,
        kind: &str,
        listen: Option<String>,
        wake_port: Option<u16>,
    ) -> panel_store::Result<ServiceHandle> {
        let pid = std::process::id();
        let host = panel_relay::local_hostname();
        let info = ServiceInfo {
            id: format!("{kind}-{host}-{pid}-{:06x}", crate::random_u128() as u32 & 0xffffff),
            kind: kind.into(),
            host,
            pid: pid.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: Utc::now(),
            listen,
            wake_port,
        };
        store.heartbeat(&info, Utc::now()).await?;
        let (s, i) = (store.clone(), info.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = s.heartbeat(&i, Utc::now()).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        });
        Ok(ServiceHandle { info, task, store })
    }

    pub async fn stop(self) {
        self.task.abort();
        if let Err(e) = self.store.deregister(&self.info.id).await {
            tracing::warn!(error = %e, "could not deregister");
        }
    }
}
