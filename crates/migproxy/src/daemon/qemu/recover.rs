//! Postcopy recovery over QMP: once the control link is back after a pause, each daemon
//! tells its own QEMU to recover — the destination first listens again, the source resumes
//! to the socket migproxy hands it — and both follow QEMU back to `postcopy-active`.
//!
//! ```text
//!  destination daemon                                  source daemon
//!  paused: channels torn down ─► QEMU postcopy-paused  paused: channels torn down ─► QEMU postcopy-paused
//!                                                      redials the control link, with backoff
//!        ◄══════════════ control link, new epoch (attach from paused) ══════════════
//!  migrate-recover unix:RUNTIME/ID.incoming.sock       migrate unix:RUNTIME/ID.sock resume=true
//!  (the epoch's channels wait for it)                   QEMU connects: the epoch's channels
//!  postcopy-recover ─► postcopy-active: resumed        postcopy-recover ─► postcopy-active: resumed
//! ```
//!
//! A QEMU that still runs postcopy a moment after its daemon paused (it has not noticed
//! the break) is paused with `migrate-pause`, so that both QEMUs wait in `postcopy-paused`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::command::{COMMAND_TIMEOUT, QemuError, timed_with};
use super::report::Status;
use crate::daemon::migration::state::Epoch;
use crate::daemon::migration::{Arrived, Migration, Role};
use crate::daemon::{data_path, kernel};
use crate::human::Chain;
use crate::qmp::Qmp;

/// How long QEMU may go on in `postcopy-active` after its daemon paused before it is told
/// to pause.
const NOTICE: Duration = Duration::from_secs(2);

/// What this host's QEMU has been told during the recoveries so far.
#[derive(Debug, Default)]
pub(super) struct Recover {
    /// The epoch whose recovery QEMU was told about.
    told: Option<Epoch>,
    /// When this daemon first saw the open pause with QEMU still in postcopy.
    unnoticed_since: Option<Instant>,
    /// `migrate-pause` was sent for the open pause.
    paused_asked: bool,
    /// The destination QEMU listens again (a new socket file at the same path).
    relistened: bool,
}

