//! Who and what failed, in the one form both daemons report: built from relay failures,
//! carried in [`Control::Failed`](migproxy_proto::Control::Failed), rendered for people and
//! serialised for the API.

use std::borrow::Cow;
use std::fmt;

use migproxy_proto::{Attribution, Direction, Host, Leg, Op, Totals};
use serde::{Deserialize, Serialize};

use super::names::{DirectionName, HostName, LegName, OpName};

use crate::human::{Bytes, Elapsed, errno_name};
use crate::relay::{self, Failure};

/// Attribution of a relay failure on `channel` of this `host`. `qemu_leg` is the name of the
/// relay leg facing the local QEMU; the other leg is the peer link.
pub fn of_relay(host: Host, channel: u32, failure: &Failure, qemu_leg: &str) -> Attribution {
    let leg = if failure.leg == qemu_leg {
        Leg::Qemu
    } else {
        Leg::Peer
    };
    Attribution {
        host,
        leg,
        channel: Some(channel),
        direction: failure.direction.map(direction),
        op: match failure.op {
            relay::Op::Connect => Op::Connect,
            relay::Op::Read => Op::Read,
            relay::Op::Write => Op::Write,
            relay::Op::Splice => Op::Splice,
            relay::Op::Shutdown => Op::Shutdown,
        },
        errno: errno_name(&failure.error),
        message: match failure.undelivered {
            0 => os_message(&failure.error),
            held => format!(
                "{} ({} read from the other leg, not delivered)",
                os_message(&failure.error),
                Bytes(held)
            ),
        },
        bytes: Totals {
            to_destination: failure.bytes.to_destination,
            to_source: failure.bytes.to_source,
        },
        elapsed_ms: failure.elapsed.as_millis() as u64,
    }
}

/// The OS error's text without the errno (which travels apart).
pub fn os_message(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_lowercase(),
        None => error.to_string(),
    }
}

/// Where the byte counts of the two hosts first differ: one channel, one direction, and
/// that channel's counts on each host.
#[derive(Debug, Clone, Copy)]
pub struct Disagreement {
    pub channel: u32,
    pub direction: Direction,
    pub source: Totals,
    pub destination: Totals,
}

impl Disagreement {
    /// Where `channel`'s counts differ between the hosts (to destination first), if they do.
    pub fn between(channel: u32, source: Totals, destination: Totals) -> Option<Disagreement> {
        let direction = if source.to_destination != destination.to_destination {
            Direction::ToDestination
        } else if source.to_source != destination.to_source {
            Direction::ToSource
        } else {
            return None;
        };
        Some(Disagreement {
            channel,
            direction,
            source,
            destination,
        })
    }
}

/// A failure of the link between the daemons, seen from `host`, with no channel of its own:
/// `bytes` are the whole migration's.
pub fn peer_link(
    host: Host,
    op: Op,
    errno: Option<String>,
    message: String,
    bytes: Totals,
    elapsed_ms: u64,
) -> Attribution {
    Attribution {
        host,
        leg: Leg::Peer,
        channel: None,
        direction: None,
        op,
        errno,
        message,
        bytes,
        elapsed_ms,
    }
}

/// This host's QEMU failed, as QEMU (or its monitor) told it.
pub fn qemu(host: Host, message: String, bytes: Totals, elapsed_ms: u64) -> Attribution {
    Attribution {
        host,
        leg: Leg::Qemu,
        channel: None,
        direction: None,
        op: Op::Migrate,
        errno: None,
        message,
        bytes,
        elapsed_ms,
    }
}

/// A main channel that closed cleanly without the destination QEMU's acknowledgement where
/// one was to come: QEMU did not finish (`status`: the destination said it failed).
pub fn unfinished(
    channel: u32,
    bytes: Totals,
    status: Option<u32>,
    paused: bool,
    elapsed_ms: u64,
) -> Attribution {
    let (host, message) = match status {
        None if paused => (
            Host::Source,
            "QEMU closed the migration stream without finishing it (no SHUT on the return \
             path): paused"
                .to_owned(),
        ),
        None => (
            Host::Source,
            "the migration stream ended without the destination QEMU's acknowledgement (no SHUT \
             on its return path): QEMU did not finish the migration (cancelled or killed on the \
             source?)"
                .to_owned(),
        ),
        Some(status) => (
            Host::Destination,
            format!("the destination QEMU ended the migration with error status {status}"),
        ),
    };
    Attribution {
        host,
        leg: Leg::Qemu,
        channel: Some(channel),
        // What was missing would have come back on the return path.
        direction: Some(Direction::ToSource),
        op: Op::Shutdown,
        errno: None,
        message,
        bytes,
        elapsed_ms,
    }
}

