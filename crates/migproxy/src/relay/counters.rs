//! Live counters of a relay, read from other tasks while it runs.
//!
//! Each direction has exactly one writer (its pump), so plain relaxed atomics are enough: a
//! reader may see the byte count a moment before the progress time, never a torn value, and
//! the hot path takes no lock.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::pump::Direction;

/// Bytes per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Delivered from the source leg to the destination leg.
    pub to_destination: u64,
    /// Delivered from the destination leg back to the source leg (QEMU's return path).
    pub to_source: u64,
}

impl ByteCounts {
    pub fn total(&self) -> u64 {
        self.to_destination.saturating_add(self.to_source)
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    bytes: AtomicU64,
    spliced: AtomicU64,
    /// Microseconds after the relay started at which bytes last moved; 0 = never.
    last_progress_us: AtomicU64,
    /// Bytes read from the sending leg and not yet written to the receiving one: non-zero
    /// while the pump waits to write (the receiver does not take them).
    held: AtomicU64,
}

impl DirectionCounters {
    /// Bytes delivered to the receiving leg so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Of [`bytes`](Self::bytes), those moved by splice(2) without passing through user space.
    pub fn spliced_bytes(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    /// Bytes read and not yet delivered: a pump that holds bytes and makes no progress waits
    /// for its receiving leg.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// When bytes last moved, as time since the relay started.
    pub fn last_progress(&self) -> Option<Duration> {
        match self.last_progress_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn record(&self, bytes: usize, spliced: bool, since_start: Duration) {
        let bytes = bytes as u64;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        // One writer per direction: a load and a store, no read-modify-write needed.
        let held = self.held.load(Ordering::Relaxed);
        self.held
            .store(held.saturating_sub(bytes), Ordering::Relaxed);
        if spliced {
            self.spliced.fetch_add(bytes, Ordering::Relaxed);
        }
        // max(1) keeps 0 meaning "never" even for progress in the first microsecond.
        let us = (since_start.as_micros() as u64).max(1);
        self.last_progress_us.store(us, Ordering::Relaxed);
    }
}

/// Counters of a whole relay, shared as `Arc<Counters>`.
#[derive(Debug)]
pub struct Counters {
    started: Instant,
    to_destination: DirectionCounters,
    to_source: DirectionCounters,
    /// The direction whose sender finished first: 0 none yet, 1 to_destination, 2 to_source.
    first_end: AtomicU8,
}

impl Counters {
    pub(crate) fn new() -> Counters {
        Counters {
            started: Instant::now(),
            to_destination: DirectionCounters::default(),
            to_source: DirectionCounters::default(),
            first_end: AtomicU8::new(0),
        }
    }

    /// The direction that reached end of stream first, if any has.
    pub fn first_end(&self) -> Option<Direction> {
        match self.first_end.load(Ordering::Relaxed) {
            1 => Some(Direction::ToDestination),
            2 => Some(Direction::ToSource),
            _ => None,
        }
    }

    pub(super) fn mark_end(&self, direction: Direction) {
        let code = match direction {
            Direction::ToDestination => 1,
            Direction::ToSource => 2,
        };
        let _ = self
            .first_end
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn direction(&self, direction: Direction) -> &DirectionCounters {
        match direction {
            Direction::ToDestination => &self.to_destination,
            Direction::ToSource => &self.to_source,
        }
    }

    /// Bytes delivered each way so far.
    pub fn bytes(&self) -> ByteCounts {
        ByteCounts {
            to_destination: self.to_destination.bytes(),
            to_source: self.to_source.bytes(),
        }
    }

    /// Of those, the bytes moved by splice(2).
    pub fn spliced(&self) -> ByteCounts {
        ByteCounts {
            to_destination: self.to_destination.spliced_bytes(),
            to_source: self.to_source.spliced_bytes(),
        }
    }

    /// Time since the relay was created.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `bytes` were read in `direction` and wait to be written.
    pub(super) fn hold(&self, direction: Direction, bytes: usize) {
        self.direction(direction)
            .held
            .store(bytes as u64, Ordering::Relaxed);
    }

    /// Sets a direction's total from a measure taken outside the relay (the kernel data
    /// path's `TCP_INFO`): it only moves forward, and moving counts as progress.
    pub(crate) fn observe(&self, direction: Direction, total: u64) {
        let before = self.direction(direction).bytes();
        if total > before {
            self.record(direction, (total - before) as usize, false);
        }
    }

    pub(super) fn record(&self, direction: Direction, bytes: usize, spliced: bool) {
        self.direction(direction)
            .record(bytes, spliced, self.started.elapsed());
    }
}
