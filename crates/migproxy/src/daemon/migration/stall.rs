//! The stall watch: fails a migration in which no byte moves on any channel for the stall
//! timeout, blaming what this host can see (a QEMU that stopped reading or sending, or a link
//! that takes nothing).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use migproxy_proto::Attribution;

use super::group::{Group, Member};
use super::state::{Epoch, Input};
use super::{Migration, Role, State, channels};
use crate::daemon::attribution;
use crate::relay::Counters;

impl Member for Migration {
    fn moved(&self) -> u64 {
        self.bytes().total()
    }
}

impl Migration {
    /// Joins `group` (once: a migration belongs to one group).
    pub fn join(self: &Arc<Self>, group: Arc<Group>) {
        let me: Arc<dyn Member> = Arc::clone(self) as Arc<dyn Member>;
        group.join(Arc::downgrade(&me));
        let _ = self.group.set(group);
    }

    /// Bytes moved by the rest of this migration's group, 0 when it has none.
    fn group_progress(&self) -> u64 {
        let me = self as *const Migration as *const ();
        self.group.get().map_or(0, |g| g.moved_by_others(me))
    }

    /// Fails the current epoch when no byte has moved on any channel for `limit` while the
    /// migration is active: a QEMU that stopped sending or reading, or a link that stalls
    /// without breaking. Runs on both hosts; each concludes only what it can see (below).
    /// Returns when the migration ends.
    pub async fn watch_stall(self: Arc<Self>, limit: Duration) {
        // Checked often enough that a stall is reported within a twentieth of its limit.
        let tick = (limit / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let mut last = (u64::MAX, Instant::now(), 0);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let (moved, epoch, running) = self.progress();
            // A resumable channel without a connection is bounded by the resume timeout,
            // not the stall timeout: nothing can move until it is back.
            let resuming = self.resumable.any_down();
            if moved != last.0 || epoch != last.2 || running.is_empty() || resuming {
                last = (moved, Instant::now(), epoch);
            } else if last.1.elapsed() >= limit
                && let Some((blame, wait)) = self.stall_cause(&running, limit)
            {
                let _ = self.step(Input::Failure { epoch, blame, wait });
                last.1 = Instant::now();
            }
        }
    }

    /// Bytes moved so far, the epoch, and the counters of the channels running in it (none
    /// unless the migration is active).
    /// Bytes moved by its group count as progress too.
    fn progress(&self) -> (u64, Epoch, Vec<(u32, Arc<Counters>)>) {
        let (moved, epoch, running) = {
            let inner = self.lock();
            let channels = inner.core.channels();
            let running = match inner.core.state() {
                State::Active => inner.live.running_counters(channels),
                _ => Vec::new(),
            };
            (
                inner.live.total(channels).total(),
                inner.core.epoch(),
                running,
            )
        };
        // Outside this migration's lock: the others take their own.
        (moved.saturating_add(self.group_progress()), epoch, running)
    }

    /// Who stalled, as far as this host can see, and whether the other host may know better.
    /// A pump that holds bytes it cannot write waits for its receiver: this host's QEMU not
    /// reading is certain. The source also knows when its QEMU sends nothing; a link that
    /// takes nothing while heartbeats flow may be the destination QEMU not reading, which
    /// the destination says. The destination concludes nothing else: the source decides.
    fn stall_cause(
        &self,
        running: &[(u32, Arc<Counters>)],
        limit: Duration,
    ) -> Option<(Attribution, bool)> {
        use crate::relay::Direction as Way;
        let (to_qemu, to_link) = match self.spec.role {
            Role::Incoming => (Way::ToDestination, Way::ToSource),
            Role::Outgoing => (Way::ToSource, Way::ToDestination),
        };
        let held = |way: Way| {
            running
                .iter()
                .find(|(_, c)| c.direction(way).held() > 0)
                .map(|(index, c)| (*index, c.direction(way).held(), channels::totals(c.bytes())))
        };
        let elapsed_ms = self.elapsed().as_millis() as u64;
        let stall = attribution::Stall {
            host: self.host(),
            limit,
            elapsed_ms,
        };
        if let Some((index, held, bytes)) = held(to_qemu) {
            return Some((stall.qemu_not_reading(index, to_qemu, held, bytes), false));
        }
        if self.spec.role == Role::Incoming {
            return None;
        }
        let bytes = channels::totals(self.bytes());
        match held(to_link) {
            Some((index, held, bytes)) => {
                let resumable = self.spec.resume_timeout.is_some();
                let blame = stall.link_not_taking(index, (held, resumable), bytes);
                Some((blame, true))
            }
            None => Some((stall.source_silent(bytes), false)),
        }
    }
}
