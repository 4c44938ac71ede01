//! What the CLI's `--json`, the API's bodies and the UI's pages show: the service's own types,
//! made from the store's rows, so that renaming a column is not an API break, and the web and
//! CLI crates never see the store. Also the vocabulary of the operations' parameters and
//! outcomes, re-exported so that callers need no store types.

use chrono::{DateTime, Utc};
use panel_domain::run::{RunDelivery, RunKind, RunStatus, Trigger};
use panel_domain::{
    AttemptOutcome, FailureClass, MessageState, Origin, Priority, RecipientKind, RecipientState, SettingsDoc, Stage,
};
use serde::Serialize;

pub use crate::automation::ScheduleNext;
pub use crate::licensing::LicenseStatus;
pub use panel_relay::CheckReport;
pub use panel_store::{CancelResult, DefinitionKind, MessageFilter, PutOutcome, RetryResult, SaveMode, SaveOutcome};
pub use panel_vault::License;

/// `view!(Name from panel_store::Row { field: Type, ... })`: a serializable view with the
/// listed fields, taken one by one from the row.
macro_rules! view {
    ($(#[$m:meta])* $name:ident from $row:path { $($(#[$fm:meta])* $field:ident: $ty:ty),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)+
        }

        impl From<$row> for $name {
            fn from(row: $row) -> $name {
                $name { $($field: row.$field.into(),)+ }
            }
        }
    };
}

view!(
    /// One line of the message log.
    MessageSummary from panel_store::MessageSummary {
        id: i64,
        state: MessageState,
        origin: Origin,
        /// `urgent` mail is sent before `bulk` mail.
        priority: Priority,
        from: String,
        to: Vec<String>,
        subject: String,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        attempt_count: i64,
        next_attempt_at: Option<DateTime<Utc>>,
        failure_class: Option<FailureClass>,
        last_error: Option<String>,
    }
);

/// One recipient of a message: its state, the relay's last reply for it, and the attempt
/// (1-based) that decided it; none while it waits (or is held by a configuration error).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Recipient {
    pub kind: RecipientKind,
    pub address: String,
    pub state: RecipientState,
    pub reply: Option<String>,
    pub decided_by: Option<usize>,
}

/// One delivery attempt with the relay's words.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: AttemptOutcome,
    pub stage: Stage,
    pub code: Option<i64>,
    pub enhanced_code: Option<String>,
    pub reply: Option<String>,
    pub detail: String,
    /// The fix, naming `panel smtp set`'s flags (`--host`).
    pub hint: Option<String>,
    /// The same fix naming the web form's fields ("Server"): one hint, two renderings.
    pub hint_form: Option<String>,
    pub relay: String,
    /// The route the attempt went by (`primary` or a standby's name); none for an attempt a
    /// stopped worker left behind.
    pub route: Option<String>,
    pub service_id: String,
    pub settings_version: i64,
    pub recipients: serde_json::Value,
}

impl From<panel_store::AttemptRow> for Attempt {
    fn from(a: panel_store::AttemptRow) -> Attempt {
        Attempt {
            hint_form: a.hint.as_deref().map(panel_domain::settings::table::hint_for_form),
            at: a.at,
            finished_at: a.finished_at,
            outcome: a.outcome,
            stage: a.stage,
            code: a.code,
            enhanced_code: a.enhanced_code,
            reply: a.reply,
            detail: a.detail,
            hint: a.hint,
            relay: a.relay,
            route: a.route,
            service_id: a.service_id,
            settings_version: a.settings_version,
            recipients: a.recipients,
        }
    }
}

/// A message with every recipient and attempt.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct MessageDetail {
    pub id: i64,
    pub state: MessageState,
    pub origin: Origin,
    pub priority: Priority,
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    pub message_id: String,
    pub used_fallback_recipient: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failure_class: Option<FailureClass>,
    pub last_error: Option<String>,
    /// Times a worker stopped while holding this message (a duplicate delivery is possible then).
    pub interrupted: i64,
    /// When retention removed the text, HTML and attachments (headers and attempts stay).
    pub content_removed_at: Option<DateTime<Utc>>,
    pub recipients: Vec<Recipient>,
    pub attempts: Vec<Attempt>,
    /// What came back after the relay's 250: bounces, delay notices, auto-replies, oldest first.
    pub bounces: Vec<Bounce>,
}

