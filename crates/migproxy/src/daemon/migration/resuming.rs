//! Resumable channels, as the migration carries them out: the frames of the control link
//! that are theirs, and each outage's events, metrics and view (the wiring itself is
//! [`resumable`](super::resumable)'s).

use std::sync::Arc;

use migproxy_proto::Control;

use super::view::EventKind;
use super::{Epoch, Migration, Outbound};
use crate::relay::resume::Outage;

impl Migration {
    /// Applies a frame from the control link: a resumable channel's progress or break
    /// here, everything else in the lifecycle.
    pub fn on_control(self: &Arc<Self>, epoch: Epoch, control: Control) {
        match control {
            Control::Progress {
                channel,
                delivered,
                end,
            } => self
                .resumable
                .peer_progress(channel, migproxy_proto::Progress { delivered, end }),
            Control::Broken {
                channel,
                connection,
            } => self.resumable.broken(channel, connection),
            other => self.on_peer(epoch, other),
        }
    }

    /// Queues `control` on the control link, if one is up (a resumable channel's word: the
    /// lifecycle has no part in it).
    pub fn send_peer(&self, control: Control) {
        if let Some(outbound) = &self.lock().outbound {
            let _ = outbound.send(Outbound::Frame(control));
        }
    }

    /// Records an outage of channel `index` as its engine tells it: logged, published,
    /// counted (and, on the destination, a break it saw itself told to the source).
    pub fn outage(&self, index: u32, outage: Outage) {
        let id = &self.spec.id;
        match outage {
            Outage::Interrupted {
                cause,
                signalled,
                connection,
            } => {
                tracing::warn!(migration = %id, channel = index, "peer connection {connection} broken ({cause}): resuming");
                self.resumable.interrupted(index);
                if self.spec.role == super::Role::Incoming && !signalled {
                    self.send_peer(Control::Broken {
                        channel: index,
                        connection,
                    });
                }
                self.publish(EventKind::ChannelInterrupted {
                    channel: index,
                    cause,
                });
            }
            Outage::Resumed {
                lost,
                replayed,
                attempts,
            } => {
                tracing::info!(migration = %id, channel = index, "resumed after {} ({attempts} connection attempts, {} sent again)", crate::human::Elapsed(lost), crate::human::Bytes(replayed));
                self.resumable.resumed(index, lost, replayed);
                self.context.metrics.resumed(lost);
                self.publish(EventKind::ChannelResumed {
                    channel: index,
                    lost_ms: lost.as_millis() as u64,
                    replayed,
                    attempts,
                });
            }
        }
    }
}
