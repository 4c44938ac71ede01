//! `Panel`, the one door to the service's operations for the CLI, the API and the UI: the store,
//! the secrets, the metrics and the clock it holds, and the operations that span areas (the
//! dashboard, services, wake-ups). The others live by area: `settings.rs`, `queue.rs`,
//! `automation.rs`, `accounts.rs`, `vault.rs`, `licensing.rs`.

use std::sync::Arc;

use chrono::Utc;
use panel_domain::RelaySettings;
use panel_store::{ServiceRow, Store};

pub(crate) use crate::queue::validate_idempotency_key;
pub use crate::queue::{message_filter, parse_since};
pub use crate::settings::effective_view;

use crate::metrics::Metrics;
use crate::vault::{Secrets, SecretsConfig};

use crate::clock::{Clock, SystemClock};
use crate::error::OpsError;
use crate::registry::{ConfigReport, ServiceHandle};
use crate::views::{AuditEntry, Dashboard, Service};
use crate::wake::{self, Waker};

/// What the CLI and API hold: the store, the trusted license authorities and master key file,
/// and a way to wake workers after an enqueue.
#[derive(Clone)]
pub struct Panel {
    /// Only the service reaches the store: the web and CLI crates go through operations.
    pub(crate) store: Store,
    pub(crate) secrets: Arc<Secrets>,
    /// What this process did, for /metrics.
    pub metrics: Arc<Metrics>,
    /// Set inside a Panel Service: wakes its own worker without a round trip.
    pub local_waker: Option<Waker>,
    /// The time every operation uses (a test moves its own).
    clock: Arc<dyn Clock>,
    /// The live services as last read, and when: every enqueue wakes them and says whether one
    /// runs, and that need not cost a query each.
    services_seen: Arc<std::sync::Mutex<Option<ServicesSeen>>>,
    /// This process's first-run setup link, while it is open (`Panel::open_setup`).
    pub(crate) setup: Arc<std::sync::Mutex<Option<crate::accounts::SetupLink>>>,
    /// The key that signs VERP tokens, once read (`bounces.rs`).
    pub(crate) bounce_key: Arc<std::sync::OnceLock<ring::hmac::Key>>,
    /// Inside a Panel Service on PostgreSQL: asks a task of its own to NOTIFY the other
    /// services, so that an enqueue's answer does not wait for that round trip, and wake-ups
    /// asked for while one is on its way go out together as the next.
    notifier: Arc<std::sync::OnceLock<Arc<tokio::sync::Notify>>>,
    /// The enabled workflows and their templates, as of a definitions generation
    /// (`automation.rs`): an event reads them only when the generation moved.
    pub(crate) workflows: Arc<std::sync::Mutex<Option<Arc<crate::automation::Workflows>>>>,
    /// The newest valid relay settings this process read, with their version.
    settings_kept: Arc<std::sync::Mutex<Option<(i64, RelaySettings)>>>,
    /// Set for one request (`Panel::as_seen`): what was current when it was authenticated.
    pub(crate) seen: Option<Seen>,
}

/// The relay settings version and the definitions generation current while a request was
/// authenticated, read in the statement that read its token (or kept with its owner, `Kept`:
/// then its write confirms the settings version is still current). Both only ever move forward, so
/// settings and workflows kept in memory that are at least this new are what a read of its
/// own during the request would have given: the request takes them without that read (on
/// PostgreSQL a round trip, with a pooled connection's pings, for every message sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub settings: i64,
    pub definitions: i64,
    /// Set when the token's owner was one this service kept (`Panel::authenticate_kept`): the
    /// request's write carries its fence.
    pub kept: Option<Arc<Kept>>,
}

/// A request authenticated by a kept token owner (`Store::token_owner_kept`): the fence its
/// write carries, and the least role the request needs, which a read of its token after the
/// fence did not hold must still show (`Panel::reauthorized`).
#[derive(Debug, PartialEq, Eq)]
pub struct Kept {
    pub(crate) fence: panel_store::AccessFence,
    pub(crate) needs: crate::accounts::Role,
}

/// A read of the live services and when it was made.
type ServicesSeen = (std::time::Instant, Vec<ServiceRow>);

/// How long a read of the live services serves enqueues.
const SERVICES_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// A saved settings version, with what the admin must know about it (e.g. a detached credential).
#[derive(Debug, Clone)]
pub struct SettingsUpdate {
    pub version: i64,
    pub settings: RelaySettings,
    pub notices: Vec<String>,
}