/// The control link came up, and no channel followed within `limit_ms`: the source QEMU
/// never connected (its `migrate` never ran, or failed before connecting).
pub fn no_first_channel(limit_ms: u64, elapsed_ms: u64) -> Attribution {
    Attribution {
        host: Host::Source,
        leg: Leg::Qemu,
        channel: None,
        direction: None,
        op: Op::Timeout,
        errno: None,
        message: format!(
            "the source QEMU did not connect within {} of the control link coming up \
             (first-channel deadline)",
            Elapsed(std::time::Duration::from_millis(limit_ms)),
        ),
        bytes: Totals::default(),
        elapsed_ms,
    }
}

/// What a person can still do with a postcopy migration migproxy no longer recovers.
pub const BY_HAND: &str = "the guest is paused on the destination and its remaining pages \
    are still on the source; both QEMUs were left paused (postcopy-paused). To resume by \
    hand: migrate-recover URI on the destination QEMU, then migrate with that URI and \
    resume=true on the source QEMU; until then neither host can run the guest";

/// What a paused postcopy migration not recovered within `limit_ms` fails with (a failure
/// of the peer link, whose cause was `cause`): where the guest is and what a person can
/// still do.
pub fn recovery_timed_out(limit_ms: u64, cause: &str) -> String {
    format!(
        "postcopy recovery did not succeed within {} (recover_timeout) of the pause ({cause}): \
         {BY_HAND}",
        Elapsed(std::time::Duration::from_millis(limit_ms)),
    )
}

/// What a stall watch saw: on `host`, nothing moved for `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    pub host: Host,
    pub limit: std::time::Duration,
    pub elapsed_ms: u64,
}

impl Stall {
    fn attribution(
        &self,
        leg: Leg,
        channel: Option<u32>,
        direction: Option<Direction>,
        message: String,
        bytes: Totals,
    ) -> Attribution {
        Attribution {
            host: self.host,
            leg,
            channel,
            direction,
            op: Op::Timeout,
            errno: None,
            message,
            bytes,
            elapsed_ms: self.elapsed_ms,
        }
    }

    /// This host's QEMU took none of the `held` bytes waiting for it on `channel`.
    pub fn qemu_not_reading(
        &self,
        channel: u32,
        way: relay::Direction,
        held: u64,
        bytes: Totals,
    ) -> Attribution {
        let message = format!(
            "QEMU stopped reading: {} waited {} to be written to it",
            Bytes(held),
            Elapsed(self.limit)
        );
        self.attribution(
            Leg::Qemu,
            Some(channel),
            Some(direction(way)),
            message,
            bytes,
        )
    }

    /// The source's link to the destination took none of the `held` bytes, while the control
    /// link is alive. On a `resumable` channel the bytes held may also be the retention,
    /// full of bytes the destination daemon has not acknowledged.
    pub fn link_not_taking(
        &self,
        channel: u32,
        (held, resumable): (u64, bool),
        bytes: Totals,
    ) -> Attribution {
        let what = match resumable {
            true => "took or acknowledged",
            false => "took",
        };
        let message = format!(
            "the link to the destination daemon {what} none of {} for {} (the destination \
             daemon still answers on the control link)",
            Bytes(held),
            Elapsed(self.limit)
        );
        let way = Some(Direction::ToDestination);
        self.attribution(Leg::Peer, Some(channel), way, message, bytes)
    }

    /// The source QEMU sent nothing on any channel, and nothing waits to be written.
    pub fn source_silent(&self, bytes: Totals) -> Attribution {
        let message = format!(
            "the source QEMU sent nothing on any channel for {}",
            Elapsed(self.limit)
        );
        let way = Some(Direction::ToDestination);
        self.attribution(Leg::Qemu, None, way, message, bytes)
    }
}

