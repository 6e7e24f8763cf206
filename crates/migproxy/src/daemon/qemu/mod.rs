//! QEMU orchestration: a migration that names the local QEMU's QMP socket is driven by the
//! daemon itself, which then takes QEMU's verdict.
//!
//! ```text
//!  destination daemon                               source daemon
//!  create(qmp) ─► query-status: inmigrate?
//!                 query-migrate: not yet listening?
//!                 migrate-set-capabilities/-parameters
//!                                                   create(qmp) ─► query-status: not incoming?
//!                                                                  query-migrate: idle?
//!                                                                  migrate-set-capabilities/-parameters
//!                          ◄═══════ control link ═══════
//!  migrate-incoming unix:RUNTIME/ID.incoming.sock                  migrate unix:RUNTIME/ID.sock
//!  (channels wait for it before connecting QEMU)
//!  follow: query-migrate every 100 ms               follow: query-migrate every 100 ms,
//!                                                           migrate-start-postcopy after N s
//!  QEMU completed and every channel clean ─► Done   QEMU completed and every channel clean ─► Done
//! ```
//!
//! Both QEMUs are checked before anything moves, and the destination QEMU is told to listen
//! only once the source daemon has come with its own QEMU checked: a refusal on either host
//! leaves both QEMUs as they were (but for capabilities), ready for another attempt.
//!
//! A daemon says `Done` to its peer only when its channels ended cleanly *and* its QEMU says
//! `completed`, so a migration is `completed` only when QEMU says so on both hosts. QEMU's
//! `failed` becomes the migration's failure, attributed to that host's QEMU with QEMU's own
//! `error-desc`, after a short grace in which the peer may explain it (a source QEMU whose
//! writes fail is usually the echo of something on the destination). A cancel through the
//! API runs `migrate_cancel` on the source QEMU first, so that QEMU reports `cancelled` (and
//! resumes the guest) rather than failing on the sockets torn down under it.
//!
//! QEMU serves one client per QMP monitor: migproxy needs a `-qmp` socket of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod command;
mod recover;
pub mod report;

use migproxy_proto::Attribution;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use self::command::{COMMAND_TIMEOUT, run, run_status, timed};
pub use self::command::{Fault, QemuError, hand_over};
pub use self::report::{CancelRefused, Report, Settings, Status};
use super::migration::{CancelRequest, Migration, Role, State};
use super::paths::OwnSocket;
use super::{data_path, kernel};
use crate::endpoint::Endpoint;
use crate::human::Chain;
use crate::qmp::Qmp;

/// How often QEMU is asked how the migration goes.
const POLL: Duration = Duration::from_millis(100);

/// How long QEMU may take to settle (`cancelled`, `failed`) once the migration has ended.
const WIND_DOWN: Duration = Duration::from_secs(3);

/// `max-bandwidth` when none is asked for: unlimited in practice (100 GiB/s), as libvirt
/// does. QEMU's own default (128 MiB/s) is a trap for anyone migrating more than a toy.
pub const UNLIMITED_BANDWIDTH: u64 = 100 << 30;

/// Destination: checks that QEMU waits for `migrate-incoming` and sets the capabilities
/// both sides must share. QEMU is told to listen only once the source daemon has come
/// ([`follow_incoming`]): until then the QEMU is left reusable.
pub async fn prepare_incoming(settings: &Settings) -> Result<Qmp, QemuError> {
    let mut qmp = Qmp::connect(&settings.qmp).await.map_err(QemuError::Qmp)?;
    let status = run_status(&mut qmp).await?;
    if status != "inmigrate" {
        return Err(QemuError::NotIncoming {
            qmp: settings.qmp.clone(),
            status,
        });
    }
    let info = run(&mut qmp, "query-migrate", Value::Null, "").await?;
    if let Some(addresses) = info.get("socket-address") {
        return Err(QemuError::Listening {
            qmp: settings.qmp.clone(),
            listening: addresses.to_string(),
        });
    }
    configure(&mut qmp, settings, Role::Incoming).await?;
    Ok(qmp)
}

