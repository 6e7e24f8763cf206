//! Watches QEMU's return path (destination → source, on the main channel) for the one message
//! that tells a finished migration from a paused one.
//!
//! QEMU ends every migration that has a return path — all postcopy ones — with the
//! destination sending `MIG_RP_MSG_SHUT` (status 0) before it closes. When postcopy pauses
//! (`migrate-pause`, a broken link), the channels simply close: at the byte level that looks
//! like a clean end. So a recoverable migration's main channel counts as completed only when
//! its return path carried `SHUT(0)`.
//!
//! ```text
//! message       type be16 │ length be16 │ data (length bytes)
//! SHUT (1)      status be32             0 = finished cleanly
//! RECV_BITMAP (5) is followed, outside the framing, by: size be64 │ bitmap │ ending be64
//! ```
//! (QEMU `migration/migration.c`, `migrate_send_rp_message`, `ramblock_recv_bitmap_send`.)

const SHUT: u16 = 1;
const RECV_BITMAP: u16 = 5;
/// Highest message type QEMU defines (`MIG_RP_MSG_RESUME_ACK`).
const LAST_TYPE: u16 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A message header: type and length.
    Header,
    /// The data of a message of this type.
    Body(u16, usize),
    /// The size of a raw received-pages bitmap.
    BitmapSize,
    /// Raw bytes to skip: the bitmap and its 8-byte end marker.
    Skip(u64),
    /// Unparseable: nothing more is concluded.
    Lost,
}

/// A streaming parser of the return path.
#[derive(Debug)]
pub struct ReturnPath {
    expect: Expect,
    pending: Vec<u8>,
    shut: Option<u32>,
}

impl Default for ReturnPath {
    fn default() -> Self {
        ReturnPath {
            expect: Expect::Header,
            pending: Vec::new(),
            shut: None,
        }
    }
}

impl ReturnPath {
    /// The status of the `SHUT` message, once seen.
    pub fn shut(&self) -> Option<u32> {
        self.shut
    }

    /// Whether the parser still follows the stream.
    pub fn in_sync(&self) -> bool {
        self.expect != Expect::Lost
    }

    /// Consumes the next bytes of the return path.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.expect != Expect::Lost {
            if let Expect::Skip(left) = self.expect {
                let n = (left as usize).min(bytes.len());
                bytes = &bytes[n..];
                self.expect = match left - n as u64 {
                    0 => Expect::Header,
                    rest => Expect::Skip(rest),
                };
                continue;
            }
            let want = match self.expect {
                Expect::Header => 4,
                Expect::Body(_, len) => len,
                Expect::BitmapSize => 8,
                Expect::Skip(_) | Expect::Lost => unreachable!("handled above"),
            };
            let take = (want - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == want {
                let unit = std::mem::take(&mut self.pending);
                self.complete(&unit);
            }
        }
    }

    fn complete(&mut self, unit: &[u8]) {
        self.expect = match self.expect {
            Expect::Header => {
                let kind = u16::from_be_bytes([unit[0], unit[1]]);
                let len = u16::from_be_bytes([unit[2], unit[3]]) as usize;
                match kind {
                    0 => Expect::Lost,
                    kind if kind > LAST_TYPE => Expect::Lost,
                    kind if len == 0 => self.after(kind),
                    kind => Expect::Body(kind, len),
                }
            }
            Expect::Body(kind, _) => {
                if kind == SHUT && unit.len() == 4 {
                    self.shut = Some(u32::from_be_bytes([unit[0], unit[1], unit[2], unit[3]]));
                }
                self.after(kind)
            }
            Expect::BitmapSize => {
                let size = u64::from_be_bytes(unit.try_into().unwrap_or([0xff; 8]));
                size.checked_add(8).map_or(Expect::Lost, Expect::Skip)
            }
            Expect::Skip(_) | Expect::Lost => Expect::Lost,
        };
    }

    /// What follows a whole message of `kind`.
    fn after(&self, kind: u16) -> Expect {
        if kind == RECV_BITMAP {
            Expect::BitmapSize
        } else {
            Expect::Header
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(message(2, &7u32.to_be_bytes())); // PONG
        s.extend(message(4, &[0; 12])); // REQ_PAGES
        s.extend(message(5, b"\x07pc.ram")); // RECV_BITMAP, then raw data
        s.extend(16u64.to_be_bytes());
        s.extend([0xaa; 16]);
        s.extend(0x0101_0101_0101_0101u64.to_be_bytes());
        s.extend(message(6, &1u32.to_be_bytes())); // RESUME_ACK
        s.extend(message(1, &0u32.to_be_bytes())); // SHUT(0)
        s
    }

    #[test]
    fn finds_shut_whatever_the_chunking() {
        let s = stream();
        for chunk in 1..=s.len() {
            let mut rp = ReturnPath::default();
            for piece in s.chunks(chunk) {
                rp.feed(piece);
            }
            assert_eq!(rp.shut(), Some(0), "chunks of {chunk}");
            assert!(rp.in_sync());
        }
    }

    #[test]
    fn no_shut_before_the_end_and_garbage_loses_sync() {
        let s = stream();
        let mut rp = ReturnPath::default();
        rp.feed(&s[..s.len() - 8]);
        assert_eq!(rp.shut(), None);
        let mut rp = ReturnPath::default();
        rp.feed(&message(9, &[]));
        assert!(!rp.in_sync());
        rp.feed(&message(1, &0u32.to_be_bytes()));
        assert_eq!(rp.shut(), None, "nothing is concluded once lost");
        let mut rp = ReturnPath::default();
        rp.feed(&message(1, &1u32.to_be_bytes()));
        assert_eq!(rp.shut(), Some(1), "an error status is reported as such");
    }
}
