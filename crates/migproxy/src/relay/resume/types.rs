//! The engine's vocabulary: its settings, what the daemon sees of a channel (counters, a
//! tap, outages), what it asks of the peer (a hurry), and how a channel or a session ends.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::retention::RetentionError;
use crate::human::Elapsed;
use crate::relay::{Counters, Direction, TapFn};

/// What asks the peer for its progress at once (the daemon's `Hurry` frame).
#[derive(Clone)]
pub struct Hurry(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hurry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hurry")
    }
}

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The most bytes one direction keeps unacknowledged.
    pub retention: usize,
    /// How long the channel may go without a working connection.
    pub resume_timeout: Duration,
    /// The hello's budget on a fresh connection.
    pub hello_timeout: Duration,
    /// How long a peer's end of stream short of its announced length waits for the
    /// announcement before it counts as a broken connection.
    pub end_grace: Duration,
    /// The copy buffer, per direction.
    pub chunk: usize,
    /// What the daemon sees of the channel while it runs.
    pub observe: Observe,
}

/// The channel as the daemon watches it, the same as a relay's: byte counters (progress,
/// the stall watch), a tap on the direction toward the source (QEMU's return path, for the
/// verdict), and each outage as it starts and ends.
#[derive(Debug, Clone)]
pub struct Observe {
    /// Bytes first sent up, and bytes delivered down: a replay counts once.
    pub counters: Arc<Counters>,
    /// The direction from this side's local end to the peer: `ToDestination` on the
    /// source's host, `ToSource` on the destination's.
    pub up: Direction,
    /// Sees every byte of the destination→source direction once, in order.
    pub tap_to_source: Option<TapFn>,
    pub outages: Option<mpsc::UnboundedSender<Outage>>,
}

impl Default for Observe {
    fn default() -> Observe {
        Observe {
            counters: Arc::new(Counters::new()),
            up: Direction::ToDestination,
            tap_to_source: None,
            outages: None,
        }
    }
}

impl Observe {
    pub(super) fn down(&self) -> Direction {
        match self.up {
            Direction::ToDestination => Direction::ToSource,
            Direction::ToSource => Direction::ToDestination,
        }
    }

    /// Counts `bytes` moved `direction` (and shows them to the tap, if it watches it).
    pub(super) fn moved(&self, direction: Direction, bytes: &[u8]) {
        self.counters.record(direction, bytes.len(), false);
        if let (Direction::ToSource, Some(tap)) = (direction, &self.tap_to_source) {
            (tap.0)(bytes);
        }
    }

    /// Counts `bytes` moved `direction` by splice (no tap watches it).
    pub(super) fn spliced(&self, direction: Direction, bytes: usize) {
        self.counters.record(direction, bytes, true);
    }

    /// A tap watches `direction`: its bytes must pass through user space.
    pub(super) fn tapped(&self, direction: Direction) -> bool {
        direction == Direction::ToSource && self.tap_to_source.is_some()
    }

    pub(super) fn tell(&self, outage: Outage) {
        if let Some(outages) = &self.outages {
            let _ = outages.send(outage);
        }
    }
}

/// An outage of the channel's connection to the peer, as it starts and as it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outage {
    /// The connection broke (the cause, as the OS or the daemon said it).
    Interrupted {
        cause: String,
        /// Cut on the daemon's word ([`Sides::breaks`]), not by an error seen here.
        signalled: bool,
        /// The link's number for the connection that broke ([`PeerLink::connection`]).
        connection: u32,
    },
    /// Going on, on a new connection.
    Resumed {
        /// From the break to the new connection's hellos.
        lost: Duration,
        /// Bytes sent again.
        replayed: u64,
        /// Connections tried.
        attempts: u32,
    },
}

impl Default for Options {
    fn default() -> Options {
        Options {
            retention: 16 << 20,
            resume_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(5),
            end_grace: Duration::from_secs(2),
            chunk: 1 << 20,
            observe: Observe::default(),
        }
    }
}

/// What a channel carried, and what it cost.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Bytes read from the local end and sent.
    pub sent: u64,
    /// Bytes of the peer's direction written to the local end.
    pub delivered: u64,
    /// Connections after the first.
    pub resumptions: u32,
    /// Bytes sent again after a break.
    pub replayed: u64,
    /// Where this side kept what it sent until the peer acknowledged it.
    pub kept_in: Keeping,
}

/// Where a direction keeps the bytes the peer has not acknowledged: kernel pipes (the local
/// end is a plain socket and no tap watches the direction; in the clear and over TLS alike),
/// or the daemon's memory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Keeping {
    #[default]
    Memory,
    Pipes,
}

/// Why a channel ended short.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("local end: {op} failed")]
    Local {
        op: &'static str,
        #[source]
        error: io::Error,
    },
    /// This host's own retention (the pipes or memory that keep unacknowledged bytes)
    /// failed: neither QEMU's fault nor the peer's, and no new connection mends it.
    #[error("this host's retention of unacknowledged bytes: {op} failed")]
    Retention {
        op: &'static str,
        #[source]
        error: io::Error,
    },
    #[error("peer offsets")]
    Offsets(#[from] RetentionError),
    #[error(
        "no working connection to the peer for {}{} ({attempts} attempts; the last: {last})",
        Elapsed(*.waited),
        cause.as_ref().map(|cause| format!(" after it broke: {cause}")).unwrap_or_default()
    )]
    Timeout {
        /// The break that started the outage; none before the first connection.
        cause: Option<io::Error>,
        waited: Duration,
        attempts: u32,
        last: io::Error,
    },
    #[error("the peer refused the channel's new connection: {0}")]
    Refused(#[source] io::Error),
    #[error("the peer's direction went past the end it announced ({end} bytes): {delivered}")]
    BeyondEnd { end: u64, delivered: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// How a session on one connection ended short.
pub(super) enum Cut {
    /// The connection failed: resume on another.
    Broken(io::Error),
    /// The channel cannot go on.
    Fatal(ResumeError),
}

impl From<ResumeError> for Cut {
    fn from(error: ResumeError) -> Cut {
        Cut::Fatal(error)
    }
}

impl From<RetentionError> for Cut {
    fn from(error: RetentionError) -> Cut {
        Cut::Fatal(error.into())
    }
}

pub(super) fn local(op: &'static str) -> impl FnOnce(io::Error) -> Cut {
    move |error| Cut::Fatal(ResumeError::Local { op, error })
}

/// This host's retention failed at `op`.
pub(super) fn retention_failed(op: &'static str, error: io::Error) -> ResumeError {
    ResumeError::Retention { op, error }
}
