//! When a schedule fires: a cron expression or the weekly form (weekdays, weeks of the month,
//! start time, optional repeat until an end time), in an IANA time zone.
//!
//! Daylight saving time: a fire time inside a spring-forward gap runs at the first valid time
//! after the gap (the day is never skipped); a time that occurs twice in a fall-back overlap runs
//! once, at its first occurrence. Cron patterns follow croner's rules, which are the same for
//! fixed times; interval patterns (`*/15 * * * *`) keep their real-time spacing through the overlap.

use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// The article's form: e.g. every Monday and Wednesday of the first and last week, at 08:00,
/// repeating every 30 minutes until 17:00.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeeklyRule {
    /// `MON`..`SUN` (or full names); at least one.
    pub weekdays: Vec<String>,
    /// `first`..`fifth`, `last`, or 1..5; empty means every week.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weeks_of_month: Vec<WeekOfMonthSpec>,
    /// Local time, `HH:MM`.
    pub start_time: String,
    /// Repeat interval such as `30m` or `2h`; needs `end_time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_every: Option<String>,
    /// Local time of the last repeat, `HH:MM` (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum WeekOfMonthSpec {
    Number(u8),
    Name(String),
}

/// A parsed, valid time rule.
#[derive(Debug, Clone)]
pub struct Timing {
    pub timezone: Tz,
    rule: Rule,
}

#[derive(Debug, Clone)]
enum Rule {
    /// No rule: runs only when invoked.
    Manual,
    Cron(Box<croner::Cron>),
    Weekly(Weekly),
}

#[derive(Debug, Clone)]
struct Weekly {
    weekdays: Vec<Weekday>,
    /// 1..=5 for the n-th occurrence of the weekday in the month, 0 for the last.
    weeks: Vec<u8>,
    times: Vec<NaiveTime>,
}

/// Where a due schedule stands after a wait: the fire time to run, and how many were skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    pub fire_time: DateTime<Utc>,
    /// Earlier fire times that passed while no service ran (they are not run).
    pub missed: u32,
}

const MAX_MISSED_COUNTED: u32 = 100_000;

impl Timing {
    /// Parses the rule; `Err` is (field, message).
    pub fn parse(
        timezone: &str,
        cron: Option<&str>,
        weekly: Option<&WeeklyRule>,
    ) -> Result<Timing, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let tz = Tz::from_str(timezone.trim()).map_err(|_| {
            (
                "timezone",
                format!("'{timezone}' is not an IANA time zone name (e.g. Europe/Berlin, America/New_York, UTC)"),
            )
        });
        let rule = match (cron, weekly) {
            (Some(_), Some(_)) => {
                errors.push(("cron", "give either cron or weekly, not both".to_string()));
                Rule::Manual
            }
            (Some(c), None) => match croner::Cron::from_str(c) {
                Ok(parsed) => Rule::Cron(Box::new(parsed)),
                Err(e) => {
                    errors.push(("cron", format!("'{c}' is not a valid cron expression: {e}")));
                    Rule::Manual
                }
            },
            (None, Some(w)) => match Weekly::parse(w) {
                Ok(w) => Rule::Weekly(w),
                Err(mut e) => {
                    errors.append(&mut e);
                    Rule::Manual
                }
            },
            (None, None) => Rule::Manual,
        };
        let tz = tz.map_err(|e| errors.push(e));
        match tz {
            Ok(timezone) if errors.is_empty() => Ok(Timing { timezone, rule }),
            _ => Err(errors),
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self.rule, Rule::Manual)
    }

    /// The first fire time strictly after `after`; `None` for a manual-only schedule.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.rule {
            Rule::Manual => None,
            // Fire times are whole seconds; croner would keep the sub-second part of `after`.
            Rule::Cron(c) => {
                let local = whole_second(after).with_timezone(&self.timezone);
                c.find_next_occurrence(&local, false).ok().map(|t| whole_second(t.with_timezone(&Utc)))
            }
            Rule::Weekly(w) => w.next_after(&self.timezone, after),
        }
    }

    /// The next `count` fire times after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count);
        let mut t = after;
        while out.len() < count {
            match self.next_after(t) {
                Some(n) => {
                    out.push(n);
                    t = n;
                }
                None => break,
            }
        }
        out
    }

    /// A schedule whose fire time `due` has passed by `now`: the latest fire time not after
    /// `now` runs (once), and the ones between are counted as missed.
    pub fn catch_up(&self, due: DateTime<Utc>, now: DateTime<Utc>) -> CatchUp {
        let mut latest = due;
        let mut missed = 0;
        while let Some(n) = self.next_after(latest).filter(|n| *n <= now) {
            latest = n;
            missed += 1;
            if missed == MAX_MISSED_COUNTED {
                if let Rule::Cron(c) = &self.rule
                    && let Ok(prev) = c.find_previous_occurrence(&now.with_timezone(&self.timezone), true)
                {
                    latest = prev.with_timezone(&Utc);
                }
                break;
            }
        }
        CatchUp { fire_time: latest, missed }
    }

    /// A human-readable form of the rule, for lists.
    pub fn describe(&self) -> String {
        match &self.rule {
            Rule::Manual => "manual only".into(),
            Rule::Cron(c) => format!("cron {} ({})", c.pattern, self.timezone),
            Rule::Weekly(w) => {
                let days: Vec<String> = w.weekdays.iter().map(|d| format!("{d}")).collect();
                let times = match w.times.as_slice() {
                    [one] => one.format("%H:%M").to_string(),
                    many => format!(
                        "{} times from {} to {}",
                        many.len(),
                        many[0].format("%H:%M"),
                        many[many.len() - 1].format("%H:%M")
                    ),
                };
                format!("weekly on {} at {} ({})", days.join(","), times, self.timezone)
            }
        }
    }
}

