//! Postcopy recovery, as the wrapper carries it out: the events and metrics of every pause
//! and recovery, and what the tasks driving QEMU and redialling the link ask of it. The
//! bookkeeping itself is the lifecycle's (`state/recovery.rs`).

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::Attribution;

use super::early::{self, Tried};
use super::state::{Epoch, Input, Note, Phase};
use super::view::EventKind;
use super::{Migration, Role};
use crate::daemon::attribution::{self, Rendered};
use crate::human::Elapsed;

impl Migration {
    /// Publishes a step of recovery (under the migration's lock: nothing here takes it).
    pub(super) fn note(&self, note: Note) {
        let id = &self.spec.id;
        match note {
            Note::Paused { pause, cause } => {
                tracing::warn!(migration = %id, pause, "paused: {}", Rendered(&cause));
                self.publish(EventKind::Paused {
                    pause,
                    cause: attribution::Report::from(&cause),
                });
            }
            Note::Recovering { pause } => {
                tracing::info!(migration = %id, pause, "the link is back: recovering");
                self.publish(EventKind::Recovering { pause });
            }
            Note::Resumed { pause, frozen_ms } => {
                let frozen = Duration::from_millis(frozen_ms);
                tracing::info!(migration = %id, pause, ?frozen, "resumed");
                self.context.metrics.recovered(frozen);
                self.publish(EventKind::Resumed { pause, frozen_ms });
            }
        }
    }

    /// Every pause (a new one, or a second break while recovering): where QEMU is driven here,
    /// the next epoch's channels wait for its `migrate-recover` (QEMU's listening socket of
    /// the broken epoch is gone).
    /// Where a person recovers QEMU, the destination connects to QEMU as soon as it listens
    /// again ([`early`](super::early)).
    pub(super) fn paused_again(self: &Arc<Self>) {
        if self.spec.role != Role::Incoming {
            return;
        }
        if self.spec.qemu.is_some() {
            self.qemu_ready.send_replace(false);
        } else if let Some(path) = self.spec.local.unix_path() {
            // The socket QEMU listens on now, until `migrate-recover` binds a new one.
            let before = early::socket_at(path);
            let round = self.early.begin();
            let migration = Arc::clone(self);
            self.spawn(async move { migration.connect_early(round, before).await });
        }
    }

    /// Watches the destination QEMU's socket until `migrate-recover` binds a new one (not
    /// `before`), the pause's round ends or the migration does; connects and holds the
    /// connection for the resumed main channel, and closes it if nobody takes it.
    async fn connect_early(self: Arc<Self>, round: u64, before: Option<early::SocketId>) {
        let target = &self.spec.local;
        let Some(path) = target.unix_path() else {
            return;
        };
        let mut changes = early::DirChanges::new(path);
        // The socket bound anew that refused through a whole grace: tried again at each
        // wake (once, not for a grace), since a loaded QEMU may listen late.
        let mut graced = None;
        tracing::debug!(migration = %self.spec.id, round, ?before, "watching the destination QEMU's socket for migrate-recover");
        loop {
            let now = early::socket_at(path).filter(|now| Some(*now) != before);
            let grace = match now == graced {
                true => Duration::ZERO,
                false => early::LISTEN_GRACE,
            };
            let connect = async || {
                // The socket looked at, and no other (nor a link) swapped in since.
                early::connect_listening(path, Some(now?), grace).await
            };
            match self.early.try_connect(round, connect).await {
                Tried::Over => return,
                Tried::Held => break,
                Tried::NotYet if now.is_some() && now != graced => {
                    tracing::debug!(migration = %self.spec.id, round, ?now, "a socket bound anew refused for {}: tried again at each look", Elapsed(grace));
                    graced = now;
                }
                Tried::NotYet => {}
            }
            tokio::select! {
                () = self.stopped() => return,
                () = self.early.round_over(round) => return,
                _ = changes.next() => {}
            }
        }
        drop(changes);
        tracing::info!(migration = %self.spec.id, "the destination QEMU listens again (migrate-recover): connected to it for the resumed main channel");
        tokio::select! {
            () = self.stopped() => {}
            () = self.early.round_over(round) => {}
            () = tokio::time::sleep(early::EARLY_HOLD) => {
                tracing::warn!(migration = %self.spec.id, "no resumed main channel came within {} of migrate-recover: the connection made to the destination QEMU is closed (QEMU pauses again)", Elapsed(early::EARLY_HOLD));
            }
        }
        self.early.close(round).await;
    }

