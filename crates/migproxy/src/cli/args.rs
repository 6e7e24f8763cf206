//! clap value parsers shared by the subcommands: endpoints, seconds, sizes and states.

use std::time::Duration;

use crate::daemon::migration::State;
use crate::endpoint::{Endpoint, EndpointError};

/// clap parser for endpoints: errors read `invalid endpoint "tcp:foo": missing port`.
pub(super) fn endpoint(text: &str) -> Result<Endpoint, EndpointError> {
    text.parse()
}

/// clap parser for durations in seconds, fractions allowed: `10`, `0.5`.
pub(super) fn seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("\"{text}\" is not a number of seconds"))?;
    Duration::try_from_secs_f64(value).map_err(|_| format!("{text} s is not a usable duration"))
}

/// As [`seconds`], for the daemon's timeouts, with the config file's bounds: 0 would mean
/// "at once" and fail everything, and an absurd value overflows the clock's arithmetic.
pub(super) fn positive_seconds(text: &str) -> Result<Duration, String> {
    let duration = seconds(text)?;
    if duration.is_zero() || duration.as_secs_f64() >= 1e9 {
        return Err("must be a positive number of seconds (below 1e9)".to_owned());
    }
    Ok(duration)
}

/// clap parser for sizes: `1073741824`, `512M`, `1G`, `1GiB` (binary units).
pub(super) fn size(text: &str) -> Result<u64, String> {
    let bad = || format!("\"{text}\" is not a size (examples: 4096, 512M, 1G)");
    let trimmed = text.trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'K' | 'k')) => (&trimmed[..i], 10),
        Some((i, 'M' | 'm')) => (&trimmed[..i], 20),
        Some((i, 'G' | 'g')) => (&trimmed[..i], 30),
        Some((i, 'T' | 't')) => (&trimmed[..i], 40),
        _ => (trimmed, 0),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1 << shift).ok_or_else(bad)
}

/// clap parser for a migration state as the API names it: `active`, `completed`…
pub(super) fn state(text: &str) -> Result<State, String> {
    State::parse(text).ok_or_else(|| {
        let names: Vec<_> = State::ALL.iter().map(|s| s.name()).collect();
        format!("\"{text}\" is not one of {}", names.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("512M"), Ok(512 << 20));
        assert_eq!(size("1G"), Ok(1 << 30));
        assert_eq!(size("1GiB"), Ok(1 << 30));
        assert_eq!(size("2KB"), Ok(2048));
        assert!(size("").is_err());
        assert!(size("G").is_err());
        assert!(size("-1G").is_err());
        assert!(size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(seconds("-1").is_err());
        assert!(seconds("soon").is_err());
        assert!(seconds("inf").is_err());
        assert_eq!(positive_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(positive_seconds("0").is_err());
        assert!(positive_seconds("0.0").is_err());
    }
}
