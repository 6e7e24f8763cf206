//! The control link of one migration, the same on both hosts: it sends what the migration
//! queues (channel events, failures, cancel, done) plus a heartbeat every interval, and applies
//! what the peer sends. Silence for longer than the peer timeout, a broken socket, or an end of
//! stream before the migration has ended are failures of the peer link.

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::{Control, Op};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::attribution::os_message;
use super::migration::{Epoch, Link, Migration, Outbound};
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

/// Runs the control link until both sides have closed it or it breaks.
/// `version` is the protocol version the link speaks (negotiated in its hello).
pub async fn run(
    migration: Arc<Migration>,
    stream: Stream,
    link: Link,
    timing: Timing,
    version: u16,
) {
    let span = tracing::info_span!("control", migration = %migration.spec.id, epoch = link.epoch);
    serve(migration, stream, link, timing, version)
        .instrument(span)
        .await;
}

async fn serve(
    migration: Arc<Migration>,
    stream: Stream,
    link: Link,
    timing: Timing,
    version: u16,
) {
    let (reader, writer) = tokio::io::split(stream);
    let Link { queue, epoch, stop } = link;
    let writer = Writer {
        half: writer,
        version,
    };
    let sending = send(&migration, epoch, writer, queue, timing.heartbeat_interval);
    let receiving = async {
        tokio::select! {
            () = receive(&migration, epoch, &stop, reader, timing.peer_timeout) => {}
            // Once the epoch has ended, give the peer a moment to close, then stop listening.
            () = async {
                stop.cancelled().await;
                tokio::time::sleep(CLOSE_LINGER).await;
            } => {}
        }
    };
    tokio::join!(sending, receiving);
}

/// The link's writing half and the protocol version it speaks.
struct Writer {
    half: WriteHalf<Stream>,
    version: u16,
}

async fn send(
    migration: &Arc<Migration>,
    epoch: Epoch,
    mut writer: Writer,
    mut queue: mpsc::UnboundedReceiver<Outbound>,
    heartbeat: Duration,
) {
    let mut tick = tokio::time::interval(heartbeat);
    // A deadline, not a sleep made anew each turn: other frames do not put it off.
    let mut progress = tokio::time::Instant::now() + PROGRESS_IDLE;
    let mut buf = Vec::new();
    loop {
        let controls = tokio::select! {
            outbound = queue.recv() => match outbound {
                Some(Outbound::Frame(control)) => vec![control],
                Some(Outbound::Close) | None => break,
            },
            _ = tick.tick() => vec![Control::Heartbeat],
            () = tokio::time::sleep_until(progress), if migration.resumable.on() => {
                let due = migration.resumable.due();
                let next = if due.is_empty() { PROGRESS_IDLE } else { PROGRESS_BUSY };
                progress = tokio::time::Instant::now() + next;
                due
            }
        };
        if let Err(error) = write_all(&mut writer, &controls, &mut buf).await {
            let blame = migration.peer_link_failure(
                Op::Write,
                errno_name(&error),
                format!("control link: {}", os_message(&error)),
            );
            migration.fail_or_wait(epoch, blame);
            return;
        }
    }
    // Everything queued before the end has been written: a clean close.
    let _ = writer.half.shutdown().await;
}

async fn receive(
    migration: &Arc<Migration>,
    epoch: Epoch,
    ended: &tokio_util::sync::CancellationToken,
    mut reader: ReadHalf<Stream>,
    peer_timeout: Duration,
) {
    let mut buf = Vec::new();
    loop {
        let read = tokio::time::timeout(peer_timeout, read_control(&mut reader, &mut buf)).await;
        let silent = read.is_err();
        let blame = match read {
            Ok(Ok(Some(control))) => {
                migration.on_control(epoch, control);
                continue;
            }
            Ok(Ok(None)) if ended.is_cancelled() => return,
            // However the link ends, it ends a cancel this host asked the source for.
            _ if migration.link_closed(epoch) => return,
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
        migration.fail_or_wait(epoch, blame);
        if silent {
            // Silence may be this host's own doing (a daemon frozen while the peer failed it):
            // the peer's explanation may already wait in the socket buffer. Read what is there
            // while the failure waits for an explanation, so both hosts tell the peer's story.
            drain(migration, epoch, &mut reader, &mut buf).await;
        }
        return;
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
