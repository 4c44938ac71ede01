//! When to try a message again after a temporary failure, when to give up, and when to leave
//! an unreachable relay alone for a while.

use std::time::{Duration, Instant};

use crate::classify::{FailureClass, SmtpReply, Stage};
use crate::duration;
use crate::errors::FieldError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before retry 1, 2, ...; the last entry repeats.
    pub schedule: Vec<Duration>,
    /// Measured from enqueue; no attempt starts after this.
    pub give_up_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    GiveUp,
}

pub const DEFAULT_SCHEDULE: &str = "1m,5m,15m,30m,1h";
pub const DEFAULT_GIVE_UP_AFTER: &str = "24h";

/// Fraction of each delay that is randomised, so that messages failed together do not all
/// come back to the relay at the same second.
const JITTER_PERCENT: u64 = 10;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::from_doc(None, None).expect("defaults are valid")
    }
}

impl RetryPolicy {
    pub fn from_doc(schedule: Option<&str>, give_up_after: Option<&str>) -> Result<Self, FieldError> {
        let schedule = duration::parse_list(schedule.unwrap_or(DEFAULT_SCHEDULE))
            .map_err(|e| FieldError::new("retry_schedule", format!("{e}; write e.g. 1m,5m,15m,30m,1h")))?;
        if schedule.iter().any(Duration::is_zero) {
            return Err(FieldError::new("retry_schedule", "has a zero delay; every delay must be at least 1s"));
        }
        let give_up_after = duration::parse(give_up_after.unwrap_or(DEFAULT_GIVE_UP_AFTER))
            .map_err(|e| FieldError::new("give_up_after", e))?;
        if give_up_after.is_zero() {
            return Err(FieldError::new("give_up_after", "must be at least 1s (e.g. 24h)"));
        }
        Ok(Self { schedule, give_up_after })
    }

    /// Decides after failed attempt number `attempts` (1-based), `age` after enqueue.
    /// `random` is any random number; it only spreads the delay.
    pub fn decide(&self, attempts: u32, age: Duration, random: u64) -> RetryDecision {
        if age >= self.give_up_after {
            return RetryDecision::GiveUp;
        }
        let index = (attempts.max(1) as usize - 1).min(self.schedule.len() - 1);
        let base = self.schedule[index];
        let spread = base.as_millis() as u64 * JITTER_PERCENT / 100;
        let jittered = if spread == 0 {
            base
        } else {
            let offset = random % (2 * spread + 1);
            (base + Duration::from_millis(offset)).saturating_sub(Duration::from_millis(spread))
        };
        // The last try happens at the deadline rather than never.
        RetryDecision::RetryAfter(jittered.min(self.give_up_after - age))
    }
}

/// Backoff for a whole relay while it is unreachable (RFC 5321 §4.5.4.1): after a failure to
/// reach it, no message is tried until the delay passes, then one message probes; the delay
/// doubles (1 s up to 60 s) while probes fail, and a relay that answers resets it. Without
/// this, every due message would hit a relay that is down, one after another.
#[derive(Debug, Default, Clone)]
pub struct RelayBackoff {
    delay: Option<Duration>,
    until: Option<Instant>,
}

impl RelayBackoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(60);

    /// Records a failure to reach the relay; returns the delay before the next try, never
    /// shorter than what the server asked for (`asked`, HTTP Retry-After).
    pub fn failed(&mut self, now: Instant, asked: Option<Duration>) -> Duration {
        let delay = self.delay.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.delay = Some(delay);
        let wait = delay.max(asked.unwrap_or_default());
        self.until = Some(now + wait);
        wait
    }

    /// The relay answered (whatever it said): back to normal. True when this ends an outage
    /// (the relay was being backed off), so what the outage deferred can go at once.
    pub fn reached(&mut self) -> bool {
        let ended = self.delay.is_some();
        *self = RelayBackoff::default();
        ended
    }

    /// How long to wait before trying the relay again, if at all.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.until.filter(|u| *u > now).map(|u| u - now)
    }

    /// True after a failure until the relay is reached again: try one message at a time.
    pub fn probing(&self) -> bool {
        self.delay.is_some()
    }
}

/// Whether a temporary reply asks Panel to slow down (the relay's or provider's rate limit:
/// Exchange Online's and Google's throttling texts, `421 4.7.0 Try again later`) rather than
/// naming a problem of this message. The whole transport then pauses as for an outage, and
/// resumes one message at a time. Not `452 4.5.3` (too many recipients): the next transaction
/// takes those at once.
pub fn is_throttling(reply: &SmtpReply) -> bool {
    if !reply.is_transient() || reply.enhanced.as_deref() == Some("4.5.3") {
        return false;
    }
    let text = reply.text.to_ascii_lowercase();
    let says_so = ["rate", "too many", "throttl", "slow down", "try again later", "exceeded", "limit"]
        .iter()
        .any(|w| text.contains(w));
    says_so && matches!(reply.code, 421 | 450 | 451 | 452)
}