fn direction(way: relay::Direction) -> Direction {
    match way {
        relay::Direction::ToDestination => Direction::ToDestination,
        relay::Direction::ToSource => Direction::ToSource,
    }
}

/// The destination carried more channels than the source opened: a connection the source
/// never made was admitted.
pub fn channel_count(source: u32, destination: u32) -> Attribution {
    Attribution {
        host: Host::Destination,
        leg: Leg::Peer,
        channel: Some(source),
        direction: None,
        op: Op::Protocol,
        errno: None,
        message: format!(
            "channel counts disagree: the source daemon opened {source} channel(s), the \
             destination daemon carried {destination}"
        ),
        bytes: Totals::default(),
        elapsed_ms: 0,
    }
}

/// Both hosts saw every channel complete, but the byte counts differ (`source` and
/// `destination` are the totals of each). Both hosts build the same attribution from the
/// same counts, so they report it alike; `first` names the channel and direction.
pub fn disagreement(
    source: Totals,
    destination: Totals,
    first: Option<Disagreement>,
) -> Attribution {
    let mut message = format!(
        "byte counts disagree: the source daemon moved {} to destination and {} to source, \
         the destination daemon {} and {}",
        source.to_destination, source.to_source, destination.to_destination, destination.to_source
    );
    if let Some(first) = first {
        let (at_source, at_destination, way) = match first.direction {
            Direction::ToDestination => (
                first.source.to_destination,
                first.destination.to_destination,
                "to destination",
            ),
            Direction::ToSource => (
                first.source.to_source,
                first.destination.to_source,
                "to source",
            ),
        };
        message += &format!(
            "; first on channel {} {way}: {at_source} at the source, {at_destination} at the \
             destination",
            first.channel
        );
    }
    Attribution {
        host: Host::Destination,
        leg: Leg::Peer,
        channel: first.map(|f| f.channel),
        direction: first.map(|f| f.direction),
        op: Op::Protocol,
        errno: None,
        message,
        // Like every attribution that names a channel, that channel's bytes.
        bytes: first.map_or(destination, |f| f.destination),
        elapsed_ms: 0,
    }
}

/// The (host, leg, op) labels of an attribution, as metrics count failures.
pub fn labels(a: &Attribution) -> (&'static str, &'static str, &'static str) {
    (
        host_name(a.host),
        LegName::from(a.leg).as_str(),
        OpName::from(a.op).as_str(),
    )
}

pub fn host_name(host: Host) -> &'static str {
    HostName::from(host).as_str()
}

/// Text that came from elsewhere (the peer daemon, QEMU) with every control character
/// escaped as Rust writes it (`\n`, `\u{1b}`), and the bidirectional overrides too: shown
/// raw, a newline would forge a log line and an escape sequence would drive the terminal of
/// whoever reads the report.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    let hostile = |c: char| c.is_control() || is_bidi_control(c);
    if !text.chars().any(hostile) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hostile(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

/// The characters that reorder what follows them on screen (U+202A–U+202E, U+2066–U+2069,
/// and the marks U+200E, U+200F).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// One line for people (the peer's text escaped, see [`escape_controls`]):
/// `destination QEMU: write failed on channel 0 after 512 MiB to destination and 0 B to
/// source (3.4 s): broken pipe (EPIPE)`.
#[derive(Debug)]
pub struct Rendered<'a>(pub &'a Attribution);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        match a.leg {
            Leg::Qemu => write!(f, "{} QEMU: ", host_name(a.host))?,
            Leg::Peer => write!(f, "peer link, seen from the {}: ", host_name(a.host))?,
        }
        match a.op {
            Op::Timeout => f.write_str("timed out")?,
            Op::Protocol => f.write_str("protocol error")?,
            Op::Migrate => f.write_str("migration failed")?,
            op => write!(f, "{} failed", OpName::from(op).as_str())?,
        }
        if let Some(channel) = a.channel {
            write!(f, " on channel {channel}")?;
        }
        if a.bytes.to_destination == 0 && a.bytes.to_source == 0 {
            f.write_str(" before any byte moved")?;
        } else {
            write!(
                f,
                " after {} to destination and {} to source",
                Bytes(a.bytes.to_destination),
                Bytes(a.bytes.to_source)
            )?;
        }
        if a.elapsed_ms > 0 {
            write!(
                f,
                " ({})",
                Elapsed(std::time::Duration::from_millis(a.elapsed_ms))
            )?;
        }
        write!(f, ": {}", escape_controls(&a.message))?;
        if let Some(errno) = &a.errno {
            write!(f, " ({})", escape_controls(errno))?;
        }
        Ok(())
    }
}

