//! Service registry: each Panel Service and worker heartbeats into the store, so the CLI can tell
//! whether anything will process a queued step, and `panel services list` can show who runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use panel_store::{ServiceInfo, Store};
use tokio::task::JoinHandle;

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Heartbeats between two looks for services that stopped without deregistering (a minute).
const PRUNE_EVERY_BEATS: u64 = 30;

/// A service whose last heartbeat is older than this is considered not running.
pub fn liveness_window() -> chrono::Duration {
    chrono::Duration::seconds(10)
}

/// What a service reports about the configuration it runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigReport {
    pub file: Option<String>,
    /// Key ids of the trusted license authorities.
    pub authorities: Vec<String>,
    /// What the admin must know: the file changed and needs a restart, or cannot be read.
    pub note: Option<String>,
}

pub struct ServiceHandle {
    /// As registered; the configuration part is kept current in `current`.
    pub info: ServiceInfo,
    current: Arc<Mutex<ServiceInfo>>,
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
        config: ConfigReport,
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
            config_file: config.file,
            authorities: config.authorities,
            config_note: config.note,
        };
        store.heartbeat(&info, Utc::now()).await?;
        let current = Arc::new(Mutex::new(info.clone()));
        let (s, i) = (store.clone(), current.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            let mut beats: u64 = 0;
            loop {
                tick.tick().await;
                beats += 1;
                let info = i.lock().expect("not poisoned").clone();
                if let Err(e) = s.heartbeat(&info, Utc::now()).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                // Services that died without deregistering are forgotten after an hour; looked
                // for once a minute (a write), not at every heartbeat.
                if beats % PRUNE_EVERY_BEATS == 1
                    && let Err(e) = s.prune_services(Utc::now() - chrono::Duration::hours(1)).await
                {
                    tracing::warn!(error = %e, "could not forget services that stopped heartbeating");
                }
            }
        });
        Ok(ServiceHandle { info, current, task, store })
    }

    /// What a task that watches the config file publishes through.
    pub fn config_reporter(&self) -> ConfigReporter {
        ConfigReporter { current: self.current.clone(), store: self.store.clone() }
    }

    pub async fn stop(self) {
        self.task.abort();
        if let Err(e) = self.store.deregister(&self.info.id).await {
            tracing::warn!(error = %e, "could not deregister");
        }
    }
}

/// Publishes what a service runs with after its config file changed.
#[derive(Clone)]
pub struct ConfigReporter {
    current: Arc<Mutex<ServiceInfo>>,
    store: Store,
}

impl ConfigReporter {
    /// At once, rather than at the next heartbeat; the heartbeat keeps it from then on.
    pub async fn report(&self, config: ConfigReport) {
        let info = {
            let mut i = self.current.lock().expect("not poisoned");
            i.config_file = config.file;
            i.authorities = config.authorities;
            i.config_note = config.note;
            i.clone()
        };
        if let Err(e) = self.store.heartbeat(&info, Utc::now()).await {
            tracing::warn!(error = %e, "could not publish the service's configuration");
        }
    }
}
