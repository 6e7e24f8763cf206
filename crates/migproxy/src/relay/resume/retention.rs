//! What one direction of a resumable channel has sent but the peer has not yet acknowledged
//! as delivered: kept, bounded, for a replay on the next connection. Pure: no I/O.
//!
//! ```text
//!   offset:  base ─────────────────────────── sent
//!            │ kept (unacknowledged) bytes    │  ◄── push (at most `limit` kept)
//!   ack(n) ──► drops [base, n); replay(n) gives [n, sent)
//! ```

use std::collections::VecDeque;

/// A peer's acknowledgement or resume offset that cannot be true.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    /// More than was ever sent: a confused or hostile peer.
    #[error("the peer claims {claimed} bytes delivered, but only {sent} were sent")]
    BeyondSent { claimed: u64, sent: u64 },
    /// Bytes the peer acknowledged earlier and that were dropped: it lost what it had
    /// delivered (a restarted peer), so the stream cannot go on from there.
    #[error("the peer asks for bytes from offset {asked}, but it had acknowledged {base} already")]
    BeforeBase { asked: u64, base: u64 },
}

/// The unacknowledged bytes of one direction.
#[derive(Debug)]
pub struct Retention {
    kept: VecDeque<u8>,
    /// The stream offset of `kept[0]`: everything before it was acknowledged.
    base: u64,
    limit: usize,
}

impl Retention {
    /// Keeps at most `limit` bytes (at least 1).
    pub fn new(limit: usize) -> Retention {
        Retention {
            kept: VecDeque::new(),
            base: 0,
            limit: limit.max(1),
        }
    }

    /// Bytes sent so far (the offset of the next byte).
    pub fn sent(&self) -> u64 {
        self.base + self.kept.len() as u64
    }

    /// Bytes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.base
    }

    /// How many more bytes may be pushed before an acknowledgement frees room.
    pub fn room(&self) -> usize {
        self.limit - self.kept.len()
    }

    /// How many bytes are kept.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Keeps `data`, sent now. The caller reads no more than [`room`](Self::room).
    pub fn push(&mut self, data: &[u8]) {
        debug_assert!(data.len() <= self.room());
        self.kept.extend(data);
    }

    /// The peer delivered everything before `upto`: drops it. An older acknowledgement than
    /// one seen is no news (acknowledgements may be reordered with a resume's offset).
    pub fn ack(&mut self, upto: u64) -> Result<(), RetentionError> {
        let sent = self.sent();
        if upto > sent {
            return Err(RetentionError::BeyondSent {
                claimed: upto,
                sent,
            });
        }
        if upto > self.base {
            self.kept.drain(..(upto - self.base) as usize);
            self.base = upto;
        }
        Ok(())
    }

    /// What to send again to a peer that delivered everything before `from`: the kept bytes
    /// from there on, as the two slices of the ring.
    pub fn replay(&self, from: u64) -> Result<(&[u8], &[u8]), RetentionError> {
        if from < self.base {
            return Err(RetentionError::BeforeBase {
                asked: from,
                base: self.base,
            });
        }
        if from > self.sent() {
            return Err(RetentionError::BeyondSent {
                claimed: from,
                sent: self.sent(),
            });
        }
        let skip = (from - self.base) as usize;
        let (a, b) = self.kept.as_slices();
        Ok(match skip <= a.len() {
            true => (&a[skip..], b),
            false => (&b[skip - a.len()..], &[][..]),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn replayed(r: &Retention, from: u64) -> Vec<u8> {
        let (a, b) = r.replay(from).unwrap();
        [a, b].concat()
    }

    #[test]
    fn kept_bytes_replay_from_any_unacknowledged_offset_across_the_ring_wrap() {
        let mut r = Retention::new(8);
        r.push(b"abcdef");
        r.ack(4).unwrap();
        assert_eq!((r.acked(), r.sent(), r.room()), (4, 6, 6));
        // The ring wraps: the kept bytes straddle its end.
        r.push(b"ghijk");
        assert_eq!(replayed(&r, 4), b"efghijk");
        assert_eq!(replayed(&r, 9), b"jk");
        assert_eq!(replayed(&r, 11), b"");
        assert_eq!(r.room(), 1);
    }

    #[test]
    fn an_offset_that_cannot_be_true_is_refused_and_an_old_ack_is_no_news() {
        let mut r = Retention::new(16);
        r.push(b"0123456789");
        r.ack(5).unwrap();
        r.ack(3).unwrap();
        assert_eq!(r.acked(), 5, "an older ack drops nothing back");
        assert_eq!(
            r.ack(11),
            Err(RetentionError::BeyondSent {
                claimed: 11,
                sent: 10
            })
        );
        assert_eq!(
            r.replay(4).unwrap_err(),
            RetentionError::BeforeBase { asked: 4, base: 5 }
        );
        assert!(r.replay(11).is_err());
        assert_eq!(r.kept(), 5, "nothing changed by a refusal");
    }
}