    /// Incoming: the connection to the destination QEMU a resumed main channel takes, made
    /// early; `None` for every other channel, or when none was made. While the claim lives,
    /// nothing else connects to QEMU for it.
    pub async fn claim_early(&self, main: bool) -> Option<early::Claim<'_>> {
        let by_hand = self.spec.role == Role::Incoming && self.spec.qemu.is_none();
        (main && by_hand && self.spec.recoverable).then_some(())?;
        Some(self.early.claim().await)
    }

    /// The epoch whose recovery QEMU must be told about: a control link is back after a
    /// pause, and QEMU has not run postcopy since.
    pub fn recovering(&self) -> Option<Epoch> {
        let inner = self.lock();
        let live = !matches!(
            inner.core.phase(),
            Phase::Pending | Phase::Paused | Phase::Ended { .. }
        );
        let open = inner.core.recoveries().open().is_some();
        (live && open).then(|| inner.core.epoch())
    }

    /// Whether a pause is open (paused, or recovering).
    pub fn pause_open(&self) -> bool {
        self.lock().core.recoveries().open().is_some()
    }

    /// Cancelled on this host while postcopy was paused: the peer may not know yet.
    pub fn cancelled_while_paused_here(&self) -> bool {
        let inner = self.lock();
        inner.core.cancelled_paused() && inner.core.cancelled_by() == Some(self.host())
    }

    /// How many channels this migration has seen: a resumed epoch starts after them.
    pub fn channels_seen(&self) -> u32 {
        self.lock().core.channels().len() as u32
    }

    /// Runs `task` on the daemon's tracker, as every task of the migration runs.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.context.tasks.spawn(task);
    }

    /// A paused migration that cannot be resumed (the peer refused, or QEMU did): it fails
    /// for good with `blame`.
    pub fn resume_refused(self: &Arc<Self>, blame: Attribution) {
        let _ = self.step(Input::ResumeRefused { blame });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::Path;

    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

    use super::*;
    use crate::daemon::migration::{Timers, testing};

    /// A socket bound at `path` that does not listen yet: QEMU between bind and listen.
    fn bound(path: &Path) -> OwnedFd {
        let flags = SockFlag::SOCK_CLOEXEC;
        let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        fd
    }

    #[tokio::test]
    async fn a_qemu_that_listens_long_after_it_bound_is_still_connected_early() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let migration =
            testing::recovered_by_hand(&format!("unix:{}", path.display()), Timers::default());
        let before = early::socket_at(&path);
        let round = migration.early.begin();
        let watcher = tokio::spawn(Arc::clone(&migration).connect_early(round, before));
        // migrate-recover on a loaded machine: the path bound anew, listened on only after
        // several of the watcher's graces.
        tokio::time::sleep(early::POLL * 3).await;
        std::fs::remove_file(&path).unwrap();
        let socket = bound(&path);
        tokio::time::sleep(early::LISTEN_GRACE * 4).await;
        socket::listen(&socket, Backlog::new(1).unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::from(socket);
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::UnixListener::from_std(listener).unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(2), listener.accept()).await;
        assert!(
            accepted.is_ok(),
            "the watcher gave up on the socket that listened late"
        );
        assert!(migration.claim_early(true).await.unwrap().held.is_some());
        watcher.await.unwrap();
        drop(first);
    }
}
