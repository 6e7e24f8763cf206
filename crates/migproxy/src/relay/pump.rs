//! What the two copy loops ([`fd`](super::fd) for splice, [`stream`](super::stream) for
//! buffers) share: the direction they move, their options, how often they yield, and how one
//! stops when a step fails.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Gives the worker thread up now and then. A stream that never runs dry never returns
/// `Pending`, and tokio's budget counts calls, not bytes: a pump could keep its worker for
/// tens of milliseconds, and a task woken onto that worker — an API call, a cancel — would
/// wait behind it (cancel p99 was 99 ms under full load, max 162 ms; with this, 3 ms).
/// Yielding costs: a yielded task may wake an idle worker to steal it, a cross-core wake-up.
/// After every chunk that cost the daemon pair a quarter of its throughput here, every 2 ms
/// a single stream 12 %; every [`TURN`] costs nothing measurable.
pub(super) struct Turn {
    since: std::time::Instant,
}

/// How long a pump may keep its worker before letting others run.
const TURN: Duration = Duration::from_millis(10);

impl Turn {
    pub(super) fn new() -> Turn {
        Turn {
            since: std::time::Instant::now(),
        }
    }

    pub(super) async fn take(&mut self) {
        if self.since.elapsed() >= TURN {
            tokio::task::yield_now().await;
            self.since = std::time::Instant::now();
        }
    }
}

/// The smallest copy buffer: large reads keep the per-byte syscall cost low.
pub const MIN_COPY_BUFFER: usize = 256 * 1024;

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the source leg to the destination leg: the migration stream itself.
    ToDestination,
    /// From the destination leg to the source leg: QEMU's return path.
    ToSource,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::ToDestination => "source→destination",
            Direction::ToSource => "destination→source",
        })
    }
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Connect,
    Read,
    Write,
    /// Setting up the zero-copy path itself (not a read or write on a leg).
    Splice,
    Shutdown,
}

impl Op {
    pub(super) fn phrase(self) -> &'static str {
        match self {
            Op::Connect => "connect to",
            Op::Read => "read from",
            Op::Write => "write to",
            Op::Splice => "splice for",
            Op::Shutdown => "shutdown of",
        }
    }
}

/// Sees every byte of one direction as it passes, in order (a protocol observer). A tapped
/// direction is copied rather than spliced: taps are for small flows such as QEMU's return
/// path.
pub type Tap = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Tuning of a relay.
#[derive(Debug, Clone)]
pub struct Options {
    /// Use splice(2) when both legs are plain sockets. Off forces the copying path.
    pub zero_copy: bool,
    /// Size of the copy buffer per direction, at least [`MIN_COPY_BUFFER`].
    pub copy_buffer: usize,
    /// Observer of the destination→source direction.
    pub tap_to_source: Option<TapFn>,
}

/// A [`Tap`] with a Debug form, so that options stay printable.
#[derive(Clone)]
pub struct TapFn(pub Tap);

impl fmt::Debug for TapFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tap")
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            zero_copy: true,
            // Large reads and writes matter for TLS: 1 MiB carried 1.28× what 256 KiB did.
            copy_buffer: 1 << 20,
            tap_to_source: None,
        }
    }
}

/// A failed step inside one direction, before it is given its leg's name.
#[derive(Debug)]
pub(super) struct PumpError {
    pub(super) op: Op,
    pub(super) error: io::Error,
    /// Bytes read from the source of the direction and not delivered when it failed.
    pub(super) held: u64,
}

impl PumpError {
    pub(super) fn read(error: io::Error) -> PumpError {
        PumpError {
            op: Op::Read,
            error,
            held: 0,
        }
    }
    pub(super) fn write(error: io::Error) -> PumpError {
        PumpError {
            op: Op::Write,
            error,
            held: 0,
        }
    }
    pub(super) fn holding(mut self, held: usize) -> PumpError {
        self.held = held as u64;
        self
    }
}
