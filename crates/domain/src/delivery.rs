//! Settling one delivery attempt: from what the relay said for each recipient to the message's
//! next state. Pure, so every combination is unit-tested.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classify::{ConnectionContext, Failure, FailureClass, SmtpReply, Stage, classify};
use crate::message::{MessageState, RecipientState};
use crate::retry::{RetryDecision, RetryPolicy};

/// What happened to one recipient in one SMTP transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientResult {
    /// RCPT accepted; whether it was delivered depends on the DATA outcome.
    Accepted,
    Rejected(Failure),
    /// The transaction failed before RCPT for this recipient.
    NotTried,
    /// Not sent: the recipient policy's capture mode keeps the message instead.
    Captured,
    /// Delivered in an earlier transaction of the same attempt (a message with more
    /// recipients than one transaction takes), with that transaction's reply to the data.
    Delivered(SmtpReply),
}

/// The relay client's report of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    /// In the order of the claim's pending recipients.
    pub recipients: Vec<RecipientResult>,
    /// A failure that ended the whole transaction (connection, AUTH, MAIL, DATA, no recipient accepted).
    pub failure: Option<Failure>,
    /// The relay's final reply to the message data (`250 2.0.0 Ok: queued as ...`).
    pub data_reply: Option<SmtpReply>,
}

crate::string_enum!(
    /// How one attempt ended. `interrupted`: the worker holding the step stopped (crash, kill)
    /// before recording an outcome, so the relay may or may not have the message.
    AttemptOutcome {
        Delivered = "delivered",
        PartiallyDelivered = "partially_delivered",
        TemporaryFailure = "temporary_failure",
        PermanentFailure = "permanent_failure",
        ConfigurationError = "configuration_error",
        Interrupted = "interrupted",
        /// Nothing was sent: the recipient policy captured the message.
        Captured = "captured",
    }
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientSettlement {
    pub state: RecipientState,
    /// The relay's reply for this recipient, one line.
    pub reply: Option<String>,
    pub stage: Option<Stage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub outcome: AttemptOutcome,
    pub stage: Stage,
    pub reply: Option<SmtpReply>,
    pub detail: String,
    pub hint: Option<String>,
    pub recipients: Vec<RecipientSettlement>,
    pub state: MessageState,
    pub retry_after: Option<Duration>,
    pub failure_class: Option<FailureClass>,
    /// One line for the message list: why it is not delivered yet.
    pub last_error: Option<String>,
}

/// Where in its life the message is when the attempt ends.
#[derive(Debug, Clone, Copy)]
pub struct AttemptContext<'a> {
    pub connection: ConnectionContext,
    pub policy: &'a RetryPolicy,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// Time since the message was enqueued.
    pub age: Duration,
    pub random: u64,
    /// The recipients earlier attempts settled (an attempt only sends to the pending ones).
    pub earlier: &'a Earlier,
}

/// What earlier attempts decided for the recipients this attempt does not send to, so that
/// the message's state follows all its recipients whatever order their outcomes came in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Earlier {
    pub delivered: u32,
    pub failed: u32,
    /// The first recipient refused for good, with the relay's reply: `addr: 550 5.1.1 ...`.
    pub refusal: Option<String>,
}

