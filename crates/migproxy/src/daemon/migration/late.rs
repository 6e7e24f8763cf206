//! The peer's word on how a migration ended there, when it comes after this host's own end:
//! the last frames a control link carried once both hosts had ended during an outage
//! (`daemon::last_frames`). Kept beside this host's verdict, which it does not change:
//! each host's state is what it knew when it ended.

use std::sync::atomic::Ordering;

use migproxy_proto::{Control, Verdict};

use super::view::{self, EventKind, LateEnd};
use super::{Migration, State};
use crate::daemon::attribution;
use crate::daemon::names::HostName;

impl Migration {
    /// Destination, ended: whether to take a link carrying the source's last frames: once,
    /// and only if it ended with its own link down (otherwise the source heard its end).
    pub fn takes_last_frames(&self) -> bool {
        self.ended_with_link_down() && !self.last_frames_taken.swap(true, Ordering::SeqCst)
    }

    /// The link taken for the source's last frames went before its reply: the source may
    /// come again.
    pub fn last_frames_undone(&self) {
        self.last_frames_taken.store(false, Ordering::SeqCst);
    }

    /// The end a frame says: a cancel, a failure for good, or every channel's clean end
    /// (with QEMU's word or without). A pause (`Failed`) is no end.
    pub fn end_said(
        control: &Control,
    ) -> Option<(State, Option<HostName>, Option<attribution::Report>)> {
        Some(match control {
            Control::Cancel { by } => (State::Cancelled, Some(HostName::from(*by)), None),
            Control::GaveUp(blame) => (State::Failed, None, Some(attribution::Report::from(blame))),
            Control::Done {
                verdict: Verdict::Unknown,
                ..
            } => (State::Transferred, None, None),
            Control::Done { .. } => (State::Completed, None, None),
            _ => return None,
        })
    }

    /// Records the peer's end, said in one of its last frames after this host had ended
    /// ([`end_said`](Self::end_said)); any other frame is ignored.
    pub fn heard_late(&self, control: &Control) {
        let Some((state, cancelled_by, error)) = Self::end_said(control) else {
            return;
        };
        let end = LateEnd {
            state,
            cancelled_by,
            error,
            heard_at: view::unix_seconds(Some(std::time::SystemTime::now())).unwrap_or_default(),
        };
        tracing::info!(migration = %self.spec.id, here = %self.state(), there = %end.state,
            "the peer's end, heard after this host's");
        *self.late.lock().unwrap_or_else(|p| p.into_inner()) = Some(end.clone());
        self.publish(EventKind::PeerEnded(end));
    }

    /// The peer's end, if heard after this host's.
    pub(super) fn late_end(&self) -> Option<LateEnd> {
        self.late.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
