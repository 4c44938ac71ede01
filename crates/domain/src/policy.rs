//! The recipient policy, for installations that must not mail real people (test environments
//! loaded with production data): `deliver` (as addressed), `redirect` (every message to one
//! address, the original recipients named in a header and at the top of the body), and the
//! allowed domains (a recipient outside them is refused at enqueue, and never sent to). Pure:
//! the worker asks `plan` what one attempt sends and `report_for_pending` what it meant.

use crate::address::{EmailAddress, Mailbox};
use crate::classify::{Failure, FailureKind, Stage};
use crate::delivery::{RecipientResult, SendReport};
use crate::errors::FieldErrors;
use crate::message::OutgoingMessage;
use crate::string_enum;

string_enum!(
    /// What happens to a message's recipients.
    PolicyMode {
        Deliver = "deliver" => "Deliver (as addressed)",
        Redirect = "redirect" => "Redirect every message to one address",
        Capture = "capture" => "Capture (send nothing; keep each message to read)",
    }
);

/// The recipient policy of the settings in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientPolicy {
    pub mode: PolicyMode,
    /// With `Redirect`: where every message goes (the Fallback recipient unless set).
    pub redirect_to: EmailAddress,
    /// Lower-case domains; empty: every domain. A domain allows its subdomains too.
    pub allowed_domains: Vec<String>,
}

impl RecipientPolicy {
    /// Delivers as addressed, to any domain.
    pub fn deliver(fallback: &EmailAddress) -> RecipientPolicy {
        RecipientPolicy { mode: PolicyMode::Deliver, redirect_to: fallback.clone(), allowed_domains: Vec::new() }
    }

    /// What every page, `smtp show`, `smtp check` and the dashboard say while mail does not go
    /// as addressed to anyone: so that nobody forgets a test installation redirecting, or a
    /// production one restricted. `None` for plain delivery.
    pub fn notice(&self) -> Option<String> {
        let domains = (!self.allowed_domains.is_empty())
            .then(|| format!("mail goes only to {} (and their subdomains)", self.allowed_domains.join(", ")));
        match (self.mode, domains) {
            (PolicyMode::Deliver, None) => None,
            (PolicyMode::Deliver, Some(d)) => Some(format!("Recipient policy: {d}; other recipients are refused.")),
            (PolicyMode::Capture, d) => Some(format!(
                "Recipient policy: capture. Nothing is sent; every message is kept in the message log, to read and \
                 download{}.",
                d.map(|d| format!("; {d}")).unwrap_or_default()
            )),
            (PolicyMode::Redirect, d) => Some(format!(
                "Recipient policy: every message is redirected to {}, not sent to its recipients{}.",
                self.redirect_to,
                d.map(|d| format!("; {d}")).unwrap_or_default()
            )),
        }
    }

