//! Operations shared by the CLI and the REST API: the same validation, the same errors.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{
    Auth, CredentialKind, FieldErrors, MessageState, Origin, OutgoingMessage, RelaySettings, SettingsDoc,
};
use panel_relay::CheckReport;
use panel_store::{AuditEvent, MessageDetail, ServiceRow, Store, StoreError, StoredSettings};

use crate::credential_source::StoredCredentials;
use crate::metrics::Metrics;
use crate::vault::{Secrets, SecretsConfig};

use crate::wake::{self, Waker};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad input: exit code 2, HTTP 400.
    #[error("{0}")]
    Invalid(FieldErrors),
    #[error(
        "no relay settings yet; configure them first: panel smtp set --host HOST --from ADDRESS --fallback-recipient ADDRESS"
    )]
    NotConfigured,
    #[error("the stored relay settings are invalid (version {version}): {errors}; fix them with panel smtp set")]
    StoredSettingsInvalid { version: i64, errors: FieldErrors },
    #[error("message {0} not found")]
    NotFound(i64),
    #[error("{what} '{name}' not found")]
    NotFoundNamed { what: &'static str, name: String },
    /// A license is missing, invalid or refused: exit code 1, HTTP 403.
    #[error("{0}")]
    License(String),
    /// The master key file or the encrypted credentials are unusable.
    #[error("{0}")]
    Vault(String),
    /// A template that does not render (preview): exit code 2, HTTP 400.
    #[error("the template does not render: {0}")]
    Template(panel_automation::TemplateError),
    /// The request conflicts with what is stored (a name taken, a template in use): HTTP 409.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpsError {
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            OpsError::Invalid(_)
                | OpsError::NotFound(_)
                | OpsError::NotFoundNamed { .. }
                | OpsError::NotConfigured
                | OpsError::Template(_)
        )
    }
}

