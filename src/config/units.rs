//! Durations and instants as a config writes them, and as the hash sees
//! them.
//!
//! Durations are humantime strings (`"500ms"`, `"8h"`); instants are RFC
//! 3339 with an offset (`"2026-12-01T09:00:00Z"`, `"2026-12-01T18:00:00+09:00"`),
//! parsed strictly by the `time` crate. Both hash as integers (nanoseconds,
//! nanoseconds since the Unix epoch), so two spellings of one value hash
//! alike.
//!
//! This module only converts. It must not judge a value (validation does).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A duration as a config would write it: `"350s"`, `"1500ms"`.
pub fn fmt_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else if nanos % 1_000 == 0 {
        format!("{}us", d.as_micros())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

/// Parse an RFC 3339 time with its offset (`Z` or `±HH:MM`) into an instant.
/// `Err` says what is wrong, for the caller's message.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| e.to_string())?;
    Ok(SystemTime::from(t))
}

/// An instant in RFC 3339, in UTC (`Z`), with a fraction only when it has
/// one: what `routes` shows and [`render`](super::render) writes, and what
/// [`parse_rfc3339`] reads back to the same instant.
pub fn fmt_rfc3339(t: SystemTime) -> String {
    let utc = OffsetDateTime::from(t);
    // Formatting fails only outside years 0-9999, which no parsed value is.
    utc.format(&Rfc3339).unwrap_or_else(|_| format!("{utc}"))
}

// Nanoseconds: every distinct duration hashes differently.
pub(super) fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_nanos())
}

pub(super) fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_nanos()),
        None => s.serialize_none(),
    }
}

/// Nanoseconds since the Unix epoch (negative before it).
pub(super) fn ser_opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&unix_nanos(*t)),
        None => s.serialize_none(),
    }
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn offsets_name_the_same_instant() {
        // 2026-12-01T09:00:00Z
        let want = at(1_796_115_600);
        for s in ["2026-12-01T09:00:00Z", "2026-12-01T18:00:00+09:00", "2026-12-01T04:00:00-05:00"] {
            assert_eq!(parse_rfc3339(s), Ok(want), "{s}");
        }
        assert_eq!(fmt_rfc3339(want), "2026-12-01T09:00:00Z");
        let frac = parse_rfc3339("2026-12-01T18:00:00.25+09:00").unwrap();
        assert_eq!(frac, want + Duration::from_millis(250));
        assert_eq!(parse_rfc3339(&fmt_rfc3339(frac)), Ok(frac));
    }

    #[test]
    fn no_offset_or_a_bad_field_is_refused() {
        // RFC 3339 lets a space stand for the T; that is accepted.
        assert!(parse_rfc3339("2026-12-01 09:00:00Z").is_ok());
        for s in [
            "2026-12-01T09:00:00",
            "2026-13-01T09:00:00Z",
            "2026-02-30T09:00:00Z",
            "2026-12-01T25:00:00Z",
            "2026-12-01T09:00:00+24:00",
            "2026-12-01",
            "tomorrow",
            "",
        ] {
            assert!(parse_rfc3339(s).is_err(), "{s} was accepted");
        }
    }
}
