//! Rendering for people: byte counts, durations, rates, OS errors and error chains.
//!
//! Every report line migproxy prints goes through these, so that a failure reads the same in
//! the CLI, the logs and (later) the API: `1.21 GiB`, `3.4 s`,
//! `connection reset by peer (ECONNRESET)`.

use std::fmt;
use std::io;
use std::time::Duration;

/// A byte count in binary units: `312 B`, `4.0 KiB`, `1.21 GiB`.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        // Three significant digits: 1.21 GiB, 12.1 GiB, 121 GiB.
        let decimals = if value < 10.0 {
            2
        } else if value < 100.0 {
            1
        } else {
            0
        };
        write!(f, "{value:.decimals$} {}", UNITS[unit])
    }
}

/// A duration at a precision that suits its size: `840 ms`, `3.4 s`, `2 min 05 s`.
#[derive(Debug, Clone, Copy)]
pub struct Elapsed(pub Duration);

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs_f64();
        if secs < 1.0 {
            write!(f, "{} ms", self.0.as_millis())
        } else if secs < 120.0 {
            write!(f, "{secs:.1} s")
        } else {
            let whole = self.0.as_secs();
            write!(f, "{} min {:02} s", whole / 60, whole % 60)
        }
    }
}

/// Throughput in binary units per second: `850 MiB/s`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub bytes: u64,
    pub over: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.over.as_secs_f64();
        if secs <= 0.0 {
            return f.write_str("-");
        }
        write!(f, "{}/s", Bytes((self.bytes as f64 / secs) as u64))
    }
}

/// An I/O error as `message (ERRNO)`: `connection reset by peer (ECONNRESET)`.
///
/// The errno name is what operators grep for and what they find in man pages; the message is
/// what they understand at a glance. Errors without an OS code (time-outs, protocol errors)
/// render as their own text.
#[derive(Debug, Clone, Copy)]
pub struct OsError<'a>(pub &'a io::Error);

impl fmt::Display for OsError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.raw_os_error() {
            Some(code) => {
                let errno = nix::errno::Errno::from_raw(code);
                write!(f, "{} ({errno:?})", lower_first(errno.desc()))
            }
            None => write!(f, "{}", self.0),
        }
    }
}

/// The symbolic name of an error's errno (`ECONNRESET`), if it has one.
pub fn errno_name(error: &io::Error) -> Option<String> {
    os_code(error).map(|code| format!("{:?}", nix::errno::Errno::from_raw(code)))
}

/// The OS error code of `error`, or of the first OS error among its sources: an error that
/// explains an OS error (a resumed channel's deadline, naming the reset that started it)
/// still has its errno.
fn os_code(error: &io::Error) -> Option<i32> {
    if let Some(code) = error.raw_os_error() {
        return Some(code);
    }
    let mut next = error.get_ref().and_then(|inner| inner.source());
    while let Some(cause) = next {
        if let Some(code) = cause
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        next = cause.source();
    }
    None
}

/// An error and its sources on one line, each after a colon: `TLS revocation list
/// /etc/pki/qemu/ca-crl.pem: the file is empty`. Errors keep their causes as `source()`
/// rather than in their own text; a line for people needs both.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        for cause in causes(self.0) {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

/// The texts of an error's sources, outermost first: what the API returns as `causes` and the
/// CLI numbers. An OS error reads as [`OsError`] does; a cause written on several lines (a
/// TOML error with its snippet) is put on one.
pub fn causes(error: &dyn std::error::Error) -> Vec<String> {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = match cause.downcast_ref::<io::Error>() {
            Some(os) => OsError(os).to_string(),
            None => cause.to_string(),
        };
        causes.push(one_line(&text));
        source = cause.source();
    }
    causes
}

/// Lines joined with a space, blank ones dropped.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines.join(" ")
}

/// "Connection reset by peer" → "connection reset by peer", but keep "I/O error" as it is:
/// only a plain capitalised first word is lowered.
fn lower_first(text: &str) -> String {
    let first_word = text.split(' ').next().unwrap_or_default();
    let mut chars = first_word.chars();
    let plain =
        chars.next().is_some_and(char::is_uppercase) && chars.all(|c| c.is_ascii_lowercase());
    if plain {
        let mut lowered = first_word.to_lowercase();
        lowered.push_str(&text[first_word.len()..]);
        lowered
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        let error = Outer(io::Error::other("inner"));
        assert_eq!(Chain(&error).to_string(), "outer: inner");
        let refused = Outer(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(causes(&refused), ["connection refused (ECONNREFUSED)"]);
    }

    #[test]
    fn bytes_use_three_significant_digits() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(312).to_string(), "312 B");
        assert_eq!(Bytes(1024).to_string(), "1.00 KiB");
        assert_eq!(Bytes(1_299_227_607).to_string(), "1.21 GiB");
        assert_eq!(Bytes(64 << 20).to_string(), "64.0 MiB");
        assert_eq!(Bytes(300 << 30).to_string(), "300 GiB");
        assert_eq!(Bytes(u64::MAX).to_string(), "16384 PiB");
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(Elapsed(Duration::from_millis(840)).to_string(), "840 ms");
        assert_eq!(Elapsed(Duration::from_millis(3400)).to_string(), "3.4 s");
        assert_eq!(Elapsed(Duration::from_secs(125)).to_string(), "2 min 05 s");
        let rate = Rate {
            bytes: 1 << 30,
            over: Duration::from_secs(2),
        };
        assert_eq!(rate.to_string(), "512 MiB/s");
        let none = Rate {
            bytes: 1,
            over: Duration::ZERO,
        };
        assert_eq!(none.to_string(), "-");
    }

    #[test]
    fn os_errors_name_the_errno() {
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(
            OsError(&reset).to_string(),
            "connection reset by peer (ECONNRESET)"
        );
        assert_eq!(errno_name(&reset).as_deref(), Some("ECONNRESET"));
        let eio = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(OsError(&eio).to_string(), "I/O error (EIO)");
        let custom = io::Error::new(io::ErrorKind::TimedOut, "no progress for 10 s");
        assert_eq!(OsError(&custom).to_string(), "no progress for 10 s");
        assert_eq!(errno_name(&custom), None);
    }
}
