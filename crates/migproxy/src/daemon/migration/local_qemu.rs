//! What the local QEMU says, when the daemon drives it over QMP: recorded in the report,
//! published as `qemu` events, and fed to the lifecycle (QEMU's `completed`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use migproxy_proto::Attribution;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::state::Input;
use super::{CancelRequest, Migration, view};
use crate::daemon::attribution;
use crate::daemon::qemu::report::{self as qemu, Status};

impl Migration {
    /// Records a `query-migrate` answer from the local QEMU; publishes a `qemu` event when
    /// QEMU's status or pass changes.
    pub fn qemu_observed(
        self: &Arc<Self>,
        info: serde_json::Value,
        pass: Option<u64>,
        statuses: &[Status],
        wall: Duration,
    ) {
        let mut inner = self.lock();
        let Some(report) = inner.qemu.as_mut() else {
            return;
        };
        let before = (report.status.clone(), report.pass);
        report.update(&info, pass, statuses, wall);
        if before == (report.status.clone(), report.pass) {
            return;
        }
        let event = view::qemu_event(report);
        let status = report.status.clone();
        self.publish(event);
        let _ = self.step_locked(&mut inner, Input::Qemu { status });
    }

    /// QEMU refused to switch to postcopy: the migration goes on in precopy, and the
    /// report and a `qemu` event say why.
    pub fn qemu_postcopy_refused(&self, error: String) {
        tracing::warn!(migration = %self.spec.id, "QEMU did not switch to postcopy: {error}");
        self.with_qemu_report(|report| report.postcopy_error = Some(error));
    }

    /// The local QEMU's monitor closed: QEMU exited or crashed.
    pub fn qemu_monitor_closed(&self) {
        self.with_qemu_report(|report| report.monitor_closed = true);
    }

    fn with_qemu_report(&self, change: impl FnOnce(&mut qemu::Report)) {
        let mut inner = self.lock();
        let Some(report) = inner.qemu.as_mut() else {
            return;
        };
        change(report);
        let event = view::qemu_event(report);
        drop(inner);
        self.publish(event);
    }

    /// Whether the local QEMU has given its verdict (`completed`, `failed`, `cancelled`).
    pub fn qemu_final(&self) -> bool {
        self.lock()
            .qemu
            .as_ref()
            .is_some_and(qemu::Report::is_final)
    }

    /// QEMU's status, as last seen (`None` when QEMU is not driven here).
    pub fn qemu_status(&self) -> Option<Status> {
        self.lock().qemu.as_ref().map(|q| q.status.clone())
    }

    /// Whether the local QEMU says `completed` within the explanation grace. A connection
    /// closed under QEMU may be seen before QEMU's `completed`, which is polled: QEMU is
    /// given the grace to say so. Any other verdict (failed, cancelled), `stop` (the epoch
    /// ended) or silence: the close was not a finished QEMU's doing.
    pub async fn qemu_completes(&self, stop: &CancellationToken) -> bool {
        let deadline = Instant::now() + self.explanation_grace();
        while Instant::now() < deadline {
            // A QEMU whose monitor broke (it died) will not say anything any more.
            if self.lock().qemu.as_ref().is_some_and(|q| q.monitor_closed) {
                return false;
            }
            match self.qemu_status() {
                Some(Status::Completed) => return true,
                Some(status) if status.is_final() => return false,
                None => return false,
                _ => {}
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        false
    }

    /// QEMU's `error-desc`, if it gave one.
    pub fn qemu_error(&self) -> Option<String> {
        self.lock().qemu.as_ref().and_then(|q| q.error_desc.clone())
    }

    /// A failure of this host's QEMU, as QEMU told it.
    pub fn qemu_failure(&self, message: String) -> Attribution {
        let now = self.now(&self.lock());
        attribution::qemu(self.host(), message, now.bytes, now.elapsed_ms)
    }

    /// Registers the task that cancels the source QEMU first.
    pub fn set_qemu_canceller(self: &Arc<Self>, canceller: mpsc::Sender<CancelRequest>) {
        let mut inner = self.lock();
        inner.qemu_cancel = Some(canceller);
        let _ = self.step_locked(&mut inner, Input::QemuFollowing);
    }
}
