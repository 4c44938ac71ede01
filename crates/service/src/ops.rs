//! Operations shared by the CLI and the REST API: the same validation, the same errors.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{FieldErrors, MessageState, Origin, OutgoingMessage, RelaySettings, SettingsDoc};
use panel_relay::CheckReport;
use panel_store::{MessageDetail, ServiceRow, Store, StoreError, StoredSettings};

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
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpsError {
    pub fn is_bad_input(&self) -> bool {
        matches!(self, OpsError::Invalid(_) | OpsError::NotFound(_) | OpsError::NotConfigured)
    }
}

/// What the CLI and API hold: the store, and a way to wake workers after an enqueue.
#[derive(Clone)]
pub struct Panel {
    pub store: Store,
    /// Set inside a Panel Service: wakes its own worker without a round trip.
    pub local_waker: Option<Waker>,
}

impl Panel {
    pub fn new(store: Store) -> Panel {
        Panel { store, local_waker: None }
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
    pub async fn update_settings(&self, patch: &SettingsDoc, by: &str) -> Result<(i64, RelaySettings), OpsError> {
        let current = self.store.current_settings().await?;
        let (version, doc) = match &current {
            Some(s) => (s.version, s.doc.merged(patch)),
            None => (0, SettingsDoc::default().merged(patch)),
        };
        let settings = RelaySettings::validate(&doc).map_err(OpsError::Invalid)?;
        let mut errors = FieldErrors::default();
        if let Some(ca) = &settings.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            errors.push("ca_file", format!("{} cannot be read: {e}", ca.display()));
        }
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        let new_version = self.store.save_settings(version, &doc, by, Utc::now()).await?;
        // Workers pick the new version up on their next claim; wake them so held messages go now.
        self.wake_workers().await;
        Ok((new_version, settings))
    }

    pub async fn check(&self) -> Result<CheckReport, OpsError> {
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        Ok(panel_relay::check(Arc::new(settings)).await)
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
        self.enqueue(Origin::TestMessage, &draft, &settings).await
    }

    /// The mail tester and any other ad-hoc message.
    pub async fn enqueue_draft(&self, origin: Origin, draft: &Draft) -> Result<i64, OpsError> {
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        self.enqueue(origin, draft, &settings).await
    }

    async fn enqueue(&self, origin: Origin, draft: &Draft, settings: &RelaySettings) -> Result<i64, OpsError> {
        let now = Utc::now();
        let message =
            OutgoingMessage::prepare(draft, &settings.from, &settings.fallback_recipient, now, crate::random_u128())
                .map_err(OpsError::Invalid)?;
        let id = self.store.enqueue(origin, &message, now).await?;
        self.wake_workers().await;
        Ok(id)
    }

    pub async fn retry(&self, id: i64) -> Result<panel_store::RetryResult, OpsError> {
        let result = self.store.retry_message(id, Utc::now()).await?;
        if result == panel_store::RetryResult::Requeued {
            self.wake_workers().await;
        }
        Ok(result)
    }

    /// Services whose heartbeat is recent.
    pub async fn live_services(&self) -> Result<Vec<ServiceRow>, OpsError> {
        let now = Utc::now();
        let rows = self.store.services(now - chrono::Duration::hours(1)).await?;
        Ok(rows.into_iter().filter(|s| s.heartbeat_at >= now - crate::liveness_window()).collect())
    }

    async fn wake_workers(&self) {
        if let Some(w) = &self.local_waker {
            w.wake();
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

/// The settings in force with every default filled in, as shown by `panel smtp show` and the API.
/// Names where the password comes from, never the password.
pub fn effective_view(s: &RelaySettings) -> serde_json::Value {
    use panel_domain::duration::{format, format_list};
    use panel_domain::{Auth, PasswordSource};
    let (auth, username, password_file, password_env) = match &s.auth {
        Auth::None => ("none", None, None, None),
        Auth::Password { username, source } => match source {
            PasswordSource::File(p) => ("password", Some(username.clone()), Some(p.display().to_string()), None),
            PasswordSource::Env(v) => ("password", Some(username.clone()), None, Some(v.clone())),
        },
    };
    serde_json::json!({
        "host": s.host,
        "port": s.port,
        "security": s.security,
        "auth": auth,
        "username": username,
        "password_file": password_file,
        "password_env": password_env,
        "from": s.from.to_string(),
        "fallback_recipient": s.fallback_recipient.to_string(),
        "helo_name": s.helo_name,
        "ca_file": s.ca_file.as_ref().map(|p| p.display().to_string()),
        "pin_sha256": s.pin_sha256.as_ref().map(panel_domain::settings::format_pin),
        "tls_server_name": s.tls_server_name,
        "allow_plaintext_auth": s.allow_plaintext_auth,
        "connect_timeout": format(s.connect_timeout),
        "command_timeout": format(s.command_timeout),
        "retry_schedule": format_list(&s.retry.schedule),
        "give_up_after": format(s.retry.give_up_after),
    })
}
