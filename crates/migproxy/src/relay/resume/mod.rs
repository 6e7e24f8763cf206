//! Resumable channels: one migration channel carried across peer connections that break,
//! with not a byte lost, duplicated or reordered, and its local end (QEMU) never noticing.
//!
//! This is the engine of issue #18; the daemon carries a migration's channels with it when
//! both daemons agreed on resumable channels (`daemon::channel::resumable`).
//!
//! ```text
//!  local end ◄──► carry ══ connection 1 ══╳ broken (RST, timeout, a dead middlebox)
//!  (QEMU)          │
//!                  ├─ link.connect() again, with backoff, within the resume timeout
//!                  ├─ hello ──►  {delivered: bytes of the peer's direction written to QEMU,
//!                  │  ◄── hello            end: this direction's length, once QEMU ended it}
//!                  ├─ replay: what it kept from the peer's `delivered` on (Retention)
//!                  └─ then on as before, on connection 2
//! ```
//!
//! - **Retention.** Every byte read from the local end is kept until the peer says it has
//!   written it to its own local end, at most [`Options::retention`]: past that the local
//!   end is not read (QEMU blocks, as on a full socket), so memory is bounded by it.
//! - **Progress.** Each side publishes its [`Progress`] (bytes delivered, and its own
//!   direction's end) through [`Sides`]: the daemon carries it on the control link; it also
//!   travels in each hello (its wire form is in `migproxy_proto`). A peer's end of stream
//!   counts only at the announced length: a peer daemon killed closes its sockets with a
//!   FIN too.
//! - **Failures.** Only a peer connection's failure resumes, or the daemon's word that one
//!   is dead ([`Sides::breaks`]: silent, or replaced). A local failure, a peer offset that
//!   cannot be true, a cancel, or no new connection within the resume timeout end the
//!   channel, named as such ([`ResumeError`]).
//! - **Observed as a relay is** ([`Observe`]): the same [`Counters`] (a replayed byte counts
//!   once), a tap that sees the return path's bytes once and in order, and each outage as it
//!   starts and ends ([`Outage`]).

mod retention;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use migproxy_proto::{PROGRESS_LEN, Progress};

pub use self::retention::{Retention, RetentionError};
use super::{Counters, Direction, TapFn};
use crate::human::Elapsed;
use crate::transport::Stream;

/// A source of fresh connections to the peer for one channel: the dialling side dials (and
/// re-admits the channel), the other accepts the peer's next connection. An error of kind
/// `PermissionDenied` is the peer's refusal: the channel ends, it is not tried again.
pub trait PeerLink: Send {
    fn connect(&mut self) -> impl Future<Output = io::Result<Stream>> + Send;

    /// The number the link gives the connection it handed out last, if it counts them (both
    /// sides' counts agree: see the daemon's `Control::Broken`).
    fn connection(&self) -> u32 {
        0
    }
}

/// Progress between connections: this side's, published; the peer's, as it arrives.
#[derive(Debug)]
pub struct Sides {
    pub mine: watch::Sender<Progress>,
    pub peer: watch::Receiver<Progress>,
    /// Bumped by the daemon when it finds the current connection dead although it has not
    /// failed: silent past the dead-peer budget (a blackholed link fails no write for
    /// minutes), replaced by the peer's new connection for this channel, or reported broken
    /// by the peer on the control link. That last one matters: once this side has read the
    /// peer's end, a reset can no longer be seen by reading, and a side waiting only for
    /// acknowledgements would wait for a peer that waits for a new connection. The session
    /// on it ends and the channel resumes on a new one.
    pub breaks: watch::Receiver<u64>,
    /// Asks the peer for its progress at once: called when this side's retention is full
    /// and the peer's last acknowledgement is late, so that the wait is a round trip rather
    /// than the rest of the peer's period.
    pub hurry: Option<Hurry>,
}

/// What asks the peer for its progress at once (the daemon's `Hurry` frame).
#[derive(Clone)]
pub struct Hurry(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hurry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hurry")
    }
}

