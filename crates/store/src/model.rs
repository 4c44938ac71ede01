//! The shapes the store reads and writes. Serialized as the CLI's `--json` and the API's bodies.

use chrono::{DateTime, Utc};
use panel_domain::run::{RunKind, RunStatus, Trigger};
use panel_domain::{
    AttemptOutcome, FailureClass, MessageState, Origin, OutgoingMessage, Priority, RecipientKind, RecipientState,
    SettingsDoc, Stage,
};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct StoredSettings {
    pub version: i64,
    pub doc: SettingsDoc,
    pub saved_at: DateTime<Utc>,
    pub saved_by: String,
}

/// Identifies one claim of one message: the token fences out a worker whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRef {
    pub id: i64,
    pub token: i64,
}

#[derive(Debug, Clone)]
pub struct PendingRecipient {
    pub position: i64,
    pub address: String,
}

/// A message a worker holds under a lease.
#[derive(Debug, Clone)]
pub struct Claim {
    pub reference: ClaimRef,
    pub origin: Origin,
    pub message: OutgoingMessage,
    /// Attempts recorded before this claim.
    pub attempts: i64,
    pub created_at: DateTime<Utc>,
    /// The recipients not yet delivered or failed, in position order.
    pub pending: Vec<PendingRecipient>,
    /// What earlier attempts settled for the other recipients.
    pub earlier: panel_domain::Earlier,
    /// The settings and secrets generations as the claim read them (in its own statement): what
    /// the worker compares with the relay state it holds, without a read of its own.
    pub seen: ConfigGeneration,
}

/// Facts about an attempt that the settlement does not carry.
#[derive(Debug, Clone)]
pub struct AttemptMeta {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub service_id: String,
    /// `host:port` as connected.
    pub relay: String,
    /// The route it went by (`primary` or a standby's name); `None` for a lease found expired.
    pub route: Option<String>,
    pub settings_version: i64,
    /// The recipients the attempt was for: its claim's `pending`, in order. The settlement's
    /// results follow them; the record writes them without reading them again (while the claim
    /// is current nothing else changes a pending recipient).
    pub recipients: Vec<PendingRecipient>,
}