view!(
    /// A report received for the bounce domain: a bounce (`failed`), a delay notice
    /// (`delayed`), an automatic reply, or something else; matched to its message or not.
    Bounce from panel_store::BounceRecord {
        id: i64,
        received_at: DateTime<Utc>,
        /// The message it is about; none: unmatched (its token missing or forged).
        message_id: Option<i64>,
        /// `failed`, `delayed`, `auto_reply`, `delivered` or `unknown`.
        kind: String,
        recipient: Option<String>,
        /// The DSN's status (`5.1.1`).
        status: Option<String>,
        /// The remote server's reply (`550 5.1.1 user unknown`).
        diagnostic: Option<String>,
        /// The server that refused it.
        remote_mta: Option<String>,
        /// The server that wrote the report.
        reporting_mta: Option<String>,
        /// The address it came to.
        envelope_to: String,
        subject: String,
        /// Why it is unmatched, or why it changed nothing.
        reason: Option<String>,
    }
);

impl From<panel_store::MessageDetail> for MessageDetail {
    fn from(m: panel_store::MessageDetail) -> MessageDetail {
        MessageDetail {
            id: m.id,
            state: m.state,
            origin: m.origin,
            priority: m.priority,
            from: m.from,
            to: m.to,
            cc: m.cc,
            bcc: m.bcc,
            reply_to: m.reply_to,
            subject: m.subject,
            message_id: m.message_id,
            used_fallback_recipient: m.used_fallback_recipient,
            created_at: m.created_at,
            updated_at: m.updated_at,
            next_attempt_at: m.next_attempt_at,
            failure_class: m.failure_class,
            last_error: m.last_error,
            interrupted: m.interrupted,
            content_removed_at: m.content_removed_at,
            recipients: m
                .recipients
                .into_iter()
                .map(|r| Recipient {
                    decided_by: deciding_attempt(&m.attempts, &r.address, r.state),
                    kind: r.kind,
                    address: r.address,
                    state: r.state,
                    reply: r.reply,
                })
                .collect(),
            attempts: m.attempts.into_iter().map(Into::into).collect(),
            bounces: Vec::new(),
        }
    }
}

/// The last attempt that settled `address` as it stands now (each attempt lists its recipients
/// with the state it gave them).
fn deciding_attempt(attempts: &[panel_store::AttemptRow], address: &str, state: RecipientState) -> Option<usize> {
    if state == RecipientState::Pending {
        return None;
    }
    attempts
        .iter()
        .rposition(|a| {
            a.recipients.as_array().is_some_and(|list| {
                list.iter().any(|r| r["address"] == address && r["state"] == serde_json::json!(state))
            })
        })
        .map(|i| i + 1)
}

view!(
    /// A saved relay settings version, as the admin wrote it.
    StoredSettings from panel_store::StoredSettings {
        version: i64,
        doc: SettingsDoc,
        saved_at: DateTime<Utc>,
        saved_by: String,
    }
);

/// One saved relay settings version in the history: who saved it, when, and what it changed
/// from the version before it, field by field (settings name where a password comes from,
/// never a password).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct SettingsVersion {
    pub version: i64,
    pub saved_at: DateTime<Utc>,
    pub saved_by: String,
    /// The version the running services use.
    pub in_force: bool,
    pub changes: Vec<String>,
}

view!(
    /// Queue depth by state, and the wait of the oldest due message.
    QueueStats from panel_store::QueueStats {
        queued: i64,
        retrying: i64,
        sending: i64,
        delivered: i64,
        partly_failed: i64,
        failed: i64,
        captured: i64,
        /// Accepted by the relay, then bounced by every recipient's server.
        bounced: i64,
        limited: i64,
        held: i64,
        oldest_due_age_secs: Option<i64>,
    }
);

view!(
    AuditEntry from panel_store::AuditRow {
        id: i64,
        at: DateTime<Utc>,
        actor: String,
        action: String,
        subject: String,
        detail: String,
    }
);

