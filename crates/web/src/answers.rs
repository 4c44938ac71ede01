//! The API's answers that are not a service type as it stands: each a type, so that the OpenAPI
//! document describes exactly what the handler writes (both come from this one definition).

use chrono::{DateTime, Utc};
use panel_domain::SettingsDoc;
use panel_domain::message::MessageState;
use panel_service::views::{CheckReport, MessageDetail, RetryResult, Run};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

/// An error: what went wrong, and with bad input every field's problem.
#[derive(Serialize, JsonSchema)]
pub(crate) struct Error {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<panel_domain::FieldErrors>,
    /// A template that does not render: where and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<Value>,
}

/// The settings in force with defaults filled in, only the fields the chosen modes use (never
/// a secret), and `credential_status` (`attached` or `detached`) when a credential is named.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct Effective(pub Value);

impl JsonSchema for Effective {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Effective".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "object", "additionalProperties": true,
            "description": "The settings in force, defaults filled in, only the fields the chosen modes use"})
    }
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Settings {
    pub version: i64,
    pub saved_at: DateTime<Utc>,
    pub saved_by: String,
    /// What was saved, as saved.
    pub stored: SettingsDoc,
    /// Null when what is stored is not complete enough to send with.
    pub effective: Option<Effective>,
}

/// A save or restore: the version now in force, its effective view, and notices (fields
/// dropped by a mode change, a credential detached).
#[derive(Serialize, JsonSchema)]
pub(crate) struct Saved {
    pub version: i64,
    pub effective: Effective,
    pub notices: Vec<String>,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Versions {
    pub versions: Vec<panel_service::views::SettingsVersion>,
}

/// The relay check, stage by stage.
#[derive(Serialize, JsonSchema)]
pub(crate) struct Check {
    #[serde(flatten)]
    pub report: CheckReport,
    /// True when unsaved settings (the body) were checked, false for the saved ones.
    pub draft: bool,
}

/// A message accepted into the queue.
#[derive(Serialize, JsonSchema)]
pub(crate) struct Enqueued {
    pub id: i64,
    /// False when no Panel Service is running to deliver it.
    pub service_running: bool,
    /// With `wait`: the message as it stood when its outcome was known or the wait ended.
    pub message: Option<MessageDetail>,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Ids {
    pub ids: Vec<i64>,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Cancelled {
    /// Always `cancelled`.
    pub result: &'static str,
    /// The state the message was in.
    pub was: MessageState,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Requeued {
    pub requeued: u64,
}

/// A retry that cannot be done: the message is not failed, or its content was removed.
#[derive(Serialize, JsonSchema)]
pub(crate) struct RetryConflict {
    pub error: String,
    #[serde(flatten)]
    pub result: RetryResult,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Stored {
    pub stored: bool,
    pub replaced: bool,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct SavedDefinition {
    pub name: String,
    /// `created` or `updated`.
    pub outcome: String,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Event {
    pub event_id: i64,
    /// False when the idempotency key was seen before: nothing ran this time.
    pub created: bool,
    pub runs: Vec<Run>,
}

#[derive(Serialize, JsonSchema)]
pub(crate) struct Me {
    pub name: String,
    pub role: String,
    /// Send as `X-CSRF-Token` with a session's writes; null for an API token.
    pub csrf: Option<String>,
}

/// The relay settings table, as the web form reads it.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct SettingsTable(pub Value);

impl JsonSchema for SettingsTable {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SettingsTable".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "object", "required": ["groups", "settings"], "properties": {
            "groups": {"type": "array", "items": {"type": "object", "required": ["name", "label"]}},
            "settings": {"type": "array", "items": {"type": "object", "required": ["name", "flag", "type", "label"]}}
        }})
    }
}

/// An answer that is a message file (`message/rfc822`), not JSON.
pub(crate) struct Eml;

impl JsonSchema for Eml {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Eml".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "contentMediaType": "message/rfc822"})
    }
}

/// A template's preview context: any JSON object.
pub(crate) type Context = Map<String, Value>;
