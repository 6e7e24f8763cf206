//! Resumable channels, as the migration carries them out: the frames of the control link
//! that are theirs, and each outage's events, metrics and view (the wiring itself is
//! [`resumable`](super::resumable)'s).

use std::sync::Arc;

use migproxy_proto::Control;

use super::state::{ChannelState, State};
use super::view::{ChannelSnapshot, EventKind};
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
            // Only the destination tells of a break: a source's word is not taken.
            Control::Broken {
                channel,
                connection,
            } if self.spec.role == super::Role::Outgoing => {
                self.resumable.broken(channel, connection);
            }
            Control::Broken { .. } => {}
            Control::Hurry { channel } => self.resumable.hurried(channel),
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
                self.resuming_changed();
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
                self.resuming_changed();
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

impl Migration {
    /// The state the API shows for the lifecycle's `state`: `resuming` in place of `active`
    /// while a resumable channel or the control link has no connection.
    pub fn shown_state(&self, state: State) -> State {
        if state == State::Active && self.resumable.any_down() {
            State::Resuming
        } else {
            state
        }
    }

    /// Marks the channels without a connection now as `resuming`.
    pub fn shown_channels(&self, rows: &mut [ChannelSnapshot]) {
        let open = self.resumable.outages().open;
        for row in rows.iter_mut() {
            if row.state == ChannelState::Active && open.contains_key(&row.index) {
                row.state = ChannelState::Resuming;
            }
        }
    }

    /// Publishes a state event when the first outage begins (`resuming`) and when the last
    /// one ends (`active` again): call it after each change of an outage, without the
    /// migration's lock. Decided and published under that lock, as every other state event
    /// is: none comes after the migration left `active` (paused, or ended).
    pub fn resuming_changed(&self) {
        let inner = self.lock();
        let (state, phase) = (inner.core.state(), inner.core.phase());
        let mut shown = self.resumable.shown();
        let now = self.shown_state(state);
        if state != State::Active || (now == State::Resuming) == *shown {
            return;
        }
        *shown = now == State::Resuming;
        tracing::info!(migration = %self.spec.id, phase = phase.name(), "state {now}");
        self.publish(EventKind::State {
            state: now,
            phase: phase.name().to_owned(),
            error: None,
        });
    }
}
