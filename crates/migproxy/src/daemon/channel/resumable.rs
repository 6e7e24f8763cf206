//! A resumable channel on one host: the local QEMU carried to the peer by the resume engine
//! ([`relay::resume`](crate::relay::resume)) instead of the relay, reported to the migration
//! as a relay's channel is (the same counters, the same return-path verdict, a failure
//! named by leg and direction), with each outage logged and, on the destination, told to
//! the source.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::Instrument;

use super::super::migration::{Admitted, Migration, Role};
use super::super::returnpath::ReturnPath;
use super::finish;
use crate::relay::resume::{self, Hurry, Observe, Outage, PeerLink, ResumeError, Sides};
use crate::relay::{ByteCounts, Counters, Direction, End, Failure, Op, Report, TapFn};
use crate::transport::Stream;

/// The two ends of one resumable channel on this host.
pub struct Ends<L> {
    /// The local QEMU's connection, and its name (its endpoint).
    pub qemu: (Stream, String),
    /// The peer's connections, and the peer's name (`tcp:HOST:PORT`).
    pub peer: (L, String),
    /// Its progress and break signal, from the migration's registry.
    pub sides: Sides,
}

/// Carries channel `index` until it ends or its epoch does, resuming across broken peer
/// connections for up to the migration's resume timeout.
pub async fn run<L: PeerLink>(
    migration: Arc<Migration>,
    index: u32,
    admitted: Admitted,
    ends: Ends<L>,
) {
    let span = tracing::info_span!("channel", migration = %migration.spec.id, channel = index);
    carry(migration, index, admitted, ends)
        .instrument(span)
        .await;
}

/// Asks the peer, on the control link, for channel `index`'s progress at once.
fn hurry(migration: &Arc<Migration>, index: u32) -> Hurry {
    let migration = Arc::downgrade(migration);
    Hurry(Arc::new(move || {
        if let Some(migration) = migration.upgrade() {
            migration.send_peer(migproxy_proto::Control::Hurry { channel: index });
        }
    }))
}

async fn carry<L: PeerLink>(
    migration: Arc<Migration>,
    index: u32,
    admitted: Admitted,
    ends: Ends<L>,
) {
    let Ends {
        qemu,
        peer,
        mut sides,
    } = ends;
    sides.hurry = Some(hurry(&migration, index));
    let (qemu, qemu_leg) = qemu;
    let (link, peer_leg) = peer;
    let return_path = admitted
        .main
        .then(|| Arc::new(Mutex::new(ReturnPath::default())));
    let (outages, told) = mpsc::unbounded_channel();
    let observe = Observe {
        counters: Arc::new(Counters::new()),
        up: match migration.spec.role {
            Role::Outgoing => Direction::ToDestination,
            Role::Incoming => Direction::ToSource,
        },
        tap_to_source: return_path.as_ref().map(|parser| {
            let parser = Arc::clone(parser);
            TapFn(Arc::new(move |bytes: &[u8]| {
                parser.lock().unwrap_or_else(|p| p.into_inner()).feed(bytes);
            }))
        }),
        outages: Some(outages),
    };
    let counters = Arc::clone(&observe.counters);
    // The destination waits a little longer than the source, which dials: past the deadline
    // the source's failure, which names its attempts, reaches it first, and both hosts tell
    // that story.
    let mut resume_timeout = migration.spec.resume_timeout.unwrap_or_default();
    if migration.spec.role == Role::Incoming {
        resume_timeout = resume_timeout.saturating_add(migration.explanation_grace() * 2);
    }
    let options = resume::Options {
        resume_timeout,
        observe,
        ..resume::Options::default()
    };
    migration.channel_running(index, Arc::clone(&counters));
    migration.spawn(follow_outages(Arc::clone(&migration), index, told));
    let cancel = admitted.stop.child_token();
    let carried = resume::carry(qemu, link, sides, options, cancel).await;
    if let Some(last) = migration.resumable.forget(index) {
        migration.send_peer(last);
    }
    // An outage the channel ended in is over: the state may read `active` again.
    migration.resuming_changed();
    let names = Names {
        qemu: qemu_leg.clone(),
        peer: peer_leg,
        role: migration.spec.role,
    };
    let report = report(&names, &counters, carried);
    finish(
        &migration,
        index,
        &admitted,
        report,
        &qemu_leg,
        return_path.as_deref(),
    )
    .await;
}

/// Hands each outage of channel `index` to the migration as its engine tells it.
async fn follow_outages(
    migration: Arc<Migration>,
    index: u32,
    mut told: mpsc::UnboundedReceiver<Outage>,
) {
    while let Some(outage) = told.recv().await {
        migration.outage(index, outage);
    }
}

/// Which leg is which on this host.
struct Names {
    qemu: String,
    peer: String,
    role: Role,
}

/// What the engine carried, as a relay's report (with the legs in a relay's order).
fn report(
    names: &Names,
    counters: &Counters,
    carried: Result<resume::Report, ResumeError>,
) -> Report {
    let bytes = counters.bytes();
    let elapsed = counters.elapsed();
    let end = match carried {
        Ok(_) => End::Completed,
        Err(ResumeError::Cancelled) => End::Cancelled,
        Err(error) => End::Failed(failure(names, error, bytes, elapsed)),
    };
    let (source, destination) = match names.role {
        Role::Outgoing => (names.qemu.clone(), names.peer.clone()),
        Role::Incoming => (names.peer.clone(), names.qemu.clone()),
    };
    Report {
        source,
        destination,
        end,
        bytes,
        spliced: ByteCounts::default(),
        elapsed,
        first_end: counters.first_end(),
    }
}

