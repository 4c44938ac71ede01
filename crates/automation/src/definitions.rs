//! Schedules, workflows and dispatches as users write them (JSON files, API bodies), with their
//! validation. Every problem is reported at once, each naming its field.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use panel_domain::FieldErrors;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::step::Step;
use crate::template::{Engine, Template, TemplateError};
use crate::timing::{Timing, WeeklyRule};

pub const MAX_STEPS: usize = 50;

fn yes() -> bool {
    true
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default = "utc")]
    pub timezone: String,
    /// A cron expression (5 fields, or 6 with seconds first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The weekly form, instead of `cron`. With neither, the schedule runs only when invoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<WeeklyRule>,
    /// Fixed values the steps' templates can use as `data`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    /// `urgent` or `bulk`; unset: bulk for schedules and dispatches, urgent for workflows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<panel_domain::Priority>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The event type that starts it, e.g. `user.created`.
    pub trigger: String,
    /// An expression over the event; the workflow runs only when it is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// `urgent` or `bulk`; unset: bulk for schedules and dispatches, urgent for workflows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<panel_domain::Priority>,
    pub steps: Vec<Step>,
}

/// An ad-hoc run from an outside tool (the seed's "special-case schedule").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    /// `urgent` or `bulk`; unset: bulk for schedules and dispatches, urgent for workflows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<panel_domain::Priority>,
    pub steps: Vec<Step>,
}

/// Names of templates, schedules and workflows, and event types: `welcome`, `user.created`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 100 {
        return Err("must be 1-100 characters".into());
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(ok_char) {
        return Err(format!("'{name}' may use letters, digits, '.', '_' and '-', starting with a letter or digit"));
    }
    Ok(())
}

fn check_steps(steps: &[Step], errors: &mut FieldErrors) {
    if steps.is_empty() {
        errors.push("steps", "needs at least one step");
    }
    if steps.len() > MAX_STEPS {
        errors.push("steps", format!("has more than {MAX_STEPS} steps"));
    }
    for (i, s) in steps.iter().enumerate() {
        s.check(&format!("steps[{i}]"), errors);
    }
}

fn check_named(name: &str, errors: &mut FieldErrors) {
    if let Err(e) = check_name(name) {
        errors.push("name", e);
    }
}

impl ScheduleDef {
    pub fn validate(&self) -> Result<Timing, FieldErrors> {
        let mut errors = FieldErrors::default();
        check_named(&self.name, &mut errors);
        let timing = Timing::parse(&self.timezone, self.cron.as_deref(), self.weekly.as_ref())
            .map_err(|e| e.into_iter().for_each(|(f, m)| errors.push(f, m)))
            .ok();
        if !(self.data.is_null() || self.data.is_object()) {
            errors.push("data", "must be a JSON object");
        }
        check_steps(&self.steps, &mut errors);
        match timing {
            Some(t) if errors.is_empty() => Ok(t),
            _ => Err(errors),
        }
    }

    /// What a schedule's templates see.
    pub fn context(&self, fire_time: DateTime<Utc>, trigger: &str, timing: &Timing) -> Value {
        json!({
            "schedule": {
                "name": self.name,
                "trigger": trigger,
                "fire_time": fire_time.with_timezone(&timing.timezone).to_rfc3339_opts(SecondsFormat::Secs, true),
                "timezone": timing.timezone.name(),
            },
            "data": self.data,
        })
    }
}

impl WorkflowDef {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        check_named(&self.name, &mut errors);
        if let Err(e) = check_name(&self.trigger) {
            errors.push("trigger", format!("{e} (an event type such as user.created)"));
        }
        if let Some(c) = &self.condition
            && let Err(e) = Engine::strict().condition_syntax(c)
        {
            errors.push("condition", e.to_string());
        }
        check_steps(&self.steps, &mut errors);
        errors.into_result(|| ())
    }

    /// Whether the condition or any step (with the stored templates it names) may read the
    /// top-level variable `name` of the context, e.g. `event`: a run that does not can be
    /// planned before the event has its id.
    pub fn reads(&self, name: &str, templates: &HashMap<String, Template>) -> bool {
        let engine = Engine::strict();
        self.condition.as_deref().is_some_and(|c| engine.condition_reads(c, name))
            || self.steps.iter().any(|step| {
                let named = step.template_name().and_then(|t| templates.get(t));
                let stored = named.into_iter().flat_map(Template::sources);
                step.sources().into_iter().map(|(_, s)| s).chain(stored).any(|s| engine.reads(s, name))
            })
    }

    /// True when the event satisfies the condition (or there is none).
    pub fn matches<C: serde::Serialize + ?Sized>(&self, ctx: &C) -> Result<bool, TemplateError> {
        match &self.condition {
            None => Ok(true),
            Some(c) => Engine::strict().condition(c, ctx),
        }
    }
}

impl DispatchDef {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        check_named(&self.name, &mut errors);
        if !(self.data.is_null() || self.data.is_object()) {
            errors.push("data", "must be a JSON object");
        }
        check_steps(&self.steps, &mut errors);
        errors.into_result(|| ())
    }

    pub fn context(&self) -> Value {
        json!({ "dispatch": { "name": self.name }, "data": self.data })
    }
}

