//! Accept on one endpoint, connect to another, relay each connection: `migproxy relay`.
//!
//! Connections are connected onwards strictly in the order they were accepted, the next
//! connect starting only once the previous one is established. QEMU's destination tells some
//! channels apart by arrival order (multifd in 7.2), so a proxy that reorders connects breaks
//! migrations that work directly.
//!
//! ```text
//!  QEMU (source)        migproxy relay                     QEMU (destination)
//!      │ connect #1 ──► accept #1 ── connect #1 ───────────────► │
//!      │ connect #2 ──► accept #2 ── (after #1 is up) connect #2 ► │
//!      │ ═══ bytes ═══► relay #1, relay #2 (one task each) ═══════► │
//! ```

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::endpoint::Endpoint;
use crate::human::{Bytes, Elapsed};
use crate::relay::{ByteCounts, End, Failure, Leg, Options, Relay, Report};
use crate::transport::{self, Listener, TransportError};

/// What `run` needs besides the listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where each accepted connection is carried to.
    pub connect: Endpoint,
    /// Stop accepting after this many connections, then wait for their relays.
    pub max_connections: Option<u64>,
    pub connect_timeout: Duration,
    pub relay: Options,
}

/// Totals over every connection handled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub connections: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub bytes: ByteCounts,
}

impl Summary {
    fn add(&mut self, report: &Report) {
        match report.end {
            End::Completed => self.completed += 1,
            End::Cancelled => self.cancelled += 1,
            End::Failed(_) => self.failed += 1,
        }
        self.bytes.to_destination += report.bytes.to_destination;
        self.bytes.to_source += report.bytes.to_source;
    }

    /// Every connection completed (also true when there were none).
    pub fn all_completed(&self) -> bool {
        self.cancelled == 0 && self.failed == 0
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.connections == 1 { "" } else { "s" };
        write!(
            f,
            "{} connection{plural}: {} completed, {} cancelled, {} failed; \
             {} source→destination, {} destination→source",
            self.connections,
            self.completed,
            self.cancelled,
            self.failed,
            Bytes(self.bytes.to_destination),
            Bytes(self.bytes.to_source),
        )
    }
}

/// Serves `listener` until `shutdown` is cancelled or `max_connections` relays have ended.
/// `on_report` is called with the connection's number (from 1) as each relay ends.
/// Cancelling `shutdown` cancels every running relay.
pub async fn run(
    listener: Listener,
    config: Config,
    shutdown: CancellationToken,
    mut on_report: impl FnMut(u64, &Report),
) -> Summary {
    let mut summary = Summary::default();
    let mut relays = JoinSet::new();
    let mut finish = |(n, report): (u64, Report), summary: &mut Summary| {
        summary.add(&report);
        on_report(n, &report);
    };
    while config
        .max_connections
        .is_none_or(|max| summary.connections < max)
    {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(done) = relays.join_next() => {
                if let Ok(done) = done { finish(done, &mut summary) }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, label) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE or ENOBUFS: back off instead of spinning, keep serving.
                tracing::warn!(error = %crate::human::Chain(&error), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        summary.connections += 1;
        let n = summary.connections;
        let started = Instant::now();
        match connect_onwards(&config, &shutdown, started).await {
            Ok(destination) => {
                let relay = Relay::new(Leg::new(label, stream), destination)
                    .with_options(config.relay.clone())
                    .with_cancel(shutdown.child_token());
                relays.spawn(async move { (n, relay.run().await) });
            }
            Err(end) => {
                stream.abort();
                finish((n, unconnected(label, &config, end, started)), &mut summary);
            }
        }
    }
    // Stop accepting (and remove the socket file) before waiting for the relays.
    drop(listener);
    while let Some(done) = relays.join_next().await {
        if let Ok(done) = done {
            finish(done, &mut summary);
        }
    }
    summary
}

/// The report of a connection whose destination leg could not be connected: nothing moved.
fn unconnected(source: String, config: &Config, end: End, started: Instant) -> Report {
    Report {
        source,
        destination: config.connect.to_string(),
        end,
        bytes: ByteCounts::default(),
        spliced: ByteCounts::default(),
        elapsed: started.elapsed(),
        first_end: None,
    }
}

/// Connects the destination leg; on failure, says how the connection ended.
async fn connect_onwards(
    config: &Config,
    shutdown: &CancellationToken,
    started: Instant,
) -> Result<Leg, End> {
    let name = config.connect.to_string();
    let connected = tokio::select! {
        () = shutdown.cancelled() => return Err(End::Cancelled),
        connected = transport::connect(&config.connect, config.connect_timeout) => connected,
    };
    match connected {
        Ok(stream) => Ok(Leg::new(name, stream)),
        Err(error) => {
            let error = match error {
                TransportError::Connect { error, .. } => error,
                other => io::Error::new(io::ErrorKind::TimedOut, timeout_message(&other)),
            };
            Err(End::Failed(Failure::connect(
                name,
                error,
                started.elapsed(),
            )))
        }
    }
}

fn timeout_message(error: &TransportError) -> String {
    match error {
        TransportError::ConnectTimeout { timeout, .. } => {
            format!("no answer within {}", Elapsed(*timeout))
        }
        other => other.to_string(),
    }
}
