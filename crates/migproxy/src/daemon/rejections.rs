//! Refused peer connections, counted by reason and logged at a bounded rate, so that a
//! hostile peer can neither hide in nor flood the logs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Counts of refused peer connections by reason, and a limit on how often they are logged,
/// so that a hostile peer can neither hide in nor flood the logs.
#[derive(Debug, Default)]
pub struct Rejections {
    counts: Mutex<HashMap<&'static str, u64>>,
    log: Mutex<LogBudget>,
}

#[derive(Debug, Default)]
struct LogBudget {
    window: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

/// Refusals logged per 10-second window; the rest are counted and summarised.
const LOGGED_PER_WINDOW: u32 = 20;

impl Rejections {
    /// Counts a refusal; returns whether it may be logged, and how many were suppressed
    /// since the last one logged.
    pub fn record(&self, reason: &'static str) -> Option<u64> {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if log
            .window
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(10))
        {
            log.window = Some(now);
            log.logged = 0;
        }
        if log.logged < LOGGED_PER_WINDOW {
            log.logged += 1;
            Some(std::mem::take(&mut log.suppressed))
        } else {
            log.suppressed += 1;
            None
        }
    }

    /// Every count so far, by reason.
    pub fn counts(&self) -> HashMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
