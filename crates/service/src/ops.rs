//! Operations shared by the CLI and the REST API: the same validation, the same errors.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::settings::patch::SettingsEvent;
use panel_domain::{
    Auth, CredentialKind, FieldErrors, MessageState, Origin, OutgoingMessage, RelaySettings, SettingsDoc,
};
use panel_relay::CheckReport;
use panel_store::{AuditEvent, ServiceRow, Store};

use crate::credential_source::StoredCredentials;
use crate::metrics::Metrics;
use crate::vault::{Secrets, SecretsConfig};

use crate::clock::{Clock, SystemClock};
use crate::error::OpsError;
use crate::registry::ServiceHandle;
use crate::views::{
    AuditEntry, Dashboard, MessageDetail, MessageFilter, MessageSummary, QueueStats, RetryResult, Service,
    StoredSettings,
};
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
}

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
    ) -> Result<ServiceHandle, OpsError> {
        Ok(ServiceHandle::register(self.store.clone(), kind, listen, wake_port).await?)
    }

    /// Wakes `waker` when another service enqueues on a shared database (PostgreSQL NOTIFY).
    pub async fn listen_for_wakes(&self, waker: Waker) -> Result<(), OpsError> {
        Ok(wake::listen_shared(&self.store, waker).await?)
    }

    /// The message log, newest first.
    pub async fn messages(&self, filter: &MessageFilter) -> Result<Vec<MessageSummary>, OpsError> {
        Ok(self.store.list_messages(filter).await?.into_iter().map(Into::into).collect())
    }

    /// A message with every recipient and attempt.
    pub async fn message(&self, id: i64) -> Result<MessageDetail, OpsError> {
        Ok(self.store.message(id).await?.ok_or(OpsError::NotFound(id))?.into())
    }

    /// The message as queued (headers, text, HTML, attachments), to show what was sent.
    pub async fn message_content(&self, id: i64) -> Result<Option<OutgoingMessage>, OpsError> {
        Ok(self.store.message_content(id).await?)
    }

    pub async fn queue(&self) -> Result<QueueStats, OpsError> {
        Ok(self.store.queue_stats(self.now()).await?.into())
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
        let banner = match (&settings, &last_error) {
            (Ok(None), _) => Some(
                "No relay settings yet: nothing can be sent. Configure the relay under Relay settings.".to_string(),
            ),
            (Err(e), _) => Some(format!("The relay settings are broken: {e}")),
            (_, Some(e)) if e.current && e.outcome == "configuration_error" => Some(format!(
                "Sending is stopped by a configuration error at {}: {}. Fix the relay settings; held messages are sent again automatically.",
                e.stage,
                e.reply.clone().unwrap_or_else(|| e.detail.clone())
            )),
            (_, Some(e)) if e.current => Some(format!(
                "The relay is failing: the last attempt ({}) failed at {}: {}. Messages wait and are retried.",
                e.relay,
                e.stage,
                e.reply.clone().unwrap_or_else(|| e.detail.clone())
            )),
            _ => None,
        };
        Ok(Dashboard { services, queue, last_hour, last_day, hours, last_error, banner })
    }

    /// The settings in force, validated; `None` before the first save.
    pub async fn settings(&self) -> Result<Option<(i64, RelaySettings)>, OpsError> {
        let Some(stored) = self.store.current_settings().await? else { return Ok(None) };
        RelaySettings::validate(&stored.doc)
            .map(|s| Some((stored.version, s)))
            .map_err(|errors| OpsError::StoredSettingsInvalid { version: stored.version, errors })
    }

    pub async fn stored_settings(&self) -> Result<Option<StoredSettings>, OpsError> {
        Ok(self.store.current_settings().await?.map(Into::into))
    }

    /// Applies `patch` to the stored settings by the patch rules (`settings::patch::apply`: every
    /// field validated once, nothing stored on error, a credential bound to its relay endpoint),
    /// then checks what only the service can: the CA file is readable, the credential exists and
    /// is of the kind the auth mode needs.
    pub async fn update_settings(&self, patch: &SettingsDoc, by: &str) -> Result<SettingsUpdate, OpsError> {
        let current = self.store.current_settings().await?;
        let (version, old_doc) = match current {
            Some(s) => (s.version, s.doc),
            None => (0, SettingsDoc::default()),
        };
        let applied = panel_domain::settings::patch::apply(patch, &old_doc).map_err(OpsError::Invalid)?;
        let mut errors = FieldErrors::default();
        if let Some(ca) = &applied.settings.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            errors.push("ca_file", format!("{} cannot be read: {e}", ca.display()));
        }
        if let Some(name) = applied.settings.auth.credential() {
            self.check_credential_kind(&applied.settings.auth, name, &mut errors).await?;
        }
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        let events: Vec<AuditEvent> = applied
            .events
            .iter()
            .map(|e| match e {
                SettingsEvent::CredentialAttached { credential, relay } => {
                    AuditEvent::new("credential.attached", credential, format!("to relay {relay}"))
                }
                SettingsEvent::CredentialDetached { credential, from, to } => {
                    AuditEvent::new("credential.detached", credential, format!("relay changed from {from} to {to}"))
                }
            })
            .collect();
        let new_version = self.store.save_settings(version, &applied.doc, by, self.now(), &events).await?;
        // Workers pick the new version up on their next claim; wake them so held messages go now.
        self.wake_workers().await;
        Ok(SettingsUpdate { version: new_version, settings: applied.settings, notices: applied.notices })
    }

    /// The named credential must exist and be of the kind the auth mode needs.
    async fn check_credential_kind(&self, auth: &Auth, name: &str, errors: &mut FieldErrors) -> Result<(), OpsError> {
        let wanted = match auth {
            Auth::OAuth2 { provider, .. } => CredentialKind::for_provider(*provider),
            _ => CredentialKind::Password,
        };
        match self.store.credential(name).await? {
            None => errors.push(
                "credential",
                format!("no stored credential is named '{name}'; store it first: panel credential set {name} ..."),
            ),
            Some(c) if c.kind != wanted.as_str() => errors.push(
                "credential",
                format!(
                    "'{name}' is a {} credential, but auth = {} needs a {wanted} credential",
                    c.kind,
                    auth.as_str()
                ),
            ),
            Some(_) => {}
        }
        Ok(())
    }

    pub async fn check(&self) -> Result<CheckReport, OpsError> {
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        let credentials = StoredCredentials::for_settings(self, &settings, "smtp check");
        Ok(panel_relay::check(Arc::new(settings), credentials).await)
    }

    /// Enqueues the Test Message: to the Fallback recipient, or to `to` instead.
    pub async fn enqueue_test(&self, to: Option<&str>) -> Result<i64, OpsError> {
        let (version, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        let now = self.now();
        let draft = Draft {
            to: to.map(|t| vec![t.to_string()]).unwrap_or_default(),
            subject: "Panel test message".into(),
            text: format!(
                "This is a test message from Panel.\n\n\
                 It was enqueued at {} and sent through the relay {}:{} ({}), relay settings version {}.\n\
                 If you can read this, Panel can deliver mail.\n",
                now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                settings.host,
                settings.port,
                settings.security,
                version
            ),
            ..Default::default()
        };
        Ok(self.enqueue(Origin::TestMessage, &draft, &settings, None).await?.0)
    }

    /// The mail tester and any other ad-hoc message. With an idempotency key the step is created
    /// once, however often (and from however many services) it is enqueued: (id, created).
    pub async fn enqueue_draft(
        &self,
        origin: Origin,
        draft: &Draft,
        idempotency_key: Option<&str>,
    ) -> Result<(i64, bool), OpsError> {
        let key = idempotency_key
            .map(validate_idempotency_key)
            .transpose()
            .map_err(|e| OpsError::Invalid(FieldErrors(vec![e])))?;
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        self.enqueue(origin, draft, &settings, key).await
    }

    /// Many messages at once (a dispatching tool, a run over many users): every draft is
    /// validated first and errors name their index; then one transaction stores them all.
    pub async fn enqueue_drafts(&self, origin: Origin, drafts: &[Draft]) -> Result<Vec<i64>, OpsError> {
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        let now = self.now();
        let mut errors = FieldErrors::default();
        let mut messages = Vec::with_capacity(drafts.len());
        for (i, draft) in drafts.iter().enumerate() {
            match OutgoingMessage::prepare(
                draft,
                &settings.from,
                &settings.fallback_recipient,
                now,
                crate::random_u128(),
            ) {
                Ok(m) => messages.push((origin, m)),
                Err(e) => errors.0.extend(e.0.into_iter().map(|f| panel_domain::FieldError {
                    field: format!("messages[{i}].{}", f.field),
                    message: f.message,
                })),
            }
        }
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        let ids = self.store.enqueue_many(&messages, now).await?;
        for _ in &ids {
            self.metrics.step_enqueued(origin.as_str());
        }
        self.wake_workers().await;
        Ok(ids)
    }

    async fn enqueue(
        &self,
        origin: Origin,
        draft: &Draft,
        settings: &RelaySettings,
        key: Option<&str>,
    ) -> Result<(i64, bool), OpsError> {
        let now = self.now();
        let message =
            OutgoingMessage::prepare(draft, &settings.from, &settings.fallback_recipient, now, crate::random_u128())
                .map_err(OpsError::Invalid)?;
        let (id, created) = match key {
            Some(k) => self.store.enqueue_once(origin, &message, now, k).await?,
            None => (self.store.enqueue(origin, &message, now).await?, true),
        };
        if created {
            self.metrics.step_enqueued(origin.as_str());
            self.wake_workers().await;
        }
        Ok((id, created))
    }

    pub async fn retry(&self, id: i64) -> Result<RetryResult, OpsError> {
        let result = self.store.retry_message(id, self.now()).await?;
        if result == RetryResult::Requeued {
            self.wake_workers().await;
        }
        Ok(result)
    }

    /// Re-queues every failed message that failed at or after `since` (all of them without it).
    pub async fn retry_failed(&self, since: Option<chrono::DateTime<Utc>>) -> Result<u64, OpsError> {
        let since = since.unwrap_or(chrono::DateTime::UNIX_EPOCH);
        let n = self.store.retry_failed(since, self.now()).await?;
        if n > 0 {
            self.wake_workers().await;
        }
        Ok(n)
    }

    /// The Prometheus exposition: this process's counters and the shared queue's gauges.
    pub async fn metrics_text(&self) -> Result<String, OpsError> {
        let stats = self.store.queue_stats(self.now()).await?;
        let interrupted = self.store.interrupted_attempts().await?;
        Ok(self.metrics.render(&stats, interrupted))
    }

    /// Services whose heartbeat is recent.
    pub async fn live_services(&self) -> Result<Vec<Service>, OpsError> {
        Ok(self.live_service_rows().await?.into_iter().map(Into::into).collect())
    }

    async fn live_service_rows(&self) -> Result<Vec<ServiceRow>, OpsError> {
        let now = self.now();
        let rows = self.store.services(now - chrono::Duration::hours(1)).await?;
        Ok(rows.into_iter().filter(|s| s.heartbeat_at >= now - crate::liveness_window()).collect())
    }

    pub(crate) async fn wake_workers(&self) {
        if let Some(w) = &self.local_waker {
            w.wake();
        }
        if self.store.is_shared() {
            if let Err(e) = self.store.notify_wake().await {
                tracing::warn!(error = %e, "could not notify the other services; their poll picks the work up");
            }
            return;
        }
        let local_host = panel_relay::local_hostname();
        if let Ok(services) = self.live_service_rows().await {
            wake::poke(services.into_iter().filter(|s| s.info.host == local_host).filter_map(|s| s.info.wake_port))
                .await;
        }
    }

    /// Waits until message `id` is delivered or failed, or `limit` passes; returns its last state.
    pub async fn wait_for(&self, id: i64, limit: Duration) -> Result<MessageDetail, OpsError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut delay = Duration::from_millis(5);
        loop {
            let state = self.store.message_state(id).await?.ok_or(OpsError::NotFound(id))?;
            let settled = matches!(state, MessageState::Delivered | MessageState::Failed)
                || (state == MessageState::Retrying && self.has_attempt(id).await?);
            if settled || tokio::time::Instant::now() >= deadline {
                return self.message(id).await;
            }
            tokio::time::sleep(delay.min(deadline - tokio::time::Instant::now())).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    async fn has_attempt(&self, id: i64) -> Result<bool, OpsError> {
        Ok(self.store.message(id).await?.is_some_and(|m| !m.attempts.is_empty()))
    }
}

/// Idempotency keys are caller-chosen names like `nightly-report@2026-11-26T02:00Z`.
pub(crate) fn validate_idempotency_key(key: &str) -> Result<&str, panel_domain::FieldError> {
    let k = key.trim();
    if k.is_empty() || k.len() > 200 || k.chars().any(char::is_control) {
        return Err(panel_domain::FieldError::new(
            "idempotency_key",
            "must be 1-200 characters without control characters",
        ));
    }
    Ok(k)
}

/// The message log's filter from its text form (API query, UI form, CLI flags). Empty values
/// mean "any"; every bad field is reported at once.
pub fn message_filter(
    state: Option<&str>,
    origin: Option<&str>,
    recipient: Option<&str>,
    since: Option<&str>,
    limit: u32,
) -> Result<MessageFilter, FieldErrors> {
    fn given(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    let mut errors = FieldErrors::default();
    let state = given(state).and_then(|s| {
        let v = MessageState::parse(s);
        if v.is_none() {
            errors.push("state", format!("'{s}' is not a state; use one of {}", MessageState::ALL.join(", ")));
        }
        v
    });
    let origin = given(origin).and_then(|s| {
        let v = Origin::parse(s);
        if v.is_none() {
            errors.push("origin", format!("'{s}' is not an origin; use one of {}", Origin::ALL.join(", ")));
        }
        v
    });
    let since = given(since).and_then(|s| parse_since(s).map_err(|e| errors.0.extend(e.0)).ok());
    let recipient = given(recipient).map(String::from);
    errors.into_result(|| MessageFilter { state, origin, recipient, since, limit })
}

/// A `since` bound: `2h` (that long ago) or an RFC 3339 time.
pub fn parse_since(value: &str) -> Result<chrono::DateTime<Utc>, FieldErrors> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = panel_domain::duration::parse(value).map_err(|e| {
        let mut errors = FieldErrors::default();
        errors.push("since", format!("'{value}': {e}; or give an RFC 3339 time"));
        errors
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(d).unwrap_or_default())
}

/// The settings in force with every default filled in, as shown by `panel smtp show` and the API
/// (the settings table's effective view), with the stored credential's binding state.
/// Names where the password comes from, never the password.
pub fn effective_view(s: &RelaySettings) -> serde_json::Value {
    let mut view = panel_domain::settings::table::effective(&s.doc);
    if s.auth.credential().is_some() {
        view.insert("credential_status".into(), if s.credential_attached { "attached" } else { "detached" }.into());
    }
    serde_json::Value::Object(view)
}