impl Weekly {
    fn parse(w: &WeeklyRule) -> Result<Weekly, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let mut weekdays = Vec::new();
        for d in &w.weekdays {
            match Weekday::from_str(d.trim()) {
                Ok(day) if !weekdays.contains(&day) => weekdays.push(day),
                Ok(_) => {}
                Err(_) => errors.push(("weekly.weekdays", format!("'{d}' is not a weekday (MON..SUN)"))),
            }
        }
        if w.weekdays.is_empty() {
            errors.push(("weekly.weekdays", "name at least one weekday (MON..SUN)".into()));
        }
        let mut weeks = Vec::new();
        for spec in &w.weeks_of_month {
            let n = match spec {
                WeekOfMonthSpec::Number(n @ 1..=5) => Some(*n),
                WeekOfMonthSpec::Number(_) => None,
                WeekOfMonthSpec::Name(name) => match name.trim().to_ascii_lowercase().as_str() {
                    "first" => Some(1),
                    "second" => Some(2),
                    "third" => Some(3),
                    "fourth" => Some(4),
                    "fifth" => Some(5),
                    "last" => Some(0),
                    _ => None,
                },
            };
            match n {
                Some(n) => weeks.push(n),
                None => errors.push(("weekly.weeks_of_month", format!("{spec:?} is not 1..5, first..fifth or last"))),
            }
        }
        let time = |field: &'static str, v: &str, errors: &mut Vec<(&'static str, String)>| {
            NaiveTime::parse_from_str(v.trim(), "%H:%M")
                .map_err(|_| errors.push((field, format!("'{v}' is not a time of day as HH:MM (24-hour)"))))
                .ok()
        };
        let start = time("weekly.start_time", &w.start_time, &mut errors);
        let end = w.end_time.as_deref().and_then(|e| time("weekly.end_time", e, &mut errors));
        let every = match w.repeat_every.as_deref() {
            None => None,
            Some(v) => match panel_domain::duration::parse(v) {
                Ok(d) if d >= std::time::Duration::from_secs(60) => Some(Duration::seconds(d.as_secs() as i64)),
                Ok(_) => {
                    errors.push(("weekly.repeat_every", "must be at least 1m".into()));
                    None
                }
                Err(e) => {
                    errors.push(("weekly.repeat_every", format!("'{v}': {e}")));
                    None
                }
            },
        };
        let mut times = Vec::new();
        match (start, every, end) {
            (Some(s), None, None) => times.push(s),
            (Some(s), Some(every), Some(e)) if e >= s => {
                let mut t = s;
                while t <= e && times.len() < 1440 {
                    times.push(t);
                    let (next, wrapped) = t.overflowing_add_signed(every);
                    if wrapped != 0 {
                        break;
                    }
                    t = next;
                }
            }
            (Some(_), Some(_), Some(_)) => errors.push(("weekly.end_time", "must not be before start_time".into())),
            (Some(_), Some(_), None) => errors.push(("weekly.end_time", "repeat_every needs an end_time".into())),
            (Some(_), None, Some(_)) => errors.push(("weekly.repeat_every", "end_time needs a repeat_every".into())),
            (None, ..) => {}
        }
        if errors.is_empty() { Ok(Weekly { weekdays, weeks, times }) } else { Err(errors) }
    }

    fn matches(&self, date: NaiveDate) -> bool {
        if !self.weekdays.contains(&date.weekday()) {
            return false;
        }
        if self.weeks.is_empty() {
            return true;
        }
        let nth = ((date.day() - 1) / 7 + 1) as u8;
        let last = date.checked_add_days(chrono::Days::new(7)).is_none_or(|d| d.month() != date.month());
        self.weeks.iter().any(|w| *w == nth || (*w == 0 && last))
    }

    fn next_after(&self, tz: &Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut date = after.with_timezone(tz).date_naive().pred_opt()?;
        // A fifth-week rule can wait months; a day more covers the day before in the zone.
        for _ in 0..=400 {
            if self.matches(date) {
                for t in &self.times {
                    if let Some(at) = resolve(tz, date, *t)
                        && at > after
                    {
                        return Some(at);
                    }
                }
            }
            date = date.succ_opt()?;
        }
        None
    }
}

fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// A local wall-clock time as an instant: the earlier one in an overlap, the first valid minute
/// after a gap.
fn resolve(tz: &Tz, date: NaiveDate, time: NaiveTime) -> Option<DateTime<Utc>> {
    let mut local = date.and_time(time);
    for _ in 0..=180 {
        match tz.from_local_datetime(&local) {
            chrono::LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
            chrono::LocalResult::Ambiguous(first, _) => return Some(first.with_timezone(&Utc)),
            chrono::LocalResult::None => local += Duration::minutes(1),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn weekly(json: serde_json::Value) -> Timing {
        let w: WeeklyRule = serde_json::from_value(json).unwrap();
        Timing::parse("Europe/Berlin", None, Some(&w)).unwrap()
    }

    #[test]
    fn cron_runs_in_the_schedules_time_zone() {
        let t = Timing::parse("Europe/Berlin", Some("0 9 * * MON-FRI"), None).unwrap();
        // Friday 2026-11-27 09:00 in Berlin is 08:00 UTC; then Monday.
        let next = t.upcoming(utc("2026-11-26T08:00:00Z"), 2);
        assert_eq!(next, [utc("2026-11-27T08:00:00Z"), utc("2026-11-30T08:00:00Z")]);
    }

    #[test]
    fn bad_rules_name_their_field() {
        let e = Timing::parse("Mars/Olympus", Some("61 * * * *"), None).unwrap_err();
        let fields: Vec<_> = e.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["cron", "timezone"]);
        let w: WeeklyRule =
            serde_json::from_value(serde_json::json!({"weekdays": ["Funday"], "start_time": "25:00"})).unwrap();
        let e = Timing::parse("UTC", None, Some(&w)).unwrap_err();
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn weekly_rule_with_weeks_of_month_and_repeats() {
        let t = weekly(serde_json::json!({"weekdays": ["MON"], "weeks_of_month": ["first", "last"],
            "start_time": "08:00", "repeat_every": "4h", "end_time": "16:00"}));
        // November 2026: Mondays 2, 9, 16, 23, 30. First = 2nd, last = 30th. CET = UTC+1.
        let next = t.upcoming(utc("2026-11-01T00:00:00Z"), 4);
        assert_eq!(
            next,
            [
                utc("2026-11-02T07:00:00Z"),
                utc("2026-11-02T11:00:00Z"),
                utc("2026-11-02T15:00:00Z"),
                utc("2026-11-30T07:00:00Z")
            ]
        );
    }

    #[test]
    fn spring_forward_gap_runs_after_the_gap_and_fall_back_runs_once() {
        // 2026-03-29: Berlin skips 02:00-03:00. A 02:30 rule runs at 03:00 CEST (01:00 UTC).
        let t = weekly(serde_json::json!({"weekdays": ["SUN"], "start_time": "02:30"}));
        assert_eq!(t.next_after(utc("2026-03-28T12:00:00Z")), Some(utc("2026-03-29T01:00:00Z")));
        // 2026-10-25: 02:00-03:00 happens twice; 02:30 runs at the first (CEST, 00:30 UTC) only.
        let first = t.next_after(utc("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, utc("2026-10-25T00:30:00Z"));
        assert_eq!(t.next_after(first), Some(utc("2026-11-01T01:30:00Z")));
        // The same through cron.
        let c = Timing::parse("Europe/Berlin", Some("30 2 * * *"), None).unwrap();
        assert_eq!(c.next_after(utc("2026-03-28T12:00:00Z")), Some(utc("2026-03-29T01:00:00Z")));
        let first = c.next_after(utc("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, utc("2026-10-25T00:30:00Z"));
        assert_eq!(c.next_after(first), Some(utc("2026-10-26T01:30:00Z")));
    }

    #[test]
    fn after_downtime_the_latest_missed_time_runs_once() {
        let t = Timing::parse("UTC", Some("* * * * *"), None).unwrap();
        let c = t.catch_up(utc("2026-11-26T10:00:00Z"), utc("2026-11-26T10:05:30Z"));
        assert_eq!(c, CatchUp { fire_time: utc("2026-11-26T10:05:00Z"), missed: 5 });
        let on_time = t.catch_up(utc("2026-11-26T10:00:00Z"), utc("2026-11-26T10:00:00.5Z"));
        assert_eq!(on_time.missed, 0);
    }

    #[test]
    fn seconds_are_optional_in_cron() {
        let t = Timing::parse("UTC", Some("*/2 * * * * *"), None).unwrap();
        assert_eq!(t.next_after(utc("2026-11-26T10:00:00Z")), Some(utc("2026-11-26T10:00:02Z")));
        assert_eq!(t.next_after(utc("2026-11-26T10:00:00.7Z")), Some(utc("2026-11-26T10:00:02Z")), "whole seconds");
        assert_eq!(t.next_after(utc("2026-11-26T10:00:01.7Z")), Some(utc("2026-11-26T10:00:02Z")));
        assert!(Timing::parse("UTC", None, None).unwrap().is_manual());
    }
}
