//! The control link of one migration, the same on both hosts: it sends what the migration
//! queues (channel events, failures, cancel, done) plus a heartbeat every interval, and applies
//! what the peer sends. Silence for longer than the peer timeout, a broken socket, or an end of
//! stream before the migration has ended are failures of the peer link — or, where both
//! daemons agreed on resumable channels, an outage: the link gives its queue back to the
//! migration, and another connection takes over ([`rejoin`](super::migration)).

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::{Control, Op};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::attribution::os_message;
use super::migration::{Epoch, Link, Migration, Outbound, Role, State};
use super::peer::{ReadError, Timing, read_control, write_control};
use crate::human::{Elapsed, errno_name};
use crate::transport::Stream;

/// How often the progress of resumable channels is told while it changes: the peer keeps
/// what it sent until told, at most its retention, so the acknowledgements' delay caps the
/// throughput (16 MiB every 20 ms is 0.8 GiB/s, measured: half the pair's without them).
const PROGRESS_BUSY: Duration = Duration::from_millis(2);

/// How often it is looked at when nothing changed at the last look: what the peer
/// keeps for a replay is at most the bytes in flight plus this long's worth.
const PROGRESS_IDLE: Duration = Duration::from_millis(20);

/// After the migration has ended, how long to wait for the peer to close its side.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How a control link's run ended.
pub enum Over {
    /// Both sides closed it, or it failed the migration.
    Closed,
    /// It broke on a resumable migration: another may take over.
    Lost,
    /// The epoch paused and both sides parked the link (`Control::Parked`): quiet both ways,
    /// it carries the next epoch's hello.
    Parked(Stream),
}

/// Runs the control link until both sides have closed or parked it, or it breaks.
/// `version` is the protocol version the link speaks (negotiated in its hello).
pub async fn run(
    migration: Arc<Migration>,
    stream: Stream,
    link: Link,
    timing: Timing,
    version: u16,
) -> Over {
    let span = tracing::info_span!("control", migration = %migration.spec.id, epoch = link.epoch);
    serve(migration, stream, link, timing, version)
        .instrument(span)
        .await
}

async fn serve(
    migration: Arc<Migration>,
    stream: Stream,
    link: Link,
    timing: Timing,
    version: u16,
) -> Over {
    let reset_handle = stream.reset_handle();
    let (mut reader, writer) = tokio::io::split(stream);
    let Link {
        mut queue,
        epoch,
        stop,
        replaced,
        takes_over,
    } = link;
    // A link that takes over: the count of the epoch's frames the peer has received, which
    // its first frame says.
    let (told, peer_told) = tokio::sync::watch::channel(None);
    let catch_up = takes_over.then_some(CatchUp {
        told: peer_told,
        within: timing.peer_timeout,
    });
    let mut writer = Writer {
        half: writer,
        version,
        parks: parks(&migration, version),
    };
    // The first break of a resumable link: its cause.
    let lost = Lost::default();
    let sending = send(
        &migration,
        epoch,
        &mut writer,
        &mut queue,
        (timing.heartbeat_interval, catch_up),
        &lost,
    );
    let receiving = async {
        let reading = Reading {
            ended: &stop,
            peer_timeout: timing.peer_timeout,
            told: &told,
        };
        tokio::select! {
            parked = receive(&migration, epoch, reading, &mut reader, &lost) => parked,
            // Once the epoch has ended, give the peer a moment to close, then stop listening.
            () = async {
                stop.cancelled().await;
                tokio::time::sleep(linger(&migration, epoch, &timing)).await;
            } => false,
            () = lost.token.cancelled() => false,
        }
    };
    let taken_over = async {
        replaced.cancelled().await;
        let cause = "another connection took the control link over".to_owned();
        lost.broke(
            &migration,
            epoch,
            migration.peer_link_failure(Op::Read, None, cause),
        );
    };
    // Whether each side sent `Parked`: this one, then the peer.
    let parked = tokio::select! {
        parked = async { tokio::join!(sending, receiving) } => parked,
        () = async { taken_over.await; std::future::pending::<()>().await } => (false, false),
    };
    match lost.cause() {
        Some(cause) => {
            // Closed with a reset: a peer that has not found the link dead (it still hears
            // this side: a link blackholed one way) sees a break and takes over, where an
            // end of stream would pass for a clean close after the end.
            if let Some(handle) = &reset_handle {
                crate::transport::reset(handle);
            }
            migration.link_lost(epoch, cause, queue);
            Over::Lost
        }
        None if parked == (true, true) => {
            tracing::info!(migration = %migration.spec.id, "control link kept for the next epoch");
            Over::Parked(reader.unsplit(writer.half))
        }
        None => {
            if parked.0 {
                // The peer did not park: the link closes as it would have.
                let _ = writer.half.shutdown().await;
            }
            Over::Closed
        }
    }
}

