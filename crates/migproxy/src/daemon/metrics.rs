//! The daemon's Prometheus metrics, rendered in the text exposition format on `GET /metrics`.
//!
//! Counters that outlive migrations (bytes of finished channels, migrations by final state,
//! failures by cause, cancel latencies) live here; gauges and the bytes of channels still
//! running are read from the migrations at scrape time, so the byte counters are exact and
//! never go backwards.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::relay::ByteCounts;

/// Upper bounds of the cancel-latency histogram, in seconds.
const CANCEL_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];

/// Upper bounds of the postcopy paused-time histogram, in seconds.
const PAUSED_BUCKETS: [f64; 9] = [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

/// Upper bounds of the resumable channels' outage histogram, in seconds.
const OUTAGE_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0];

/// A histogram of seconds: cumulative buckets at `bounds`, the count and the sum.
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: [f64; N],
    buckets: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: [0; N],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bucket, bound) in self.buckets.iter_mut().zip(self.bounds) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    /// The family `name` in the exposition format (buckets cumulative, as Prometheus wants).
    fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        for (bucket, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {bucket}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Counters>,
}

#[derive(Debug)]
struct Counters {
    /// Bytes of channels that have ended.
    finished: ByteCounts,
    by_state: BTreeMap<&'static str, u64>,
    /// Failures by (host, leg, op).
    failures: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    cancels: Histogram<{ CANCEL_BUCKETS.len() }>,
    /// Recovered pauses, by how long the guest was frozen (its count is the recoveries').
    paused: Histogram<{ PAUSED_BUCKETS.len() }>,
    /// Resumed channel outages, by how long the channel had no connection (its count is the
    /// resumptions').
    outages: Histogram<{ OUTAGE_BUCKETS.len() }>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            finished: ByteCounts::default(),
            by_state: BTreeMap::new(),
            failures: BTreeMap::new(),
            cancels: Histogram::new(CANCEL_BUCKETS),
            paused: Histogram::new(PAUSED_BUCKETS),
            outages: Histogram::new(OUTAGE_BUCKETS),
        }
    }
}

