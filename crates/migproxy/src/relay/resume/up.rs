//! Local end to peer: every byte read is kept until the peer acknowledges it, and sent on;
//! sent again from the peer's offset on a new connection. Between plain sockets (in the
//! clear, no tap) the bytes are kept in pipes and never enter user space ([`Pipes`]);
//! otherwise they are read into the retention's memory and written from it ([`Retention`]).

use std::io;
use std::time::{Duration, Instant};

use migproxy_proto::Progress;
use tokio::sync::watch;

use super::ends::{PourError, Reader, Writer};
use super::pipes::Pipes;
use super::retention::{Retention, RetentionError};
use super::types::{Cut, Hurry, Keeping, Observe, ResumeError, local, retention_failed};

/// Where a direction keeps what the peer has not acknowledged.
pub(super) enum Kept {
    Memory(Retention),
    Pipes(Box<Pipes>),
}

impl Kept {
    pub(super) fn sent(&self) -> u64 {
        match self {
            Kept::Memory(kept) => kept.sent(),
            Kept::Pipes(kept) => kept.sent(),
        }
    }

    pub(super) fn acked(&self) -> u64 {
        match self {
            Kept::Memory(kept) => kept.acked(),
            Kept::Pipes(kept) => kept.acked(),
        }
    }

    pub(super) fn kept(&self) -> usize {
        match self {
            Kept::Memory(kept) => kept.kept(),
            Kept::Pipes(kept) => kept.kept(),
        }
    }

    pub(super) fn keeping(&self) -> Keeping {
        match self {
            Kept::Memory(_) => Keeping::Memory,
            Kept::Pipes(_) => Keeping::Pipes,
        }
    }

    /// The memory retention; a defect (never a silent end) if the bytes are in pipes.
    fn memory(&mut self) -> Result<&mut Retention, Cut> {
        match self {
            Kept::Memory(kept) => Ok(kept),
            Kept::Pipes(_) => Err(elsewhere("memory")),
        }
    }

    /// The pipes; a defect (never a silent end) if the bytes are in memory.
    fn pipes(&mut self) -> Result<&mut Pipes, Cut> {
        match self {
            Kept::Pipes(kept) => Ok(kept),
            Kept::Memory(_) => Err(elsewhere("pipes")),
        }
    }

    /// The peer delivered everything before `upto`.
    pub(super) fn ack(&mut self, upto: u64) -> Result<(), ResumeError> {
        match self {
            Kept::Memory(kept) => Ok(kept.ack(upto)?),
            Kept::Pipes(kept) => kept.ack(upto),
        }
    }
}

/// Local end to peer.
pub(super) struct Up {
    pub(super) local: Reader,
    pub(super) kept: Kept,
    /// Where the bytes are kept was chosen, on the first connection.
    pub(super) chosen: bool,
    pub(super) ended: bool,
    /// The most read from the local end at once.
    pub(super) chunk: usize,
    pub(super) observe: Observe,
    pub(super) hurry: Option<Hurry>,
    /// Where bytes kept in pipes pass to be sealed, when the peer is no plain socket (TLS):
    /// empty otherwise.
    pub(super) piece: Vec<u8>,
}

