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

/// One epoch's sequenced frames, both ways.
#[derive(Debug, Default)]
pub struct Sequence {
    sent: Vec<Control>,
    received: u64,
}

impl Sequence {
    /// `control` leaves for the peer (if it counts).
    pub fn sent(&mut self, control: &Control) {
        if control.is_sequenced() {
            self.sent.push(control.clone());
        }
    }

    /// `control` came from the peer (if it counts).
    pub fn received(&mut self, control: &Control) {
        if control.is_sequenced() {
            self.received += 1;
        }
    }

    /// What a link that takes over says first.
    pub fn tell(&self) -> Control {
        Control::Received {
            frames: self.received,
        }
    }

    /// What to send again to a peer that has received `frames` of them. A peer that claims
    /// more than was sent gets nothing again: a confused peer cannot make frames repeat.
    pub fn unreceived(&self, frames: u64) -> Vec<Control> {
        let from = usize::try_from(frames).unwrap_or(usize::MAX);
        self.sent.get(from..).unwrap_or_default().to_vec()
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
            s.sent(&control);
        }
        assert_eq!(s.unreceived(1), [closed, cancel.clone()]);
        assert_eq!(s.unreceived(2), [cancel]);
        assert!(s.unreceived(3).is_empty());
        assert!(
            s.unreceived(u64::MAX).is_empty(),
            "a peer claiming too much"
        );
        s.received(&Control::Heartbeat);
        s.received(&Control::Received { frames: 9 });
        s.received(&Control::ChannelOpened { channel: 1 });
        assert_eq!(s.tell(), Control::Received { frames: 1 });
    }
}
