//! What one direction of a resumable channel has sent but the peer has not yet acknowledged
//! as delivered: kept, bounded, for a replay on the next connection. Pure: no I/O.
//!
//! ```text
//!   offset:  base ─────────────────────────── sent
//!            │ kept (unacknowledged) bytes    │  ◄── push (at most `limit` kept)
//!   ack(n) ──► drops [base, n); replay(n) gives [n, sent)
//! ```

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

/// The unacknowledged bytes of one direction, in a ring of `limit` bytes that the local end
/// is read into directly ([`spare`](Self::spare), [`commit`](Self::commit)) and the peer
/// written from ([`recent`](Self::recent)): keeping costs no copy. The ring is allocated
/// zeroed, so the pages a direction never fills (a quiet return path) are never touched.
#[derive(Debug)]
pub struct Retention {
    ring: Vec<u8>,
    /// Where `kept[0]` is in the ring.
    head: usize,
    /// How many bytes are kept.
    len: usize,
    /// The stream offset of `kept[0]`: everything before it was acknowledged.
    base: u64,
}

impl Retention {
    /// Keeps at most `limit` bytes (at least 1).
    pub fn new(limit: usize) -> Retention {
        Retention {
            ring: vec![0; limit.max(1)],
            head: 0,
            len: 0,
            base: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.ring.len()
    }

    /// Bytes sent so far (the offset of the next byte).
    pub fn sent(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Bytes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.base
    }

    /// How many more bytes may be kept before an acknowledgement frees room.
    pub fn room(&self) -> usize {
        self.limit() - self.len
    }

    /// How many bytes are kept.
    pub fn kept(&self) -> usize {
        self.len
    }

    /// Where the next bytes go: the free space after the kept ones, up to the ring's end (or
    /// the kept bytes' start). Empty when the ring is full. [`commit`](Self::commit) keeps
    /// what was put there.
    pub fn spare(&mut self) -> &mut [u8] {
        let limit = self.limit();
        let tail = self.head + self.len;
        match tail < limit {
            true => &mut self.ring[tail..],
            false => &mut self.ring[tail - limit..self.head],
        }
    }

    /// Keeps the first `n` bytes of [`spare`](Self::spare), sent now.
    pub fn commit(&mut self, n: usize) {
        debug_assert!(n <= self.room());
        self.len += n.min(self.room());
    }

    /// The last `n` bytes kept, committed together: one slice.
    pub fn recent(&self, n: usize) -> &[u8] {
        debug_assert!(n <= self.len);
        let limit = self.limit();
        let tail = (self.head + self.len) % limit;
        let tail = if tail == 0 && self.len > 0 {
            limit
        } else {
            tail
        };
        &self.ring[tail - n.min(tail)..tail]
    }

    /// Keeps `data`, sent now (a copy; the engine reads into [`spare`](Self::spare)). The
    /// caller pushes no more than [`room`](Self::room).
    pub fn push(&mut self, mut data: &[u8]) {
        debug_assert!(data.len() <= self.room());
        while !data.is_empty() && self.room() > 0 {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
        }
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
            let n = (upto - self.base) as usize;
            self.len -= n;
            // Empty, the ring starts over: the next read gets all of it in one piece.
            self.head = if self.len == 0 {
                0
            } else {
                (self.head + n) % self.limit()
            };
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
        let limit = self.limit();
        let start = self.head + (from - self.base) as usize;
        let end = self.head + self.len;
        Ok(match (start < limit, end <= limit) {
            (true, true) => (&self.ring[start..end], &[][..]),
            (true, false) => (&self.ring[start..], &self.ring[..end - limit]),
            (false, _) => (&self.ring[start - limit..end - limit], &[][..]),
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
    fn the_local_end_is_read_into_the_ring_and_sent_from_it_in_one_piece() {
        let mut r = Retention::new(8);
        let spare = r.spare();
        assert_eq!(spare.len(), 8);
        spare[..5].copy_from_slice(b"abcde");
        r.commit(5);
        assert_eq!(r.recent(5), b"abcde");
        r.ack(3).unwrap();
        // Up to the ring's end first, then the space freed before the kept bytes.
        assert_eq!(r.spare().len(), 3);
        r.spare().copy_from_slice(b"fgh");
        r.commit(3);
        assert_eq!(r.recent(3), b"fgh");
        assert_eq!(r.spare().len(), 3);
        r.spare()[..2].copy_from_slice(b"ij");
        r.commit(2);
        assert_eq!(r.recent(2), b"ij");
        assert_eq!(replayed(&r, 3), b"defghij");
        assert_eq!(r.room(), 1);
        // Emptied, the ring starts over whole.
        r.ack(10).unwrap();
        assert_eq!((r.kept(), r.spare().len()), (0, 8));
        // Full: no spare room at all, wherever the kept bytes start.
        r.push(b"01234567");
        assert!(r.spare().is_empty());
        r.ack(13).unwrap();
        r.push(b"abc");
        assert!(r.spare().is_empty());
        assert_eq!(replayed(&r, 13), b"34567abc");
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