/// Why the engine gave up, as a relay's failure: on the QEMU leg (its read or write), or on
/// the peer leg (no connection within the resume timeout, or offsets that cannot be true).
fn failure(
    names: &Names,
    error: ResumeError,
    bytes: ByteCounts,
    elapsed: std::time::Duration,
) -> Failure {
    let (up, down) = match names.role {
        Role::Outgoing => (Direction::ToDestination, Direction::ToSource),
        Role::Incoming => (Direction::ToSource, Direction::ToDestination),
    };
    let message = error.to_string();
    let (leg, direction, op, error) = match error {
        ResumeError::Local { op: "read", error } => (&names.qemu, Some(up), Op::Read, error),
        ResumeError::Local { op, error } => {
            let op = if op == "write" {
                Op::Write
            } else {
                Op::Shutdown
            };
            (&names.qemu, Some(down), op, error)
        }
        ResumeError::Retention { error, .. } => {
            // This host's own pipes or memory: on the QEMU leg's side of the link, as a
            // relay's failed splice set-up is, and no connection mends it.
            let message = format!("{message}: {error}");
            let error = io::Error::new(
                error.kind(),
                Explained {
                    message,
                    cause: error,
                },
            );
            (&names.qemu, Some(up), Op::Splice, error)
        }
        ResumeError::Timeout { cause, last, .. } => {
            // The message says it all; the first cause stays beneath it, for its errno.
            let cause = cause.unwrap_or(last);
            let error = io::Error::new(cause.kind(), Explained { message, cause });
            (&names.peer, None, Op::Connect, error)
        }
        ResumeError::Refused(error) => {
            let error = io::Error::new(error.kind(), message);
            (&names.peer, None, Op::Connect, error)
        }
        ResumeError::Offsets(_) | ResumeError::BeyondEnd { .. } | ResumeError::Cancelled => {
            let error = io::Error::new(io::ErrorKind::InvalidData, message);
            (&names.peer, Some(down), Op::Read, error)
        }
    };
    Failure {
        leg: leg.clone(),
        direction,
        op,
        error: Arc::new(error),
        bytes,
        undelivered: 0,
        elapsed,
    }
}

/// A message that says more than the OS error beneath it (kept as its source).
#[derive(Debug)]
struct Explained {
    message: String,
    cause: io::Error,
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Explained {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// The dialling side's connections: the first as dialled with the channel, then each a
/// new dial that re-admits the channel.
pub struct Redial<F> {
    pub first: Option<Stream>,
    pub dial: F,
    /// Counts the connections dialled: the first is 1.
    pub connection: Arc<AtomicU32>,
}

impl<F, D> PeerLink for Redial<F>
where
    F: FnMut() -> D + Send,
    D: Future<Output = io::Result<Stream>> + Send,
{
    async fn connect(&mut self) -> io::Result<Stream> {
        match self.first.take() {
            Some(first) => Ok(first),
            None => {
                let before = self.connection.load(Ordering::Relaxed);
                let stream = (self.dial)().await?;
                // Admitted: the destination counts it too. A `Broken` that raised the count
                // meanwhile named this very connection (the destination took it and found
                // it broken): the count stays, rather than going one past the destination's.
                self.connection.fetch_max(before + 1, Ordering::Relaxed);
                Ok(stream)
            }
        }
    }

    fn connection(&self) -> u32 {
        self.connection.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use migproxy_proto::{Host, Leg};

    use super::*;
    use crate::daemon::attribution;

    fn names() -> Names {
        Names {
            qemu: "unix:/run/migproxy/m.sock".into(),
            peer: "tcp:192.0.2.1:4444".into(),
            role: Role::Outgoing,
        }
    }

    /// The attribution the source reports for `error` on channel 0.
    fn blamed(error: ResumeError) -> migproxy_proto::Attribution {
        let names = names();
        let failure = failure(&names, error, ByteCounts::default(), Duration::ZERO);
        attribution::of_relay(Host::Source, 0, &failure, &names.qemu)
    }

    #[test]
    fn a_failed_retention_is_this_hosts_not_qemus_read_or_the_peers() {
        let error = io::Error::from_raw_os_error(libc::ENOMEM);
        let blame = blamed(ResumeError::Retention { op: "tee", error });
        assert_eq!(
            (blame.leg, blame.op),
            (Leg::Qemu, migproxy_proto::Op::Splice)
        );
        assert_eq!(blame.errno.as_deref(), Some("ENOMEM"));
        assert!(
            blame.message.contains("this host's retention") && blame.message.contains("tee"),
            "{}",
            blame.message
        );
    }

    #[test]
    fn a_failed_read_of_qemu_stays_qemus() {
        let error = io::Error::from_raw_os_error(libc::ECONNRESET);
        let blame = blamed(ResumeError::Local { op: "read", error });
        assert_eq!((blame.leg, blame.op), (Leg::Qemu, migproxy_proto::Op::Read));
        assert_eq!(blame.errno.as_deref(), Some("ECONNRESET"));
    }
}