    /// Whether mail may go to `address` (its domain or a parent of it is allowed).
    pub fn allows(&self, address: &str) -> bool {
        if self.allowed_domains.is_empty() {
            return true;
        }
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d).to_ascii_lowercase();
        self.allowed_domains.iter().any(|d| domain == *d || domain.ends_with(&format!(".{d}")))
    }

    /// Every recipient of `message` outside the allowed domains, each at its field (`to[1]`),
    /// as the enqueue refuses them: nothing is stored.
    pub fn check(&self, message: &OutgoingMessage) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::default();
        for (field, list) in [("to", &message.to), ("cc", &message.cc), ("bcc", &message.bcc)] {
            for (i, m) in list.iter().enumerate() {
                if !self.allows(m.address.as_str()) {
                    errors.push(format!("{field}[{i}]"), self.outside(m.address.as_str()));
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn outside(&self, address: &str) -> String {
        format!(
            "{address} is outside the allowed domains ({}) of the recipient policy; nothing is sent to it \
             (panel smtp set --allowed-domains)",
            self.allowed_domains.join(", ")
        )
    }

    /// What one attempt sends for the claim's `pending` recipients.
    pub fn plan(&self, message: &OutgoingMessage, pending: &[String]) -> PolicyPlan {
        let allowed: Vec<bool> = pending.iter().map(|a| self.allows(a)).collect();
        match self.mode {
            PolicyMode::Deliver => {
                let envelope: Vec<String> =
                    pending.iter().zip(&allowed).filter(|(_, ok)| **ok).map(|(a, _)| a.clone()).collect();
                let mut next = 0;
                let slots = allowed
                    .iter()
                    .map(|ok| {
                        ok.then(|| {
                            next += 1;
                            next - 1
                        })
                    })
                    .collect();
                // Refused recipients leave the headers too: Microsoft Graph sends to the headers.
                let message = allowed.contains(&false).then(|| {
                    let keep = |ms: &[Mailbox]| -> Vec<Mailbox> {
                        ms.iter().filter(|m| self.allows(m.address.as_str())).cloned().collect()
                    };
                    OutgoingMessage {
                        to: keep(&message.to),
                        cc: keep(&message.cc),
                        bcc: keep(&message.bcc),
                        ..message.clone()
                    }
                });
                PolicyPlan { message, envelope, slots, refusal: self.refusals(pending), capture: false }
            }
            PolicyMode::Capture => PolicyPlan {
                message: None,
                envelope: Vec::new(),
                slots: vec![None; pending.len()],
                refusal: self.refusals(pending),
                capture: true,
            },
            PolicyMode::Redirect => {
                let any = allowed.iter().any(|ok| *ok);
                let envelope = if any { vec![self.redirect_to.to_string()] } else { Vec::new() };
                let slots = allowed.iter().map(|ok| ok.then_some(0)).collect();
                let refusal = self.refusals(pending);
                PolicyPlan { message: Some(self.redirected(message)), envelope, slots, refusal, capture: false }
            }
        }
    }

    fn refusals(&self, pending: &[String]) -> Vec<Option<Failure>> {
        pending
            .iter()
            .map(|a| {
                (!self.allows(a)).then(|| Failure::new(Stage::Policy, FailureKind::PolicyRefused, self.outside(a)))
            })
            .collect()
    }

    /// The message as it goes to `redirect_to`: addressed to it alone (no Cc, no Bcc), the
    /// original recipients in `X-Panel-Original-Recipients` and in a note at the top of the text
    /// and the HTML, so that whoever reads it sees whom it was for.
    pub fn redirected(&self, message: &OutgoingMessage) -> OutgoingMessage {
        let list = |ms: &[Mailbox]| ms.iter().map(|m| m.address.to_string()).collect::<Vec<_>>().join(", ");
        let mut original = format!("To: {}", list(&message.to));
        if !message.cc.is_empty() {
            original.push_str(&format!("; Cc: {}", list(&message.cc)));
        }
        if !message.bcc.is_empty() {
            original.push_str(&format!("; Bcc: {}", list(&message.bcc)));
        }
        let note = format!("[Redirected by Panel's recipient policy. Originally for {original}]");
        let html = message.html.as_ref().map(|h| {
            let escaped = note.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
            format!("<p style=\"border:1px solid #b45309;padding:4px\">{escaped}</p>\n{h}")
        });
        OutgoingMessage {
            to: vec![self.redirect_to.clone().into()],
            cc: Vec::new(),
            bcc: Vec::new(),
            text: format!("{note}\n\n{}", message.text),
            html,
            original_recipients: Some(original),
            ..message.clone()
        }
    }
}

/// One attempt under the policy: what goes to the relay, and how its answer maps back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPlan {
    /// The message to send instead of the stored one (redirect); `None`: the stored one.
    pub message: Option<OutgoingMessage>,
    /// The envelope recipients; empty: nothing is sent.
    pub envelope: Vec<String>,
    /// For each pending recipient, its place in `envelope`; `None`: refused by the policy.
    slots: Vec<Option<usize>>,
    refusal: Vec<Option<Failure>>,
    /// Capture: nothing is sent; the allowed recipients are captured.
    capture: bool,
}

impl PolicyPlan {
    /// The report for the claim's pending recipients, from the relay's report for `envelope`
    /// (`None` when nothing was sent): each refused recipient is refused for good.
    pub fn report_for_pending(&self, sent: Option<SendReport>) -> SendReport {
        let sent = sent.unwrap_or(SendReport { recipients: Vec::new(), failure: None, data_reply: None });
        let recipients = self
            .slots
            .iter()
            .zip(&self.refusal)
            .map(|(slot, refusal)| match (slot, refusal) {
                (Some(i), _) => sent.recipients.get(*i).cloned().unwrap_or(RecipientResult::NotTried),
                (None, Some(f)) => RecipientResult::Rejected(f.clone()),
                (None, None) if self.capture => RecipientResult::Captured,
                (None, None) => RecipientResult::NotTried,
            })
            .collect();
        SendReport { recipients, failure: sent.failure, data_reply: sent.data_reply }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Draft;

    fn message(to: &[&str], cc: &[&str], bcc: &[&str]) -> OutgoingMessage {
        let draft = Draft {
            to: to.iter().map(|s| s.to_string()).collect(),
            cc: cc.iter().map(|s| s.to_string()).collect(),
            bcc: bcc.iter().map(|s| s.to_string()).collect(),
            subject: "Reset".into(),
            text: "Your link".into(),
            html: Some("<p>Your link</p>".into()),
            ..Default::default()
        };
        let from = Mailbox::parse("from", "Panel <panel@corp.example>").unwrap();
        let fallback = EmailAddress::parse("fallback", "ops@corp.example").unwrap();
        OutgoingMessage::prepare(&draft, &from, &fallback, chrono::Utc::now(), 1).unwrap()
    }

    fn policy(mode: PolicyMode, domains: &[&str]) -> RecipientPolicy {
        RecipientPolicy {
            mode,
            redirect_to: EmailAddress::parse("redirect_to", "qa@test.example").unwrap(),
            allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn allowed_domains_take_subdomains_and_name_each_refused_field() {
        let p = policy(PolicyMode::Deliver, &["test.example"]);
        assert!(p.allows("a@test.example") && p.allows("a@Mail.Test.Example"));
        assert!(!p.allows("a@nottest.example") && !p.allows("a@example"));
        let m = message(&["a@test.example", "b@corp.example"], &[], &["c@corp.example"]);
        let errors = p.check(&m).unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["to[1]", "bcc[0]"]);
        assert!(errors.0[0].message.contains("outside the allowed domains (test.example)"));
        assert!(policy(PolicyMode::Deliver, &[]).check(&m).is_ok(), "no list: every domain");
    }

    #[test]
    fn deliver_sends_to_the_allowed_and_refuses_the_others_for_good() {
        let p = policy(PolicyMode::Deliver, &["test.example"]);
        let pending = ["a@test.example".to_string(), "b@corp.example".to_string(), "c@test.example".to_string()];
        let m = message(&["a@test.example", "b@corp.example"], &["c@test.example"], &[]);
        let plan = p.plan(&m, &pending);
        assert_eq!(plan.envelope, ["a@test.example", "c@test.example"]);
        // The refused leave the headers too (Graph sends to the headers).
        let sent = plan.message.as_ref().expect("a copy without the refused");
        assert_eq!(sent.to.iter().map(|m| m.address.as_str()).collect::<Vec<_>>(), ["a@test.example"]);
        assert_eq!(sent.cc.len(), 1);
        assert!(p.plan(&m, &pending[..1]).message.is_none(), "nothing refused: the stored message as it is");
        let sent = SendReport {
            recipients: vec![RecipientResult::Accepted, RecipientResult::NotTried],
            failure: None,
            data_reply: None,
        };
        let report = plan.report_for_pending(Some(sent));
        assert_eq!(report.recipients[0], RecipientResult::Accepted);
        assert!(matches!(&report.recipients[1], RecipientResult::Rejected(f) if f.kind == FailureKind::PolicyRefused));
        assert_eq!(report.recipients[2], RecipientResult::NotTried);
        // All refused: nothing to send, each refused.
        let plan = p.plan(&message(&["b@corp.example"], &[], &[]), &pending[1..2]);
        assert!(plan.envelope.is_empty());
        assert!(matches!(plan.report_for_pending(None).recipients[0], RecipientResult::Rejected(_)));
    }

    #[test]
    fn capture_sends_nothing_and_captures_the_allowed_recipients() {
        let p = policy(PolicyMode::Capture, &["corp.example"]);
        let m = message(&["ann@corp.example"], &[], &[]);
        let pending = ["ann@corp.example".to_string(), "eve@elsewhere.example".to_string()];
        let plan = p.plan(&m, &pending);
        assert!(plan.envelope.is_empty() && plan.message.is_none());
        let report = plan.report_for_pending(None);
        assert_eq!(report.recipients[0], RecipientResult::Captured);
        assert!(matches!(report.recipients[1], RecipientResult::Rejected(_)));
        assert!(p.notice().unwrap().contains("capture. Nothing is sent"));
    }

    #[test]
    fn redirect_sends_one_copy_to_the_address_and_names_the_original_recipients() {
        let p = policy(PolicyMode::Redirect, &[]);
        let m = message(&["ann@corp.example"], &["bob@corp.example"], &["eve@corp.example"]);
        let pending: Vec<String> = m.recipients().iter().map(|(_, a)| a.to_string()).collect();
        let plan = p.plan(&m, &pending);
        assert_eq!(plan.envelope, ["qa@test.example"]);
        let sent = plan.message.as_ref().unwrap();
        assert_eq!(sent.to.len(), 1);
        assert!(sent.cc.is_empty() && sent.bcc.is_empty());
        let original = "To: ann@corp.example; Cc: bob@corp.example; Bcc: eve@corp.example";
        assert_eq!(sent.original_recipients.as_deref(), Some(original));
        assert!(sent.text.starts_with("[Redirected by Panel's recipient policy. Originally for To: ann@"));
        assert!(sent.html.as_deref().unwrap().contains("Originally for To: ann@corp.example"));
        // Folded as any long header; unfolded, the list as written.
        let rendered = String::from_utf8(sent.render()).unwrap().replace("\r\n ", " ");
        assert!(rendered.contains(&format!("X-Panel-Original-Recipients: {original}")), "{rendered}");
        assert!(rendered.lines().any(|l| l == "To: qa@test.example"), "{rendered}");
        assert!(!rendered.lines().any(|l| l.starts_with("Cc:")), "{rendered}");
        // The one RCPT's answer is every pending recipient's.
        let one = SendReport { recipients: vec![RecipientResult::Accepted], failure: None, data_reply: None };
        assert_eq!(plan.report_for_pending(Some(one)).recipients, vec![RecipientResult::Accepted; 3]);
    }
}
