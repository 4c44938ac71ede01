//! The queue's operations: enqueue (the Test Message, ad-hoc messages, bulk), retry, wait for an
//! outcome, and read the message log. Every enqueue is validated first and woken after commit.

use std::time::Duration;

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{FieldErrors, MessageState, Origin, OutgoingMessage, RelaySettings};

use panel_store::StoreError;

use crate::error::OpsError;
use crate::ops::Panel;
use crate::views::{CancelResult, MessageDetail, MessageFilter, MessageSummary, QueueStats, RetryResult};

impl Panel {
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
        // A request on a kept token owner writes under its fence (`Kept`). A write with a key
        // can carry none (it may find the key's message instead of writing): its token is read.
        if key.is_some() && self.fence().is_some() {
            return self.reauthorized().await?.enqueue_draft_as_seen(origin, draft, key).await;
        }
        match self.enqueue_draft_as_seen(origin, draft, key).await {
            // The token, its role or the settings changed since the owner was kept: nothing was
            // written; the request is answered as of a read of its token now.
            Err(OpsError::Store(StoreError::Stale)) => {
                self.metrics.access_changed();
                self.reauthorized().await?.enqueue_draft_as_seen(origin, draft, key).await
            }
            outcome => outcome,
        }
    }

    async fn enqueue_draft_as_seen(
        &self,
        origin: Origin,
        draft: &Draft,
        key: Option<&str>,
    ) -> Result<(i64, bool), OpsError> {
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
            check_size(draft, &format!("messages[{i}]: "))?;
            match OutgoingMessage::prepare(
                draft,
                &settings.from,
                &settings.fallback_recipient,
                now,
                crate::random_u128(),
            )
            .and_then(|m| settings.policy.check(&m).map(|()| m))
            {
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
        let (ids, handed_over) = self.store.enqueue_many_here(&messages, now).await?;
        for _ in &ids {
            self.metrics.step_enqueued(origin.as_str());
        }
        // Handed over, they are this process's worker's, which the hand-over woke.
        if !handed_over {
            self.wake_workers_after_commit().await;
        }
        Ok(ids)
    }

    async fn enqueue(
        &self,
        origin: Origin,
        draft: &Draft,
        settings: &RelaySettings,
        key: Option<&str>,
    ) -> Result<(i64, bool), OpsError> {
        check_size(draft, "")?;
        let now = self.now();
        let message =
            OutgoingMessage::prepare(draft, &settings.from, &settings.fallback_recipient, now, crate::random_u128())
                .and_then(|m| settings.policy.check(&m).map(|()| m))
                .map_err(OpsError::Invalid)?;
        let (id, created, handed_over) = match key {
            Some(k) => {
                let (id, created) = self.store.enqueue_once(origin, &message, now, k).await?;
                (id, created, false)
            }
            None => {
                let enqueued = self.store.enqueue_fenced(origin, message, now, self.fence()).await?;
                (enqueued.id, true, enqueued.handed_over)
            }
        };
        if created {
            self.metrics.step_enqueued(origin.as_str());
        }
        // Handed over, it is this process's worker's, which the hand-over woke.
        if created && !handed_over {
            self.wake_workers_after_commit().await;
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

    /// Sends every retrying message now instead of at its retry time (after the admin fixed
    /// what a recipient's server or the relay complained about).
    pub async fn send_retrying_now(&self) -> Result<u64, OpsError> {
        let n = self.store.send_retrying_now(self.now()).await?;
        if n > 0 {
            self.wake_workers().await;
        }
        Ok(n)
    }

    /// Cancels message `id` for good, with `reason` (required: the log says who and why).
    /// Returns the state it was in.
    pub async fn cancel(&self, id: i64, by: &str, reason: &str) -> Result<MessageState, OpsError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 500 || reason.chars().any(char::is_control) {
            let mut errors = FieldErrors::default();
            errors.push("reason", "say why in 1-500 characters on one line: the message log shows it");
            return Err(OpsError::Invalid(errors));
        }
        match self.store.cancel_message(id, by, reason, self.now()).await? {
            CancelResult::Cancelled { was } => Ok(was),
            CancelResult::NotFound => Err(OpsError::NotFound(id)),
            CancelResult::NotCancellable { state: MessageState::Sending } => Err(OpsError::Conflict(format!(
                "message {id} is being sent right now; if the attempt leaves it waiting, cancel it then"
            ))),
            CancelResult::NotCancellable { state } => Err(OpsError::Conflict(format!(
                "message {id} is {state}; only a message still to be sent can be cancelled"
            ))),
        }
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

    /// Waits until message `id` is delivered or failed, or `limit` passes; returns its last state.
    pub async fn wait_for(&self, id: i64, limit: Duration) -> Result<MessageDetail, OpsError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut delay = Duration::from_millis(5);
        loop {
            let state = self.store.message_state(id).await?.ok_or(OpsError::NotFound(id))?;
            let settled = state.is_final() || (state == MessageState::Retrying && self.has_attempt(id).await?);
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
    /// The message log, newest first.
    pub async fn messages(&self, filter: &MessageFilter) -> Result<Vec<MessageSummary>, OpsError> {
        Ok(self.store.list_messages(filter).await?.into_iter().map(Into::into).collect())
    }

    /// A message with every recipient and attempt.
    pub async fn message(&self, id: i64) -> Result<MessageDetail, OpsError> {
        let mut detail: MessageDetail = self.store.message(id).await?.ok_or(OpsError::NotFound(id))?.into();
        detail.bounces = self.store.message_bounces(id).await?.into_iter().map(Into::into).collect();
        Ok(detail)
    }

    /// The message as queued (headers, text, HTML, attachments), to show what was sent.
    pub async fn message_content(&self, id: i64) -> Result<Option<OutgoingMessage>, OpsError> {
        Ok(self.store.message_content(id).await?)
    }

    /// The message as an RFC 5322 file (`.eml`): exactly what goes (or would have gone, when
    /// captured) after DATA. A conflict once retention removed its content.
    pub async fn message_eml(&self, id: i64) -> Result<Vec<u8>, OpsError> {
        let detail = self.message(id).await?;
        if let Some(at) = detail.content_removed_at {
            return Err(OpsError::Conflict(format!(
                "message {id}'s content was removed by retention on {at}; the log keeps its headers, recipients and attempts"
            )));
        }
        let content = self.store.message_content(id).await?.ok_or(OpsError::NotFound(id))?;
        Ok(content.render())
    }

    pub async fn queue(&self) -> Result<QueueStats, OpsError> {
        Ok(self.store.queue_stats(self.now()).await?.into())
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

/// The one size limit of a message, the same from the CLI, the API and the UI: its content (text,
/// HTML and attachments) up to `MAX_BODY_BYTES`. Larger is `TooLarge` (413, exit 2).
fn check_size(draft: &Draft, which: &str) -> Result<(), OpsError> {
    use panel_domain::message::MAX_BODY_BYTES;
    let size = draft.content_bytes();
    if size <= MAX_BODY_BYTES {
        return Ok(());
    }
    Err(OpsError::TooLarge(format!(
        "{which}the message's text, HTML and attachments are {:.1} MiB; at most {} MiB is sent",
        size as f64 / 1048576.0,
        MAX_BODY_BYTES >> 20
    )))
}
