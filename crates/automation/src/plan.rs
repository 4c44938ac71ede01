//! Planning a run: every step rendered against the run's context, each ending as a message to
//! queue or a failure with its reason, and the run's status from its steps. Pure: the service
//! loads the templates and settings, commits the plan, and queues its messages.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use panel_domain::run::RunStatus;
use panel_domain::{EmailAddress, Mailbox, OutgoingMessage};
use serde::Serialize;

use crate::step::Step;
use crate::template::Template;

panel_domain::string_enum!(
    /// How one step came out.
    StepStatus { Queued = "queued", Failed = "failed" }
);

/// One step's outcome, as the run history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepOutcome {
    pub step: usize,
    pub kind: &'static str,
    pub status: StepStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<String>>,
    /// Queued steps only: why the Fallback recipient was used, or null when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StepOutcome {
    fn failed(step: usize, error: String) -> StepOutcome {
        StepOutcome {
            step,
            kind: "email",
            status: StepStatus::Failed,
            subject: None,
            recipients: None,
            note: None,
            error: Some(error),
        }
    }
}

/// A step's outcome and, when it made one, the message to queue.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub outcome: StepOutcome,
    pub message: Option<OutgoingMessage>,
}

/// What every step needs from the relay settings.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    pub from: &'a Mailbox,
    pub fallback_recipient: &'a EmailAddress,
    pub allow_from_override: bool,
    /// A step whose recipients fall outside the allowed domains fails with the reason.
    pub policy: &'a panel_domain::policy::RecipientPolicy,
}

/// A planned run: its status, a note when steps failed, and its steps in order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub status: RunStatus,
    pub detail: Option<String>,
    pub steps: Vec<PlannedStep>,
}

/// Renders every step against `ctx`. A step that fails (a missing template, a template error,
/// a recipient that is not an address, a From the settings do not allow) is recorded with its
/// reason and the others still run. `random` gives each message its Message-ID's randomness.
pub fn plan_steps<C: serde::Serialize + ?Sized>(
    steps: &[Step],
    ctx: &C,
    templates: &HashMap<String, Template>,
    sender: Sender<'_>,
    now: DateTime<Utc>,
    random: &mut dyn FnMut() -> u128,
) -> Plan {
    let planned: Vec<PlannedStep> =
        steps.iter().enumerate().map(|(i, s)| plan_step(i, s, ctx, templates, sender, now, random())).collect();
    let queued = planned.iter().filter(|p| p.message.is_some()).count();
    let status = match queued {
        n if n == planned.len() => RunStatus::Queued,
        0 => RunStatus::Failed,
        _ => RunStatus::Partial,
    };
    let detail = (status != RunStatus::Queued)
        .then(|| format!("{} of {} step(s) failed", planned.len() - queued, planned.len()));
    Plan { status, detail, steps: planned }
}

