//! The relay engine: moves one migration channel between two connected streams.
//!
//! ```text
//!   source leg                      migproxy                      destination leg
//!  (e.g. QEMU's        ┌───────────────────────────────────┐     (e.g. the peer or
//!   migrate socket)    │ to_destination: splice ─► pipe ─► │      destination QEMU)
//!        ──────────────┤                                   ├──────────────
//!                      │ ◄─ pipe ◄─ splice :to_source      │
//!                      └───────────────────────────────────┘
//! ```
//!
//! Guarantees:
//! - **Exact.** Every byte read from one leg is written to the other, in order; counters
//!   count bytes *delivered*. End of stream in one direction becomes `shutdown(SHUT_WR)` on
//!   the other leg while the opposite direction keeps flowing, because QEMU's return path and
//!   postcopy need full duplex until both sides are done. A normal end is a FIN, never a reset.
//! - **Zero-copy where it can be.** When both legs are plain sockets, each direction moves
//!   data with splice(2) through its own pipe, grown to `/proc/sys/fs/pipe-max-size`, driven
//!   by tokio readiness: no thread ever blocks in a syscall. Otherwise (TLS, or splice
//!   refused with `EINVAL`), the same loop copies through a buffer of 1 MiB (at least 256 KiB).
//! - **Never corked.** No `SPLICE_F_MORE` and `TCP_NODELAY` on TCP legs: a 20-byte postcopy
//!   page request goes out at once.
//! - **Attributable.** A failure names the leg, the direction, the operation, the errno and
//!   the bytes moved each way ([`Failure`]).
//! - **Cancellable at any instant**, through a [`CancellationToken`], even when a peer has
//!   stopped reading and every buffer is full: both legs are aborted (a reset on TCP), so a
//!   QEMU blocked in `write` fails at once.
//!
//! On failure the other leg is aborted too: a peer must never mistake a broken relay for the
//! clean end of a stream.

mod counters;
mod fd;
mod pump;
pub mod resume;
mod stream;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

pub use self::counters::{ByteCounts, Counters, DirectionCounters};
use self::pump::PumpError;
pub use self::pump::{Direction, MIN_COPY_BUFFER, Op, Options, Tap, TapFn};
use crate::human::{Bytes, Elapsed, OsError, Rate};
use crate::transport::Stream;

/// A named end of a relay: the stream and how to call it in reports (its endpoint).
#[derive(Debug)]
pub struct Leg {
    pub name: String,
    pub stream: Stream,
}

impl Leg {
    pub fn new(name: impl Into<String>, stream: Stream) -> Leg {
        Leg {
            name: name.into(),
            stream,
        }
    }
}

/// What went wrong, where, and how far the relay had got.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The leg the failed operation was on (its endpoint).
    pub leg: String,
    /// The direction that failed; `None` for failures before any direction ran (connect).
    pub direction: Option<Direction>,
    pub op: Op,
    pub error: Arc<io::Error>,
    /// Bytes delivered each way.
    pub bytes: ByteCounts,
    /// Bytes of the failed direction read from its source leg and never delivered (in the
    /// pipe or the copy buffer when the write failed). A TLS leg's own send buffer is not
    /// seen: bytes it accepted count as delivered.
    pub undelivered: u64,
    pub elapsed: Duration,
}

impl Failure {
    /// A failure to connect a leg, before any byte moved.
    pub fn connect(leg: impl Into<String>, error: io::Error, elapsed: Duration) -> Failure {
        Failure {
            leg: leg.into(),
            direction: None,
            op: Op::Connect,
            error: Arc::new(error),
            bytes: ByteCounts::default(),
            undelivered: 0,
            elapsed,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} failed ", self.op.phrase(), self.leg)?;
        if self.bytes.total() == 0 {
            write!(f, "before any byte moved")?;
        } else {
            write!(
                f,
                "after {} source→destination and {} destination→source",
                Bytes(self.bytes.to_destination),
                Bytes(self.bytes.to_source)
            )?;
        }
        if self.undelivered > 0 {
            write!(f, ", {} read but not delivered", Bytes(self.undelivered))?;
        }
        write!(f, " ({}): {}", Elapsed(self.elapsed), OsError(&self.error))
    }
}

impl std::error::Error for Failure {}

/// How a relay ended.
#[derive(Debug, Clone)]
pub enum End {
    /// Both directions reached end of stream and were closed cleanly.
    Completed,
    /// Ended by its cancel token.
    Cancelled,
    Failed(Failure),
}

/// The outcome of a relay, with its counters at the end.
#[derive(Debug, Clone)]
pub struct Report {
    pub source: String,
    pub destination: String,
    pub end: End,
    pub bytes: ByteCounts,
    /// Of `bytes`, those moved by splice(2).
    pub spliced: ByteCounts,
    pub elapsed: Duration,
    /// The direction whose sender ended its stream first (who closed first), if any did.
    pub first_end: Option<Direction>,
}

impl Report {
    pub fn is_completed(&self) -> bool {
        matches!(self.end, End::Completed)
    }