impl Panel {
    pub fn new(store: Store, secrets: SecretsConfig) -> Panel {
        Panel {
            store,
            secrets: Arc::new(Secrets::new(secrets)),
            metrics: Arc::default(),
            local_waker: None,
            clock: Arc::new(SystemClock),
            services_seen: Arc::default(),
            notifier: Arc::default(),
            setup: Arc::default(),
            bounce_key: Arc::default(),
            workflows: Arc::default(),
            settings_kept: Arc::default(),
            seen: None,
        }
    }

    /// This Panel for one request authenticated when `seen` was current (`Seen`).
    pub fn as_seen(&self, seen: Seen) -> Panel {
        Panel { seen: Some(seen), ..self.clone() }
    }

    /// The fence a write for this request carries (`Kept`), if its token owner was kept.
    pub(crate) fn fence(&self) -> Option<panel_store::AccessFence> {
        self.seen.as_ref()?.kept.as_ref().map(|kept| kept.fence.clone())
    }

    /// This request as of a read of its token now, for a write whose fence did not hold
    /// (`StoreError::Stale`) or that cannot carry one: what the read says, or why the request is
    /// refused now (the token is gone, or its role no longer allows the request). A request
    /// whose token owner was not kept is already as of a read: itself.
    pub(crate) async fn reauthorized(&self) -> Result<Panel, OpsError> {
        let Some(kept) = self.seen.as_ref().and_then(|seen| seen.kept.clone()) else { return Ok(self.clone()) };
        let owner = self.store.token_owner(kept.fence.token_hash(), self.now()).await?.ok_or(OpsError::SignedOut)?;
        let role = crate::accounts::Role::parse(&owner.role).unwrap_or(crate::accounts::Role::Viewer);
        if role < kept.needs {
            return Err(OpsError::Forbidden(crate::accounts::role_refusal(role, kept.needs)));
        }
        Ok(self.as_seen(Seen { settings: owner.settings_version, definitions: owner.definitions, kept: None }))
    }

    /// The settings kept in memory, when they are at least as new as the request saw.
    pub(crate) fn kept_settings(&self) -> Option<(i64, RelaySettings)> {
        let seen = self.seen.as_ref()?;
        self.settings_kept.lock().expect("not poisoned").clone().filter(|(version, _)| *version >= seen.settings)
    }

    /// Keeps `read` when it is newer than the settings kept.
    pub(crate) fn keep_settings(&self, read: &Option<(i64, RelaySettings)>) {
        let Some((version, settings)) = read else { return };
        let mut kept = self.settings_kept.lock().expect("not poisoned");
        if kept.as_ref().is_none_or(|(old, _)| old < version) {
            *kept = Some((*version, settings.clone()));
        }
    }

