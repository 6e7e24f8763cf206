//! Cancels: on behalf of which host, and by which route — at once, through the source QEMU
//! first, or (from the destination) by asking the source first. The lifecycle decides the
//! route ([`super::state::CancelRoute`]); this carries it out.

use std::sync::Arc;

use migproxy_proto::{Control, Host};
use tokio::sync::oneshot;

use super::state::{CancelRoute, Effect, Epoch, Input, Refusal};
use super::{CancelRequest, Inner, Migration, State};
use crate::daemon::qemu::report::CancelRefused;

impl Migration {
    /// Cancels the migration on behalf of `by` now; tells the peer if the cancel is ours.
    /// Returns false when the migration had already ended or the cancel is refused.
    pub fn cancel(self: &Arc<Self>, by: Host) -> bool {
        self.step(Input::Cancel { by }).is_ok()
    }

    /// The peer closed (or broke) the control link of `epoch`. True when that ends a cancel
    /// this host asked for: the source has ended its side, the migration is cancelled here
    /// too.
    pub fn link_closed(self: &Arc<Self>, epoch: Epoch) -> bool {
        self.step(Input::LinkClosed { epoch }).is_ok()
    }

    /// The source's word, on a hello that only says so (`FLAG_CANCEL`), that it cancelled
    /// the migration while no control link was up: taken as that link's `Cancel` would
    /// have been, without a link or an epoch. True when it ended the migration.
    pub fn cancel_told(self: &Arc<Self>, by: Host) -> bool {
        let epoch = self.epoch();
        let control = Control::Cancel { by };
        self.step(Input::Peer { epoch, control }).is_ok()
    }

    /// Applies a control frame from the peer daemon, received on the link of `epoch`.
    pub fn on_peer(self: &Arc<Self>, epoch: Epoch, control: Control) {
        let _ = self.step(Input::Peer { epoch, control });
    }

    /// Cancels on behalf of `by`, through the source QEMU first when the daemon drives it
    /// (so that QEMU reports `cancelled` and resumes the guest rather than failing on the
    /// sockets torn down under it); from the destination, by asking the source first. A
    /// cancel asked on this host is refused once the guest may be the destination's.
    /// `Ok(false)`: the migration had already ended.
    pub async fn cancel_through_qemu(self: &Arc<Self>, by: Host) -> Result<bool, CancelRefused> {
        let route = {
            let mut inner = self.lock();
            let before = (inner.core.phase(), inner.core.paused());
            match inner.core.ask(by) {
                Ok((effects, route)) => {
                    // The QEMU route is carried out here, so that its answer reaches the caller.
                    let effects = effects
                        .into_iter()
                        .filter(|e| !matches!(e, Effect::CancelQemu { .. }))
                        .collect();
                    self.apply(&mut inner, effects);
                    self.observe(&mut inner, before);
                    route
                }
                Err(Refusal::Cancel(refused)) => return Err(refused),
                Err(_) => return Ok(false),
            }
        };
        match route {
            CancelRoute::Now => Ok(true),
            CancelRoute::AskedTheSource => {
                let mut state = self.watch_state();
                let _ = state.wait_for(|s| s.is_final()).await;
                let inner = self.lock();
                Ok(inner.core.cancelled_by() == Some(by))
            }
            CancelRoute::ThroughQemu => self.cancel_qemu_first(by).await,
        }
    }

    /// Asks the task following QEMU to cancel it, then the migration; if that task does not
    /// answer in time, cancels the migration regardless.
    async fn cancel_qemu_first(self: &Arc<Self>, by: Host) -> Result<bool, CancelRefused> {
        let canceller = self.lock().qemu_cancel.clone();
        let (reply, answer) = oneshot::channel();
        let request = CancelRequest { by, reply };
        let wait = self.context.timers.cancel_wait;
        if let Some(canceller) = canceller {
            let asked = tokio::time::timeout(wait, async {
                canceller.send(request).await.ok()?;
                answer.await.ok()
            })
            .await;
            if let Ok(Some(outcome)) = asked {
                return outcome.map(|cancelled| cancelled || self.state() == State::Cancelled);
            }
        }
        Ok(self.cancel(by))
    }

    pub(super) fn spawn_qemu_cancel(self: &Arc<Self>, inner: &Inner, by: Host) {
        if inner.qemu_cancel.is_none() {
            return;
        }
        let migration = Arc::clone(self);
        self.context.tasks.spawn(async move {
            let _ = migration.cancel_qemu_first(by).await;
        });
    }
}