    /// How the bytes moved: `zero-copy`, `copied` or `partly zero-copy`.
    pub fn data_path(&self) -> &'static str {
        match (self.spliced.total(), self.bytes.total()) {
            (0, _) => "copied",
            (s, t) if s == t => "zero-copy",
            _ => "partly zero-copy",
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.end {
            End::Completed => write!(
                f,
                "completed: {} source→destination, {} destination→source in {} ({}, {})",
                Bytes(self.bytes.to_destination),
                Bytes(self.bytes.to_source),
                Elapsed(self.elapsed),
                Rate {
                    bytes: self.bytes.to_destination,
                    over: self.elapsed
                },
                self.data_path(),
            ),
            End::Cancelled => write!(
                f,
                "cancelled after {} source→destination and {} destination→source ({})",
                Bytes(self.bytes.to_destination),
                Bytes(self.bytes.to_source),
                Elapsed(self.elapsed)
            ),
            End::Failed(failure) => write!(f, "failed: {failure}"),
        }
    }
}

/// Why both directions stopped early.
enum Stop {
    Cancelled,
    Failed(Direction, PumpError),
}

/// One relay between a source and a destination leg. Create it, take its
/// [`counters`](Relay::counters) and [`cancel token`](Relay::cancel_token), then
/// [`run`](Relay::run) it to the end.
#[derive(Debug)]
pub struct Relay {
    source: Leg,
    destination: Leg,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    options: Options,
}

impl Relay {
    pub fn new(source: Leg, destination: Leg) -> Relay {
        Relay {
            source,
            destination,
            counters: Arc::new(Counters::new()),
            cancel: CancellationToken::new(),
            options: Options::default(),
        }
    }

    pub fn with_options(mut self, options: Options) -> Relay {
        self.options = options;
        self.options.copy_buffer = self.options.copy_buffer.max(MIN_COPY_BUFFER);
        self
    }

    /// Ends the relay when `token` (or any parent of it) is cancelled.
    pub fn with_cancel(mut self, token: CancellationToken) -> Relay {
        self.cancel = token;
        self
    }

    /// Live counters, readable from any task while the relay runs.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Cancelling this token ends the relay at once.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Moves bytes both ways until both directions have ended, one fails, or the relay is
    /// cancelled.
    pub async fn run(self) -> Report {
        let Relay {
            mut source,
            mut destination,
            counters,
            cancel,
            options,
        } = self;
        let result =
            if let (Some(src), Some(dst)) = (source.stream.socket(), destination.stream.socket()) {
                let tap = options.tap_to_source.clone();
                let forward = fd::pump(
                    src,
                    dst,
                    Direction::ToDestination,
                    &counters,
                    &options,
                    None,
                );
                let backward = fd::pump(dst, src, Direction::ToSource, &counters, &options, tap);
                both(&cancel, forward, backward).await
            } else {
                run_streams(
                    &mut source.stream,
                    &mut destination.stream,
                    &counters,
                    &cancel,
                    &options,
                )
                .await
            };
        let end = match result {
            Ok(()) => End::Completed,
            Err(stop) => {
                let end = end_of(stop, &source.name, &destination.name, &counters);
                // Leave no peer thinking the stream ended normally.
                source.stream.abort();
                destination.stream.abort();
                end
            }
        };
        report(source.name, destination.name, end, &counters)
    }
}

fn report(source: String, destination: String, end: End, counters: &Counters) -> Report {
    Report {
        source,
        destination,
        end,
        bytes: counters.bytes(),
        spliced: counters.spliced(),
        elapsed: counters.elapsed(),
        first_end: counters.first_end(),
    }
}

fn end_of(stop: Stop, source: &str, destination: &str, counters: &Counters) -> End {
    match stop {
        Stop::Cancelled => End::Cancelled,
        Stop::Failed(direction, PumpError { op, error, held }) => {
            // A read fails on the leg the direction comes from, anything else on the leg it
            // goes to.
            let (from, to) = match direction {
                Direction::ToDestination => (source, destination),
                Direction::ToSource => (destination, source),
            };
            let leg = if op == Op::Read { from } else { to };
            End::Failed(Failure {
                leg: leg.to_owned(),
                direction: Some(direction),
                op,
                error: Arc::new(error),
                bytes: counters.bytes(),
                undelivered: held,
                elapsed: counters.elapsed(),
            })
        }
    }
}

async fn run_streams(
    source: &mut Stream,
    destination: &mut Stream,
    counters: &Counters,
    cancel: &CancellationToken,
    options: &Options,
) -> Result<(), Stop> {
    let (src_read, src_write) = tokio::io::split(source);
    let (dst_read, dst_write) = tokio::io::split(destination);
    let forward = stream::pump(
        src_read,
        dst_write,
        Direction::ToDestination,
        counters,
        options,
        None,
    );
    let tap = options.tap_to_source.clone();
    let backward = stream::pump(
        dst_read,
        src_write,
        Direction::ToSource,
        counters,
        options,
        tap,
    );
    both(cancel, forward, backward).await
}

/// Runs both directions to their end; the first failure or the cancel token stops both.
async fn both(
    cancel: &CancellationToken,
    forward: impl Future<Output = Result<(), PumpError>>,
    backward: impl Future<Output = Result<(), PumpError>>,
) -> Result<(), Stop> {
    let forward = async {
        forward
            .await
            .map_err(|e| Stop::Failed(Direction::ToDestination, e))
    };
    let backward = async {
        backward
            .await
            .map_err(|e| Stop::Failed(Direction::ToSource, e))
    };
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(Stop::Cancelled),
        result = async { tokio::try_join!(forward, backward) } => result.map(|_| ()),
    }
}
