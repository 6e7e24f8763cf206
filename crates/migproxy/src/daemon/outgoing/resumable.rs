//! The source's side of resumable channels: the first data connection as dialled with the
//! channel, then, after each break, a new one that re-admits it (`FLAG_RESUME`, with the
//! epoch's credential); and the control link, dialled again to take over when it breaks.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use migproxy_proto::{FLAG_ENDED, FLAG_RESUME, Hello, Kind, Op, Status};

use super::super::Daemon;
use super::super::channel::resumable::{self as channel, Ends, Redial};
use super::super::migration::{Admitted, Epoch, Link, Migration, State};
use super::super::peer::{Dialled, PeerError};
use super::super::{control, last_frames};
use super::dial::{dial_again, hello};
use crate::human::Chain;
use crate::transport::Stream;

/// Carries QEMU's connection `index` as a resumable channel; `hello` is the one its first
/// data connection was dialled with.
pub async fn carry(
    daemon: Arc<Daemon>,
    migration: Arc<Migration>,
    (index, admitted): (u32, Admitted),
    hello: Hello,
    qemu: (Stream, String),
    first: Stream,
) {
    let registration = migration.resumable.register(index, false);
    let connection = registration.connection;
    let again = Hello {
        flags: hello.flags | FLAG_RESUME,
        ..hello
    };
    let dialler = Arc::clone(&migration);
    let dial = move || {
        let (daemon, migration, hello) = (Arc::clone(&daemon), Arc::clone(&dialler), again.clone());
        async move {
            // A refusal that says the migration was cancelled there has cancelled it here
            // (`dial_again`): the cancel stops the channel, whose refusal then fails nothing.
            let dialled = dial_again(&daemon, &migration, &hello).await;
            dialled.map(|dialled| dialled.stream).map_err(as_io)
        }
    };
    let link = Redial {
        first: Some(first),
        dial,
        connection,
    };
    let peer = format!("tcp:{}", migration.spec.peer);
    let ends = Ends {
        qemu,
        peer: (link, peer),
        sides: registration.sides,
    };
    channel::run(migration, index, admitted, ends).await;
}

/// A dial's failure as the engine takes it: the peer's refusal is final (`PermissionDenied`:
/// it holds nothing to resume), except when it is only busy; everything else is tried again.
fn as_io(error: PeerError) -> io::Error {
    let kind = match &error {
        PeerError::Refused {
            status: Status::Busy,
            ..
        } => io::ErrorKind::ConnectionRefused,
        PeerError::Refused { .. } => io::ErrorKind::PermissionDenied,
        other => other
            .os_error()
            .map_or(io::ErrorKind::TimedOut, io::Error::kind),
    };
    io::Error::new(kind, Chain(&error).to_string())
}

/// Runs the control link, and, each time it is lost (a resumable migration's link broke),
/// dials another that takes over, until the migration ends or the resume timeout fails it.
/// A link parked at a pause is kept for the redial task, which starts the next epoch on it.
pub async fn control_link(
    daemon: Arc<Daemon>,
    migration: Arc<Migration>,
    stream: Stream,
    link: Link,
    version: u16,
) {
    let (mut stream, mut link, mut version) = (stream, link, version);
    loop {
        let timing = daemon.config.timing.clone();
        let epoch = (link.epoch, link.stop.clone());
        let run = control::run(Arc::clone(&migration), stream, link, timing, version);
        match run.await {
            control::Over::Lost => {}
            control::Over::Parked(stream) => return keep(&migration, stream),
            control::Over::Closed => return,
        }
        match take_over(&daemon, &migration, epoch).await {
            Some((again, taken, spoken)) => (stream, link, version) = (again, taken, spoken),
            None => return,
        }
    }
}

/// Leaves a link parked at a pause for the redial task. Looked at again once left: a link
/// dialled meanwhile that attached, or the migration's end (after which the redial task no
/// longer takes it), closes it rather than leave it in the slot.
fn keep(migration: &Migration, stream: Stream) {
    // One displaced (of an epoch that paused before it was used) closes.
    drop(migration.parked.put(stream));
    if migration.is_stopped() || migration.state() != State::Paused {
        drop(migration.parked.try_take());
    }
}

