//! When to try a message again after a temporary failure, and when to give up.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
