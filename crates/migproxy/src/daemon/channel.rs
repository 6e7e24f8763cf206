//! One migration channel on one host: a relay between the local QEMU and the peer link,
//! reported to the migration when it ends.

use std::sync::Arc;

use super::migration::{Admitted, Migration};
use crate::relay::{Leg, Relay};

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
    let relay = Relay::new(source, destination).with_cancel(admitted.stop.child_token());
    migration.channel_running(index, relay.counters());
    tracing::debug!(migration = %migration.spec.id, channel = index, "channel open");
    let report = relay.run().await;
    tracing::info!(migration = %migration.spec.id, channel = index, "channel {report}");
    migration.channel_ended(index, admitted.epoch, &report, &qemu_leg);
}
