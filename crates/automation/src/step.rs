//! Steps of a schedule, workflow or dispatch. Email is the one kind today; `kind` in the JSON
//! leaves room for others.

use panel_domain::message::{Attachment, Draft};
use panel_domain::{FieldErrors, Mailbox};
use serde::{Deserialize, Serialize};

use crate::template::{Engine, Template, TemplateError};

/// Largest total size of a step's attachments.
pub const MAX_ATTACHMENT_BYTES: usize = 5 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Email(EmailStep),
}

/// Sends one message. Either `template` (a stored template's name) or an inline `subject` and
/// `text` (and optional `html`). Every address field is a template over the context: an entry
/// that renders empty adds no recipient; a step with no recipient at all goes to the Fallback
/// recipient.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Overrides the settings' From address; only when the relay settings allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentSpec>,
}

/// An attachment rendered from the context (a CSV report, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentSpec {
    pub filename: String,
    #[serde(default = "text_plain")]
    pub content_type: String,
    pub content: String,
}

fn text_plain() -> String {
    "text/plain".into()
}

/// One step's message, ready for the queue, with what the run history should say about it.
#[derive(Debug, Clone)]
pub struct StepMessage {
    pub draft: Draft,
    /// Why the Fallback recipient was used, when it was.
    pub note: Option<String>,
}

impl Step {
    /// The stored template this step needs, if any.
    pub fn template_name(&self) -> Option<&str> {
        match self {
            Step::Email(e) => e.template.as_deref(),
        }
    }

    /// Every template source the step renders itself (not a stored template it names), by part.
    pub fn sources(&self) -> Vec<(String, &str)> {
        match self {
            Step::Email(e) => e.sources(),
        }
    }

    /// Checks the step's shape and template syntax; `field` prefixes each error (`steps[0]`).
    pub fn check(&self, field: &str, errors: &mut FieldErrors) {
        match self {
            Step::Email(e) => e.check(field, errors),
        }
    }
}

impl EmailStep {
    fn check(&self, field: &str, errors: &mut FieldErrors) {
        let inline = self.subject.is_some() || self.text.is_some() || self.html.is_some();
        match (&self.template, inline) {
            (Some(_), true) => {
                errors.push(field, "names a template and also has an inline subject/text/html; use one or the other")
            }
            (None, false) => errors.push(field, "needs a template or an inline subject and text"),
            (None, true) if self.subject.is_none() || self.text.is_none() => {
                errors.push(field, "an inline message needs both subject and text")
            }
            _ => {}
        }
        if let Some(name) = &self.template
            && let Err(e) = crate::check_name(name)
        {
            errors.push(format!("{field}.template"), e);
        }
        let engine = Engine::strict();
        let sources = self.sources();
        // An address written out (no template in it) is checked now, not when the run fails.
        let lists = [("to", &self.to), ("cc", &self.cc), ("bcc", &self.bcc)];
        let literals = lists.iter().flat_map(|(kind, list)| {
            list.iter().enumerate().map(move |(i, expr)| (format!("{kind}[{i}]"), expr.as_str()))
        });
        let single = [("reply_to", &self.reply_to), ("from", &self.from)];
        let literals = literals.chain(single.iter().filter_map(|(k, v)| v.as_deref().map(|v| (k.to_string(), v))));
        for (part, expr) in literals {
            let expr = expr.trim();
            let literal = !expr.contains("{{") && !expr.contains("{%") && !expr.is_empty() && expr != "none";
            if literal && let Err(e) = Mailbox::parse(&part, expr) {
                errors.push(format!("{field}.{part}"), e.message);
            }
        }
        for (i, a) in self.attachments.iter().enumerate() {
            if !panel_domain::message::is_valid_content_type(&a.content_type) {
                errors
                    .push(format!("{field}.attachments[{i}].content_type"), "is not a valid MIME type (e.g. text/csv)");
            }
        }
        for (part, source) in sources {
            if let Err(e) = engine.check(&part, source) {
                errors.push(format!("{field}.{part}"), e.to_string());
            }
        }
    }

