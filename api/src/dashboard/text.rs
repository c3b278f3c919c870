//! How the pages write times, sizes and durations, and the redaction of what must never reach a page.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use regex::Regex;

/// `2026-12-07 01:30:05 UTC`.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long ago `at` was, in the largest unit that fits (`3 min ago`); a time to come reads `in 2 h`.
pub fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds();
    if secs < 0 {
        format!("in {}", span(-secs))
    } else {
        format!("{} ago", span(secs))
    }
}

/// A span of seconds in its largest unit: `42 s`, `3 min`, `5 h`, `12 d`.
pub fn span(secs: i64) -> String {
    match secs {
        ..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86_400 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// A task's run time: `850 ms`, `12.3 s`, `4 min 5 s`.
pub fn duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = secs.round() as i64;
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Text from a task (an error, a progress line) with anything that looks like a credential masked: the
/// password of a `scheme://user:password@host` URL and `password=…`, `secret=…`, `key=…` pairs. Errors are
/// written not to carry secrets; this is the second line of defence for a page anyone with the link can read.
pub fn redact(text: &str) -> String {
    static URL_PASSWORD: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")
            .expect("a valid regex")
    });
    static PAIR: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"(?i)(?P<head>\b[a-z0-9_]*(?:password|secret|token|key)[a-z0-9_]*\s*[=:]\s*)[^\s,;&]+",
        )
        .expect("a valid regex")
    });
    let masked = URL_PASSWORD.replace_all(text, "${head}***@");
    PAIR.replace_all(&masked, "${head}***").into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_spans_and_durations_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(span(42), "42 s");
        assert_eq!(span(3 * 60 + 5), "3 min");
        assert_eq!(span(2 * 86_400), "2 d");
        assert_eq!(duration(0.25), "250 ms");
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(245.0), "4 min 5 s");
    }

    #[test]
    fn redaction_masks_url_passwords_and_secret_pairs() {
        assert_eq!(
            redact("connecting to postgres://admin:hunter2@10.0.0.1:5432/db failed"),
            "connecting to postgres://admin:***@10.0.0.1:5432/db failed"
        );
        assert_eq!(
            redact("password=hunter2 user=x, S3_SECRET_KEY: abc123; access_key=AKIA"),
            "password=*** user=x, S3_SECRET_KEY: ***; access_key=***"
        );
        assert_eq!(
            redact("the bucket berth-x exists"),
            "the bucket berth-x exists"
        );
    }
}
