//! One migration channel on one host: a relay between the local QEMU and the peer link,
//! reported to the migration when it ends.

use std::sync::Arc;

use std::sync::Mutex;

use tracing::Instrument;

use super::migration::{Admitted, Migration, Role};
use super::returnpath::ReturnPath;
use crate::relay::{Leg, Options, Relay, TapFn};

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
    // The source host watches the main channel's return path of a recoverable migration, to
    // tell a finished postcopy migration from a paused one.
    let watch =
        migration.spec.recoverable && admitted.main && migration.spec.role == Role::Outgoing;
    let return_path = watch.then(|| Arc::new(Mutex::new(ReturnPath::default())));
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
    tracing::info!(migration = %migration.spec.id, channel = index, "channel {report}");
    let shut = return_path.map(|parser| {
        let parser = parser.lock().unwrap_or_else(|p| p.into_inner());
        // A parser that lost the thread concludes nothing: take the end as QEMU's word.
        if parser.in_sync() {
            parser.shut()
        } else {
            Some(0)
        }
    });
    migration.channel_ended(index, admitted.epoch, &report, &qemu_leg, shut);
}
