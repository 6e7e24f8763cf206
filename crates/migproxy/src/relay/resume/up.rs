//! Local end to peer: every byte read is kept until the peer acknowledges it, and sent on;
//! sent again from the peer's offset on a new connection.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::ends::{Reader, Writer};
use migproxy_proto::Progress;

use super::retention::Retention;
use super::types::{Cut, Hurry, Observe, local};

/// Local end to peer.
pub(super) struct Up {
    pub(super) local: Reader,
    pub(super) kept: Retention,
    pub(super) ended: bool,
    /// The most read from the local end at once.
    pub(super) chunk: usize,
    pub(super) observe: Observe,
    pub(super) hurry: Option<Hurry>,
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
    pub(super) async fn run(
        &mut self,
        mut peer: Writer,
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
            let n = self.read().await?;
            if n == 0 {
                self.ended = true;
                self.observe.counters.mark_end(self.observe.up);
                let end = Some(self.kept.sent());
                mine.send_modify(|mine| mine.end = end);
                break;
            }
            let read = self.kept.recent(n);
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

    /// Reads the local end straight into the retention (what is kept costs no copy), and
    /// counts it once, as a relay counts: sent on (a replay does not count again).
    async fn read(&mut self) -> Result<usize, Cut> {
        let spare = self.kept.spare();
        let room = spare.len().min(self.chunk);
        let n = self.local.read(&mut spare[..room]).await;
        let n = n.map_err(local("read"))?;
        if n > 0 {
            self.kept.commit(n);
            self.observe.moved(self.observe.up, self.kept.recent(n));
        }
        Ok(n)
    }
}

/// The next change of the peer's progress; never, once nobody can publish it.
pub(super) async fn wait_change(acks: &mut watch::Receiver<Progress>) {
    if acks.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