/// The most read from the pipes at once for a peer that is no plain socket: small enough to
/// stay in the cache between the read and the sealing. Measured before: the same bytes
/// read from the local end straight into the 16 MiB retention made the kernel's copy into
/// user memory about four times as long as the relay's into its one warm buffer.
const PIECE: usize = 256 << 10;

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
    pub(super) async fn run(
        &mut self,
        mut peer: Writer,
        from: u64,
        acks: &mut watch::Receiver<Progress>,
        mine: &watch::Sender<Progress>,
    ) -> Result<(), Cut> {
        self.choose();
        match &self.kept {
            Kept::Memory(_) => self.run_copied(&mut peer, from, acks, mine).await?,
            Kept::Pipes(_) => self.run_spliced(&mut peer, from, acks, mine).await?,
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

    /// On the first connection: pipes where the local end is a plain socket and no tap
    /// needs the bytes, memory otherwise (or when the system gives no pipe). A peer that is
    /// no plain socket (TLS) gets the bytes read from the pipes through a small buffer
    /// ([`piece`]).
    fn choose(&mut self) {
        if std::mem::replace(&mut self.chosen, true) {
            return;
        }
        let Kept::Memory(memory) = &self.kept else {
            return;
        };
        let local = self.local.socket().is_some();
        if !local || self.observe.tapped(self.observe.up) || memory.sent() > 0 {
            return;
        }
        match Pipes::new(memory.limit()) {
            Ok(pipes) => self.kept = Kept::Pipes(Box::new(pipes)),
            Err(error) => tracing::warn!(%error, "no pipes to keep bytes in: copying instead"),
        }
    }

    /// Acknowledgements in; `acked_at` moves when one freed room.
    fn take_acks(
        &mut self,
        acks: &mut watch::Receiver<Progress>,
        acked_at: &mut Instant,
    ) -> Result<(), Cut> {
        let before = self.kept.acked();
        self.kept.ack(acks.borrow_and_update().delivered)?;
        if self.kept.acked() > before {
            *acked_at = Instant::now();
        }
        Ok(())
    }

    /// No room: waits for an acknowledgement, held as a relay holds what its receiver does
    /// not take (the stall watch blames the link, whose peer does not acknowledge, not the
    /// local end).
    async fn wait_room(&mut self, acks: &mut watch::Receiver<Progress>, acked_at: Instant) {
        let observe = &self.observe;
        observe.counters.hold(observe.up, self.kept.kept());
        wait_ack(self.hurry.as_ref(), acks, acked_at).await;
        observe.counters.hold(observe.up, 0);
    }

    /// The local end's end of stream: this direction's length is announced.
    fn end(&mut self, mine: &watch::Sender<Progress>) {
        self.ended = true;
        self.observe.counters.mark_end(self.observe.up);
        let end = Some(self.kept.sent());
        mine.send_modify(|mine| mine.end = end);
    }

    /// Kept in memory: replays from it, reads into it, writes from it.
    async fn run_copied(
        &mut self,
        peer: &mut Writer,
        from: u64,
        acks: &mut watch::Receiver<Progress>,
        mine: &watch::Sender<Progress>,
    ) -> Result<(), Cut> {
        let kept = self.kept.memory()?;
        let (a, b) = kept.replay(from)?;
        peer.write_all(a).await.map_err(Cut::Broken)?;
        peer.write_all(b).await.map_err(Cut::Broken)?;
        peer.flush().await.map_err(Cut::Broken)?;
        let mut acked_at = Instant::now();
        while !self.ended {
            self.take_acks(acks, &mut acked_at)?;
            let kept = self.kept.memory()?;
            if kept.room() == 0 {
                self.wait_room(acks, acked_at).await;
                continue;
            }
            let n = self.read().await?;
            if n == 0 {
                self.end(mine);
                break;
            }
            let kept = self.kept.memory()?;
            let read = kept.recent(n);
            // Held while the peer does not take it, as a relay's pump holds it.
            self.observe.counters.hold(self.observe.up, n);
            peer.write_all(read).await.map_err(Cut::Broken)?;
            peer.flush().await.map_err(Cut::Broken)?;
            self.observe.counters.hold(self.observe.up, 0);
        }
        Ok(())
    }

    /// Reads the local end straight into the retention (what is kept costs no copy), and
    /// counts it once, as a relay counts: sent on (a replay does not count again).
    async fn read(&mut self) -> Result<usize, Cut> {
        let kept = self.kept.memory()?;
        let spare = kept.spare();
        let room = spare.len().min(self.chunk);
        let n = self.local.read(&mut spare[..room]).await;
        let n = n.map_err(local("read"))?;
        if n > 0 {
            kept.commit(n);
            self.observe.moved(self.observe.up, kept.recent(n));
        }
        Ok(n)
    }

    /// Kept in pipes: replays from them, splices the local end in, tees, sends out.
    async fn run_spliced(
        &mut self,
        peer: &mut Writer,
        from: u64,
        acks: &mut watch::Receiver<Progress>,
        mine: &watch::Sender<Progress>,
    ) -> Result<(), Cut> {
        self.replay_spliced(peer, from).await?;
        let mut acked_at = Instant::now();
        while !self.ended {
            self.take_acks(acks, &mut acked_at)?;
            let kept = self.kept.pipes()?;
            if !kept.waiting() {
                if kept.room() == 0 {
                    self.wait_room(acks, acked_at).await;
                    continue;
                }
                let end = self.local.socket().ok_or_else(no_socket)?;
                let n = kept.fill(end).await.map_err(local("read"))?;
                if n == 0 {
                    self.end(mine);
                    break;
                }
                // Counted once, as it comes in (a replay does not count again).
                self.observe.spliced(self.observe.up, n);
            }
            let kept = self.kept.pipes()?;
            let n = kept.keep()?;
            if n == 0 {
                // The chain is full of small pieces: room comes with acknowledgements.
                self.wait_room(acks, acked_at).await;
                continue;
            }
            self.observe.counters.hold(self.observe.up, n);
            let mut out = peer.out(piece(&mut self.piece, self.chunk, peer));
            let kept = self.kept.pipes()?;
            kept.send(&mut out)
                .await
                .map_err(poured("send kept bytes"))?;
            self.observe.counters.hold(self.observe.up, 0);
        }
        Ok(())
    }

    /// On a new connection the pipes' kept bytes from `from` on (all of them, once the
    /// peer's offset is acknowledged) go to the peer first.
    async fn replay_spliced(&mut self, peer: &mut Writer, from: u64) -> Result<(), Cut> {
        let kept = self.kept.pipes()?;
        if from < kept.acked() {
            let base = kept.acked();
            return Err(RetentionError::BeforeBase { asked: from, base }.into());
        }
        kept.ack(from)?;
        kept.restart()?;
        let mut out = peer.out(piece(&mut self.piece, self.chunk, peer));
        kept.replay(&mut out).await.map_err(poured("replay"))?;
        Ok(())
    }
}

/// The buffer bytes kept in pipes pass through to `peer`: none for a plain socket (they are
/// spliced), up to [`PIECE`] for any other (TLS), made the first time one needs it.
fn piece<'a>(piece: &'a mut Vec<u8>, chunk: usize, peer: &Writer) -> &'a mut [u8] {
    if peer.socket().is_none() && piece.is_empty() {
        *piece = vec![0; chunk.min(PIECE)];
    }
    piece
}

/// A failure to send kept bytes: the peer's connection resumes; this host's pipes end the
/// channel as its own failure (`op` says what it was doing), never as the peer's.
fn poured(op: &'static str) -> impl Fn(PourError) -> Cut {
    move |error| match error {
        PourError::Peer(error) => Cut::Broken(error),
        PourError::Kept(error) => Cut::Fatal(retention_failed(op, error)),
    }
}

fn elsewhere(wanted: &str) -> Cut {
    let error = io::Error::other(format!("the kept bytes are not in {wanted}"));
    Cut::Fatal(retention_failed("keep", error))
}

fn no_socket() -> Cut {
    let error = io::Error::other("kept in pipes, but the local end is no socket");
    Cut::Fatal(retention_failed("splice in", error))
}

/// The next change of the peer's progress; never, once nobody can publish it.
pub(super) async fn wait_change(acks: &mut watch::Receiver<Progress>) {
    if acks.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