    /// Every template source the step renders itself (not a stored template it names), by part.
    fn sources(&self) -> Vec<(String, &str)> {
        let mut sources: Vec<(String, &str)> = Vec::new();
        for (part, source) in [("subject", &self.subject), ("text", &self.text), ("html", &self.html)] {
            sources.extend(source.as_deref().map(|s| (part.to_string(), s)));
        }
        for (kind, list) in [("to", &self.to), ("cc", &self.cc), ("bcc", &self.bcc)] {
            sources.extend(list.iter().enumerate().map(|(i, expr)| (format!("{kind}[{i}]"), expr.as_str())));
        }
        for (kind, value) in [("reply_to", &self.reply_to), ("from", &self.from)] {
            sources.extend(value.as_deref().map(|v| (kind.to_string(), v)));
        }
        for (i, a) in self.attachments.iter().enumerate() {
            sources.push((format!("attachments[{i}].filename"), &a.filename));
            sources.push((format!("attachments[{i}].content"), &a.content));
        }
        sources
    }

    /// Renders the step against `ctx`. `template` is the stored template when the step names one.
    /// A recipient that renders to something that is not an address fails the step: a mangled
    /// address is never sent to.
    pub fn render<C: serde::Serialize + ?Sized>(
        &self,
        template: Option<&Template>,
        ctx: &C,
    ) -> Result<StepMessage, TemplateError> {
        let ctx = &crate::template::context(ctx);
        let inline;
        let template = match template {
            Some(t) => t,
            None => {
                inline = Template {
                    subject: self.subject.clone().unwrap_or_default(),
                    text: self.text.clone().unwrap_or_default(),
                    html: self.html.clone(),
                };
                &inline
            }
        };
        let content = template.render(ctx)?;
        let lenient = Engine::lenient();
        let mut empty = Vec::new();
        let mut addresses = |kind: &str, list: &[String]| -> Result<Vec<String>, TemplateError> {
            let mut out = Vec::new();
            for (i, expr) in list.iter().enumerate() {
                let part = format!("{kind}[{i}]");
                let value = lenient.render(&part, expr, ctx)?;
                match single_address(&part, expr, &value)? {
                    Some(a) => out.push(a),
                    None => empty.push(format!("{part} `{}`", expr.trim())),
                }
            }
            Ok(out)
        };
        let to = addresses("to", &self.to)?;
        let cc = addresses("cc", &self.cc)?;
        let bcc = addresses("bcc", &self.bcc)?;
        let reply_to = self.optional_address(lenient, "reply_to", &self.reply_to, ctx)?;
        let from = self.optional_address(lenient, "from", &self.from, ctx)?;
        let strict = Engine::strict();
        let mut attachments = Vec::new();
        let mut total = 0;
        for (i, a) in self.attachments.iter().enumerate() {
            let filename = strict.render(&format!("attachments[{i}].filename"), &a.filename, ctx)?.trim().to_string();
            let content = strict.render(&format!("attachments[{i}].content"), &a.content, ctx)?;
            total += content.len();
            if total > MAX_ATTACHMENT_BYTES {
                return Err(plain_error(
                    format!("attachments[{i}]"),
                    format!("the attachments are larger than {} MiB together", MAX_ATTACHMENT_BYTES >> 20),
                ));
            }
            attachments.push(Attachment { filename, content_type: a.content_type.clone(), content });
        }
        // No To and no Cc: the Fallback recipient gets it (a Bcc alone reaches no one it was for).
        let no_recipient = to.is_empty() && cc.is_empty();
        let also_bcc = if bcc.is_empty() { "" } else { " (and the Bcc recipients)" };
        let note = no_recipient.then(|| {
            if empty.is_empty() {
                format!("the step names no To or Cc recipient; sent to the Fallback recipient{also_bcc}")
            } else {
                format!(
                    "no To or Cc recipient: {} rendered empty; sent to the Fallback recipient{also_bcc}",
                    empty.join(", ")
                )
            }
        });
        Ok(StepMessage {
            draft: Draft {
                to,
                cc,
                bcc,
                reply_to,
                from,
                subject: content.subject,
                text: content.text,
                html: content.html,
                attachments,
                // The run decides: the definition's priority, or its origin's.
                priority: None,
            },
            note,
        })
    }

    fn optional_address(
        &self,
        engine: &Engine,
        part: &str,
        expr: &Option<String>,
        ctx: &minijinja::Value,
    ) -> Result<Option<String>, TemplateError> {
        let Some(expr) = expr else { return Ok(None) };
        let value = engine.render(part, expr, ctx)?;
        single_address(part, expr, &value)
    }
}

