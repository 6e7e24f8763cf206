//! What the channel tasks tell the migration: a channel set up or not, running, ended —
//! each an input of the lifecycle, and an event once it took.

use std::sync::Arc;

use migproxy_proto::Attribution;
use migproxy_proto::Leg;

use super::state::{Input, ReturnPath};
use super::view::EventKind;
use super::{ChannelState, Epoch, Migration, channels};
use crate::daemon::attribution;
use crate::daemon::names::EndName;
use crate::relay::{ByteCounts, Counters, End, Report};

impl Migration {
    /// A channel that could not be set up (its dial or its connect failed): it failed, and
    /// with it the epoch — unless the epoch ended meanwhile. A failure on the peer link waits
    /// for the peer's explanation, as every peer-leg failure does.
    pub fn channel_failed(self: &Arc<Self>, epoch: Epoch, index: u32, blame: Attribution) {
        let mut inner = self.lock();
        let wait = blame.leg == Leg::Peer;
        let input = Input::SetupFailed {
            epoch,
            index,
            blame,
            wait,
        };
        let _ = self.step_then(&mut inner, input, |inner| {
            if inner.core.channels().get(index as usize).map(|c| c.state)
                == Some(ChannelState::Failed)
            {
                self.publish(EventKind::ChannelClosed {
                    channel: index,
                    end: EndName::Failed,
                    bytes: ByteCounts::default(),
                });
            }
        });
    }

    /// The channel's local leg is up and its relay is running with these counters.
    pub fn channel_running(self: &Arc<Self>, index: u32, counters: Arc<Counters>) {
        let mut inner = self.lock();
        inner.live.running(index, counters);
        let _ = self.step_then(&mut inner, Input::Running { index }, |_| {
            self.publish(EventKind::ChannelOpened { channel: index });
        });
    }

    /// Records how a channel's relay ended, and what that means for the migration.
    /// `qemu_leg` is the name of the relay leg that faces the local QEMU; `return_path` is
    /// what the main channel's return path said.
    pub fn channel_ended(
        self: &Arc<Self>,
        index: u32,
        epoch: Epoch,
        report: &Report,
        qemu_leg: &str,
        return_path: ReturnPath,
    ) {
        let (end, failure) = match &report.end {
            End::Completed => (migproxy_proto::ChannelEnd::Completed, None),
            End::Cancelled => (migproxy_proto::ChannelEnd::Cancelled, None),
            End::Failed(failure) => {
                let blame = attribution::of_relay(self.host(), index, failure, qemu_leg);
                let wait = blame.leg == Leg::Peer;
                (migproxy_proto::ChannelEnd::Failed, Some((blame, wait)))
            }
        };
        self.context.metrics.channel_ended(report.bytes);
        let mut inner = self.lock();
        let input = Input::Ended {
            epoch,
            index,
            end,
            bytes: channels::totals(report.bytes),
            failure,
            return_path,
        };
        let _ = self.step_then(&mut inner, input, |inner| {
            let end = match inner.core.channels().get(index as usize).map(|c| c.state) {
                Some(ChannelState::Completed) => EndName::Completed,
                Some(ChannelState::Failed) => EndName::Failed,
                _ => EndName::Cancelled,
            };
            self.publish(EventKind::ChannelClosed {
                channel: index,
                end,
                bytes: report.bytes,
            });
        });
    }
}
