//! A resumable migration's control link that broke: the epoch goes on without it for up to
//! the resume timeout, its frames queued, and a connection that presents the epoch's
//! credential (and, over TLS, the same certificate) takes over from it (issue #18).
//!
//! ```text
//!  control link ╳ broken (reset, end of stream, silent past the peer timeout)
//!    both hosts: the queue is kept, the epoch and its channels go on; the deadline starts
//!    source ── Hello{control, credential, FLAG_RESUME} ──► destination (with backoff)
//!           ◄──────────────────────── HelloReply{Ok} ──── takes the queue over
//!    (a destination that has not seen the break yet: its link is told to stop, and the
//!     source is answered Busy and tries again at once)
//!  no link within the resume timeout: the migration fails with the first cause
//! ```

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::Attribution;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::resumable::Rejoin;
use super::state::Phase;
use super::{Epoch, Link, Migration, Outbound, Role};
use crate::human::Elapsed;

/// Whether an epoch in `phase` has a control link to wait for: up, and not over (a link
/// that breaks after a host said `Done`, or asked the source to cancel, is taken over too:
/// what is queued must still reach the peer).
fn link_awaited(phase: &Phase) -> bool {
    matches!(
        phase,
        Phase::Attached | Phase::Active | Phase::Completing | Phase::Cancelling { .. }
    )
}

impl Migration {
    /// Whether a control link of `epoch` that broke may be taken over instead of failing.
    /// So may, on the source, one that broke after the migration ended here, before the
    /// destination closed its side: what this host said last may have gone down with it,
    /// and a link that takes over delivers it ([`left_queued`](Self::left_queued)).
    pub fn link_resumable(&self, epoch: Epoch) -> bool {
        let inner = self.lock();
        let phase = inner.core.phase();
        let ended_here = matches!(phase, Phase::Ended { .. }) && self.spec.role == Role::Outgoing;
        self.resumable.on() && inner.core.epoch() == epoch && (link_awaited(&phase) || ended_here)
    }

    /// The control link of `epoch` broke with `cause`: the epoch waits for another, its
    /// frames kept in `queue`, until the resume timeout (a little longer on the
    /// destination, so that the source's account of it arrives first).
    pub fn link_lost(
        self: &Arc<Self>,
        epoch: Epoch,
        cause: Attribution,
        queue: mpsc::UnboundedReceiver<Outbound>,
    ) {
        let number = {
            let mut inner = self.lock();
            if inner.core.epoch() != epoch {
                return;
            }
            if !link_awaited(&inner.core.phase()) {
                // Ended: no outage, only the last frames to deliver if a link comes.
                inner.new_link = Some(queue);
                return;
            }
            inner.new_link = Some(queue);
            // Under the same lock as `rejoin`: a link that takes over at once finds the
            // outage recorded, and ends it.
            self.resumable.link_broke(cause.clone())
        };
        tracing::warn!(migration = %self.spec.id, "control link broken ({}): waiting for it to come back", cause.message);
        self.resuming_changed();
        let mut timeout = self.spec.resume_timeout.unwrap_or_default();
        if self.spec.role == Role::Incoming {
            timeout = timeout.saturating_add(self.explanation_grace() * 2);
        }
        let migration = Arc::clone(self);
        self.spawn(async move {
            tokio::select! {
                () = migration.stopped() => {}
                () = tokio::time::sleep(timeout) => migration.link_not_back(epoch, number, timeout),
            }
        });
    }

    /// The resume timeout passed: if outage `number` still lasts, the migration fails with
    /// its first cause and the tries.
    fn link_not_back(self: &Arc<Self>, epoch: Epoch, number: u64, timeout: Duration) {
        let Some(down) = self.resumable.link_down().filter(|d| d.number == number) else {
            return;
        };
        let mut blame = down.cause;
        let attempts = self
            .resumable
            .link_attempts
            .load(std::sync::atomic::Ordering::Relaxed);
        let tries = match self.spec.role {
            Role::Outgoing => format!(" ({attempts} attempts to bring it back)"),
            Role::Incoming => String::new(),
        };
        blame.message = format!(
            "{}; the control link did not come back within {} (resume_timeout){tries}",
            blame.message,
            Elapsed(timeout)
        );
        self.fail(epoch, blame);
    }

    /// What the epoch queued for a control link that broke, once the migration has ended
    /// without one taking over: its last frames, for the source to deliver if it can.
    pub fn left_queued(&self) -> Option<mpsc::UnboundedReceiver<Outbound>> {
        let mut inner = self.lock();
        match inner.core.phase() {
            Phase::Ended { .. } => inner.new_link.take(),
            _ => None,
        }
    }

    /// Whether the migration ended with its control link down, and its last frames still
    /// wait for a link ([`left_queued`](Self::left_queued) not taken yet).
    pub fn ended_with_link_down(&self) -> bool {
        let inner = self.lock();
        matches!(inner.core.phase(), Phase::Ended { .. }) && inner.new_link.is_some()
    }

    /// A connection takes over the broken control link: the epoch's queue, and a new stop
    /// of its own. A link still up is told to give up first (`Busy`).
    pub fn rejoin(&self) -> Result<Link, Rejoin> {
        let mut inner = self.lock();
        if !self.resumable.on() || !link_awaited(&inner.core.phase()) {
            return Err(Rejoin::Refused);
        }
        let Some(queue) = inner.new_link.take() else {
            inner.link_replaced.cancel();
            return Err(Rejoin::Busy);
        };
        inner.link_replaced = CancellationToken::new();
        let back = self.resumable.link_back();
        let link = Link {
            queue,
            epoch: inner.core.epoch(),
            stop: inner.epoch_stop.clone(),
            replaced: inner.link_replaced.clone(),
            takes_over: true,
        };
        drop(inner);
        if let Some(lost) = back {
            tracing::info!(migration = %self.spec.id, "control link back after {}", Elapsed(lost));
            self.resuming_changed();
        }
        Ok(link)
    }

    /// Whether a data connection's hello carries what this epoch's data connections must:
    /// the secret handed out on its control link, or the token where the link speaks
    /// version 1. A token holder who is not the control link's peer cannot add channels.
    pub fn admits_data(&self, presented: &[u8; migproxy_proto::TOKEN_LEN]) -> bool {
        match &self.lock().credential {
            Some(credential) => credential.matches(presented),
            None => self.spec.token.matches(presented),
        }
    }

    /// What this host's data connections present (source).
    pub fn data_credential(&self) -> crate::daemon::token::Token {
        self.lock()
            .credential
            .clone()
            .unwrap_or_else(|| self.spec.token.clone())
    }
}
