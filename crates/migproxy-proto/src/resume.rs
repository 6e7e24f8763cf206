//! The hello of a resumable channel's connection (issue #18; not yet spoken by the daemon):
//! each side's progress, written first by both sides on every new connection for the
//! channel, before the channel's bytes go on from where the peer says it stands.
//!
//! ```text
//!  side A                                        side B
//!    │ ── Progress{delivered: a, end} ──────────► │ replays its direction from a
//!    │ ◄────────────────── Progress{delivered: b, end} ── │
//!    │ replays its direction from b               │
//!    │ ═══ the channel's bytes, both ways ═══════ │
//!
//! Progress   delivered u64 │ end u64 (all ones: not ended)
//! ```
//! `delivered`: bytes of the peer's direction written to this side's QEMU. `end`: the length
//! of this side's own direction, once its QEMU ended it. Big-endian. The same pair travels
//! on the control link between connections, as acknowledgements
//! ([`Control::Progress`](crate::Control::Progress)).

/// Bytes of a [`Progress`] on the wire.
pub const PROGRESS_LEN: usize = 16;

/// How one side of a resumable channel stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub delivered: u64,
    pub end: Option<u64>,
}

impl Progress {
    pub fn encode(self) -> [u8; PROGRESS_LEN] {
        let mut wire = [0; PROGRESS_LEN];
        wire[..8].copy_from_slice(&self.delivered.to_be_bytes());
        wire[8..].copy_from_slice(&self.end.unwrap_or(u64::MAX).to_be_bytes());
        wire
    }

    /// Every 16 bytes decode: whether the values can be true is the engine's to judge
    /// against what it sent and delivered.
    pub fn decode(wire: [u8; PROGRESS_LEN]) -> Progress {
        let (delivered, end) = wire.split_at(8);
        let word = |bytes: &[u8]| u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8]));
        Progress {
            delivered: word(delivered),
            end: Some(word(end)).filter(|end| *end != u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_all_ones_is_no_end() {
        for progress in [
            Progress::default(),
            Progress {
                delivered: 1 << 40,
                end: Some(7),
            },
            Progress {
                delivered: u64::MAX,
                end: Some(0),
            },
        ] {
            assert_eq!(Progress::decode(progress.encode()), progress);
        }
        assert_eq!(Progress::decode([0xff; PROGRESS_LEN]).end, None);
        assert_eq!(
            Progress::decode([0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
            Progress {
                delivered: 256,
                end: Some(2)
            }
        );
    }
}
