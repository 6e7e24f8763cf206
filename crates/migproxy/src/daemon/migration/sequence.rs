//! The control frames of a resumable epoch that a broken link may have taken down with it,
//! and how a link that takes over makes them good. Pure: no I/O.
//!
//! ```text
//!  source                                   destination
//!   sent: [ChannelClosed 0, Done]  ══╳      received: 1 (Done was lost with the link)
//!   ── Received{frames: 7} ──►               ◄── Received{frames: 1} ──
//!   ── Done (sent again: 2nd on) ──►         (7 ≥ its own: nothing to send again)
//!   then what is new, on both sides
//! ```
//!
//! Each side counts the sequenced frames ([`Control::is_sequenced`]) it has sent and
//! received in the epoch. A frame counts as sent once taken off the queue, written or not:
//! the peer's count says whether it arrived. Every frame sent again is one the peer has not
//! applied, and nothing new goes out before them, so each frame arrives once and in order.
//! The frames kept are a few per channel (opened, closed, a failure, a cancel, done): the
//! epoch keeps them all.

use migproxy_proto::Control;

/// One epoch's sequenced frames, both ways. Each count is of one epoch: a frame of a later
/// epoch starts the counts over, and one of an earlier epoch (a link that still drains as
/// the next epoch begins) counts for nothing.
#[derive(Debug, Default)]
pub struct Sequence {
    epoch: u64,
    sent: Vec<Control>,
    received: u64,
}

impl Sequence {
    /// The counts of `epoch`, if it is not an older one than counted.
    fn of(&mut self, epoch: u64) -> Option<&mut Sequence> {
        if epoch > self.epoch {
            *self = Sequence {
                epoch,
                ..Sequence::default()
            };
        }
        (epoch == self.epoch).then_some(self)
    }

    /// `control` leaves for the peer on a link of `epoch` (if it counts).
    pub fn sent(&mut self, epoch: u64, control: &Control) {
        if let Some(counts) = self.of(epoch).filter(|_| control.is_sequenced()) {
            counts.sent.push(control.clone());
        }
    }

    /// `control` came from the peer on a link of `epoch` (if it counts).
    pub fn received(&mut self, epoch: u64, control: &Control) {
        if let Some(counts) = self.of(epoch).filter(|_| control.is_sequenced()) {
            counts.received += 1;
        }
    }

    /// What a link of `epoch` that takes over says first.
    pub fn tell(&mut self, epoch: u64) -> Control {
        let frames = self.of(epoch).map_or(0, |counts| counts.received);
        Control::Received { frames }
    }

    /// What to send again, on a link of `epoch`, to a peer that has received `frames` of
    /// them. A peer that claims more than was sent gets nothing again: a confused peer
    /// cannot make frames repeat.
    pub fn unreceived(&mut self, epoch: u64, frames: u64) -> Vec<Control> {
        let Some(counts) = self.of(epoch) else {
            return Vec::new();
        };
        if frames > counts.sent.len() as u64 {
            tracing::warn!(
                frames,
                sent = counts.sent.len(),
                "the peer claims more control frames than were sent"
            );
        }
        let from = usize::try_from(frames).unwrap_or(usize::MAX);
        counts.sent.get(from..).unwrap_or_default().to_vec()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_peer_has_not_received_goes_again_and_in_order() {
        let mut s = Sequence::default();
        let closed = Control::ChannelClosed {
            channel: 0,
            end: migproxy_proto::ChannelEnd::Completed,
            bytes: migproxy_proto::Totals::default(),
        };
        let cancel = Control::Cancel {
            by: migproxy_proto::Host::Source,
        };
        for control in [
            Control::ChannelOpened { channel: 0 },
            Control::Heartbeat,
            Control::Progress {
                channel: 0,
                delivered: 5,
                end: None,
            },
            closed.clone(),
            cancel.clone(),
        ] {
            s.sent(1, &control);
        }
        assert_eq!(s.unreceived(1, 1), [closed, cancel.clone()]);
        assert_eq!(s.unreceived(1, 2), [cancel]);
        assert!(s.unreceived(1, 3).is_empty());
        assert!(
            s.unreceived(1, u64::MAX).is_empty(),
            "a peer claiming too much"
        );
        s.received(1, &Control::Heartbeat);
        s.received(1, &Control::Received { frames: 9 });
        s.received(1, &Control::ChannelOpened { channel: 1 });
        assert_eq!(s.tell(1), Control::Received { frames: 1 });
    }

    #[test]
    fn an_older_epochs_frames_count_for_nothing_and_a_newer_one_starts_over() {
        let mut s = Sequence::default();
        let opened = Control::ChannelOpened { channel: 0 };
        s.sent(2, &opened);
        s.received(2, &opened);
        // The next epoch: counted afresh.
        s.sent(3, &Control::ChannelOpened { channel: 4 });
        assert_eq!(s.unreceived(3, 0), [Control::ChannelOpened { channel: 4 }]);
        assert_eq!(s.tell(3), Control::Received { frames: 0 });
        // A late frame of the old epoch's link changes nothing.
        s.received(2, &opened);
        s.sent(2, &opened);
        assert_eq!(s.tell(3), Control::Received { frames: 0 });
        assert_eq!(s.unreceived(3, 0).len(), 1);
        assert!(
            s.unreceived(2, 0).is_empty(),
            "an old epoch gets nothing sent again"
        );
    }
}