/// Destination: once the source daemon's control link is up, makes QEMU listen on the
/// migration's target, lets the channels through, and follows QEMU.
pub async fn follow_incoming(migration: Arc<Migration>, mut qmp: Qmp, cleanup: Option<PathBuf>) {
    let mut state = migration.watch_state();
    let came = tokio::select! {
        () = migration.stopped() => false,
        came = state.wait_for(|state| *state != State::Pending) => {
            came.is_ok_and(|state| *state == State::Active)
        }
    };
    if came && migration.on_kernel_path() {
        return follow_kernel_incoming(migration, qmp).await;
    }
    let uri = migration.spec.local.to_string();
    let hint = " (start the destination QEMU with -incoming defer)";
    // Told to listen only if the migration is still on: otherwise QEMU stays reusable.
    let told = came && !migration.is_stopped();
    let listening = match told {
        true => run(&mut qmp, "migrate-incoming", json!({ "uri": uri }), hint).await,
        false => Ok(Value::Null),
    };
    match listening {
        Ok(_) if told => {
            migration.qemu_listening();
            // The socket QEMU has just created: this one only is removed at the end.
            let cleanup = cleanup.as_deref().and_then(OwnSocket::at);
            // The destination QEMU has nothing to cancel: no canceller.
            let (_, cancels) = mpsc::channel(1);
            follow(migration, qmp, cancels, cleanup).await;
        }
        Ok(_) => {}
        Err(error) => {
            let blame =
                migration.qemu_failure(format!("migrate-incoming {uri} failed: {}", Chain(&error)));
            migration.fail(migration.epoch(), blame);
        }
    }
}

/// Destination, kernel path: waits for the data connection, hands it to QEMU with
/// `migrate-incoming fd:NAME`, then watches it and follows QEMU side by side.
async fn follow_kernel_incoming(migration: Arc<Migration>, mut qmp: Qmp) {
    let arrived = tokio::select! {
        () = migration.stopped() => return,
        arrived = migration.handoff.take() => arrived,
    };
    let name = data_path::fd_name(&migration.spec.id);
    if let Err(error) = hand_over(&mut qmp, &arrived.socket, (Role::Incoming, false), &name).await {
        let _ = arrived.socket.shutdown(std::net::Shutdown::Both);
        migration.channel_abandoned(arrived.index);
        let blame = migration.qemu_failure(format!(
            "migrate-incoming fd:{name} failed: {}",
            Chain(&error)
        ));
        migration.fail(migration.epoch(), blame);
        return;
    }
    migration.qemu_listening();
    if !migration.channel_connected(arrived.admitted.epoch, arrived.index) {
        // The epoch ended meanwhile: QEMU's end must not outlive it.
        let _ = arrived.socket.shutdown(std::net::Shutdown::Both);
        migration.channel_abandoned(arrived.index);
        return;
    }
    let channel = kernel::Channel {
        index: arrived.index,
        admitted: arrived.admitted,
        socket: arrived.socket,
        preamble: arrived.preamble,
        qemu: format!("fd:{name}"),
        peer: arrived.from,
    };
    // The destination QEMU has nothing to cancel: no canceller.
    let (_, cancels) = mpsc::channel(1);
    tokio::join!(
        kernel::watch(Arc::clone(&migration), channel),
        follow(migration, qmp, cancels, None)
    );
}

/// Source: checks that QEMU is a source with no migration running, and sets capabilities
/// and parameters. `migrate` itself comes once the control link is up ([`start`]).
pub async fn prepare_outgoing(settings: &Settings) -> Result<Qmp, QemuError> {
    let mut qmp = Qmp::connect(&settings.qmp).await.map_err(QemuError::Qmp)?;
    if run_status(&mut qmp).await? == "inmigrate" {
        return Err(QemuError::NotSource {
            qmp: settings.qmp.clone(),
        });
    }
    let info = run(&mut qmp, "query-migrate", Value::Null, "").await?;
    let status = Status::of(&info);
    if status != Status::None && !status.is_final() {
        return Err(QemuError::Busy {
            qmp: settings.qmp.clone(),
            status: status.to_string(),
        });
    }
    if let Some(reasons) = info["blocked-reasons"].as_array().filter(|r| !r.is_empty()) {
        let reasons: Vec<&str> = reasons.iter().filter_map(Value::as_str).collect();
        return Err(QemuError::Blocked {
            qmp: settings.qmp.clone(),
            reasons: reasons.join("; "),
        });
    }
    configure(&mut qmp, settings, Role::Outgoing).await?;
    Ok(qmp)
}

