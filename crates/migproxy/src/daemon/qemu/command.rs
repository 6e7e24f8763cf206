//! QMP commands as the daemon runs them: each failure names the QEMU (its QMP socket),
//! and says whose fault it is.

use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::migration::Role;
use crate::qmp::{Qmp, QmpError};

/// How long one QMP command may take while following QEMU before its monitor is given up.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why QEMU could not be prepared, each naming the QMP socket.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The monitor could not be reached or spoke no QMP.
    #[error(transparent)]
    Qmp(QmpError),
    #[error("QEMU at {}{hint}", .qmp.display())]
    Command {
        qmp: PathBuf,
        #[source]
        error: QmpError,
        hint: &'static str,
    },
    #[error(
        "QEMU at {} is {status}, not waiting for an incoming migration: start the destination \
         QEMU with -incoming defer", .qmp.display()
    )]
    NotIncoming { qmp: PathBuf, status: String },
    #[error(
        "QEMU at {} already listens for its migration on {listening} (started with -incoming \
         URI): start it with -incoming defer, so that migproxy chooses where it listens",
        .qmp.display()
    )]
    Listening { qmp: PathBuf, listening: String },
    #[error(
        "QEMU at {} waits for an incoming migration: it is a destination, not a source",
        .qmp.display()
    )]
    NotSource { qmp: PathBuf },
    #[error("QEMU at {} already has a migration in state {status}", .qmp.display())]
    Busy { qmp: PathBuf, status: String },
    #[error("QEMU at {} cannot migrate: {reasons}", .qmp.display())]
    Blocked { qmp: PathBuf, reasons: String },
    #[error("QEMU at {} did not answer {command} within {} s", .qmp.display(), COMMAND_TIMEOUT.as_secs())]
    Timeout { qmp: PathBuf, command: &'static str },
}

impl QemuError {
    /// QEMU did not answer `command` within [`COMMAND_TIMEOUT`].
    pub fn timed_out(qmp: &Qmp, command: &'static str) -> QemuError {
        QemuError::Timeout {
            qmp: qmp.path().to_owned(),
            command,
        }
    }

    /// The OS error underneath, when the monitor's socket failed.
    pub fn os_error(&self) -> Option<&std::io::Error> {
        match self {
            QemuError::Qmp(QmpError::Connect { error, .. } | QmpError::Io { error, .. }) => {
                Some(error)
            }
            _ => None,
        }
    }

    /// Whose fault it is: the request's (a path that is no QMP socket), a QEMU in the wrong
    /// state (or whose monitor is held by another client), or a QEMU that broke off.
    pub fn fault(&self) -> Fault {
        match self {
            QemuError::Qmp(QmpError::Connect { .. } | QmpError::Protocol { .. }) => Fault::Request,
            QemuError::Qmp(QmpError::Io { .. } | QmpError::Closed { .. })
            | QemuError::Timeout { .. } => Fault::Qemu,
            _ => Fault::State,
        }
    }
}

/// See [`QemuError::fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Request,
    State,
    Qemu,
}

/// Runs one command; QEMU's refusals name the socket and carry `hint`.
pub(crate) async fn run(
    qmp: &mut Qmp,
    command: &str,
    arguments: Value,
    hint: &'static str,
) -> Result<Value, QemuError> {
    qmp.execute(command, arguments)
        .await
        .map_err(|error| match error {
            error @ QmpError::Command { .. } => QemuError::Command {
                qmp: qmp.path().to_owned(),
                error,
                hint,
            },
            other => QemuError::Qmp(other),
        })
}

pub(crate) async fn run_status(qmp: &mut Qmp) -> Result<String, QemuError> {
    let status = run(qmp, "query-status", Value::Null, "").await?;
    Ok(status["status"].as_str().unwrap_or("unknown").to_owned())
}

/// Runs one command, giving QEMU [`COMMAND_TIMEOUT`]. After a timeout the session must not be
/// used again (a reply may be half read).
pub(crate) async fn timed(qmp: &mut Qmp, command: &'static str) -> Result<Value, QemuError> {
    timed_with(qmp, command, Value::Null).await
}

/// As [`timed`], with arguments.
pub(crate) async fn timed_with(
    qmp: &mut Qmp,
    command: &'static str,
    arguments: Value,
) -> Result<Value, QemuError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, run(qmp, command, arguments, "")).await {
        Ok(answer) => answer,
        Err(_) => Err(QemuError::timed_out(qmp, command)),
    }
}

/// Kernel path: hands QEMU its end of the data connection — `getfd` with the descriptor
/// alongside, then `migrate` (source) or `migrate-incoming` (destination) on `fd:NAME`; to
/// recover a paused postcopy (`resume`), `migrate` with `resume: true` or `migrate-recover`.
/// QEMU takes its own duplicate: `socket` stays this daemon's, to watch and to shut down.
pub async fn hand_over(
    qmp: &mut Qmp,
    socket: &std::net::TcpStream,
    (role, resume): (Role, bool),
    name: &str,
) -> Result<(), QemuError> {
    use std::os::fd::AsFd;
    qmp.execute_with_fd("getfd", json!({ "fdname": name }), socket.as_fd())
        .await
        .map_err(|error| match error {
            error @ QmpError::Command { .. } => QemuError::Command {
                qmp: qmp.path().to_owned(),
                error,
                hint: "",
            },
            other => QemuError::Qmp(other),
        })?;
    let (command, hint) = match (role, resume) {
        (Role::Outgoing, _) => ("migrate", ""),
        (Role::Incoming, false) => (
            "migrate-incoming",
            " (start the destination QEMU with -incoming defer)",
        ),
        (Role::Incoming, true) => ("migrate-recover", ""),
    };
    let uri = format!("fd:{name}");
    let arguments = match (role, resume) {
        (Role::Outgoing, true) => json!({ "uri": uri, "resume": true }),
        _ => json!({ "uri": uri }),
    };
    if let Err(error) = run(qmp, command, arguments, hint).await {
        // QEMU keeps a descriptor it was given until told otherwise.
        let _ = qmp.execute("closefd", json!({ "fdname": name })).await;
        return Err(error);
    }
    Ok(())
}