/// An attribution as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The whole story in one line.
    pub message: String,
    pub host: HostName,
    /// `qemu` (the daemon's local QEMU) or `peer` (the link between the daemons).
    pub leg: LegName,
    pub channel: Option<u32>,
    pub direction: Option<DirectionName>,
    pub op: OpName,
    pub errno: Option<String>,
    /// The OS or protocol error text.
    pub detail: String,
    /// The cause under `message`, as one entry: `detail`, then the errno in parentheses if
    /// there is one. An attribution crosses the peer link as text (see [`Attribution`]), so
    /// the error chain it was made from is not kept apart; this is not a copy of `message`
    /// but its lowest level, as the API's `causes` are for other errors.
    pub causes: Vec<String>,
    pub bytes: relay::ByteCounts,
    pub elapsed_ms: u64,
}

impl From<&Attribution> for Report {
    fn from(a: &Attribution) -> Report {
        Report {
            message: Rendered(a).to_string(),
            host: a.host.into(),
            leg: a.leg.into(),
            channel: a.channel,
            direction: a.direction.map(DirectionName::from),
            op: a.op.into(),
            errno: a.errno.as_deref().map(|e| escape_controls(e).into_owned()),
            detail: escape_controls(&a.message).into_owned(),
            causes: vec![match &a.errno {
                Some(errno) => format!(
                    "{} ({})",
                    escape_controls(&a.message),
                    escape_controls(errno)
                ),
                None => escape_controls(&a.message).into_owned(),
            }],
            bytes: relay::ByteCounts {
                to_destination: a.bytes.to_destination,
                to_source: a.bytes.to_source,
            },
            elapsed_ms: a.elapsed_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        assert!(matches!(
            escape_controls("broken pipe – café"),
            Cow::Borrowed("broken pipe – café")
        ));
        assert_eq!(
            escape_controls("bad\n2025-01-01 WARN forged\r\t\u{1b}[31mred\u{7f}"),
            "bad\\n2025-01-01 WARN forged\\r\\t\\u{1b}[31mred\\u{7f}"
        );
        assert_eq!(escape_controls("a\u{202e}b"), "a\\u{202e}b");
    }

    #[test]
    fn a_peer_message_cannot_break_the_line_it_is_rendered_in() {
        let a = Attribution {
            host: Host::Source,
            leg: Leg::Qemu,
            channel: None,
            direction: None,
            op: Op::Read,
            errno: Some("EIO\n".into()),
            message: "x\nWARN forged line\u{1b}[2J".into(),
            bytes: Totals::default(),
            elapsed_ms: 0,
        };
        let line = Rendered(&a).to_string();
        assert_eq!(
            line,
            "source QEMU: read failed before any byte moved: x\\nWARN forged line\\u{1b}[2J \
             (EIO\\n)"
        );
        let report = Report::from(&a);
        for text in [&report.message, &report.detail, &report.causes[0]] {
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
    }

    #[test]
    fn renders_host_leg_channel_op_bytes_and_errno() {
        let a = Attribution {
            host: Host::Destination,
            leg: Leg::Qemu,
            channel: Some(0),
            direction: Some(Direction::ToDestination),
            op: Op::Write,
            errno: Some("EPIPE".into()),
            message: "broken pipe".into(),
            bytes: Totals {
                to_destination: 512 << 20,
                to_source: 0,
            },
            elapsed_ms: 3400,
        };
        assert_eq!(
            Rendered(&a).to_string(),
            "destination QEMU: write failed on channel 0 after 512 MiB to destination and 0 B \
             to source (3.4 s): broken pipe (EPIPE)"
        );
    }
}