/// Source: `migrate` to the daemon's socket.
pub async fn start(qmp: &mut Qmp, uri: &Endpoint) -> Result<(), QemuError> {
    run(qmp, "migrate", json!({"uri": uri.to_string()}), "").await?;
    Ok(())
}

async fn configure(qmp: &mut Qmp, settings: &Settings, role: Role) -> Result<(), QemuError> {
    let capabilities: Vec<Value> = [
        ("events", true),
        ("multifd", settings.multifd.is_some()),
        ("postcopy-ram", settings.postcopy),
    ]
    .iter()
    .map(|(capability, state)| json!({"capability": capability, "state": state}))
    .collect();
    run(
        qmp,
        "migrate-set-capabilities",
        json!({ "capabilities": capabilities }),
        "",
    )
    .await?;
    let mut parameters = serde_json::Map::new();
    if let Some(channels) = settings.multifd {
        parameters.insert("multifd-channels".into(), json!(channels));
    }
    if role == Role::Outgoing {
        let bandwidth = settings.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH);
        parameters.insert("max-bandwidth".into(), json!(bandwidth));
        if let Some(ms) = settings.downtime_limit_ms {
            parameters.insert("downtime-limit".into(), json!(ms));
        }
    }
    if !parameters.is_empty() {
        run(qmp, "migrate-set-parameters", Value::Object(parameters), "").await?;
    }
    Ok(())
}

/// How a cancel through QEMU went.
enum Cancelled {
    Done,
    Refused(CancelRefused),
    /// QEMU's monitor failed: the session is unusable.
    Lost(QemuError),
}

/// Follows QEMU's migration until QEMU's verdict, feeding the migration's report; then, once
/// the migration has ended, removes `cleanup` (the socket the destination QEMU listened on).
pub async fn follow(
    migration: Arc<Migration>,
    mut qmp: Qmp,
    mut cancels: mpsc::Receiver<CancelRequest>,
    mut cleanup: Option<OwnSocket>,
) {
    let started = Instant::now();
    let mut postcopy = Switch::new(&migration);
    let mut recover = recover::Recover::default();
    loop {
        let ended = tokio::select! {
            () = migration.stopped() => true,
            Some(request) = cancels.recv() => {
                let outcome = cancel_qemu(&mut qmp, postcopy.switched).await;
                if !answer(&migration, request, outcome) {
                    break;
                }
                false
            }
            () = tokio::time::sleep(POLL) => false,
        };
        if ended {
            wind_down(&migration, &mut qmp, started, postcopy.switched).await;
            break;
        }
        let status = match observe(&migration, &mut qmp, started).await {
            Ok(status) => status,
            Err(error) => {
                monitor_lost(&migration, &error);
                break;
            }
        };
        if !status.is_final()
            && let Err(error) = recover.tick(&migration, &mut qmp, &status).await
        {
            monitor_lost(&migration, &error);
            break;
        }
        if recover.take_relistened() {
            // `migrate-recover` made a new socket at the same path: that one is removed.
            cleanup = cleanup.and_then(|socket| OwnSocket::at(socket.path()));
        }
        match status {
            Status::Completed => break,
            Status::Failed | Status::Cancelled => {
                verdict(&migration, &status);
                break;
            }
            Status::Active if postcopy.due(started) => {
                if let Err(error) = postcopy.ask(&migration, &mut qmp).await {
                    monitor_lost(&migration, &error);
                    break;
                }
            }
            _ => {}
        }
    }
    // The monitor is QEMU's to give to someone else now.
    drop(qmp);
    // A kernel-path connection still waiting for QEMU belongs to no one now.
    migration.stopped().await;
    recover::drain(&migration);
    if let Some(socket) = cleanup {
        migration.stopped().await;
        // Not a new migration's socket at the same path (its id reused since).
        socket.remove();
    }
}

/// The switch to postcopy a source asked for (`postcopy_after`): whether
/// `migrate-start-postcopy` was sent, and whether QEMU (may have) switched.
struct Switch {
    after: Option<Duration>,
    asked: bool,
    switched: bool,
}