impl Sides {
    /// Two sides wired straight to each other, sharing one break signal: what the control
    /// link does between two daemons, for two engines in one process.
    pub fn wired(breaks: watch::Receiver<u64>) -> (Sides, Sides) {
        let (a, a_seen) = watch::channel(Progress::default());
        let (b, b_seen) = watch::channel(Progress::default());
        // Wired, progress arrives as it is made: nothing to hurry.
        let a = Sides {
            mine: a,
            peer: b_seen,
            breaks: breaks.clone(),
            hurry: None,
        };
        let b = Sides {
            mine: b,
            peer: a_seen,
            breaks,
            hurry: None,
        };
        (a, b)
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
    fn down(&self) -> Direction {
        match self.up {
            Direction::ToDestination => Direction::ToSource,
            Direction::ToSource => Direction::ToDestination,
        }
    }

    /// Counts `bytes` moved `direction` (and shows them to the tap, if it watches it).
    fn moved(&self, direction: Direction, bytes: &[u8]) {
        self.counters.record(direction, bytes.len(), false);
        if let (Direction::ToSource, Some(tap)) = (direction, &self.tap_to_source) {
            (tap.0)(bytes);
        }
    }

    fn tell(&self, outage: Outage) {
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
enum Cut {
    /// The connection failed: resume on another.
    Broken(io::Error),
    /// The channel cannot go on.
    Fatal(ResumeError),
}

impl From<RetentionError> for Cut {
    fn from(error: RetentionError) -> Cut {
        Cut::Fatal(error.into())
    }
}

fn local(op: &'static str) -> impl FnOnce(io::Error) -> Cut {
    move |error| Cut::Fatal(ResumeError::Local { op, error })
}

/// Carries one channel between `local` and the peer until both directions have ended and
/// the peer has acknowledged every byte, resuming on a new connection after each break.
pub async fn carry<L: PeerLink>(
    local: Stream,
    link: L,
    sides: Sides,
    options: Options,
    cancel: CancellationToken,
) -> Result<Report, ResumeError> {
    let (local_r, local_w) = tokio::io::split(local);
    let mut channel = Channel {
        link,
        up: Up {
            local: local_r,
            kept: Retention::new(options.retention),
            ended: false,
            chunk: options.chunk.max(1),
            observe: options.observe.clone(),
            hurry: sides.hurry.clone(),
        },
        down: Down {
            local: local_w,
            ended: false,
            buf: vec![0; options.chunk.max(1)],
            observe: options.observe.clone(),
        },
        sides,
        options,
        report: Report::default(),
        connected: false,
    };
    tokio::select! {
        result = channel.run() => result.map(|()| channel.report),
        () = cancel.cancelled() => Err(ResumeError::Cancelled),
    }
}

struct Channel<L> {
    link: L,
    up: Up,
    down: Down,
    sides: Sides,
    options: Options,
    report: Report,
    /// A first connection's hellos were exchanged.
    connected: bool,
}

/// Local end to peer.
struct Up {
    local: ReadHalf<Stream>,
    kept: Retention,
    ended: bool,
    /// The most read from the local end at once.
    chunk: usize,
    observe: Observe,
    hurry: Option<Hurry>,
}

/// Peer to local end.
struct Down {
    local: WriteHalf<Stream>,
    /// The peer's direction reached its end and the local end was told (a FIN).
    ended: bool,
    buf: Vec<u8>,
    observe: Observe,
}

impl<L: PeerLink> Channel<L> {
    async fn run(&mut self) -> Result<(), ResumeError> {
        let mut sessions = 0u32;
        let mut cause: Option<io::Error> = None;
        loop {
            let broke = Instant::now();
            let settled = self.settled_without_connection();
            let (connection, peer, attempts) = tokio::select! {
                again = self.reconnect(cause.take()) => again?,
                () = settled => return self.end_without_connection().await,
            };
            sessions += 1;
            self.report.resumptions = sessions - 1;
            let replay = peer.map_or(0, |peer| self.up.kept.sent() - peer.delivered);
            if sessions > 1 {
                self.report.replayed += replay;
                tracing::info!(replay, attempts, "resumed on a new connection");
                let resumed = Outage::Resumed {
                    lost: broke.elapsed(),
                    replayed: replay,
                    attempts,
                };
                self.options.observe.tell(resumed);
            }
            let ended = self.session(connection, peer).await;
            self.report.sent = self.up.kept.sent();
            self.report.delivered = self.mine().delivered;
            match ended {
                Ok(()) => return Ok(()),
                Err(Cut::Fatal(error)) => return Err(error),
                // Broken once all was done (both ends, every byte acknowledged): the end.
                Err(Cut::Broken(_)) if self.done() => return Ok(()),
                Err(Cut::Broken(error)) => {
                    tracing::info!(%error, "the peer connection broke: resuming");
                    let signalled = error.get_ref().is_some_and(|e| e.is::<Signalled>());
                    let interrupted = Outage::Interrupted {
                        cause: error.to_string(),
                        signalled,
                        connection: self.link.connection(),
                    };
                    self.options.observe.tell(interrupted);
                    cause = Some(error);
                }
            }
        }
    }

    /// A new connection, its hellos exchanged, within the resume timeout (after `cause`),
    /// and the tries it took.
    async fn reconnect(
        &mut self,
        cause: Option<io::Error>,
    ) -> Result<(Stream, Option<Progress>, u32), ResumeError> {
        let start = Instant::now();
        let mut attempts = 0;
        let mut pause = Duration::ZERO;
        let mut last = None;
        loop {
            let left = self.options.resume_timeout.saturating_sub(start.elapsed());
            let tried_at = Instant::now();
            let tried = tokio::time::timeout(left, self.connect_once()).await;
            attempts += 1;
            last = Some(match tried {
                Ok(Ok((connection, peer))) => return Ok((connection, peer, attempts)),
                Ok(Err(Cut::Fatal(error))) => return Err(error),
                // The peer said no: it holds nothing to resume (restarted, or the channel
                // ended there), and asking again will not change that.
                Ok(Err(Cut::Broken(error))) if error.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(ResumeError::Refused(error));
                }
                Ok(Err(Cut::Broken(error))) => error,
                // Cut by the deadline: the try before it said more.
                Err(_) => last.unwrap_or_else(|| io::ErrorKind::TimedOut.into()),
            });
            let left = self.options.resume_timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let waited = start.elapsed();
                return Err(ResumeError::Timeout {
                    cause,
                    waited,
                    attempts,
                    last: last.unwrap_or_else(|| io::ErrorKind::TimedOut.into()),
                });
            }
            // The last try at the deadline itself. The pause counts from the try's start: one
            // that waited (its connect timed out, the network down) has waited enough.
            tokio::time::sleep(pause.saturating_sub(tried_at.elapsed()).min(left)).await;
            pause = (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
        }
    }

    /// One connection and its hellos: this side's progress out, the peer's in. On the first
    /// connection the peer's is read with its bytes (`None`): nothing was sent before, so
    /// there is nothing to replay and no reason to wait for it (the peer answers once it has
    /// its local end, which for the destination means QEMU connected, in channel order).
    async fn connect_once(&mut self) -> Result<(Stream, Option<Progress>), Cut> {
        let mut connection = self.link.connect().await.map_err(Cut::Broken)?;
        let mine = self.mine().encode();
        if !self.connected {
            let hello = async {
                connection.write_all(&mine).await?;
                connection.flush().await
            };
            let sent = tokio::time::timeout(self.options.hello_timeout, hello).await;
            sent.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
                .map_err(Cut::Broken)?;
            return Ok((connection, None));
        }
        let hello = async {
            connection.write_all(&mine).await?;
            connection.flush().await?;
            let mut wire = [0; PROGRESS_LEN];
            connection.read_exact(&mut wire).await?;
            Ok::<_, io::Error>(Progress::decode(wire))
        };
        let peer = tokio::time::timeout(self.options.hello_timeout, hello)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            .map_err(Cut::Broken)?;
        self.up.kept.ack(peer.delivered)?;
        let delivered = self.mine().delivered;
        if let Some(end) = peer.end.filter(|end| *end < delivered) {
            return Err(Cut::Fatal(ResumeError::BeyondEnd { end, delivered }));
        }
        Ok((connection, Some(peer)))
    }

    /// Resolves once what is left needs no connection: this direction ended and the peer
    /// has acknowledged all of it, and the peer's end (told on the control link, perhaps by
    /// a link that took over) is what was delivered here. The source, done, dials no more:
    /// without this a destination whose peer's end went down with a broken control link
    /// would wait for a connection until its resume timeout.
    fn settled_without_connection(&self) -> impl Future<Output = ()> + use<L> {
        let (ended, sent) = (self.up.ended, self.up.kept.sent());
        let delivered = self.mine().delivered;
        let mut peer = self.sides.peer.clone();
        async move {
            if !ended {
                return std::future::pending().await;
            }
            let told = |p: &Progress| p.delivered >= sent && p.end == Some(delivered);
            if peer.wait_for(told).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The end of [`settled_without_connection`](Self::settled_without_connection): the
    /// local end is told the peer's direction ended (if it was not), and all is acknowledged.
    async fn end_without_connection(&mut self) -> Result<(), ResumeError> {
        self.up.kept.ack(self.sides.peer.borrow().delivered)?;
        if !self.down.ended {
            let down = &mut self.down;
            down.observe.counters.mark_end(down.observe.down());
            let shut = down.local.shutdown().await;
            shut.map_err(|error| ResumeError::Local {
                op: "shutdown",
                error,
            })?;
            down.ended = true;
        }
        tracing::info!("both directions done, with no connection: the channel ends");
        Ok(())
    }

    /// Both directions ended, and the peer has acknowledged every byte of this one.
    fn done(&self) -> bool {
        self.down.ended && self.up.ended && self.up.kept.kept() == 0
    }

    fn mine(&self) -> Progress {
        *self.sides.mine.borrow()
    }

    /// Both directions on one connection, until both are done or the connection breaks.
    async fn session(&mut self, connection: Stream, peer: Option<Progress>) -> Result<(), Cut> {
        // Every later connection needs both hellos before a byte moves: bytes may have been
        // delivered on this one.
        self.connected = true;
        let (peer_r, peer_w) = tokio::io::split(connection);
        let mut peer_seen = self.sides.peer.clone();
        let from = peer.map_or(0, |peer| peer.delivered);
        let up = self.up.run(peer_w, from, &mut peer_seen, &self.sides.mine);
        let mut peer_end = self.sides.peer.clone();
        let down = self.down.run(
            peer_r,
            peer.map_or(Hello::Unread, Hello::Read),
            &mut peer_end,
            &self.sides.mine,
            &self.options,
        );
        let mut breaks = self.sides.breaks.clone();
        breaks.mark_unchanged();
        tokio::select! {
            both = async { tokio::try_join!(up, down) } => both.map(|_| ()),
            () = wait_break(&mut breaks) => Err(Cut::Broken(io::Error::new(
                io::ErrorKind::TimedOut,
                Signalled,
            ))),
        }
    }
}

/// How late an acknowledgement may be before a full retention hurries the peer: a little
/// more than the daemon's busy period (2 ms), so that acknowledgements coming at that pace
/// are waited for, and a peer whose period went idle (20 ms) is asked at once. Hurrying at
/// every full retention instead made the acknowledgements a ping-pong, one per round trip,
/// each freeing a little: more frames and smaller writes.
const HURRY_AFTER: Duration = Duration::from_millis(3);

/// The retention is full: waits for the next acknowledgement, hurrying the peer once if it
/// is late ([`HURRY_AFTER`] since the last one that freed room, `acked_at`).
async fn wait_ack(hurry: Option<&Hurry>, acks: &mut watch::Receiver<Progress>, acked_at: Instant) {
    let Some(Hurry(hurry)) = hurry else {
        return wait_change(acks).await;
    };
    let due = HURRY_AFTER.saturating_sub(acked_at.elapsed());
    if tokio::time::timeout(due, wait_change(acks)).await.is_ok() {
        return;
    }
    hurry();
    wait_change(acks).await;
}

impl Up {
    /// Sends again from `from`, then reads the local end while there is room, until it ends
    /// and the peer has acknowledged all of it.
    async fn run(
        &mut self,
        mut peer: WriteHalf<Stream>,
        from: u64,
        acks: &mut watch::Receiver<Progress>,
        mine: &watch::Sender<Progress>,
    ) -> Result<(), Cut> {
        let (a, b) = self.kept.replay(from)?;
        peer.write_all(a).await.map_err(Cut::Broken)?;
        peer.write_all(b).await.map_err(Cut::Broken)?;
        peer.flush().await.map_err(Cut::Broken)?;
        let mut acked_at = Instant::now();
        while !self.ended {
            let before = self.kept.acked();
            self.kept.ack(acks.borrow_and_update().delivered)?;
            if self.kept.acked() > before {
                acked_at = Instant::now();
            }
            if self.kept.room() == 0 {
                // Held as a relay holds what its receiver does not take: the stall watch
                // blames the link (the peer does not acknowledge), not the local end.
                let held = self.kept.kept();
                self.observe.counters.hold(self.observe.up, held);
                wait_ack(self.hurry.as_ref(), acks, acked_at).await;
                self.observe.counters.hold(self.observe.up, 0);
                continue;
            }
            // Read straight into the retention: what is kept costs no copy.
            let spare = self.kept.spare();
            let room = spare.len().min(self.chunk);
            let n = self.local.read(&mut spare[..room]).await;
            let n = n.map_err(local("read"))?;
            if n == 0 {
                self.ended = true;
                self.observe.counters.mark_end(self.observe.up);
                let end = Some(self.kept.sent());
                mine.send_modify(|mine| mine.end = end);
                break;
            }
            self.kept.commit(n);
            let read = self.kept.recent(n);
            // Counted once, as a relay counts: sent on (a replay does not count again).
            self.observe.moved(self.observe.up, read);
            // Held while the peer does not take it, as a relay's pump holds it.
            self.observe.counters.hold(self.observe.up, n);
            peer.write_all(read).await.map_err(Cut::Broken)?;
            peer.flush().await.map_err(Cut::Broken)?;
            self.observe.counters.hold(self.observe.up, 0);
        }
        peer.shutdown().await.map_err(Cut::Broken)?;
        loop {
            self.kept.ack(acks.borrow_and_update().delivered)?;
            if self.kept.kept() == 0 {
                return Ok(());
            }
            wait_change(acks).await;
        }
    }
}

impl Down {
    /// Writes what the peer sends to the local end, counting each write as it completes (a
    /// write cut short by a break counts only what it wrote: the peer sends the rest again).
    async fn run(
        &mut self,
        mut peer: ReadHalf<Stream>,
        hello: Hello,
        announced: &mut watch::Receiver<Progress>,
        mine: &watch::Sender<Progress>,
        options: &Options,
    ) -> Result<(), Cut> {
        let mut end = match hello {
            Hello::Read(hello) => hello.end,
            Hello::Unread => first_hello(&mut peer).await?.end,
        };
        let delivered = || mine.borrow().delivered;
        loop {
            let n = peer.read(&mut self.buf).await.map_err(Cut::Broken)?;
            if n == 0 {
                return self.finish(&mut end, announced, delivered(), options).await;
            }
            // Nothing past the announced end reaches the local end.
            let beyond = delivered() + n as u64;
            if let Some(end) = end.or(announced.borrow().end).filter(|end| beyond > *end) {
                let error = ResumeError::BeyondEnd {
                    end,
                    delivered: beyond,
                };
                return Err(Cut::Fatal(error));
            }
            // Held until the local end takes it: a local end that stops reading is seen.
            self.observe.counters.hold(self.observe.down(), n);
            let mut written = 0;
            while written < n {
                let w = self.local.write(&self.buf[written..n]).await;
                let w = w.map_err(local("write"))?;
                if w == 0 {
                    return Err(local("write")(io::ErrorKind::WriteZero.into()));
                }
                self.observe
                    .moved(self.observe.down(), &self.buf[written..written + w]);
                written += w;
                mine.send_modify(|mine| mine.delivered += w as u64);
            }
        }
    }

    /// The peer's end of stream: the end, once it is the announced length (shuts the local
    /// end's write side down); a broken connection otherwise.
    async fn finish(
        &mut self,
        end: &mut Option<u64>,
        announced: &mut watch::Receiver<Progress>,
        delivered: u64,
        options: &Options,
    ) -> Result<(), Cut> {
        let known = end.is_some();
        let wait = async {
            let told = announced.wait_for(|peer| known || peer.end.is_some()).await;
            told.map(|peer| peer.end).ok().flatten()
        };
        if let Ok(told) = tokio::time::timeout(options.end_grace, wait).await {
            *end = end.or(told);
        }
        match *end {
            Some(end) if end == delivered => {
                if !self.ended {
                    self.observe.counters.mark_end(self.observe.down());
                    self.local.shutdown().await.map_err(local("shutdown"))?;
                    self.ended = true;
                }
                Ok(())
            }
            Some(end) if end < delivered => {
                Err(Cut::Fatal(ResumeError::BeyondEnd { end, delivered }))
            }
            _ => Err(Cut::Broken(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the peer closed the connection after {delivered} bytes, short of its end"),
            ))),
        }
    }
}

/// The peer's hello on a session's connection.
enum Hello {
    /// Read before the session began.
    Read(Progress),
    /// The first connection's: it comes first among the peer's bytes.
    Unread,
}

/// Reads the peer's hello at the head of the first connection: it can only say that
/// nothing was delivered (nothing was sent before).
async fn first_hello(peer: &mut ReadHalf<Stream>) -> Result<Progress, Cut> {
    let mut wire = [0; PROGRESS_LEN];
    peer.read_exact(&mut wire).await.map_err(Cut::Broken)?;
    let hello = Progress::decode(wire);
    if hello.delivered != 0 {
        let claimed = hello.delivered;
        return Err(RetentionError::BeyondSent { claimed, sent: 0 }.into());
    }
    Ok(hello)
}

/// A session cut on the daemon's word.
#[derive(Debug)]
struct Signalled;

impl std::fmt::Display for Signalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection went dead (the daemon's word: silent, replaced, or broken on the peer's side)")
    }
}

impl std::error::Error for Signalled {}

/// The next break the daemon calls; never, once nobody can call one.
async fn wait_break(breaks: &mut watch::Receiver<u64>) {
    if breaks.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The next change of the peer's progress; never, once nobody can publish it.
async fn wait_change(acks: &mut watch::Receiver<Progress>) {
    if acks.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests;