/// A rendered address field: empty means none; anything else must be exactly one valid address.
fn single_address(part: &str, expr: &str, value: &str) -> Result<Option<String>, TemplateError> {
    let value = value.trim();
    if value.is_empty() || value == "none" {
        return Ok(None);
    }
    match Mailbox::parse(part, value) {
        Ok(m) => Ok(Some(m.to_string())),
        Err(e) => Err(TemplateError {
            part: part.into(),
            line: None,
            near: Some(expr.trim().into()),
            message: format!("rendered to '{}', which is not a valid address: {}", value.escape_debug(), e.message),
        }),
    }
}

fn plain_error(part: String, message: String) -> TemplateError {
    TemplateError { part, line: None, near: None, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn step(json: Value) -> EmailStep {
        match serde_json::from_value::<Step>(json).unwrap() {
            Step::Email(e) => e,
        }
    }

    #[test]
    fn recipients_come_from_the_context() {
        let s = step(json!({"kind": "email", "subject": "Hi {{ object.name }}", "text": "t",
            "to": ["{{ object.manager.mail }}"], "cc": ["audit@example.org"], "bcc": []}));
        let m = s.render(None, &json!({"object": {"name": "Ann", "manager": {"mail": "boss@example.org"}}})).unwrap();
        assert_eq!(m.draft.to, ["boss@example.org"]);
        assert_eq!(m.draft.cc, ["audit@example.org"]);
        assert_eq!(m.draft.subject, "Hi Ann");
        assert!(m.note.is_none());
    }

    #[test]
    fn no_recipient_says_which_expressions_were_empty() {
        let s = step(json!({"kind": "email", "subject": "s", "text": "t", "to": ["{{ object.manager.mail }}"]}));
        let m = s.render(None, &json!({"object": {}})).unwrap();
        assert!(m.draft.to.is_empty());
        let note = m.note.unwrap();
        assert!(note.contains("to[0] `{{ object.manager.mail }}` rendered empty"), "{note}");
    }

    #[test]
    fn a_recipient_that_is_not_an_address_fails_with_expression_and_value() {
        let s = step(json!({"kind": "email", "subject": "s", "text": "t", "to": ["{{ object.mail }}"]}));
        let e = s.render(None, &json!({"object": {"mail": "bob at example"}})).unwrap_err();
        assert_eq!(e.part, "to[0]");
        assert_eq!(e.near.as_deref(), Some("{{ object.mail }}"));
        assert!(e.message.contains("'bob at example'"), "{e}");
        let e = s.render(None, &json!({"object": {"mail": "a@example.org\r\nBcc: x@evil.example"}})).unwrap_err();
        assert!(e.message.contains("not a valid address"), "{e}");
    }

    #[test]
    fn attachments_render_from_the_context() {
        let s = step(json!({"kind": "email", "subject": "Report", "text": "attached", "to": ["a@example.org"],
            "attachments": [{"filename": "users-{{ day }}.csv", "content_type": "text/csv",
                "content": "name\n{% for u in users %}{{ u }}\n{% endfor %}"}]}));
        let m = s.render(None, &json!({"day": "2026-11-26", "users": ["ann", "bob"]})).unwrap();
        assert_eq!(m.draft.attachments[0].filename, "users-2026-11-26.csv");
        assert_eq!(m.draft.attachments[0].content, "name\nann\nbob\n");
    }

    #[test]
    fn check_reports_shape_and_syntax_problems() {
        let mut errors = FieldErrors::default();
        step(json!({"kind": "email", "template": "t", "subject": "x", "to": ["{{ a"]})).check("steps[0]", &mut errors);
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["steps[0]", "steps[0].to[0]"]);
        let mut errors = FieldErrors::default();
        step(json!({"kind": "email", "text": "x"})).check("steps[1]", &mut errors);
        assert!(errors.0[0].message.contains("both subject and text"));
        assert!(serde_json::from_value::<Step>(json!({"kind": "email", "tu": []})).is_err(), "typos are refused");
        // Written-out addresses are checked at save, all of them; templated ones when rendered.
        let mut errors = FieldErrors::default();
        step(json!({"kind": "email", "subject": "s", "text": "t", "to": ["x@@y", "{{ object.mail }}"],
            "bcc": ["not an address"], "reply_to": "ok@example.org"}))
        .check("steps[2]", &mut errors);
        let fields: Vec<_> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["steps[2].to[0]", "steps[2].bcc[0]"]);
        assert!(serde_json::from_value::<Step>(json!({"kind": "fax"})).is_err());
    }
}