impl Switch {
    fn new(migration: &Migration) -> Switch {
        let after = migration
            .spec
            .qemu
            .as_ref()
            .and_then(|q| q.postcopy_after_ms);
        Switch {
            after: after.map(Duration::from_millis),
            asked: false,
            switched: false,
        }
    }

    /// Whether it is time to ask (once).
    fn due(&self, started: Instant) -> bool {
        !self.asked && self.after.is_some_and(|after| started.elapsed() >= after)
    }

    /// Sends `migrate-start-postcopy`. QEMU saying no is recorded and the migration goes on
    /// in precopy, still cancellable; no answer at all (timeout, monitor gone) is an error:
    /// a monitor that does not answer is lost, as when `query-migrate` goes unanswered.
    async fn ask(&mut self, migration: &Migration, qmp: &mut Qmp) -> Result<(), QemuError> {
        self.asked = true;
        match timed(qmp, "migrate-start-postcopy").await {
            Err(error @ QemuError::Command { .. }) => {
                migration.qemu_postcopy_refused(Chain(&error).to_string());
                Ok(())
            }
            Err(error) => Err(error),
            Ok(_) => {
                self.switched = true;
                Ok(())
            }
        }
    }
}

/// Answers a cancel request; false when QEMU's monitor is lost (stop following).
fn answer(migration: &Arc<Migration>, request: CancelRequest, outcome: Cancelled) -> bool {
    let here = request.by == migration.host();
    let (reply, following) = match outcome {
        Cancelled::Done => (Ok(migration.cancel(request.by)), true),
        // The peer has already cancelled its side: this host cannot refuse, only spare QEMU.
        Cancelled::Refused(refused) if here => (Err(refused), true),
        Cancelled::Refused(_) => (Ok(migration.cancel(request.by)), true),
        Cancelled::Lost(error) => {
            monitor_lost(migration, &error);
            (Ok(migration.cancel(request.by)), false)
        }
    };
    let _ = request.reply.send(reply);
    following
}

/// `migrate_cancel`, unless the migration is past the point where the source can take the
/// guest back: switched to postcopy, or completed.
async fn cancel_qemu(qmp: &mut Qmp, switched: bool) -> Cancelled {
    let before = match timed(qmp, "query-migrate").await {
        Ok(info) => Status::of(&info),
        Err(error) => return Cancelled::Lost(error),
    };
    if switched || before.is_postcopy() {
        return Cancelled::Refused(CancelRefused::Postcopy);
    }
    if before == Status::Completed {
        return Cancelled::Refused(CancelRefused::Completed);
    }
    if let Err(error) = timed(qmp, "migrate_cancel").await {
        return Cancelled::Lost(error);
    }
    // A migration that completed meanwhile ignores the cancel: look again.
    match timed(qmp, "query-migrate").await {
        Ok(info) if Status::of(&info) == Status::Completed => {
            Cancelled::Refused(CancelRefused::Completed)
        }
        Ok(_) => Cancelled::Done,
        Err(error) => Cancelled::Lost(error),
    }
}

/// QEMU's monitor closed or stopped answering: recorded, and the migration fails. On the
/// source that is the cause: the source QEMU died, and the destination's failure follows
/// from it. A destination QEMU exits by itself when its incoming migration breaks (QEMU 7.2),
/// so there it is usually the echo of a failure on the source: the peer's explanation is
/// waited for.
fn monitor_lost(migration: &Arc<Migration>, error: &QemuError) {
    migration.qemu_monitor_closed();
    if migration.state().is_final() {
        return;
    }
    let blame = lost(migration, error);
    match migration.spec.role {
        Role::Outgoing => migration.fail(migration.epoch(), blame),
        Role::Incoming => migration.fail_later(migration.epoch(), blame),
    }
}