/// Dials, with backoff, a control link that takes over from the broken one: the first try
/// at once, then every 50 ms growing to 2 s. `None` once the migration ended, or the
/// destination refused (it holds nothing to go on with: it restarted, or the migration
/// ended there), which fails the migration at once. A migration that ended meanwhile (a
/// cancel, a failure) still has its last frames delivered, if a link comes within the
/// destination's wait for one ([`last_frames_grace`]):
/// the destination would otherwise learn of it only at its resume timeout.
async fn take_over(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    (epoch, epoch_stop): (Epoch, tokio_util::sync::CancellationToken),
) -> Option<(Stream, Link, u16)> {
    // The epoch's credential, taken now: an epoch that ends forgets it.
    let hello = takeover_hello(migration);
    let mut pause = Duration::ZERO;
    let mut ended: Option<tokio::time::Instant> = None;
    let mut plain = false;
    let mut tried_at = tokio::time::Instant::now();
    loop {
        if ended.is_none() && migration.is_stopped() {
            ended = Some(tokio::time::Instant::now());
        }
        // The epoch ended with the migration going on (paused past the resume timeout): its
        // recovery dials, with the next epoch's credential.
        // (The state, read under the migration's lock, tells that from an end.)
        if ended.is_none() && epoch_stop.is_cancelled() && !migration.state().is_final() {
            return None;
        }
        if ended.is_some_and(|at| at.elapsed() >= last_frames_grace(daemon, migration)) {
            return None;
        }
        tokio::select! {
            () = migration.stopped(), if ended.is_none() => continue,
            // The pause counts from the last try's start: one that waited (its connect
            // timed out, the network down) has waited enough.
            () = tokio::time::sleep(pause.saturating_sub(tried_at.elapsed())) => {}
        }
        tried_at = tokio::time::Instant::now();
        pause = (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
        migration
            .resumable
            .link_attempts
            .fetch_add(1, Ordering::Relaxed);
        // Ended: the link only carries the last frames, which a destination that has ended
        // too takes rather than refuse (one of an older build refuses the flag).
        let last = ended.is_some() && !plain;
        let this = Hello {
            flags: hello.flags | if last { FLAG_ENDED } else { 0 },
            ..hello.clone()
        };
        let refusal = match dial_again(daemon, migration, &this).await {
            Ok(dialled) => return rejoin_or_deliver(migration, dialled).await,
            Err(error) => match after(migration, (ended.is_some(), last), error) {
                After::Again => continue,
                After::Soon => {
                    pause = Duration::from_millis(20);
                    continue;
                }
                After::Plain => {
                    plain = true;
                    continue;
                }
                After::Stop => return None,
                After::Fail(refusal) => refusal,
            },
        };
        let message = format!(
            "the destination refused the control link's return: {}",
            Chain(&refusal)
        );
        let blame = migration.peer_link_failure(Op::Handshake, None, message);
        migration.fail(epoch, blame);
        return None;
    }
}

/// A link that takes over, or (the migration having ended) one that carries its last
/// frames.
async fn rejoin_or_deliver(
    migration: &Arc<Migration>,
    dialled: Dialled,
) -> Option<(Stream, Link, u16)> {
    match migration.rejoin() {
        Ok(link) => Some((dialled.stream, link, dialled.version)),
        Err(_) => {
            let hear = dialled.message == last_frames::ENDED;
            last_frames::exchange(migration, dialled.stream, dialled.version, hear).await;
            None
        }
    }
}

/// What a failed dial for a link that takes over leads to.
enum After {
    /// Dial again at the next pause.
    Again,
    /// Dial again soon: the destination was busy.
    Soon,
    /// Dial again without `FLAG_ENDED`, which an older destination refuses as malformed.
    Plain,
    Stop,
    /// The destination refused it: the migration fails.
    Fail(PeerError),
}

/// `ended`: the migration has ended here; `last`: the dial carried `FLAG_ENDED`.
fn after(migration: &Migration, (ended, last): (bool, bool), error: PeerError) -> After {
    let PeerError::Refused { status, .. } = &error else {
        if !ended {
            tracing::debug!(migration = %migration.spec.id, error = %Chain(&error), "the control link is not back yet");
        }
        return After::Again;
    };
    match status {
        Status::Busy => After::Soon,
        Status::Malformed if last => After::Plain,
        // Ended here, and refused there: nothing to deliver to (it has ended too).
        _ if ended => After::Stop,
        // Cancelled there while the link was down: cancelled here too (`dial_again`).
        Status::Cancelled => After::Stop,
        // Ended here while the dial was under way: the next one carries the last frames.
        _ if migration.is_stopped() => After::Again,
        _ => After::Fail(error),
    }
}

/// How long a migration that ended while its control link was down keeps trying to
/// deliver its last frames: as long as a destination with the same settings waits for a
/// link, so that it learns how the migration ended here rather than failing at its
/// deadline. It waits its resume timeout and twice its wait for an explanation, counted
/// from when it found the link dead, which may be a peer timeout after this host did; at
/// least [`LAST_FRAMES_LEAST`].
fn last_frames_grace(daemon: &Daemon, migration: &Migration) -> Duration {
    let resume = migration.spec.resume_timeout.unwrap_or_default();
    let waits = resume + daemon.config.timing.peer_timeout + migration.explanation_grace() * 2;
    waits.max(LAST_FRAMES_LEAST)
}

const LAST_FRAMES_LEAST: Duration = Duration::from_secs(5);

/// The hello of a control link that takes over: the epoch's credential in place of the
/// spent one-time token, and `FLAG_RESUME`.
fn takeover_hello(migration: &Migration) -> Hello {
    let control = hello(migration, Kind::Control, migration.channels_seen());
    Hello {
        // The epoch's credential, even once the migration has ended (and forgotten it):
        // its last frames may still need a link.
        token: *migration
            .resumable
            .credential()
            .unwrap_or_else(|| migration.data_credential())
            .bytes(),
        flags: control.flags | FLAG_RESUME,
        ..control
    }
}