#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    pub state: Option<MessageState>,
    pub origin: Option<Origin>,
    /// Part of a recipient address (case-insensitive).
    pub recipient: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct MessageSummary {
    pub id: i64,
    pub state: MessageState,
    pub origin: Origin,
    pub priority: Priority,
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub attempt_count: i64,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failure_class: Option<FailureClass>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientRow {
    pub kind: RecipientKind,
    pub address: String,
    pub state: RecipientState,
    pub reply: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: AttemptOutcome,
    pub stage: Stage,
    pub code: Option<i64>,
    pub enhanced_code: Option<String>,
    pub reply: Option<String>,
    pub detail: String,
    pub hint: Option<String>,
    pub relay: String,
    /// The route the attempt went by; `None` for an abandoned lease and before routes existed.
    pub route: Option<String>,
    pub service_id: String,
    pub settings_version: i64,
    pub recipients: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
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
    pub recipients: Vec<RecipientRow>,
    pub attempts: Vec<AttemptRow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RetryResult {
    Requeued,
    NotFound,
    NotFailed {
        state: MessageState,
    },
    /// Retention removed its content: there is nothing to send again.
    ContentRemoved {
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CancelResult {
    Cancelled {
        was: MessageState,
    },
    NotFound,
    /// Delivered, already cancelled, or being sent right now.
    NotCancellable {
        state: MessageState,
    },
}

/// Which messages held by a configuration error a release takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// All of them: something they depend on changed (settings, a credential, a license).
    All,
    /// Those stopped before their own MAIL FROM (connection, TLS, AUTH): proven fixed by any
    /// attempt that got further, or by a successful check.
    SessionFailures,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    pub id: String,
    /// `serve` (Panel Service) or `worker` (service mode).
    pub kind: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub listen: Option<String>,
    /// Loopback UDP port that wakes the worker when a step is enqueued by another process.
    pub wake_port: Option<u16>,
    /// The config file the service loaded, if any.
    pub config_file: Option<String>,
    /// The key ids of the license authorities it trusts.
    pub authorities: Vec<String>,
    /// Set when its config file changed in a way it has not applied, or cannot be read.
    pub config_note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    #[serde(flatten)]
    pub info: ServiceInfo,
    pub heartbeat_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStats {
    pub queued: i64,
    pub retrying: i64,
    pub sending: i64,
    pub delivered: i64,
    pub partly_failed: i64,
    pub failed: i64,
    /// Kept by the recipient policy's capture mode; nothing was sent.
    pub captured: i64,
    pub bounced: i64,
    /// Of the queued and retrying, those waiting for room under the sending limits.
    pub limited: i64,
    /// Of the failed, those held by a configuration error: sent again by themselves when it is
    /// fixed, so not given up on.
    pub held: i64,
    /// Seconds the oldest due message has waited.
    pub oldest_due_age_secs: Option<i64>,
}

/// What a worker compares before each claim: a change in either rebuilds its relay state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigGeneration {
    pub settings: i64,
    /// Bumped by every change to license keys or stored credentials.
    pub secrets: i64,
}

/// One audit log entry to write; the actor and time come with the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub action: String,
    pub subject: String,
    pub detail: String,
}

impl AuditEvent {
    pub fn new(action: &str, subject: &str, detail: impl Into<String>) -> AuditEvent {
        AuditEvent { action: action.into(), subject: subject.into(), detail: detail.into() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct LicenseRow {
    pub id: String,
    pub key: String,
    pub added_at: DateTime<Utc>,
    pub added_by: String,
}

/// A stored credential. The sealed blobs stay inside the service: this type is not serializable.
#[derive(Clone)]
pub struct CredentialRow {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub username: String,
    /// Non-secret settings of the credential (e.g. a Microsoft tenant).
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
    pub first_used_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for CredentialRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("master_key_id", &self.master_key_id)
            .finish_non_exhaustive()
    }
}

/// A credential to store: sealed by the caller, who chose its id (the ciphertext is bound to it).
pub struct NewCredential {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub username: String,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The relay settings reference it; nothing was deleted.
    InUse,
}

/// A data key re-wrapped under a new master key.
pub struct Rewrapped {
    pub id: String,
    pub old_master_key_id: String,
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
}

panel_domain::string_enum!(
    /// What a definition row holds: templates, workflows and schedules share one table.
    DefinitionKind { Template = "template", Workflow = "workflow", Schedule = "schedule" }
);

#[derive(Debug, Clone, Serialize)]
pub struct DefinitionRow {
    pub kind: DefinitionKind,
    pub name: String,
    /// The JSON the user wrote (for a template: subject, text, html).
    pub doc: serde_json::Value,
    pub enabled: bool,
    /// A workflow's event type.
    pub trigger: Option<String>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fire_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// A definition to store. `trigger` is a workflow's event type; `next_fire_at` a schedule's.
#[derive(Debug, Clone)]
pub struct NewDefinition {
    pub kind: DefinitionKind,
    pub name: String,
    pub doc: serde_json::Value,
    pub enabled: bool,
    pub trigger: Option<String>,
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// How a definition is saved: `create` refuses an existing name, `update` a missing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    Create,
    Update,
    Upsert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    Created,
    Updated,
    /// `create` of a name that exists; nothing written.
    Exists,
    /// `update` of a name that does not exist; nothing written.
    Missing,
}

/// One step of a run about to be committed: its outcome for the history and, when it made
/// one, the message to enqueue (the store adds `message_id` to the outcome).
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub outcome: serde_json::Value,
    pub message: Option<(Origin, OutgoingMessage)>,
}

#[derive(Debug, Clone)]
pub struct NewRun {
    pub kind: RunKind,
    pub name: String,
    pub trigger: Trigger,
    /// Set for clock-driven schedule runs: the store keeps one run per key.
    pub fire_key: Option<String>,
    pub fire_time: Option<DateTime<Utc>>,
    pub event_id: Option<i64>,
    pub missed: u32,
    pub status: RunStatus,
    pub detail: Option<String>,
    pub service: String,
    pub steps: Vec<PlannedStep>,
}

/// A clock-driven fire: the schedule advances from `expected_next` to `new_next` only if no
/// other service advanced it first.
#[derive(Debug, Clone)]
pub struct ScheduleAdvance {
    pub name: String,
    pub expected_next: DateTime<Utc>,
    pub fire_time: DateTime<Utc>,
    pub new_next: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunMessage {
    pub id: i64,
    pub state: MessageState,
    pub subject: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub kind: RunKind,
    pub name: String,
    pub trigger: Trigger,
    pub fire_time: Option<DateTime<Utc>>,
    pub event_id: Option<i64>,
    pub started_at: DateTime<Utc>,
    pub missed: i64,
    pub status: RunStatus,
    pub detail: Option<String>,
    pub service: String,
    pub steps: serde_json::Value,
    pub messages: Vec<RunMessage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub id: i64,
    /// False when the idempotency key was seen before: nothing ran this time.
    pub created: bool,
    /// The workflow runs it started: as written, or for a repeated key as they are now.
    pub runs: Vec<RunRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminRow {
    pub name: String,
    pub role: String,
    #[serde(skip)]
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Who a session or API token belongs to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub admin: String,
    pub role: String,
    pub kind: String,
    /// Sessions only: the CSRF token every state-changing request must carry.
    pub csrf: Option<String>,
    /// The newest relay settings version (0 before the first save) and the definitions
    /// generation, read in the same statement: what was current while the request that
    /// brought the token was on its way, without a read of its own.
    pub settings_version: i64,
    pub definitions: i64,
    /// When a session (or a token with an end) stops being accepted.
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a request answered from a kept token owner was authorized on
/// (`Store::token_owner_kept`): the token, its owner's role and the relay settings version. The
/// request's write goes in only while all three are unchanged, checked in the statement that
/// writes it; else nothing is written and it fails with `StoreError::Stale`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessFence {
    pub(crate) token_hash: String,
    pub(crate) role: String,
    pub(crate) settings_version: i64,
}

impl AccessFence {
    /// The digest of the token the request came with: to read it again after `Stale`.
    pub fn token_hash(&self) -> &str {
        &self.token_hash
    }
}

// Not derived: a token's digest identifies it (`panel admin token list` shows a prefix), and a
// debug print of a request's state must not carry it into a log.
impl std::fmt::Debug for AccessFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessFence")
            .field("role", &self.role)
            .field("settings_version", &self.settings_version)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    /// The start of the token's digest: names it for `revoke_token`, tells nothing about it.
    pub id: String,
    pub admin: String,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The outcome of reserving a sign-in attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInReservation {
    /// Counted; the ids are given back with `forgive_sign_in` when the password was right.
    Reserved(Vec<i64>),
    /// Too many attempts; the oldest counted one, from which the wait follows.
    Blocked { oldest: DateTime<Utc> },
}

/// Messages that reached `state` in one hour (by their last update).
#[derive(Debug, Clone, Serialize)]
pub struct HourlyCount {
    pub hour: DateTime<Utc>,
    pub state: MessageState,
    pub count: i64,
}

/// The newest attempt that did not deliver, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct RelayError {
    pub message_id: i64,
    pub at: DateTime<Utc>,
    pub relay: String,
    pub route: Option<String>,
    pub outcome: AttemptOutcome,
    pub stage: Stage,
    pub code: Option<i64>,
    pub reply: Option<String>,
    pub detail: String,
    pub hint: Option<String>,
    /// True when no attempt delivered since: the relay (or its configuration) is failing now.
    pub current: bool,
}

/// A message a received report may be about: its state and its recipients with theirs.
#[derive(Debug, Clone)]
pub struct BounceTarget {
    pub id: i64,
    pub state: MessageState,
    pub recipients: Vec<(String, RecipientState)>,
}

/// One row of a received report, as the service decided it.
#[derive(Debug, Clone, Default)]
pub struct BounceRow {
    /// `failed`, `delayed`, `auto_reply`, `delivered`, `unknown`.
    pub kind: String,
    pub recipient: Option<String>,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
    pub reporting_mta: Option<String>,
    /// The address it came to (the VERP address).
    pub envelope_to: String,
    pub subject: String,
    /// Why it is unmatched, or why it changes nothing.
    pub reason: Option<String>,
    /// The report's first 64 KB, as received.
    pub report: String,
    /// The state the recipient moves to (`bounced`, `delayed`), if any.
    pub moves_to: Option<RecipientState>,
}

/// A stored report.
#[derive(Debug, Clone, Serialize)]
pub struct BounceRecord {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub message_id: Option<i64>,
    pub kind: String,
    pub recipient: Option<String>,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
    pub reporting_mta: Option<String>,
    pub envelope_to: String,
    pub subject: String,
    pub reason: Option<String>,
}
