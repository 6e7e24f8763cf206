//! Postcopy recovery, as the wrapper carries it out: the events and metrics of every pause
//! and recovery, and what the tasks driving QEMU and redialling the link ask of it. The
//! bookkeeping itself is the lifecycle's (`state/recovery.rs`).

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::Attribution;

use super::state::{Epoch, Input, Note, Phase};
use super::view::EventKind;
use super::{Migration, Role};
use crate::daemon::attribution::{self, Rendered};

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
    pub(super) fn paused_again(&self) {
        if self.spec.role == Role::Incoming && self.spec.qemu.is_some() {
            self.qemu_ready.send_replace(false);
        }
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