/// What the CLI and API hold: the store, the trusted license authorities and master key file,
/// and a way to wake workers after an enqueue.
#[derive(Clone)]
pub struct Panel {
    pub store: Store,
    pub(crate) secrets: Arc<Secrets>,
    /// What this process did, for /metrics.
    pub metrics: Arc<Metrics>,
    /// Set inside a Panel Service: wakes its own worker without a round trip.
    pub local_waker: Option<Waker>,
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
        Panel { store, secrets: Arc::new(Secrets::new(secrets)), metrics: Arc::default(), local_waker: None }
    }

    /// The settings in force, validated; `None` before the first save.
    pub async fn settings(&self) -> Result<Option<(i64, RelaySettings)>, OpsError> {
        let Some(stored) = self.store.current_settings().await? else { return Ok(None) };
        RelaySettings::validate(&stored.doc)
            .map(|s| Some((stored.version, s)))
            .map_err(|errors| OpsError::StoredSettingsInvalid { version: stored.version, errors })
    }

    pub async fn stored_settings(&self) -> Result<Option<StoredSettings>, OpsError> {
        Ok(self.store.current_settings().await?)
    }

    /// Applies `patch` to the stored settings. Every field is validated; nothing is stored on error.
    /// A stored credential is bound to the relay endpoint it was named for: changing the host,
    /// port or security mode detaches it until the admin names it again.
    pub async fn update_settings(&self, patch: &SettingsDoc, by: &str) -> Result<SettingsUpdate, OpsError> {
        let current = self.store.current_settings().await?;
        let (version, old_doc) = match &current {
            Some(s) => (s.version, s.doc.clone()),
            None => (0, SettingsDoc::default()),
        };
        let mut doc = old_doc.merged(&prefer_named_source(patch, &old_doc));
        let settings = RelaySettings::validate(&doc).map_err(OpsError::Invalid)?;
        let mut errors = FieldErrors::default();
        if let Some(ca) = &settings.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            errors.push("ca_file", format!("{} cannot be read: {e}", ca.display()));
        }
        let mut events = Vec::new();
        let mut notices = Vec::new();
        match settings.auth.credential() {
            None => doc.credential_relay = None,
            Some(name) => {
                self.check_credential_kind(&settings.auth, name, &mut errors).await?;
                let endpoint = settings.endpoint();
                let named = patch.credential.as_deref().is_some_and(|c| !c.trim().is_empty());
                let was_attached = RelaySettings::validate(&old_doc).is_ok_and(|s| s.credential_attached);
                if named {
                    if doc.credential_relay.as_deref() != Some(&endpoint) || !was_attached {
                        events.push(AuditEvent::new("credential.attached", name, format!("to relay {endpoint}")));
                    }
                    doc.credential_relay = Some(endpoint);
                } else if doc.credential_relay.as_deref() != Some(&endpoint) {
                    if was_attached {
                        let from = doc.credential_relay.clone().unwrap_or_default();
                        events.push(AuditEvent::new(
                            "credential.detached",
                            name,
                            format!("relay changed from {from} to {endpoint}"),
                        ));
                    }
                    notices.push(format!(
                        "the stored credential '{name}' is detached: it was confirmed for {}, and the relay is now {endpoint}. \
                         It is not sent until you confirm it for this relay: panel smtp set --credential {name}",
                        doc.credential_relay.as_deref().unwrap_or("another relay")
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        let settings = RelaySettings::validate(&doc).map_err(OpsError::Invalid)?;
        let new_version = self.store.save_settings(version, &doc, by, Utc::now(), &events).await?;
        // Workers pick the new version up on their next claim; wake them so held messages go now.
        self.wake_workers().await;
        Ok(SettingsUpdate { version: new_version, settings, notices })
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
        let now = Utc::now();
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
        let now = Utc::now();
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
        let now = Utc::now();
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

    pub async fn retry(&self, id: i64) -> Result<panel_store::RetryResult, OpsError> {
        let result = self.store.retry_message(id, Utc::now()).await?;
        if result == panel_store::RetryResult::Requeued {
            self.wake_workers().await;
        }
        Ok(result)
    }

    /// Re-queues every failed message that failed at or after `since` (all of them without it).
    pub async fn retry_failed(&self, since: Option<chrono::DateTime<Utc>>) -> Result<u64, OpsError> {
        let since = since.unwrap_or(chrono::DateTime::UNIX_EPOCH);
        let n = self.store.retry_failed(since, Utc::now()).await?;
        if n > 0 {
            self.wake_workers().await;
        }
        Ok(n)
    }

    /// The Prometheus exposition: this process's counters and the shared queue's gauges.
    pub async fn metrics_text(&self) -> Result<String, OpsError> {
        let stats = self.store.queue_stats(Utc::now()).await?;
        let interrupted = self.store.interrupted_attempts().await?;
        Ok(self.metrics.render(&stats, interrupted))
    }

    /// Services whose heartbeat is recent.
    pub async fn live_services(&self) -> Result<Vec<ServiceRow>, OpsError> {
        let now = Utc::now();
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
        if let Ok(services) = self.live_services().await {
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
                return self.store.message(id).await?.ok_or(OpsError::NotFound(id));
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
) -> Result<panel_store::MessageFilter, FieldErrors> {
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
    errors.into_result(|| panel_store::MessageFilter { state, origin, recipient, since, limit })
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

/// The settings in force with every default filled in, as shown by `panel smtp show` and the API.
/// Names where the password comes from, never the password.
pub fn effective_view(s: &RelaySettings) -> serde_json::Value {
    use panel_domain::PasswordSource;
    use panel_domain::duration::{format, format_list};
    let mut view = serde_json::json!({
        "host": s.host,
        "port": s.port,
        "security": s.security,
        "auth": s.auth.as_str(),
        "from": s.from.to_string(),
        "fallback_recipient": s.fallback_recipient.to_string(),
        "helo_name": s.helo_name,
        "ca_file": s.ca_file.as_ref().map(|p| p.display().to_string()),
        "pin_sha256": s.pin_sha256.as_ref().map(panel_domain::settings::format_pin),
        "tls_server_name": s.tls_server_name,
        "allow_plaintext_auth": s.allow_plaintext_auth,
        "allow_from_override": s.allow_from_override,
        "connect_timeout": format(s.connect_timeout),
        "command_timeout": format(s.command_timeout),
        "retry_schedule": format_list(&s.retry.schedule),
        "give_up_after": format(s.retry.give_up_after),
    });
    let extra = match &s.auth {
        Auth::None => serde_json::json!({}),
        Auth::Password { username, source: PasswordSource::File(p) } => {
            serde_json::json!({ "username": username, "password_file": p.display().to_string() })
        }
        Auth::Password { username, source: PasswordSource::Env(v) } => {
            serde_json::json!({ "username": username, "password_env": v })
        }
        Auth::Stored { credential } | Auth::Ntlm { credential } => serde_json::json!({ "credential": credential }),
        Auth::Integrated { keytab, principal, service_principal } => serde_json::json!({
            "keytab": keytab.as_ref().map(|p| p.display().to_string()),
            "principal": principal,
            "service_principal": service_principal.clone().unwrap_or_else(|| format!("smtp/{}", s.host)),
        }),
        Auth::OAuth2 { provider, mailbox, credential, token_endpoint } => serde_json::json!({
            "oauth_provider": provider,
            "username": mailbox.as_str(),
            "credential": credential,
            "token_endpoint": token_endpoint.as_ref().map(|u| u.to_string()),
        }),
    };
    if let (Some(map), serde_json::Value::Object(extra)) = (view.as_object_mut(), extra) {
        map.extend(extra);
        if s.auth.credential().is_some() {
            map.insert("credential_status".into(), if s.credential_attached { "attached" } else { "detached" }.into());
        }
    }
    view
}

/// Naming one password source in a patch replaces the other kind: `--credential X` drops a
/// stored username and password file or variable, and `--password-file` drops a credential.
fn prefer_named_source(patch: &SettingsDoc, old: &SettingsDoc) -> SettingsDoc {
    let named = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let mut p = patch.clone();
    let clear = |field: &mut Option<String>| {
        field.get_or_insert_with(String::new);
    };
    // Switching the auth mode drops what does not apply to the new one, unless the patch names it.
    match p.auth.as_deref().map(|a| a.trim().to_ascii_lowercase()).as_deref() {
        // Neither takes a username or any secret.
        Some("none" | "integrated") => [
            &mut p.username,
            &mut p.password_file,
            &mut p.password_env,
            &mut p.credential,
            &mut p.oauth_provider,
            &mut p.token_endpoint,
        ]
        .into_iter()
        .for_each(clear),
        Some("password") => [&mut p.oauth_provider, &mut p.token_endpoint].into_iter().for_each(clear),
        Some("oauth2") => [&mut p.password_file, &mut p.password_env].into_iter().for_each(clear),
        Some("ntlm") => {
            [&mut p.username, &mut p.password_file, &mut p.password_env, &mut p.oauth_provider, &mut p.token_endpoint]
                .into_iter()
                .for_each(clear)
        }
        _ => {}
    }
    // The Kerberos fields belong to integrated only.
    if p.auth.as_deref().is_some_and(|a| !a.trim().eq_ignore_ascii_case("integrated")) {
        [&mut p.keytab, &mut p.principal, &mut p.service_principal].into_iter().for_each(clear);
    }
    let password_mode =
        p.auth.as_deref().or(old.auth.as_deref()).is_some_and(|a| a.trim().eq_ignore_ascii_case("password"));
    if password_mode && named(&p.credential) {
        [&mut p.username, &mut p.password_file, &mut p.password_env].into_iter().for_each(clear);
    }
    if named(&p.password_file) || named(&p.password_env) {
        clear(&mut p.credential);
    }
    p
}
