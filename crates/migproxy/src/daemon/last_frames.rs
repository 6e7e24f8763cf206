//! The last frames of a resumable migration that ended on a host while its control link was
//! down: a link that comes back carries them, and then closes. The same on both hosts.
//!
//! ```text
//!  source (ended: cancelled)                       destination (running, or ended too)
//!    │ ── hello{FLAG_RESUME | FLAG_ENDED, credential} ──────────────► │
//!    │ ◄──────────────────── Ok ("" running: a takeover, as any;     │
//!    │                           " ended": it ended too, last frames  │
//!    │                           both ways, once)                     │
//!    │ ── Received{frames: 9} ──────►   ◄────── Received{frames: 4} ── │
//!    │ ── what it has not had, then what was queued (Cancel) ──────► │
//!    │ ◄──────── (ended too) what it queued for the source (GaveUp) ─ │
//!    │ ── FIN ──►                                          ◄── FIN ── │
//! ```
//!
//! A destination still running takes the link over as any other, and the source's frames
//! end it there as they would have on the old link. One that had ended too (it failed at
//! its resume timeout while the source was cancelled, or the other way round) changes
//! nothing of its own verdict — each host's state is what it knew when it ended — but
//! both record the other's word ([`Migration::heard_late`]): both hosts tell one story.

use std::time::Duration;

use migproxy_proto::Control;
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::migration::{Migration, Outbound};
use super::peer::{read_control, write_control};
use crate::transport::Stream;

/// How long the peer may take to say what it received, and then to send its last frames
/// and close.
const PEER_WAIT: Duration = Duration::from_secs(5);

/// The acceptance's message on a link that carries only last frames: the destination's
/// migration has ended too.
pub const ENDED: &str = " ended";

/// Sends the epoch's frames the peer has not had and what the migration queued for it
/// (its end), once the peer has said how many it has; reads what the peer sends until it
/// closes. `hear`: the peer has ended too, and its end, if it says it, is recorded. Bounded
/// as a whole: a peer that stops reading holds the task no longer than that.
pub async fn exchange(migration: &Migration, stream: Stream, version: u16, hear: bool) {
    let exchanged = frames(migration, stream, version, hear);
    if tokio::time::timeout(PEER_WAIT * 3, exchanged)
        .await
        .is_err()
    {
        tracing::info!(migration = %migration.spec.id, "the peer took too long over the last frames: link closed");
    }
}

async fn frames(migration: &Migration, stream: Stream, version: u16, hear: bool) {
    let mut queue = migration.left_queued();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = Vec::new();
    let epoch = migration.epoch();
    let tell = migration.resumable.sequence().tell(epoch);
    if write_control(&mut writer, version, &tell, &mut buf)
        .await
        .is_err()
    {
        return;
    }
    let mut heard = Heard::default();
    let Some(frames) = peer_count(&mut reader, &mut heard).await else {
        return;
    };
    let mut last = migration.resumable.sequence().unreceived(epoch, frames);
    while let Some(Ok(Outbound::Frame(control))) = queue.as_mut().map(|q| q.try_recv()) {
        last.push(control);
    }
    for control in &last {
        if write_control(&mut writer, version, control, &mut buf)
            .await
            .is_err()
        {
            return;
        }
    }
    tracing::info!(migration = %migration.spec.id, frames = last.len(), "the control link is back after the end: its last frames were delivered");
    let _ = writer.shutdown().await;
    // Read what the peer still sends until it closes: its last frames, if it ended too;
    // closing with unread bytes would reset the link under ours.
    let drained = async {
        while let Ok(Some(control)) = read_control(&mut reader, &mut buf).await {
            heard.frame(control);
        }
    };
    let _ = tokio::time::timeout(PEER_WAIT, drained).await;
    if let Some(end) = heard.end.filter(|_| hear) {
        migration.heard_late(&end);
    }
}

/// The peer's end among the frames it sent ([`Migration::end_said`]): the last of them
/// wins.
#[derive(Default)]
struct Heard {
    end: Option<Control>,
}

impl Heard {
    fn frame(&mut self, control: Control) {
        if Migration::end_said(&control).is_some() {
            self.end = Some(control);
        }
    }
}

/// The peer's count of the epoch's frames: its first sequenced word on a link that takes
/// over (progress and heartbeats may come before it).
async fn peer_count(reader: &mut (impl AsyncRead + Unpin), heard: &mut Heard) -> Option<u64> {
    let mut buf = Vec::new();
    let count = async {
        loop {
            match read_control(reader, &mut buf).await {
                Ok(Some(Control::Received { frames })) => return Some(frames),
                Ok(Some(control)) => heard.frame(control),
                Ok(None) | Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(PEER_WAIT, count).await.ok().flatten()
}