pub fn settle(report: &SendReport, ctx: AttemptContext<'_>) -> Settlement {
    let tx_class = report.failure.as_ref().map(|f| classify(f, ctx.connection));
    let mut recipients = Vec::with_capacity(report.recipients.len());
    for result in &report.recipients {
        let settled = match (result, &report.failure, tx_class.as_ref()) {
            (RecipientResult::Accepted, None, _) => RecipientSettlement {
                state: RecipientState::Delivered,
                reply: report.data_reply.as_ref().map(SmtpReply::one_line),
                stage: Some(Stage::Data),
            },
            (RecipientResult::Delivered(reply), _, _) => RecipientSettlement {
                state: RecipientState::Delivered,
                reply: Some(reply.one_line()),
                stage: Some(Stage::Data),
            },
            (RecipientResult::Captured, _, _) => RecipientSettlement {
                state: RecipientState::Captured,
                reply: Some("captured by the recipient policy; not sent".into()),
                stage: Some(Stage::Policy),
            },
            (RecipientResult::Rejected(f), _, _) => {
                let state = match classify(f, ctx.connection).class {
                    FailureClass::Transient | FailureClass::Internal => RecipientState::Pending,
                    FailureClass::Permanent | FailureClass::Configuration => RecipientState::Failed,
                };
                RecipientSettlement { state, reply: Some(f.detail.clone()), stage: Some(f.stage) }
            }
            (_, Some(f), Some(c)) => RecipientSettlement {
                state: if c.class == FailureClass::Permanent {
                    RecipientState::Failed
                } else {
                    RecipientState::Pending
                },
                reply: Some(f.detail.clone()),
                stage: Some(f.stage),
            },
            (_, _, _) => RecipientSettlement { state: RecipientState::Pending, reply: None, stage: None },
        };
        recipients.push(settled);
    }

    let count = |s: RecipientState| recipients.iter().filter(|r| r.state == s).count();
    let (delivered, pending) = (count(RecipientState::Delivered), count(RecipientState::Pending));
    let first_rejection = report.recipients.iter().find_map(|r| match r {
        RecipientResult::Rejected(f) => Some(f),
        _ => None,
    });
    let headline = report.failure.as_ref().or(first_rejection);
    let headline_class = headline.map(|f| classify(f, ctx.connection));

    // An internal failure waits on the retry schedule like a temporary one, under its own name.
    let retry_class = match tx_class.as_ref().map(|c| c.class) {
        Some(FailureClass::Internal) => FailureClass::Internal,
        _ => FailureClass::Transient,
    };
    let captured = count(RecipientState::Captured);
    let (state, retry_after, failure_class) = match tx_class.as_ref().map(|c| c.class) {
        // Capture: kept and final; recipients the policy refused show as failed beside them.
        _ if captured > 0 && pending == 0 => (MessageState::Captured, None, None),
        Some(FailureClass::Configuration) => (MessageState::Failed, None, Some(FailureClass::Configuration)),
        _ if pending > 0 => match ctx.policy.decide(ctx.attempts, ctx.age, ctx.random) {
            // Never sooner than the server asked (HTTP Retry-After: Graph's throttling).
            RetryDecision::RetryAfter(d) => {
                let asked = report.failure.as_ref().and_then(|f| f.retry_after).unwrap_or_default();
                (MessageState::Retrying, Some(d.max(asked)), Some(retry_class))
            }
            RetryDecision::GiveUp => (MessageState::Failed, None, Some(retry_class)),
        },
        _ if delivered == recipients.len() && ctx.earlier.failed == 0 => (MessageState::Delivered, None, None),
        _ => (MessageState::Failed, None, Some(FailureClass::Permanent)),
    };
    let gave_up = state == MessageState::Failed && failure_class == Some(retry_class);
    if gave_up {
        for r in &mut recipients {
            if r.state == RecipientState::Pending {
                r.state = RecipientState::Failed;
            }
        }
    }

    // A final state follows every recipient, this attempt's and the earlier ones': some
    // delivered and the others refused for good is partly failed, never hidden as delivered or
    // as failed. A configuration error holds the message (failed, re-queued by the fix).
    let anyone_delivered = delivered as u32 + ctx.earlier.delivered > 0;
    let state = match state {
        MessageState::Failed if failure_class != Some(FailureClass::Configuration) && anyone_delivered => {
            MessageState::PartlyFailed
        }
        s => s,
    };
    let unknown = report.failure.as_ref().is_some_and(|f| f.kind == crate::FailureKind::UnknownOutcome);
    let outcome = match (state, delivered) {
        (MessageState::Delivered, _) => AttemptOutcome::Delivered,
        (MessageState::Captured, _) => AttemptOutcome::Captured,
        // Counted with the attempts a worker abandoned under its lease: a copy may have gone.
        _ if unknown => AttemptOutcome::Interrupted,
        (_, d) if d > 0 => AttemptOutcome::PartiallyDelivered,
        _ => match headline_class.as_ref().map(|c| c.class) {
            Some(FailureClass::Configuration) => AttemptOutcome::ConfigurationError,
            Some(FailureClass::Permanent) => AttemptOutcome::PermanentFailure,
            _ => AttemptOutcome::TemporaryFailure,
        },
    };
    let (stage, reply, detail) = match (headline, delivered) {
        _ if state == MessageState::Captured => {
            (Stage::Policy, None, "captured by the recipient policy: kept, nothing was sent".to_string())
        }
        (Some(f), 0) | (Some(f @ Failure { stage: Stage::Data, .. }), _) => {
            (f.stage, f.reply.clone(), f.detail.clone())
        }
        _ => (
            Stage::Data,
            report.data_reply.clone(),
            report.data_reply.as_ref().map(SmtpReply::one_line).unwrap_or_default(),
        ),
    };
    let hint = headline_class.and_then(|c| c.hint);
    let last_error = match state {
        MessageState::Delivered | MessageState::Captured => None,
        MessageState::Failed | MessageState::PartlyFailed if gave_up => Some(format!(
            "gave up after {} attempts over {}: {} {}",
            ctx.attempts,
            crate::duration::format(Duration::from_secs(ctx.age.as_secs())),
            headline.map_or(Stage::Data, |f| f.stage),
            headline.map(|f| f.detail.as_str()).unwrap_or("")
        )),
        _ => headline.map(|f| f.to_string()).or_else(|| ctx.earlier.refusal.clone()),
    };
    Settlement { outcome, stage, reply, detail, hint, recipients, state, retry_after, failure_class, last_error }
}