    /// The same Panel on another clock (the in-process tests' `ManualClock`).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Panel {
        self.clock = clock;
        self
    }

    pub(crate) fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Now, by this Panel's clock.
    pub fn now(&self) -> chrono::DateTime<Utc> {
        self.clock.now()
    }

    /// Opens (creating if needed) the database at `url`, applies pending migrations, and
    /// returns the Panel on it.
    pub async fn open(url: &str, secrets: SecretsConfig) -> Result<Panel, OpsError> {
        Ok(Panel::new(Store::open(url).await?, secrets))
    }

    /// The schema version the database has, and the one this build needs.
    pub async fn schema_version(&self) -> Result<(i64, i64), OpsError> {
        Ok(self.store.schema_version().await?)
    }

    /// True when several services share the database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// Registers this process as a running service and keeps its heartbeat going.
    pub async fn register_service(
        &self,
        kind: &str,
        listen: Option<String>,
        wake_port: Option<u16>,
        config: ConfigReport,
    ) -> Result<ServiceHandle, OpsError> {
        Ok(ServiceHandle::register(self.store.clone(), kind, listen, wake_port, config).await?)
    }

    /// Wakes `waker` when another service enqueues on a shared database (PostgreSQL NOTIFY).
    pub async fn listen_for_wakes(&self, waker: Waker) -> Result<(), OpsError> {
        Ok(wake::listen_shared(&self.store, waker).await?)
    }

    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, OpsError> {
        Ok(self.store.audit_log(limit).await?.into_iter().map(Into::into).collect())
    }

    /// Services, the queue, counts per hour over the last day, the last relay error, and the
    /// banner the admin must see first.
    pub async fn dashboard(&self) -> Result<Dashboard, OpsError> {
        use chrono::Timelike;
        let now = self.now();
        let services = self.live_services().await?;
        let queue = self.queue().await?;
        let start = now.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0)).unwrap_or(now)
            - chrono::Duration::hours(23);
        let counts = self.store.hourly_counts(start).await?;
        let (hours, last_hour, last_day) = Dashboard::tally(start, &counts);
        let last_error: Option<crate::views::RelayError> = self.store.last_relay_error().await?.map(Into::into);
        let settings = self.settings().await;
        let routes = match &settings {
            Ok(Some((_, s))) => {
                let names: Vec<String> = s.routes().map(|(n, _)| n.to_string()).collect();
                let last = self.store.route_attempts(&names).await?;
                crate::views::RouteStatus::of(
                    s.routes()
                        .zip(last)
                        .map(|((name, r), last)| (name.to_string(), r.endpoint(), last.map(Into::into)))
                        .collect(),
                )
            }
            _ => Vec::new(),
        };
        // A failing route while another carries the mail: no message waits, but the admin
        // must know the route they count on is down.
        let failover = match routes.iter().position(|r| r.state == "in use") {
            Some(used) if used > 0 => routes[..used].iter().find_map(|r| {
                let a = r.last.as_ref()?;
                Some(format!(
                    "Route {} is failing (at {}: {}); mail goes by route {} until it is back.",
                    r.name, a.stage, a.detail, routes[used].name
                ))
            }),
            _ => None,
        };
        let storage = self.storage_fault();
        let banner = match (&settings, &last_error) {
            _ if let Some(f) = &storage => Some(format!(
                "The database cannot be written since {}: {}. New mail is refused (503) and nothing acknowledged \
                 is lost; free space on the data directory's disk and Panel resumes by itself.",
                f.since.format("%Y-%m-%d %H:%M:%S UTC"),
                f.reason
            )),
            (Ok(None), _) => Some(
                "No relay settings yet: nothing can be sent. Configure the relay under Relay settings.".to_string(),
            ),
            (Err(e), _) => Some(format!("The relay settings are broken: {e}")),
            _ if failover.is_some() => failover,
            (_, Some(e))
                if e.current
                    && e.outcome == panel_domain::AttemptOutcome::ConfigurationError
                    && e.stage.is_inside_panel() =>
            {
                Some(format!(
                    "Sending is stopped by Panel's own configuration, not by the relay: {}. Fix it where the \
                     hint says; held messages are sent again automatically.",
                    e.detail
                ))
            }
            (_, Some(e)) if e.current && e.outcome == panel_domain::AttemptOutcome::ConfigurationError => {
                Some(format!(
                    "Sending is stopped by a configuration error at {}: {}. Fix the relay settings; held messages are sent again automatically.",
                    e.stage,
                    e.reply.clone().unwrap_or_else(|| e.detail.clone())
                ))
            }
            (_, Some(e)) if e.current => Some(format!(
                "The relay is failing: the last attempt ({}) failed at {}: {}. Messages wait and are retried.",
                e.relay,
                e.stage,
                e.reply.clone().unwrap_or_else(|| e.detail.clone())
            )),
            // Sending works again, but what the error held is not sent yet: say so until none is.
            _ if queue.held > 0 => Some(format!(
                "{} message(s) are held by an earlier configuration error. They are sent again by themselves \
                 when the settings, a credential, a license or a file the settings read changes, or when a \
                 delivery or check gets past the stage that held them; `panel messages retry --status failed` \
                 sends them now.",
                queue.held
            )),
            _ => None,
        };
        // A new installation: the fields a relay needs, named as the form names them.
        let missing = match &settings {
            Ok(None) => panel_domain::settings::table::SETTINGS
                .iter()
                .filter(|s| matches!(s.default, panel_domain::settings::table::Default::Required))
                .map(|s| s.label.to_string())
                .collect(),
            _ => Vec::new(),
        };
        let policy = settings.as_ref().ok().and_then(|s| s.as_ref()).and_then(|(_, s)| s.policy.notice());
        Ok(Dashboard { services, queue, last_hour, last_day, hours, last_error, banner, missing, policy, routes })
    }

    /// The Prometheus exposition: this process's counters and the shared queue's gauges.
    pub async fn metrics_text(&self) -> Result<String, OpsError> {
        let stats = self.store.queue_stats(self.now()).await?;
        let interrupted = self.store.interrupted_attempts().await?;
        let mut text = self.metrics.render(&stats, interrupted, self.storage_fault().is_none());
        if let Ok(Some((_, settings))) = self.settings().await {
            // A test installation redirecting, or one restricted to some domains, shows on a graph.
            let policy = &settings.policy;
            text.push_str(&format!(
                "# HELP panel_recipient_policy The recipient policy in force (mode deliver or redirect; restricted \
                 when only the allowed domains get mail).\n# TYPE panel_recipient_policy gauge\n\
                 panel_recipient_policy{{mode=\"{}\",restricted=\"{}\"}} 1\n",
                policy.mode,
                !policy.allowed_domains.is_empty()
            ));
        }
        Ok(text)
    }

    /// Set while this process's writes to the database fail (a full disk, an I/O error): new
    /// mail is refused with 503 and `/readyz` says why. Clears by itself a few seconds after the
    /// last failed write (`STORAGE_FAULT_HOLD`).
    pub fn storage_fault(&self) -> Option<panel_store::StorageFault> {
        self.store.storage_fault()
    }

    /// Services whose heartbeat is recent.
    pub async fn live_services(&self) -> Result<Vec<Service>, OpsError> {
        Ok(self.live_service_rows().await?.into_iter().map(Into::into).collect())
    }

    async fn live_service_rows(&self) -> Result<Vec<ServiceRow>, OpsError> {
        Ok(self.store.services(self.now() - crate::liveness_window()).await?)
    }

    /// Whether any Panel Service or worker runs: what an enqueue's answer says. Read at most
    /// once a second per process (a service's heartbeat comes every two), not once per message.
    pub async fn service_running(&self) -> Result<bool, OpsError> {
        Ok(!self.recent_services().await?.is_empty())
    }

    /// The live services, as read within the last second.
    async fn recent_services(&self) -> Result<Vec<ServiceRow>, OpsError> {
        if let Some((at, rows)) = self.services_seen.lock().expect("not poisoned").as_ref()
            && at.elapsed() < SERVICES_FRESH
        {
            return Ok(rows.clone());
        }
        let rows = self.live_service_rows().await?;
        *self.services_seen.lock().expect("not poisoned") = Some((std::time::Instant::now(), rows.clone()));
        Ok(rows)
    }

    /// The service's notifier task, started at the first wake-up it sends.
    fn notifier(&self) -> &Arc<tokio::sync::Notify> {
        self.notifier.get_or_init(|| {
            let asked = Arc::new(tokio::sync::Notify::new());
            let (waiting, store) = (asked.clone(), self.store.clone());
            tokio::spawn(async move {
                loop {
                    waiting.notified().await;
                    notify_services(&store).await;
                }
            });
            asked
        })
    }

    /// `wake_workers` after a write whose commit woke every service already (the store's
    /// enqueues and events: `Store::enqueue`, `enqueue_once`, `enqueue_many`, `record_event`):
    /// on PostgreSQL, only this service's own workers are left to tell, at once instead of by
    /// the NOTIFY's round trip.
    pub(crate) async fn wake_workers_after_commit(&self) {
        if !self.store.is_shared() {
            return self.wake_workers().await;
        }
        if let Some(w) = &self.local_waker {
            w.wake();
        }
    }

    pub(crate) async fn wake_workers(&self) {
        if let Some(w) = &self.local_waker {
            w.wake();
        }
        if self.store.is_shared() {
            match self.local_waker {
                // A service lives on: its notifier sends the NOTIFY (a wake-up is best effort;
                // the poll is the safety net either way).
                Some(_) => self.notifier().notify_one(),
                // A CLI command exits after it returns: it sends the NOTIFY itself.
                None => notify_services(&self.store).await,
            }
            return;
        }
        let local_host = panel_relay::local_hostname();
        let own = self.local_waker.as_ref().and_then(Waker::port);
        if let Ok(services) = self.recent_services().await {
            let ports = services.into_iter().filter(|s| s.info.host == local_host).filter_map(|s| s.info.wake_port);
            wake::poke(ports.filter(|&p| Some(p) != own));
        }
    }
}

/// NOTIFYs the services sharing the store; a failure is only logged (their poll picks the work up).
async fn notify_services(store: &Store) {
    if let Err(e) = store.notify_wake().await {
        tracing::warn!(error = %e, "could not notify the other services; their poll picks the work up");
    }
}