fn plan_step<C: serde::Serialize + ?Sized>(
    index: usize,
    step: &Step,
    ctx: &C,
    templates: &HashMap<String, Template>,
    sender: Sender<'_>,
    now: DateTime<Utc>,
    random: u128,
) -> PlannedStep {
    let failed = |error: String| PlannedStep { outcome: StepOutcome::failed(index, error), message: None };
    let Step::Email(email) = step;
    let template = match &email.template {
        Some(name) => match templates.get(name) {
            Some(t) => Some(t),
            None => return failed(format!("template '{name}' does not exist")),
        },
        None => None,
    };
    let mut rendered = match email.render(template, ctx) {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    // Only Bcc left (the manager's address rendered empty): the mail would reach nobody it was
    // meant for, so the Fallback recipient goes in To and the Bcc stays.
    let bcc_only = rendered.draft.to.is_empty() && rendered.draft.cc.is_empty() && !rendered.draft.bcc.is_empty();
    if bcc_only {
        rendered.draft.to.push(sender.fallback_recipient.to_string());
    }
    if rendered.draft.from.is_some() && !sender.allow_from_override {
        return failed(
            "the step sets its own From address, which the relay settings do not allow \
             (panel smtp set --allow-from-override true)"
                .into(),
        );
    }
    let prepared = OutgoingMessage::prepare(&rendered.draft, sender.from, sender.fallback_recipient, now, random)
        .and_then(|m| sender.policy.check(&m).map(|()| m));
    match prepared {
        Ok(mut message) => PlannedStep {
            outcome: StepOutcome {
                step: index,
                kind: "email",
                status: StepStatus::Queued,
                subject: Some(message.subject.clone()),
                recipients: Some(message.recipients().iter().map(|(_, a)| a.to_string()).collect()),
                note: Some(rendered.note),
                error: None,
            },
            message: Some({
                message.used_fallback_recipient |= bcc_only;
                message
            }),
        },
        Err(errors) => failed(errors.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn steps(list: Value) -> Vec<Step> {
        serde_json::from_value(list).unwrap()
    }

    fn plan(list: Value, ctx: Value, allow_from_override: bool) -> Plan {
        let from = Mailbox::parse("from", "Panel <panel@example.org>").unwrap();
        let fallback = EmailAddress::parse("fallback_recipient", "ops@example.org").unwrap();
        let policy = panel_domain::policy::RecipientPolicy::deliver(&fallback);
        let sender = Sender { from: &from, fallback_recipient: &fallback, allow_from_override, policy: &policy };
        let mut n = 0;
        plan_steps(&steps(list), &ctx, &HashMap::new(), sender, Utc::now(), &mut || {
            n += 1;
            n
        })
    }

    #[test]
    fn a_failing_step_is_recorded_and_the_others_still_run() {
        let p = plan(
            json!([
                {"kind": "email", "subject": "Hi {{ object.name }}", "text": "t", "to": ["{{ object.mail }}"]},
                {"kind": "email", "template": "missing", "to": ["a@example.org"]},
                {"kind": "email", "subject": "s", "text": "t", "to": ["{{ object.name }}"]},
            ]),
            json!({"object": {"name": "Ann", "mail": "ann@example.org"}}),
            false,
        );
        assert_eq!(p.status, RunStatus::Partial);
        assert_eq!(p.detail.as_deref(), Some("2 of 3 step(s) failed"));
        let first = serde_json::to_value(&p.steps[0].outcome).unwrap();
        assert_eq!(
            first,
            json!({"step": 0, "kind": "email", "status": "queued", "subject": "Hi Ann",
                   "recipients": ["ann@example.org"], "note": null})
        );
        let second = serde_json::to_value(&p.steps[1].outcome).unwrap();
        assert_eq!(
            second,
            json!({"step": 1, "kind": "email", "status": "failed", "error": "template 'missing' does not exist"})
        );
        assert!(p.steps[2].outcome.error.as_deref().unwrap().contains("Ann"), "{:?}", p.steps[2].outcome);
        assert!(p.steps[1].message.is_none() && p.steps[0].message.is_some());
    }

    #[test]
    fn no_recipient_goes_to_the_fallback_with_a_note_and_a_foreign_from_needs_permission() {
        let p = plan(
            json!([{"kind": "email", "subject": "s", "text": "t", "to": ["{{ object.manager }}"]}]),
            json!({"object": {}}),
            false,
        );
        assert_eq!(p.status, RunStatus::Queued);
        assert_eq!(p.steps[0].outcome.recipients.as_deref(), Some(&["ops@example.org".to_string()][..]));
        assert!(p.steps[0].outcome.note.clone().flatten().unwrap().contains("object.manager"));
        let own_from =
            json!([{"kind": "email", "subject": "s", "text": "t", "from": "x@example.org", "to": ["a@example.org"]}]);
        let refused = plan(own_from.clone(), json!({}), false);
        assert_eq!(refused.status, RunStatus::Failed);
        assert!(refused.steps[0].outcome.error.as_deref().unwrap().contains("--allow-from-override true"));
        assert_eq!(plan(own_from, json!({}), true).status, RunStatus::Queued);
    }
}