/// Whether a link may be parked at a pause: a recoverable migration's, from version 2 on
/// (the next epoch's hello presents the credential).
fn parks(migration: &Migration, version: u16) -> bool {
    migration.spec.recoverable && version >= 2
}

/// How long a link listens for the peer to close once the epoch has ended: 2 s, or, on a
/// resumable link's source, long enough for a dead link to be found so. Silent for the
/// peer timeout, the link is found dead here; a destination that finds it dead first (it
/// no longer hears this side) closes it with a reset after its wait for an explanation.
/// Either way a link that takes over delivers the last frames, which the dead one may have
/// swallowed: otherwise the destination would fail at its resume timeout while this host
/// says the migration ended.
fn linger(migration: &Migration, epoch: Epoch, timing: &Timing) -> Duration {
    let dials = migration.spec.role == Role::Outgoing && migration.link_resumable(epoch);
    match dials {
        true => timing.peer_timeout + migration.explanation_grace() + CLOSE_LINGER,
        false => CLOSE_LINGER,
    }
}

/// A resumable link's break: the first cause, and the token that stops both halves.
#[derive(Default)]
struct Lost {
    token: tokio_util::sync::CancellationToken,
    cause: std::sync::Mutex<Option<migproxy_proto::Attribution>>,
}

impl Lost {
    /// The link broke with `blame`: an outage where the migration may go on without it, a
    /// failure (after the peer's explanation) otherwise.
    fn broke(&self, migration: &Arc<Migration>, epoch: Epoch, blame: migproxy_proto::Attribution) {
        if !migration.link_resumable(epoch) {
            migration.fail_or_wait(epoch, blame);
            return;
        }
        let mut cause = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        cause.get_or_insert(blame);
        self.token.cancel();
    }

