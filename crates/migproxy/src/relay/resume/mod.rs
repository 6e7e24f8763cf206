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
//! - **Copies** ([`ends`]). In the clear, where both the peer connection and the local end
//!   are plain sockets, no byte of the migration stream enters user space: up, it is kept in
//!   pipes (spliced in, tee(2)'d, spliced out: `pipes`); down, it is spliced peer → pipe →
//!   local end. Over TLS up keeps its bytes in the same pipes and reads them through a
//!   small buffer to seal them; down is copied. A tapped direction (the return path) is
//!   copied, and keeps its bytes in the retention's memory.
//! - **Observed as a relay is** ([`Observe`]): the same [`Counters`] (a replayed byte counts
//!   once), a tap that sees the return path's bytes once and in order, and each outage as it
//!   starts and ends ([`Outage`]).

mod down;
mod ends;
mod pipes;
mod retention;
mod types;
mod up;

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use migproxy_proto::{PROGRESS_LEN, Progress};

use self::down::{Down, Hello};
pub use self::retention::{Retention, RetentionError};
use self::types::Cut;
pub use self::types::{Hurry, Keeping, Observe, Options, Outage, Report, ResumeError};
use self::up::{Kept, Up};
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

/// Carries one channel between `local` and the peer until both directions have ended and
/// the peer has acknowledged every byte, resuming on a new connection after each break.
pub async fn carry<L: PeerLink>(
    local: Stream,
    link: L,
    sides: Sides,
    options: Options,
    cancel: CancellationToken,
) -> Result<Report, ResumeError> {
    let (local_r, local_w) = ends::halves(local);
    let mut channel = Channel {
        link,
        up: Up {
            local: local_r,
            kept: Kept::Memory(Retention::new(options.retention)),
            chosen: false,
            ended: false,
            chunk: options.chunk.max(1),
            observe: options.observe.clone(),
            hurry: sides.hurry.clone(),
            piece: Vec::new(),
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
        result = channel.run() => result.map(|()| Report {
            kept_in: channel.up.kept.keeping(),
            ..channel.report
        }),
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

impl<L: PeerLink> Channel<L> {
    async fn run(&mut self) -> Result<(), ResumeError> {
        let mut sessions = 0u32;
        let mut cause: Option<io::Error> = None;
        loop {
            let broke = Instant::now();
            let settled = self.settled_without_connection();
            let (connection, peer, attempts) = tokio::select! {
                again = self.reconnect(cause.take()) => match again {
                    Err(ResumeError::Refused(error)) => return self.refused(error).await,
                    again => again?,
                },
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

    /// The peer refused a new connection: it holds nothing to resume. The channel may have
    /// ended there with all done, its last progress still on its way on the control link,
    /// which races the data connection's close (seen in CI: a multifd channel failed after
    /// QEMU completed on both hosts). That progress, within the end grace, settles it;
    /// otherwise the refusal stands.
    async fn refused(&mut self, error: io::Error) -> Result<(), ResumeError> {
        let settled = self.settled_without_connection();
        match tokio::time::timeout(self.options.end_grace, settled).await {
            Ok(()) => self.end_without_connection().await,
            Err(_) => Err(ResumeError::Refused(error)),
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
        let (peer_r, peer_w) = ends::halves(connection);
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

#[cfg(test)]
mod tests;
