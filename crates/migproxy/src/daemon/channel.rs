//! One migration channel on one host: a relay between the local QEMU and the peer link,
//! reported to the migration when it ends.

use std::sync::Arc;

use std::sync::Mutex;

use tracing::Instrument;

pub mod resumable;

use super::migration::state::ReturnPath as Verdict;
use super::migration::{Admitted, Migration};
use super::returnpath::ReturnPath;
use crate::relay::{End, Leg, Options, Relay, Report, TapFn};

/// Relays channel `index` from `source` to `destination` until it ends or its epoch does.
/// One of the legs faces the local QEMU; its name is `qemu_leg`, so that a failure can be
/// attributed.
pub async fn run(
    migration: Arc<Migration>,
    index: u32,
    admitted: Admitted,
    source: Leg,
    destination: Leg,
    qemu_leg: String,
) {
    let span = tracing::info_span!("channel", migration = %migration.spec.id, channel = index);
    relay(migration, index, admitted, source, destination, qemu_leg)
        .instrument(span)
        .await;
}

async fn relay(
    migration: Arc<Migration>,
    index: u32,
    admitted: Admitted,
    source: Leg,
    destination: Leg,
    qemu_leg: String,
) {
    // Both hosts watch the main channel's return path (the same bytes on each): the
    // destination QEMU's `SHUT` tells a finished migration from one that stopped (postcopy
    // paused, a source QEMU cancelled or killed), where the bytes alone end cleanly alike.
    let return_path = admitted
        .main
        .then(|| Arc::new(Mutex::new(ReturnPath::default())));
    let mut options = Options::default();
    if let Some(parser) = &return_path {
        let parser = Arc::clone(parser);
        options.tap_to_source = Some(TapFn(Arc::new(move |bytes| {
            parser.lock().unwrap_or_else(|p| p.into_inner()).feed(bytes);
        })));
    }
    let relay = Relay::new(source, destination)
        .with_options(options)
        .with_cancel(admitted.stop.child_token());
    migration.channel_running(index, relay.counters());
    tracing::debug!(migration = %migration.spec.id, channel = index, "channel open");
    let report = relay.run().await;
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

/// Reports how channel `index` ended (relayed or resumable), with what its return path
/// said.
async fn finish(
    migration: &Arc<Migration>,
    index: u32,
    admitted: &Admitted,
    mut report: Report,
    qemu_leg: &str,
    return_path: Option<&Mutex<ReturnPath>>,
) {
    tracing::info!(migration = %migration.spec.id, channel = index, "channel {report}");
    if closed_by_a_finished_qemu(migration, &report, qemu_leg, admitted).await {
        tracing::info!(
            migration = %migration.spec.id,
            channel = index,
            "QEMU completed: its leg's end was its own closing, not a failure"
        );
        report.end = End::Completed;
    }
    let verdict = match return_path {
        Some(parser) if report.is_completed() => {
            let parser = parser.lock().unwrap_or_else(|p| p.into_inner());
            // A parser that lost the thread concludes nothing.
            match (parser.in_sync(), parser.shut(), report.bytes.to_source) {
                (false, _, _) => Verdict::Unknown,
                (true, Some(status), _) => Verdict::Shut(status),
                (true, None, 0) => Verdict::Silent,
                (true, None, _) => Verdict::Unfinished,
            }
        }
        _ => Verdict::NotWatched,
    };
    migration.channel_ended(index, admitted.epoch, &report, qemu_leg, verdict);
}

/// QEMU 7.2's destination may close a multifd socket with bytes still unread as it
/// completes, which resets this daemon's end of it (`ECONNRESET`) while every byte has been
/// delivered. A failure on the local QEMU's leg therefore gives way to that QEMU's own
/// `completed`, said within the explanation grace; the counts are still compared with the
/// peer's before the migration is `completed`. Without QMP there is no such word: the
/// failure stands.
async fn closed_by_a_finished_qemu(
    migration: &Migration,
    report: &Report,
    qemu_leg: &str,
    admitted: &Admitted,
) -> bool {
    let End::Failed(failure) = &report.end else {
        return false;
    };
    failure.leg == qemu_leg
        && failure.direction.is_some()
        && migration.qemu_completes(&admitted.stop).await
}

#[cfg(test)]
mod tests;