/// A running Panel Service or worker, with its last heartbeat.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Service {
    pub id: String,
    /// `serve` (Panel Service) or `worker` (service mode).
    pub kind: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub listen: Option<String>,
    pub wake_port: Option<u16>,
    pub heartbeat_at: DateTime<Utc>,
    /// The config file it loaded, if any.
    pub config_file: Option<String>,
    /// The key ids of the license authorities it trusts.
    pub authorities: Vec<String>,
    /// Set when its config file changed in a way it has not applied ("restart needed: ...") or
    /// cannot be read.
    pub config_note: Option<String>,
}

impl From<panel_store::ServiceRow> for Service {
    fn from(s: panel_store::ServiceRow) -> Service {
        let i = s.info;
        Service {
            id: i.id,
            kind: i.kind,
            host: i.host,
            pid: i.pid,
            version: i.version,
            started_at: i.started_at,
            listen: i.listen,
            wake_port: i.wake_port,
            heartbeat_at: s.heartbeat_at,
            config_file: i.config_file,
            authorities: i.authorities,
            config_note: i.config_note,
        }
    }
}

view!(
    /// A template, workflow or schedule as the admin wrote it, with its state.
    Definition from panel_store::DefinitionRow {
        kind: DefinitionKind,
        name: String,
        doc: serde_json::Value,
        enabled: bool,
        next_fire_at: Option<DateTime<Utc>>,
        last_fire_at: Option<DateTime<Utc>>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        updated_by: String,
    }
);

view!(
    RunMessage from panel_store::RunMessage {
        id: i64,
        state: MessageState,
        subject: String,
        last_error: Option<String>,
    }
);

/// One run of a workflow, a schedule or a dispatch: its steps and their messages.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Run {
    pub id: i64,
    pub kind: RunKind,
    pub name: String,
    pub trigger: Trigger,
    pub fire_time: Option<DateTime<Utc>>,
    pub event_id: Option<i64>,
    pub started_at: DateTime<Utc>,
    pub missed: i64,
    /// How the steps were planned: every message queued, some, or none.
    pub status: RunStatus,
    /// What became of the mail since, following the messages: sending, sent, partly failed, failed.
    pub delivery: RunDelivery,
    pub detail: Option<String>,
    pub service: String,
    pub steps: serde_json::Value,
    pub messages: Vec<RunMessage>,
}

impl From<panel_store::RunRow> for Run {
    fn from(r: panel_store::RunRow) -> Run {
        Run {
            id: r.id,
            kind: r.kind,
            name: r.name,
            trigger: r.trigger,
            fire_time: r.fire_time,
            event_id: r.event_id,
            started_at: r.started_at,
            missed: r.missed,
            status: r.status,
            delivery: RunDelivery::of(r.status, &r.messages.iter().map(|m| m.state).collect::<Vec<_>>()),
            detail: r.detail,
            service: r.service,
            steps: r.steps,
            messages: r.messages.into_iter().map(Into::into).collect(),
        }
    }
}

/// A posted event: its id, whether it was new, and the workflow runs it started (as they were
/// written, their messages queued; for a repeated key, as they are now).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Event {
    pub id: i64,
    /// False when the idempotency key was seen before: nothing ran this time.
    pub created: bool,
    pub runs: Vec<Run>,
}

impl From<panel_store::EventRecord> for Event {
    fn from(r: panel_store::EventRecord) -> Event {
        Event { id: r.id, created: r.created, runs: r.runs.into_iter().map(Into::into).collect() }
    }
}

/// An admin account (never its password hash), with its sign-in lock state.
#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Wrong passwords for this account, from every address, in the last 15 minutes.
    pub failed_sign_ins: i64,
    /// Set while the account is locked for addresses it never signed in from (too many wrong
    /// passwords from everywhere): until then only its known addresses may try.
    pub locked_until: Option<DateTime<Utc>>,
}

view!(
    /// An API token's label and use (never the token).
    ApiToken from panel_store::TokenRow {
        /// Names the token for `panel admin token revoke ID` (the start of its digest).
        id: String,
        admin: String,
        label: String,
        created_at: DateTime<Utc>,
        last_used_at: Option<DateTime<Utc>>,
    }
);

view!(
    /// The newest attempt that did not deliver.
    RelayError from panel_store::RelayError {
        message_id: i64,
        at: DateTime<Utc>,
        relay: String,
        /// The route the attempt went by.
        route: Option<String>,
        outcome: AttemptOutcome,
        stage: Stage,
        code: Option<i64>,
        reply: Option<String>,
        detail: String,
        hint: Option<String>,
        /// True when no attempt delivered since: the relay (or its configuration) is failing now.
        current: bool,
    }
);