/// Whether another route could do what this attempt's route failed to: the route could not be
/// reached, refused service or asked Panel to slow down, or refused Panel itself (its
/// settings, credential, TLS or sign-in: a configuration error before this message's own
/// transaction). A recipient's answer (a 5xx at RCPT, a 4xx for one mailbox) is not the
/// route's, and no other route would be told otherwise.
pub fn route_failed(s: &Settlement) -> bool {
    let throttled =
        s.failure_class == Some(FailureClass::Transient) && s.reply.as_ref().is_some_and(crate::retry::is_throttling);
    let refused_panel = s.outcome == AttemptOutcome::ConfigurationError && Stage::SESSION.contains(&s.stage);
    throttled || refused_panel || crate::retry::is_relay_unreachable(s.stage, s.failure_class, s.reply.as_ref())
}

/// The attempt failed on a route that the route `next` can stand in for: the message is due
/// again at once, for `next`, instead of at its retry time or after a fix. The attempt keeps
/// what its route said; a message that gave up (past its give-up time) stays failed.
pub fn fail_over(mut s: Settlement, next: &str) -> Settlement {
    let held = s.state == MessageState::Failed && s.failure_class == Some(FailureClass::Configuration);
    if !route_failed(&s) || !(held || s.state == MessageState::Retrying) {
        return s;
    }
    s.state = MessageState::Retrying;
    s.retry_after = Some(Duration::ZERO);
    s.failure_class = Some(FailureClass::Transient);
    s.last_error = Some(format!("{}; trying route {next} at once", s.last_error.as_deref().unwrap_or(&s.detail)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::FailureKind;
    use crate::settings::Security;

    fn ctx(policy: &RetryPolicy, age_secs: u64) -> AttemptContext<'_> {
        AttemptContext {
            connection: ConnectionContext { port: 587, security: Security::Starttls },
            policy,
            attempts: 1,
            age: Duration::from_secs(age_secs),
            random: 0,
            earlier: &NONE_EARLIER,
        }
    }

    static NONE_EARLIER: Earlier = Earlier { delivered: 0, failed: 0, refusal: None };

    fn rejected(code: u16, line: &str) -> RecipientResult {
        RecipientResult::Rejected(Failure::reply(Stage::Rcpt, SmtpReply::from_lines(code, &[line])))
    }

    #[test]
    fn a_captured_message_is_final_kept_and_its_refused_recipients_failed() {
        let policy = RetryPolicy::default();
        let refused = RecipientResult::Rejected(Failure::new(Stage::Policy, FailureKind::PolicyRefused, "outside"));
        let report =
            SendReport { recipients: vec![RecipientResult::Captured, refused], failure: None, data_reply: None };
        let s = settle(&report, ctx(&policy, 0));
        assert_eq!((s.state, s.outcome, s.stage), (MessageState::Captured, AttemptOutcome::Captured, Stage::Policy));
        assert_eq!(s.recipients[0].state, RecipientState::Captured);
        assert_eq!(s.recipients[1].state, RecipientState::Failed);
        assert!(s.state.is_final() && s.last_error.is_none() && s.retry_after.is_none());
    }

    fn ok_data() -> Option<SmtpReply> {
        Some(SmtpReply::from_lines(250, &["250 2.0.0 Ok: queued as ABC"]))
    }

    #[test]
    fn all_accepted_is_delivered_with_the_relays_reply() {
        let p = RetryPolicy::default();
        let r = SendReport { recipients: vec![RecipientResult::Accepted; 2], failure: None, data_reply: ok_data() };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::Delivered);
        assert_eq!(s.outcome, AttemptOutcome::Delivered);
        assert_eq!(s.reply.unwrap().code, 250);
        assert!(s.recipients.iter().all(|r| r.state == RecipientState::Delivered));
    }

    #[test]
    fn a_rejected_recipient_is_named_and_the_others_are_delivered() {
        let p = RetryPolicy::default();
        let r = SendReport {
            recipients: vec![
                RecipientResult::Accepted,
                rejected(550, "550 5.1.1 <nobody@x.org>: Recipient address rejected"),
            ],
            failure: None,
            data_reply: ok_data(),
        };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::PartlyFailed, "some delivered, one refused for good");
        assert_eq!(s.failure_class, Some(FailureClass::Permanent));
        assert_eq!(s.outcome, AttemptOutcome::PartiallyDelivered);
        assert_eq!(s.recipients[0].state, RecipientState::Delivered);
        assert_eq!(s.recipients[1].state, RecipientState::Failed);
        assert!(s.recipients[1].reply.as_deref().unwrap().contains("550 5.1.1"));
        assert!(s.last_error.unwrap().contains("nobody@x.org"));
    }

    /// Three recipients: one delivered, one refused for good (550), one deferred (451) and
    /// then delivered or refused. Whatever order the outcomes come in, the final state follows
    /// all three: partly failed, with the refusal in the last error.
    #[test]
    fn the_final_state_follows_every_recipient_in_any_order() {
        let p = RetryPolicy::default();
        let ok = || RecipientResult::Accepted;
        let refused = || rejected(550, "550 5.1.1 <gone@x.org>: Recipient address rejected");
        let deferred = || rejected(451, "451 4.3.0 <later@x.org>: try again");
        let attempt = |recipients: Vec<RecipientResult>, earlier: &Earlier| {
            let r = SendReport { recipients, failure: None, data_reply: ok_data() };
            settle(&r, AttemptContext { earlier, ..ctx(&p, 0) })
        };
        let tally = |s: &Settlement, e: &Earlier| Earlier {
            delivered: e.delivered
                + s.recipients.iter().filter(|r| r.state == RecipientState::Delivered).count() as u32,
            failed: e.failed + s.recipients.iter().filter(|r| r.state == RecipientState::Failed).count() as u32,
            refusal: e.refusal.clone().or_else(|| {
                s.recipients.iter().find(|r| r.state == RecipientState::Failed).and_then(|r| r.reply.clone())
            }),
        };
        let none = Earlier::default();
        // The refusal first, the deferred one delivered on the retry: was `delivered` before.
        let first = attempt(vec![ok(), refused(), deferred()], &none);
        assert_eq!(first.state, MessageState::Retrying);
        let second = attempt(vec![ok()], &tally(&first, &none));
        assert_eq!(second.state, MessageState::PartlyFailed);
        assert!(second.last_error.as_deref().unwrap().contains("gone@x.org"), "{:?}", second.last_error);
        // The deferral first, the refusal on the retry.
        let first = attempt(vec![ok(), deferred()], &none);
        let second = attempt(vec![refused()], &tally(&first, &none));
        assert_eq!(second.state, MessageState::PartlyFailed);
        // All in one attempt.
        assert_eq!(attempt(vec![ok(), refused(), ok()], &none).state, MessageState::PartlyFailed);
        // Nobody delivered is failed; everybody delivered is delivered, in any order.
        let first = attempt(vec![refused(), deferred()], &none);
        assert_eq!(attempt(vec![refused()], &tally(&first, &none)).state, MessageState::Failed);
        let first = attempt(vec![ok(), deferred()], &none);
        assert_eq!(attempt(vec![ok()], &tally(&first, &none)).state, MessageState::Delivered);
    }

    #[test]
    fn a_451_recipient_is_retried_alone() {
        let p = RetryPolicy::default();
        let r = SendReport {
            recipients: vec![RecipientResult::Accepted, rejected(451, "451 4.3.0 try again")],
            failure: None,
            data_reply: ok_data(),
        };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::Retrying);
        assert_eq!(s.recipients[1].state, RecipientState::Pending);
        assert!(s.retry_after.is_some());
    }

    #[test]
    fn permanent_rejection_of_every_recipient_fails_at_once() {
        let p = RetryPolicy::default();
        let r = SendReport {
            recipients: vec![rejected(550, "550 5.1.1 no such user")],
            failure: Some(
                Failure::new(Stage::Rcpt, FailureKind::Reply, "no recipient accepted")
                    .with_reply_of(&rejected(550, "550 5.1.1 no such user")),
            ),
            data_reply: None,
        };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::Failed);
        assert_eq!(s.outcome, AttemptOutcome::PermanentFailure);
        assert_eq!(s.reply.unwrap().code, 550);
        assert_eq!(s.stage, Stage::Rcpt);
    }

    #[test]
    fn connection_failure_retries_everyone_until_the_deadline() {
        let p = RetryPolicy::default();
        let f = Failure::new(Stage::Tcp, FailureKind::ConnectionRefused, "connection refused");
        let r = SendReport { recipients: vec![RecipientResult::NotTried; 2], failure: Some(f), data_reply: None };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::Retrying);
        assert_eq!(s.outcome, AttemptOutcome::TemporaryFailure);
        assert_eq!(s.stage, Stage::Tcp);

        let s = settle(&r, ctx(&p, 25 * 3600));
        assert_eq!(s.state, MessageState::Failed);
        assert!(s.recipients.iter().all(|r| r.state == RecipientState::Failed));
        assert!(s.last_error.unwrap().starts_with("gave up after 1 attempts"));
    }

    #[test]
    fn a_configured_schedule_is_followed_and_giving_up_keeps_the_last_reply() {
        // The clock is the message's age, passed in: 1s, 2s, then 2s again, giving up at 10s.
        let p = RetryPolicy::from_doc(Some("1s,2s"), Some("10s")).unwrap();
        let reply = SmtpReply::from_lines(451, &["451 4.3.0 <a@example.org>: Temporary lookup failure"]);
        let r = SendReport {
            recipients: vec![RecipientResult::Rejected(Failure::reply(Stage::Rcpt, reply))],
            failure: None,
            data_reply: None,
        };
        let at = |attempts: u32, age: u64| {
            let c = AttemptContext {
                connection: ConnectionContext { port: 25, security: crate::Security::None },
                policy: &p,
                attempts,
                age: Duration::from_secs(age),
                random: 0, // the low edge of the ±10% jitter
                earlier: &NONE_EARLIER,
            };
            settle(&r, c)
        };
        let delays: Vec<_> =
            [(1, 0), (2, 1), (3, 3)].iter().map(|(n, age)| at(*n, *age).retry_after.unwrap()).collect();
        let millis: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(millis, [900, 1800, 1800]);
        let last = at(6, 10);
        assert_eq!(last.state, MessageState::Failed);
        assert_eq!(last.reply.as_ref().unwrap().code, 451);
        let error = last.last_error.unwrap();
        assert!(error.contains("gave up after 6 attempts") && error.contains("451 4.3.0"), "{error}");
    }

    #[test]
    fn authentication_failure_is_a_configuration_error_that_keeps_recipients_pending() {
        let p = RetryPolicy::default();
        let reply = SmtpReply::from_lines(535, &["535 5.7.8 Error: authentication failed"]);
        let r = SendReport {
            recipients: vec![RecipientResult::NotTried],
            failure: Some(Failure::reply(Stage::Auth, reply)),
            data_reply: None,
        };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::Failed);
        assert_eq!(s.failure_class, Some(FailureClass::Configuration));
        assert_eq!(s.outcome, AttemptOutcome::ConfigurationError);
        assert_eq!(s.recipients[0].state, RecipientState::Pending, "re-sent once the settings are fixed");
        assert!(s.hint.unwrap().contains("username or password"));
    }

    #[test]
    fn data_rejection_after_accepted_recipients_fails_them() {
        let p = RetryPolicy::default();
        let reply = SmtpReply::from_lines(554, &["554 5.7.1 content rejected"]);
        let r = SendReport {
            recipients: vec![RecipientResult::Accepted],
            failure: Some(Failure::reply(Stage::Data, reply)),
            data_reply: None,
        };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!(s.state, MessageState::Failed);
        assert_eq!(s.stage, Stage::Data);
        assert_eq!(s.recipients[0].state, RecipientState::Failed);
    }

    #[test]
    fn an_internal_failure_is_retried_on_the_schedule_then_fails_as_internal() {
        let p = RetryPolicy::default();
        let r = SendReport {
            recipients: vec![RecipientResult::NotTried; 2],
            failure: Some(Failure::new(Stage::Internal, FailureKind::Internal, "panicked: boom")),
            data_reply: None,
        };
        let s = settle(&r, ctx(&p, 0));
        assert_eq!((s.state, s.failure_class), (MessageState::Retrying, Some(FailureClass::Internal)));
        assert_eq!(s.outcome, AttemptOutcome::TemporaryFailure);
        assert_eq!(s.stage, Stage::Internal);
        assert!(s.retry_after.is_some());
        let late = settle(&r, ctx(&p, 25 * 3600));
        assert_eq!((late.state, late.failure_class), (MessageState::Failed, Some(FailureClass::Internal)));
        assert!(late.last_error.unwrap().starts_with("gave up after"));
        assert!(late.recipients.iter().all(|r| r.state == RecipientState::Failed));
    }

    #[test]
    fn a_routes_own_failure_fails_over_at_once_and_a_recipients_answer_does_not() {
        let p = RetryPolicy::default();
        let report = |failure: Option<Failure>, recipients: Vec<RecipientResult>| SendReport {
            recipients,
            failure,
            data_reply: None,
        };
        let refused = Failure::new(Stage::Tcp, FailureKind::ConnectionRefused, "connection refused");
        let down = settle(&report(Some(refused), vec![RecipientResult::NotTried]), ctx(&p, 0));
        let moved = fail_over(down.clone(), "standby");
        assert_eq!((moved.state, moved.retry_after), (MessageState::Retrying, Some(Duration::ZERO)));
        assert_eq!((moved.outcome, moved.stage), (down.outcome, Stage::Tcp), "the attempt says what the route did");
        assert!(moved.last_error.unwrap().ends_with("trying route standby at once"));

        // A rejected password holds the message for a fix, unless another route can send it.
        let auth = SmtpReply::from_lines(535, &["535 5.7.8 Error: authentication failed"]);
        let held =
            settle(&report(Some(Failure::reply(Stage::Auth, auth)), vec![RecipientResult::NotTried]), ctx(&p, 0));
        assert_eq!((held.state, held.failure_class), (MessageState::Failed, Some(FailureClass::Configuration)));
        let moved = fail_over(held, "standby");
        assert_eq!((moved.state, moved.failure_class), (MessageState::Retrying, Some(FailureClass::Transient)));
        assert_eq!(moved.recipients[0].state, RecipientState::Pending);

        // A slow-down reply is the route's; 421 too.
        let slow = SmtpReply::from_lines(421, &["421 4.7.0 Try again later, closing connection."]);
        let throttled =
            settle(&report(Some(Failure::reply(Stage::Mail, slow)), vec![RecipientResult::NotTried]), ctx(&p, 0));
        assert!(route_failed(&throttled));

        // A 550 for the recipient, a 4xx for one mailbox: the recipient's answer, not the route's.
        for r in [rejected(550, "550 5.1.1 user unknown"), rejected(452, "452 4.2.2 mailbox full")] {
            let own = settle(&report(None, vec![r]), ctx(&p, 0));
            assert!(!route_failed(&own), "{own:?}");
            assert_eq!(fail_over(own.clone(), "standby"), own);
        }
        // Past its give-up time the message fails on the last route it tried.
        let late = settle(
            &report(
                Some(Failure::new(Stage::Tcp, FailureKind::ConnectionRefused, "refused")),
                vec![RecipientResult::NotTried],
            ),
            ctx(&p, 25 * 3600),
        );
        assert_eq!(fail_over(late.clone(), "standby").state, MessageState::Failed);
    }
}