/// One `query-migrate`, recorded in the migration with the events queued meanwhile; returns
/// QEMU's status.
async fn observe(
    migration: &Arc<Migration>,
    qmp: &mut Qmp,
    started: Instant,
) -> Result<Status, QemuError> {
    let answer = timed(qmp, "query-migrate").await;
    let events = qmp.take_events();
    let pass = events
        .iter()
        .filter(|e| e.event == "MIGRATION_PASS")
        .filter_map(|e| e.data["pass"].as_u64())
        .max();
    let statuses: Vec<Status> = events
        .iter()
        .filter(|e| e.event == "MIGRATION")
        .filter_map(|e| e.data["status"].as_str())
        .map(Status::parse)
        .collect();
    let info = match answer {
        Ok(info) => info,
        // QEMU said `completed` and then went (a management tool quit it at once).
        Err(_) if statuses.last() == Some(&Status::Completed) => json!({"status": "completed"}),
        Err(error) => return Err(error),
    };
    let status = Status::of(&info);
    migration.qemu_observed(info, pass, &statuses, started.elapsed());
    Ok(status)
}

/// The migration ended (cancelled, failed elsewhere): on a cancel, the source QEMU is told
/// to cancel too — never once it has switched to postcopy or completed, which would lose
/// the guest; then QEMU's last word is recorded while it settles.
async fn wind_down(migration: &Arc<Migration>, qmp: &mut Qmp, started: Instant, switched: bool) {
    let cancelled = migration.spec.role == Role::Outgoing && migration.state() == State::Cancelled;
    if cancelled && !migration.qemu_final() {
        match cancel_qemu(qmp, switched).await {
            Cancelled::Lost(_) => {
                migration.qemu_monitor_closed();
                return;
            }
            Cancelled::Done | Cancelled::Refused(_) => {}
        }
    }
    end_unreached_incoming(migration, qmp).await;
    let deadline = Instant::now() + WIND_DOWN;
    while Instant::now() < deadline {
        match observe(migration, qmp, started).await {
            Ok(status) if status.is_final() || status == Status::None => return,
            Ok(_) => tokio::time::sleep(POLL).await,
            // The destination QEMU exits when its incoming migration breaks (QEMU 7.2).
            Err(_) => {
                migration.qemu_monitor_closed();
                return;
            }
        }
    }
}

/// A destination QEMU told to listen, whose migration ended before any channel reached it,
/// would wait for ever on a socket nobody will connect to (its file is removed). One empty
/// connection ends its incoming migration as a broken one ends — QEMU 7.2 then exits, as it
/// does when a migration is cancelled a moment later — rather than leaving it hanging.
/// Whether a connection reached QEMU is QEMU's to say: its status leaves `none`/`setup` once
/// it has accepted one.
async fn end_unreached_incoming(migration: &Migration, qmp: &mut Qmp) {
    if migration.spec.role != Role::Incoming || migration.state() == State::Completed {
        return;
    }
    let status = match timed(qmp, "query-migrate").await {
        Ok(info) => Status::of(&info),
        Err(_) => return,
    };
    if !matches!(status, Status::None | Status::Setup) {
        return;
    }
    let Some(path) = migration.spec.local.unix_path() else {
        return;
    };
    if super::paths::refuse_symlink(path).is_err() {
        return;
    }
    tracing::info!(migration = %migration.spec.id, "ending the destination QEMU's wait");
    let poke = tokio::net::UnixStream::connect(path);
    if let Ok(Ok(stream)) = tokio::time::timeout(COMMAND_TIMEOUT, poke).await {
        drop(stream);
    }
}

/// QEMU says the migration failed, or someone cancelled it in QEMU directly.
fn verdict(migration: &Arc<Migration>, status: &Status) {
    if *status == Status::Cancelled {
        migration.cancel(migration.host());
        return;
    }
    let desc = migration
        .qemu_error()
        .unwrap_or_else(|| "no error-desc given".to_owned());
    let blame = migration.qemu_failure(format!("QEMU reports the migration failed: {desc}"));
    migration.fail_later(migration.epoch(), blame);
}

/// The monitor broke while the migration ran: QEMU exited or crashed.
fn lost(migration: &Migration, error: &QemuError) -> Attribution {
    let mut blame = migration.qemu_failure(format!(
        "QEMU's monitor broke during the migration (QEMU exited or crashed?): {}",
        Chain(error)
    ));
    blame.errno = error.os_error().and_then(crate::human::errno_name);
    blame
}

/// Where the destination QEMU listens when the request names no target: a socket in the
/// daemon's runtime directory, removed when the migration ends.
pub fn incoming_socket(runtime_dir: &Path, id: &str) -> PathBuf {
    runtime_dir.join(format!("{id}.incoming.sock"))
}