    fn cause(&self) -> Option<migproxy_proto::Attribution> {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The link's writing half, the protocol version it speaks, and whether it may be parked.
struct Writer {
    half: WriteHalf<Stream>,
    version: u16,
    parks: bool,
}

/// A link that takes over: the peer's count of the epoch's frames, once its first frame
/// says it, within `within`.
struct CatchUp {
    told: tokio::sync::watch::Receiver<Option<u64>>,
    within: Duration,
}

/// Writes what the migration queues, and heartbeats and progress, until the epoch ends or the
/// link breaks; then closes the link, or parks it. Returns whether it sent `Parked`.
async fn send(
    migration: &Arc<Migration>,
    epoch: Epoch,
    writer: &mut Writer,
    queue: &mut mpsc::UnboundedReceiver<Outbound>,
    (heartbeat, catch_up): (Duration, Option<CatchUp>),
    lost: &Lost,
) -> bool {
    let mut tick = tokio::time::interval(heartbeat);
    // A deadline, not a sleep made anew each turn: other frames do not put it off.
    let mut progress = tokio::time::Instant::now() + PROGRESS_IDLE;
    let mut buf = Vec::new();
    // First what a link that broke may have lost: the resumable channels' progress, and
    // (once the peer said how many it has) the epoch's frames it missed.
    let mut controls = migration.resumable.relink();
    if let Some(catch_up) = catch_up {
        controls.insert(0, migration.resumable.sequence().tell(epoch));
        let written = write_all(writer, &controls, &mut buf).await;
        controls = match written {
            Ok(()) => match missed(migration, epoch, catch_up, lost).await {
                Some(missed) => missed,
                None => return false,
            },
            Err(error) => {
                write_failed(migration, epoch, &error, lost);
                return false;
            }
        };
    }
    loop {
        if let Err(error) = write_all(writer, &controls, &mut buf).await {
            write_failed(migration, epoch, &error, lost);
            return false;
        }
        controls = tokio::select! {
            // Lost: what is queued stays for the link that takes over.
            () = lost.token.cancelled() => return false,
            outbound = queue.recv() => match outbound {
                Some(Outbound::Frame(control)) => {
                    // Counted as sent once taken: the peer's count says if it arrived.
                    migration.resumable.sequence().sent(epoch, &control);
                    vec![control]
                }
                Some(Outbound::Close) | None => break,
            },
            _ = tick.tick() => vec![Control::Heartbeat],
            // Looked at every period, and at once when the peer hurries a channel.
            () = async {
                tokio::select! {
                    () = tokio::time::sleep_until(progress) => {}
                    () = migration.resumable.hurry_asked() => {}
                }
            }, if migration.resumable.on() => {
                let due = migration.resumable.due();
                let idle = due.is_empty() && !migration.resumable.awaited();
                let next = if idle { PROGRESS_IDLE } else { PROGRESS_BUSY };
                progress = tokio::time::Instant::now() + next;
                due
            }
        };
    }
    // Everything queued before the end has been written. Paused, the link is kept for the
    // next epoch if the peer keeps it too; otherwise a clean close.
    if writer.parks && migration.state() == State::Paused {
        return write_all(writer, &[Control::Parked], &mut buf)
            .await
            .is_ok();
    }
    let _ = writer.half.shutdown().await;
    false
}

/// The link broke on a write.
fn write_failed(migration: &Arc<Migration>, epoch: Epoch, error: &std::io::Error, lost: &Lost) {
    let blame = migration.peer_link_failure(
        Op::Write,
        errno_name(error),
        format!("control link: {}", os_message(error)),
    );
    lost.broke(migration, epoch, blame);
}

/// The epoch's frames the peer missed, once it has said how many it has; `None` if the link
/// broke first, or the peer said nothing within the peer timeout (the link is broken).
async fn missed(
    migration: &Arc<Migration>,
    epoch: Epoch,
    mut catch_up: CatchUp,
    lost: &Lost,
) -> Option<Vec<Control>> {
    let told = tokio::select! {
        () = lost.token.cancelled() => return None,
        told = tokio::time::timeout(catch_up.within, catch_up.told.wait_for(Option::is_some)) => told,
    };
    let Ok(Ok(frames)) = told.map(|told| told.map(|frames| frames.unwrap_or_default())) else {
        let message = format!(
            "control link: the peer daemon did not say what it received within {}",
            Elapsed(catch_up.within)
        );
        lost.broke(
            migration,
            epoch,
            migration.peer_link_failure(Op::Timeout, None, message),
        );
        return None;
    };
    let missed = migration.resumable.sequence().unreceived(epoch, frames);
    if !missed.is_empty() {
        tracing::info!(migration = %migration.spec.id, "control link: {} frames the broken link lost, sent again", missed.len());
    }
    Some(missed)
}

/// What the receiving half goes by.
struct Reading<'a> {
    /// Cancelled when the epoch ends.
    ended: &'a tokio_util::sync::CancellationToken,
    peer_timeout: Duration,
    /// Where the peer's count of the epoch's frames goes (a link that takes over).
    told: &'a tokio::sync::watch::Sender<Option<u64>>,
}

/// Applies what the peer sends until the link ends or breaks. Returns whether the peer parked
/// it once this host's epoch had ended.
async fn receive(
    migration: &Arc<Migration>,
    epoch: Epoch,
    reading: Reading<'_>,
    reader: &mut ReadHalf<Stream>,
    lost: &Lost,
) -> bool {
    let Reading {
        ended,
        peer_timeout,
        told,
    } = reading;
    let mut buf = Vec::new();
    loop {
        let read = tokio::time::timeout(peer_timeout, read_control(reader, &mut buf)).await;
        let silent = read.is_err();
        let blame = match read {
            Ok(Ok(Some(Control::Received { frames }))) => {
                told.send_replace(Some(frames));
                continue;
            }
            // Nothing of the epoch follows: the link is quiet this way.
            Ok(Ok(Some(Control::Parked))) if ended.is_cancelled() => return true,
            // Parked while this host's epoch runs: the peer has left it, as by a close.
            Ok(Ok(Some(Control::Parked))) if migration.link_closed(epoch) => return false,
            Ok(Ok(Some(Control::Parked))) => migration.peer_link_failure(
                Op::Protocol,
                None,
                "control link parked by the peer daemon while the epoch ran".to_owned(),
            ),
            Ok(Ok(Some(control))) => {
                migration.resumable.sequence().received(epoch, &control);
                migration.on_control(epoch, control);
                continue;
            }
            Ok(Ok(None)) if ended.is_cancelled() => return false,
            // However the link ends, it ends a cancel this host asked the source for; a
            // resumable link only by its end of stream: a break may be taken over, and the
            // cancel it swallowed sent again.
            Ok(Ok(None)) if migration.link_closed(epoch) => return false,
            _ if !migration.resumable.on() && migration.link_closed(epoch) => return false,
            Ok(Ok(None)) => migration.peer_link_failure(
                Op::Read,
                None,
                "control link closed by the peer daemon".to_owned(),
            ),
            Ok(Err(ReadError::Io(error))) => migration.peer_link_failure(
                Op::Read,
                errno_name(&error),
                format!("control link: {}", os_message(&error)),
            ),
            Ok(Err(ReadError::Decode(error))) => {
                migration.peer_link_failure(Op::Protocol, None, format!("control link: {error}"))
            }
            Err(_) => migration.peer_link_failure(
                Op::Timeout,
                None,
                format!(
                    "nothing heard from the peer daemon for {}",
                    Elapsed(peer_timeout)
                ),
            ),
        };
        // Ignored if the epoch has ended meanwhile.
        lost.broke(migration, epoch, blame);
        if silent && !lost.token.is_cancelled() {
            // Silence may be this host's own doing (a daemon frozen while the peer failed it):
            // the peer's explanation may already wait in the socket buffer. Read what is there
            // while the failure waits for an explanation, so both hosts tell the peer's story.
            drain(migration, epoch, reader, &mut buf).await;
        }
        return false;
    }
}

/// Applies the frames that arrive within the explanation grace, then gives up the link.
async fn drain(
    migration: &Arc<Migration>,
    epoch: Epoch,
    reader: &mut ReadHalf<Stream>,
    buf: &mut Vec<u8>,
) {
    // As long as a failure waits for an explanation.
    let until = tokio::time::Instant::now() + migration.explanation_grace();
    while let Ok(Ok(Some(control))) =
        tokio::time::timeout_at(until, read_control(reader, buf)).await
    {
        migration.resumable.sequence().received(epoch, &control);
        migration.on_control(epoch, control);
    }
}

async fn write_all(
    writer: &mut Writer,
    controls: &[Control],
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    for control in controls {
        write_control(&mut writer.half, writer.version, control, buf).await?;
    }
    Ok(())
}