/// What the daemon knows at scrape time.
#[derive(Debug, Default)]
pub struct Live {
    pub bytes: ByteCounts,
    pub migrations_active: u64,
    pub channels_active: u64,
    pub tls: bool,
    pub rejections: Vec<(&'static str, u64)>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A channel ended having moved `bytes`.
    pub fn channel_ended(&self, bytes: ByteCounts) {
        let mut c = self.lock();
        c.finished.to_destination = c
            .finished
            .to_destination
            .saturating_add(bytes.to_destination);
        c.finished.to_source = c.finished.to_source.saturating_add(bytes.to_source);
    }

    /// A migration reached the final state (or paused) named `state`; a failure or pause
    /// with its cause's (host, leg, op) labels.
    pub fn migration_ended(
        &self,
        state: &'static str,
        cause: Option<(&'static str, &'static str, &'static str)>,
    ) {
        let mut c = self.lock();
        *c.by_state.entry(state).or_default() += 1;
        if let Some(labels) = cause {
            *c.failures.entry(labels).or_default() += 1;
        }
    }

    /// A paused postcopy migration recovered, its guest frozen for `frozen`.
    pub fn recovered(&self, frozen: Duration) {
        self.lock().paused.observe(frozen);
    }

    /// A resumable channel went on, on a new connection, after `lost`.
    pub fn resumed(&self, lost: Duration) {
        self.lock().outages.observe(lost);
    }

    /// Every channel of a cancelled migration had closed this long after the cancel.
    pub fn cancelled_in(&self, latency: Duration) {
        self.lock().cancels.observe(latency);
    }

    /// The exposition text.
    pub fn render(&self, live: &Live) -> String {
        let c = self.lock();
        let mut out = String::new();
        render_traffic(&mut out, &c, live);
        render_outcomes(&mut out, &c);
        render_cancels(&mut out, &c);
        render_recoveries(&mut out, &c);
        render_resumptions(&mut out, &c);
        render_peers(&mut out, live);
        out
    }
}

/// Bytes carried (the ended channels' plus the live ones'), and what is running now.
fn render_traffic(out: &mut String, c: &Counters, live: &Live) {
    let total = |a: u64, b: u64| a.saturating_add(b);
    family(
        out,
        "migproxy_bytes_total",
        "counter",
        "Bytes carried, by direction.",
    );
    let _ = writeln!(
        out,
        "migproxy_bytes_total{{direction=\"to_destination\"}} {}",
        total(c.finished.to_destination, live.bytes.to_destination)
    );
    let _ = writeln!(
        out,
        "migproxy_bytes_total{{direction=\"to_source\"}} {}",
        total(c.finished.to_source, live.bytes.to_source)
    );
    family(
        out,
        "migproxy_migrations_active",
        "gauge",
        "Migrations not yet ended.",
    );
    let _ = writeln!(out, "migproxy_migrations_active {}", live.migrations_active);
    family(
        out,
        "migproxy_channels_active",
        "gauge",
        "Channels being relayed.",
    );
    let _ = writeln!(out, "migproxy_channels_active {}", live.channels_active);
}

/// How migrations ended, and the causes of failures and pauses. Every state is listed,
/// at 0 too, so that a rate over it exists from the start.
fn render_outcomes(out: &mut String, c: &Counters) {
    family(
        out,
        "migproxy_migrations_total",
        "counter",
        "Migrations by final state (and pauses).",
    );
    for state in [
        "completed",
        "transferred",
        "failed",
        "cancelled",
        "expired",
        "paused",
    ] {
        let n = c.by_state.get(state).copied().unwrap_or(0);
        let _ = writeln!(out, "migproxy_migrations_total{{state=\"{state}\"}} {n}");
    }
    family(
        out,
        "migproxy_failures_total",
        "counter",
        "Failures and pauses by cause.",
    );
    for ((host, leg, op), n) in &c.failures {
        let _ = writeln!(
            out,
            "migproxy_failures_total{{host=\"{host}\",leg=\"{leg}\",op=\"{op}\"}} {n}"
        );
    }
}

/// The cancel latency histogram.
fn render_cancels(out: &mut String, c: &Counters) {
    let help = "Time from a cancel to every local channel closed.";
    c.cancels.render(out, "migproxy_cancel_seconds", help);
}

/// Postcopy recoveries, and how long each left the guest frozen.
fn render_recoveries(out: &mut String, c: &Counters) {
    family(
        out,
        "migproxy_postcopy_recoveries_total",
        "counter",
        "Paused postcopy migrations that recovered.",
    );
    let _ = writeln!(out, "migproxy_postcopy_recoveries_total {}", c.paused.count);
    let help = "Time a recovered postcopy migration's guest stayed frozen, from the pause to QEMU running postcopy again.";
    c.paused
        .render(out, "migproxy_postcopy_paused_seconds", help);
}

/// Resumed channels, and how long each went without a connection.
fn render_resumptions(out: &mut String, c: &Counters) {
    family(
        out,
        "migproxy_resumptions_total",
        "counter",
        "Resumable channels that went on, on a new peer connection, after one broke.",
    );
    let _ = writeln!(out, "migproxy_resumptions_total {}", c.outages.count);
    let help = "Time a resumed channel had no working peer connection, from the break to the new connection's hellos.";
    c.outages.render(out, "migproxy_outage_seconds", help);
}

/// The peer port: connections refused by reason, and whether the link is TLS.
fn render_peers(out: &mut String, live: &Live) {
    family(
        out,
        "migproxy_peer_rejections_total",
        "counter",
        "Peer connections refused, by reason.",
    );
    for (reason, n) in &live.rejections {
        let _ = writeln!(
            out,
            "migproxy_peer_rejections_total{{reason=\"{reason}\"}} {n}"
        );
    }
    family(
        out,
        "migproxy_tls_enabled",
        "gauge",
        "1 when the peer link is mutual TLS, 0 when plaintext.",
    );
    let _ = writeln!(out, "migproxy_tls_enabled {}", u8::from(live.tls));
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_consistent_histogram() {
        let metrics = Metrics::default();
        metrics.channel_ended(ByteCounts {
            to_destination: 10,
            to_source: 2,
        });
        metrics.migration_ended("completed", None);
        metrics.migration_ended("failed", Some(("source", "qemu", "migrate")));
        metrics.cancelled_in(Duration::from_millis(3));
        metrics.cancelled_in(Duration::from_secs(2));
        let live = Live {
            bytes: ByteCounts {
                to_destination: 5,
                to_source: 0,
            },
            migrations_active: 1,
            channels_active: 2,
            tls: true,
            rejections: vec![("bad_token", 4)],
        };
        let text = metrics.render(&live);
        for line in [
            "migproxy_bytes_total{direction=\"to_destination\"} 15",
            "migproxy_migrations_total{state=\"completed\"} 1",
            "migproxy_migrations_total{state=\"transferred\"} 0",
            "migproxy_failures_total{host=\"source\",leg=\"qemu\",op=\"migrate\"} 1",
            "migproxy_cancel_seconds_bucket{le=\"0.005\"} 1",
            "migproxy_cancel_seconds_bucket{le=\"1\"} 1",
            "migproxy_cancel_seconds_bucket{le=\"+Inf\"} 2",
            "migproxy_cancel_seconds_count 2",
            "migproxy_peer_rejections_total{reason=\"bad_token\"} 4",
            "migproxy_tls_enabled 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
