//! Postcopy recovery as the lifecycle keeps it: every pause, when it began, how many tries
//! it took to bring the link back, and how long the guest stayed frozen.
//!
//! ```text
//!  postcopy-active ── link or channel breaks ──► paused (pause n opens; recover_timeout runs)
//!        ▲                                          │ control link back (attach)
//!        │                                          ▼
//!        └──── QEMU back in postcopy-active ◄── recovering (migrate-recover / resume=true)
//!              (without QMP: the fresh main channel runs) — pause n closes, frozen time kept
//!  recover_timeout while pause n is open ─► failed, for good
//! ```

use migproxy_proto::Attribution;

/// One pause and its recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// What broke.
    pub cause: Attribution,
    /// When it paused, in milliseconds since the migration was created.
    pub paused_at_ms: u64,
    /// How long the guest stayed frozen: from the pause until QEMU ran postcopy again
    /// (without QMP: until the resumed epoch's main channel ran). `None` while not recovered.
    pub frozen_ms: Option<u64>,
    /// Tries to bring the control link back that failed.
    pub failed_attempts: u32,
}

/// Every pause of a migration, oldest first; the last one is open until it recovers.
#[derive(Debug, Clone, Default)]
pub struct Recoveries {
    list: Vec<Recovery>,
}

impl Recoveries {
    pub fn all(&self) -> &[Recovery] {
        &self.list
    }

    /// The pause not recovered yet, if any.
    pub fn open(&self) -> Option<&Recovery> {
        self.list.last().filter(|r| r.frozen_ms.is_none())
    }

    /// How many pauses ended in a recovery.
    pub fn recovered(&self) -> u32 {
        self.list.iter().filter(|r| r.frozen_ms.is_some()).count() as u32
    }

    /// Time the guest spent frozen, the open pause counted until `now_ms`.
    pub fn frozen_ms(&self, now_ms: u64) -> u64 {
        self.list
            .iter()
            .map(|r| {
                r.frozen_ms
                    .unwrap_or_else(|| now_ms.saturating_sub(r.paused_at_ms))
            })
            .sum()
    }

    /// A pause: opens pause number n (1, 2, …) and returns n, unless one is open already
    /// (a second break while recovering belongs to the same outage).
    pub(super) fn paused(&mut self, cause: Attribution, now_ms: u64) -> Option<u32> {
        if self.open().is_some() {
            return None;
        }
        self.list.push(Recovery {
            cause,
            paused_at_ms: now_ms,
            frozen_ms: None,
            failed_attempts: 0,
        });
        Some(self.list.len() as u32)
    }

    /// The open pause is over: returns how long the guest was frozen.
    pub(super) fn resumed(&mut self, now_ms: u64) -> Option<u64> {
        let open = self.list.last_mut().filter(|r| r.frozen_ms.is_none())?;
        let frozen = now_ms.saturating_sub(open.paused_at_ms);
        open.frozen_ms = Some(frozen);
        Some(frozen)
    }

    pub(super) fn attempt_failed(&mut self) {
        if let Some(open) = self.list.last_mut().filter(|r| r.frozen_ms.is_none()) {
            open.failed_attempts += 1;
        }
    }

    /// Whether pause `n` is the one still open.
    pub(super) fn is_open(&self, n: u32) -> bool {
        self.open().is_some() && self.list.len() as u32 == n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migproxy_proto::{Host, Leg, Op, Totals};

    fn cause() -> Attribution {
        Attribution {
            host: Host::Source,
            leg: Leg::Peer,
            channel: None,
            direction: None,
            op: Op::Timeout,
            errno: None,
            message: "silence".into(),
            bytes: Totals::default(),
            elapsed_ms: 0,
        }
    }

    #[test]
    fn a_break_while_recovering_belongs_to_the_open_pause() {
        let mut r = Recoveries::default();
        assert_eq!(r.paused(cause(), 1000), Some(1));
        assert_eq!(r.paused(cause(), 1500), None, "still the first outage");
        r.attempt_failed();
        assert_eq!(r.frozen_ms(4000), 3000, "the open pause counts until now");
        assert_eq!(r.resumed(6000), Some(5000));
        assert_eq!(r.resumed(7000), None, "nothing open");
        assert_eq!(r.paused(cause(), 8000), Some(2));
        assert!(r.is_open(2) && !r.is_open(1));
        assert_eq!(r.resumed(8500), Some(500));
        assert_eq!(
            (r.recovered(), r.frozen_ms(9999), r.all()[0].failed_attempts),
            (2, 5500, 1)
        );
    }
}
