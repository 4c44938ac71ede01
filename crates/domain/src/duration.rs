//! Human-friendly durations for settings: `250ms`, `90s`, `5m`, `1h30m`, `2d`, or a plain number of seconds.

use std::time::Duration;

/// The longest duration anyone means (ten years): longer ones are refused here, so that no
/// caller overflows a date computed from them (`since=99999999999d`).
pub const MAX: Duration = Duration::from_secs(10 * 366 * 86_400);

pub fn parse(value: &str) -> Result<Duration, String> {
    let d = parse_any(value)?;
    if d > MAX {
        return Err(format!("'{}' is longer than ten years; give a shorter duration", value.trim()));
    }
    Ok(d)
}

fn parse_any(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("is empty; write a duration like 30s, 5m, 1h or 1d".into());
    }
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total_ms = 0u64;
    let mut digits = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit_ms = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(format!("'{value}' has an unknown unit '{c}'; use ms, s, m, h or d (e.g. 90s, 5m, 1h)")),
        };
        let n: u64 = digits.parse().map_err(|_| format!("'{value}' is not a duration; write e.g. 90s, 5m, 1h"))?;
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("'{value}' is too long"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("'{value}' ends without a unit; write e.g. {digits}s"));
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats whole seconds back into the shortest form `parse` accepts.
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, name) in [(86400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&format!("{}{name}", secs / unit));
            secs %= unit;
        }
    }
    out
}

/// Parses a comma-separated list of durations (a retry schedule).
pub fn parse_list(value: &str) -> Result<Vec<Duration>, String> {
    value.split(',').map(parse).collect()
}

pub fn format_list(list: &[Duration]) -> String {
    list.iter().map(|d| format(*d)).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse("5x").unwrap_err().contains("unknown unit"));
        assert!(parse("1h30").unwrap_err().contains("without a unit"));
        assert!(parse("").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for s in ["0s", "45s", "5m", "1h30m", "1d", "1d1h1m1s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
        assert_eq!(format_list(&parse_list("1m, 5m,1h").unwrap()), "1m,5m,1h");
    }

    #[test]
    fn durations_longer_than_ten_years_are_refused_instead_of_overflowing_later() {
        assert!(parse("3650d").is_ok());
        for v in ["99999999999d", "18446744073709551615", "4000d"] {
            assert!(parse(v).unwrap_err().contains("ten years"), "{v}");
        }
    }
}