/// What a workflow's templates and condition see: `object` is the event's object.
///
/// It borrows the object rather than copying it into a JSON value: the engine copies it once
/// more into its own values (`template::context`), and an event's object is read for each event.
/// Fields in the order a JSON value's keys had (sorted), for templates that walk a map.
#[derive(Debug, Serialize)]
pub struct EventContext<'a> {
    event: EventMeta<'a>,
    object: &'a Value,
}

#[derive(Debug, Serialize)]
struct EventMeta<'a> {
    id: i64,
    received_at: String,
    #[serde(rename = "type")]
    event_type: &'a str,
}

pub fn event_context<'a>(
    event_id: i64,
    event_type: &'a str,
    object: &'a Value,
    received_at: DateTime<Utc>,
) -> EventContext<'a> {
    EventContext {
        event: EventMeta {
            id: event_id,
            received_at: received_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            event_type,
        },
        object,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workflow_reads_the_event_when_its_condition_a_step_or_a_named_template_does() {
        let workflow = |condition: Option<&str>, step: Value| -> WorkflowDef {
            serde_json::from_value(
                json!({"name": "w", "trigger": "user.created", "condition": condition, "steps": [step]}),
            )
            .unwrap()
        };
        let inline = |text: &str| json!({"kind": "email", "subject": "s", "text": text, "to": ["{{ object.mail }}"]});
        let named = json!({"kind": "email", "template": "welcome", "to": ["{{ object.mail }}"]});
        let templates = |text: &str| {
            HashMap::from([("welcome".to_string(), Template { subject: "Hi".into(), text: text.into(), html: None })])
        };
        let none = HashMap::new();
        assert!(!workflow(Some("object.x == 1"), inline("{{ object.login }}")).reads("event", &none));
        assert!(workflow(Some("event.id > 3"), inline("t")).reads("event", &none), "the condition");
        assert!(workflow(None, inline("Event {{ event.id }}")).reads("event", &none), "an inline part");
        let to = json!({"kind": "email", "subject": "s", "text": "t", "to": ["{{ event.type }}@example.org"]});
        assert!(workflow(None, to).reads("event", &none), "a recipient");
        assert!(
            workflow(None, named.clone()).reads("event", &templates("{{ event.received_at }}")),
            "a stored template"
        );
        assert!(!workflow(None, named.clone()).reads("event", &templates("{{ object.login }}")));
        assert!(!workflow(None, inline("{% set event = 1 %}{{ event }}")).reads("event", &none), "its own variable");
        assert!(workflow(None, named).reads("event", &templates("{{ broken")), "what it cannot parse, it may");
    }

    #[test]
    fn the_issue_s_workflow_shape_parses_and_validates() {
        let w: WorkflowDef = serde_json::from_value(json!({
            "name": "welcome", "enabled": true, "trigger": "user.created",
            "condition": "object.department == 'Finance'",
            "steps": [{"kind": "email", "template": "welcome", "to": ["{{ object.manager.mail }}"], "cc": [], "bcc": []}]
        }))
        .unwrap();
        w.validate().unwrap();
        let (finance, hr) = (json!({"department": "Finance"}), json!({"department": "HR"}));
        assert!(w.matches(&event_context(1, "user.created", &finance, Utc::now())).unwrap());
        assert!(!w.matches(&event_context(1, "user.created", &hr, Utc::now())).unwrap());
    }

    #[test]
    fn an_event_context_is_the_event_and_its_object_as_templates_read_them() {
        let object = json!({"login": "ann", "groups": ["a", "b"]});
        let at = DateTime::parse_from_rfc3339("2026-12-08T09:30:00.250Z").unwrap().to_utc();
        let ctx = event_context(42, "user.created", &object, at);
        assert_eq!(
            serde_json::to_value(&ctx).unwrap(),
            json!({"event": {"id": 42, "type": "user.created", "received_at": "2026-12-08T09:30:00Z"}, "object": object})
        );
        // Read where it is, a map's keys walk in the order a JSON value's did: sorted.
        let walked = Engine::strict().render("text", "{% for k in event %}{{ k }} {% endfor %}", &ctx).unwrap();
        assert_eq!(walked, "id received_at type ");
    }

    #[test]
    fn invalid_definitions_report_every_field() {
        let w: WorkflowDef = serde_json::from_value(json!({
            "name": "bad name", "trigger": "", "condition": "object.x ==", "steps": []
        }))
        .unwrap();
        let fields: Vec<_> = w.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["name", "trigger", "condition", "steps"]);
        let s: ScheduleDef = serde_json::from_value(json!({
            "name": "nightly", "timezone": "Europe/Berlin", "cron": "0 9 * * MON-FRI", "data": [1],
            "steps": [{"kind": "email", "subject": "s", "text": "t"}]
        }))
        .unwrap();
        let fields: Vec<_> = s.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["data"]);
        assert!(serde_json::from_value::<ScheduleDef>(json!({"name": "x", "steps": [], "crn": "* * * * *"})).is_err());
    }

    #[test]
    fn names_are_restricted() {
        assert!(check_name("user.created").is_ok());
        assert!(check_name("nightly-report_2").is_ok());
        assert!(check_name("-x").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
    }
}