/// Messages that reached each final or waiting state in one period.
#[derive(Debug, Clone, Copy, Default, Serialize, schemars::JsonSchema)]
pub struct Counts {
    pub delivered: i64,
    pub retrying: i64,
    pub partly_failed: i64,
    pub failed: i64,
    /// Kept by the recipient policy's capture mode; nothing was sent.
    pub captured: i64,
    /// Accepted by the relay, then bounced by every recipient's server.
    pub bounced: i64,
}

impl Counts {
    fn add(&mut self, state: MessageState, n: i64) {
        match state {
            MessageState::Delivered => self.delivered += n,
            MessageState::Retrying => self.retrying += n,
            MessageState::Failed => self.failed += n,
            MessageState::PartlyFailed => self.partly_failed += n,
            MessageState::Captured => self.captured += n,
            MessageState::Bounced => self.bounced += n,
            MessageState::Queued | MessageState::Sending | MessageState::Cancelled => {}
        }
    }
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct HourCounts {
    pub hour: DateTime<Utc>,
    #[serde(flatten)]
    pub counts: Counts,
}

/// What the dashboard shows, also served as `GET /api/v1/dashboard`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Dashboard {
    pub services: Vec<Service>,
    pub queue: QueueStats,
    pub last_hour: Counts,
    pub last_day: Counts,
    /// The last 24 hours, oldest first, the current hour last.
    pub hours: Vec<HourCounts>,
    pub last_error: Option<RelayError>,
    /// What the admin must see first: no settings, broken settings, a failing relay.
    pub banner: Option<String>,
    /// With no relay settings yet: the fields a relay needs (the form's labels); else empty.
    pub missing: Vec<String>,
    /// The recipient policy, when mail does not go as addressed to anyone (`RecipientPolicy::notice`).
    pub policy: Option<String>,
    /// Every route in the order they are tried, with its state (one, the primary, without
    /// standby routes).
    pub routes: Vec<RouteStatus>,
}

/// A route's state as the attempts recorded it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct RouteStatus {
    pub name: String,
    /// Where it sends: `host:port/security`, or the Graph endpoint.
    pub endpoint: String,
    /// `in use` (the first route that is not failing: mail goes by it), `standby` (not failing,
    /// after the one in use) or `failing` (its latest attempt failed at the route itself:
    /// unreachable, refusing service or refusing Panel; `last` says what it said).
    pub state: String,
    /// Its latest attempt (`current`: it did not deliver); none before it was used.
    pub last: Option<RelayError>,
}

impl RouteStatus {
    /// The routes' states from their latest attempts, in the routes' order.
    pub fn of(routes: Vec<(String, String, Option<RelayError>)>) -> Vec<RouteStatus> {
        let mut in_use = false;
        routes
            .into_iter()
            .map(|(name, endpoint, last)| {
                let failing = last.as_ref().is_some_and(|a| {
                    a.outcome != AttemptOutcome::Delivered && (Stage::SESSION.contains(&a.stage) || a.code == Some(421))
                });
                let state = match failing {
                    true => "failing",
                    false if !in_use => {
                        in_use = true;
                        "in use"
                    }
                    false => "standby",
                };
                RouteStatus { name, endpoint, state: state.to_string(), last }
            })
            .collect()
    }
}

impl Dashboard {
    /// Sorts hourly counts into the 24 hours from `start`.
    pub(crate) fn tally(
        start: DateTime<Utc>,
        counts: &[panel_store::HourlyCount],
    ) -> (Vec<HourCounts>, Counts, Counts) {
        let mut hours: Vec<HourCounts> = (0..24)
            .map(|i| HourCounts { hour: start + chrono::Duration::hours(i), counts: Counts::default() })
            .collect();
        let (mut last_hour, mut last_day) = (Counts::default(), Counts::default());
        for c in counts {
            let i = ((c.hour - start).num_hours()).clamp(0, 23) as usize;
            hours[i].counts.add(c.state, c.count);
            last_day.add(c.state, c.count);
            if i == 23 {
                last_hour.add(c.state, c.count);
            }
        }
        (hours, last_hour, last_day)
    }
}