/// Whether an attempt's failure says the relay itself is unreachable or refusing service (as
/// opposed to a problem with this message): name resolution, TCP, TLS, greeting, EHLO, or 421.
pub fn is_relay_unreachable(stage: Stage, class: Option<FailureClass>, reply: Option<&SmtpReply>) -> bool {
    // Graph throttles per app and mailbox, and its 5xx is the service: the whole transport waits.
    let graph_refusing = stage == Stage::Graph && reply.is_some_and(|r| r.code == 429 || r.code >= 500);
    class == Some(FailureClass::Transient)
        && (Stage::REACHING.contains(&stage) || reply.is_some_and(|r| r.code == 421) || graph_refusing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_replies_are_told_from_a_messages_own_refusals() {
        let r = |code, line: &str| SmtpReply::from_lines(code, &[line]);
        for throttled in [
            r(421, "421 4.7.0 Try again later, closing connection. (Google)"),
            r(451, "451 4.7.500 Server busy. Please try again later"),
            r(452, "452 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
            r(
                450,
                "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages",
            ),
        ] {
            assert!(is_throttling(&throttled), "{throttled:?}");
        }
        for other in [
            r(452, "452 4.5.3 Too many recipients"),
            r(451, "451 4.3.0 Local error in processing"),
            r(550, "550 5.4.5 Daily user sending quota exceeded"),
            r(454, "454 4.7.0 Temporary authentication failure"),
        ] {
            assert!(!is_throttling(&other), "{other:?}");
        }
    }

    #[test]
    fn relay_backoff_doubles_to_a_minute_and_resets_when_the_relay_answers() {
        let t0 = Instant::now();
        let mut b = RelayBackoff::default();
        assert!(!b.probing() && b.wait(t0).is_none());
        let delays: Vec<u64> = (0..8).map(|_| b.failed(t0, None).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert!(b.probing());
        assert_eq!(b.wait(t0), Some(Duration::from_secs(60)));
        assert_eq!(b.wait(t0 + Duration::from_secs(61)), None, "then one probe may go");
        assert!(b.reached(), "reaching it ends the outage");
        assert!(!b.probing() && b.wait(t0).is_none());
        assert!(!b.reached(), "no outage to end");
    }

    #[test]
    fn a_server_that_asks_for_time_gets_it_and_graphs_throttling_holds_the_transport() {
        use crate::classify::{FailureClass::*, SmtpReply, Stage};
        let t0 = Instant::now();
        let mut b = RelayBackoff::default();
        assert_eq!(b.failed(t0, Some(Duration::from_secs(30))), Duration::from_secs(30));
        assert_eq!(b.wait(t0), Some(Duration::from_secs(30)));
        let throttled = SmtpReply::from_lines(429, &["429 TooManyRequests"]);
        let unavailable = SmtpReply::from_lines(503, &["503 ServiceUnavailable"]);
        let refused = SmtpReply::from_lines(400, &["400 ErrorMimeContentInvalidBase64String"]);
        assert!(is_relay_unreachable(Stage::Graph, Some(Transient), Some(&throttled)));
        assert!(is_relay_unreachable(Stage::Graph, Some(Transient), Some(&unavailable)));
        assert!(!is_relay_unreachable(Stage::Graph, Some(Permanent), Some(&refused)));
    }

    #[test]
    fn only_failures_to_reach_the_relay_count_against_it() {
        use crate::classify::{FailureClass::*, SmtpReply, Stage};
        let r421 = SmtpReply::from_lines(421, &["421 4.3.2 shutting down"]);
        let r451 = SmtpReply::from_lines(451, &["451 4.3.0 try later"]);
        assert!(is_relay_unreachable(Stage::Tcp, Some(Transient), None));
        assert!(is_relay_unreachable(Stage::Greeting, Some(Transient), None));
        assert!(is_relay_unreachable(Stage::Rcpt, Some(Transient), Some(&r421)));
        assert!(!is_relay_unreachable(Stage::Rcpt, Some(Transient), Some(&r451)), "one recipient deferred");
        assert!(!is_relay_unreachable(Stage::Auth, Some(Configuration), None));
        assert!(!is_relay_unreachable(Stage::Data, None, None));
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn default_schedule_follows_the_documented_steps_then_hourly() {
        let p = RetryPolicy::default();
        let delays: Vec<_> = (1..=7)
            .map(|n| match p.decide(n, Duration::ZERO, 0) {
                RetryDecision::RetryAfter(d) => d,
                RetryDecision::GiveUp => panic!("gave up early"),
            })
            .collect();
        // random = 0 gives the low edge of the jitter window: 90% of each step.
        let expected: Vec<_> = [1, 5, 15, 30, 60, 60, 60].iter().map(|m| MIN * *m * 9 / 10).collect();
        assert_eq!(delays, expected);
        assert_eq!(p.give_up_after, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let p = RetryPolicy::default();
        for r in [0u64, 1, 17, 6000, u64::MAX] {
            let RetryDecision::RetryAfter(d) = p.decide(2, Duration::ZERO, r) else { panic!() };
            assert!(d >= MIN * 5 * 9 / 10 && d <= MIN * 5 * 11 / 10, "{d:?}");
        }
    }

    #[test]
    fn gives_up_at_the_deadline_and_last_try_lands_on_it() {
        let p = RetryPolicy::from_doc(Some("1h"), Some("2h")).unwrap();
        assert_eq!(p.decide(1, Duration::from_secs(6000), 0), RetryDecision::RetryAfter(Duration::from_secs(1200)));
        assert_eq!(p.decide(3, Duration::from_secs(7200), 0), RetryDecision::GiveUp);
    }

    #[test]
    fn rejects_bad_schedules() {
        assert_eq!(RetryPolicy::from_doc(Some("1m,0s"), None).unwrap_err().field, "retry_schedule");
        assert_eq!(RetryPolicy::from_doc(Some("soon"), None).unwrap_err().field, "retry_schedule");
        assert_eq!(RetryPolicy::from_doc(None, Some("0")).unwrap_err().field, "give_up_after");
    }
}