impl Recover {
    /// One step, after each look at QEMU's status. An error is a monitor that failed.
    pub(super) async fn tick(
        &mut self,
        migration: &Arc<Migration>,
        qmp: &mut Qmp,
        status: &Status,
    ) -> Result<(), QemuError> {
        if !migration.spec.recoverable {
            return Ok(());
        }
        if !migration.pause_open() {
            *self = Recover {
                told: self.told,
                relistened: self.relistened,
                ..Recover::default()
            };
            return Ok(());
        }
        if let Some(epoch) = migration.recovering()
            && self.told != Some(epoch)
            && *status == Status::PostcopyPaused
        {
            if migration.on_kernel_path() {
                // QEMU recovers on the epoch's data connection, once it is here (one of an
                // older epoch is ended, and the wait goes on).
                let Some(arrived) = migration.handoff.try_take() else {
                    return Ok(());
                };
                if arrived.admitted.epoch != epoch {
                    abandon(migration, &arrived);
                    return Ok(());
                }
                self.told = Some(epoch);
                return hand_over(migration, qmp, arrived, epoch).await;
            }
            self.told = Some(epoch);
            self.relistened = migration.spec.role == Role::Incoming;
            return tell(migration, qmp, epoch).await;
        }
        // The lifecycle closes the pause on QEMU's `postcopy-active` once the link is back:
        // still open with QEMU in postcopy, QEMU has not noticed the break.
        if *status == Status::PostcopyActive {
            let since = *self.unnoticed_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= NOTICE && !self.paused_asked {
                self.paused_asked = true;
                tracing::info!(migration = %migration.spec.id, "QEMU has not noticed the break: migrate-pause");
                if let Err(error @ (QemuError::Qmp(_) | QemuError::Timeout { .. })) =
                    timed_with(qmp, "migrate-pause", json!({})).await
                {
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Whether the destination QEMU has listened again since last asked: its socket file is
    /// a new one.
    pub(super) fn take_relistened(&mut self) -> bool {
        std::mem::take(&mut self.relistened)
    }
}

/// Kernel path: hands QEMU the epoch's new data connection to recover on (`getfd`, then
/// `migrate-recover fd:NAME` or `migrate fd:NAME resume=true`), and watches it as the
/// first one was. A connection of an older epoch, or QEMU refusing, ends it here.
async fn hand_over(
    migration: &Arc<Migration>,
    qmp: &mut Qmp,
    arrived: Arrived,
    epoch: Epoch,
) -> Result<(), QemuError> {
    let abandon = |arrived: &Arrived| abandon(migration, arrived);
    let name = data_path::fd_name(&migration.spec.id);
    let role = migration.spec.role;
    tracing::info!(migration = %migration.spec.id, "recovering QEMU on a new kernel-path connection");
    let handing = super::command::hand_over(qmp, &arrived.socket, (role, true), &name);
    let handed = tokio::time::timeout(COMMAND_TIMEOUT, handing).await;
    let handed = handed.unwrap_or_else(|_| Err(QemuError::timed_out(qmp, "getfd/migrate fd:")));
    match handed {
        Ok(()) => {}
        Err(error @ QemuError::Command { .. }) => {
            abandon(&arrived);
            let blame =
                migration.qemu_failure(format!("recovery on fd:{name} refused: {}", Chain(&error)));
            migration.resume_refused(blame);
            return Ok(());
        }
        Err(error) => {
            abandon(&arrived);
            return Err(error);
        }
    }
    if role == Role::Incoming && !migration.channel_connected(epoch, arrived.index) {
        abandon(&arrived);
        return Ok(());
    }
    let channel = kernel::Channel {
        index: arrived.index,
        admitted: arrived.admitted,
        socket: arrived.socket,
        preamble: arrived.preamble,
        qemu: format!("fd:{name}"),
        peer: arrived.from,
    };
    migration.spawn(kernel::watch(Arc::clone(migration), channel));
    Ok(())
}

/// Ends a kernel-path connection nobody will hand to QEMU.
fn abandon(migration: &Arc<Migration>, arrived: &Arrived) {
    let _ = arrived.socket.shutdown(std::net::Shutdown::Both);
    migration.channel_abandoned(arrived.index);
}

/// Ends what waits in the kernel path's slot: the migration is over.
pub(super) fn drain(migration: &Arc<Migration>) {
    while let Some(arrived) = migration.handoff.try_take() {
        abandon(migration, &arrived);
    }
}

/// Tells QEMU to recover on the epoch just attached: `migrate-recover` on the destination
/// (whose channels may then connect, if that epoch still runs), `migrate resume=true` on the
/// source. QEMU refusing ends the migration: it cannot be recovered by waiting.
async fn tell(migration: &Arc<Migration>, qmp: &mut Qmp, epoch: Epoch) -> Result<(), QemuError> {
    let uri = migration.spec.local.to_string();
    let (command, arguments) = match migration.spec.role {
        Role::Incoming => ("migrate-recover", json!({ "uri": uri })),
        Role::Outgoing => ("migrate", json!({ "uri": uri, "resume": true })),
    };
    tracing::info!(migration = %migration.spec.id, command, %uri, "recovering QEMU");
    match timed_with(qmp, command, arguments).await {
        Ok(_) => {
            // A break during the command: the next epoch waits for its own migrate-recover.
            if migration.spec.role == Role::Incoming && migration.recovering() == Some(epoch) {
                migration.qemu_listening();
            }
            Ok(())
        }
        Err(error @ QemuError::Command { .. }) => {
            let blame =
                migration.qemu_failure(format!("{command} {uri} refused: {}", Chain(&error)));
            migration.resume_refused(blame);
            Ok(())
        }
        Err(error) => Err(error),
    }
}
