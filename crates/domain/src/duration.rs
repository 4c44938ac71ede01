//! Human-friendly durations for settings: `90s`, `5m`, `1h30m`, `2d`, or a plain number of seconds.

use std::time::Duration;

pub fn parse(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("is empty; write a duration like 30s, 5m, 1h or 1d".into());
    }
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in value.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("'{value}' has an unknown unit '{c}'; use s, m, h or d (e.g. 90s, 5m, 1h)")),
        };
        let n: u64 = digits.parse().map_err(|_| format!("'{value}' is not a duration; write e.g. 90s, 5m, 1h"))?;
        total =
            n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("'{value}' is too long"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("'{value}' ends without a unit; write e.g. {digits}s"));
    }
    Ok(Duration::from_secs(total))
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
}
