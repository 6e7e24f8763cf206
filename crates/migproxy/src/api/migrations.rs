//! `/v1/migrations`: create (incoming or outgoing), list, show, forget, cancel.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use migproxy_proto::valid_id;
use serde::Deserialize;

use crate::daemon::migration::Migration;
use crate::daemon::migration::view::Snapshot;
use crate::daemon::token::Token;
use crate::daemon::{Daemon, RegisterError, incoming, outgoing};
use crate::endpoint::Endpoint;

use super::error::ApiError;
use super::types::{
    CreateRequest, CreatedIncoming, CreatedOutgoing, IncomingRequest, MigrationList,
    OutgoingRequest,
};

/// The QEMU fields of either request, to check in one place.
#[derive(Debug, Default)]
struct QemuBody {
    qmp: Option<String>,
    multifd: Option<u32>,
    postcopy: bool,
    postcopy_after: Option<f64>,
    max_bandwidth: Option<u64>,
    downtime_limit: Option<u64>,
}

pub(super) async fn create(
    State(daemon): State<Arc<Daemon>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: CreateRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::field("invalid request body", &e))?;
    match request {
        CreateRequest::Incoming(body) => Ok(create_incoming(&daemon, body).await?.into_response()),
        CreateRequest::Outgoing(body) => Ok(create_outgoing(&daemon, body).await?.into_response()),
    }
}

async fn create_incoming(
    daemon: &Arc<Daemon>,
    body: IncomingRequest,
) -> Result<(StatusCode, Json<CreatedIncoming>), ApiError> {
    let target: Option<Endpoint> = body
        .target
        .map(|target| target.parse())
        .transpose()
        .map_err(|e| ApiError::field("target", &e))?;
    if let Some(target) = &target {
        crate::daemon::paths::check_endpoint(target, &daemon.config.target_dirs)
            .map_err(|e| ApiError::field("target", &e))?;
    }
    let id = match body.id {
        Some(id) => checked_id(id)?,
        None => Token::generate().to_hex()[..16].to_owned(),
    };
    if body.max_channels == Some(0) {
        return Err(ApiError::bad_request("max_channels: must be at least 1"));
    }
    let qemu = QemuBody {
        qmp: body.qmp,
        multifd: body.multifd,
        postcopy: body.postcopy,
        ..QemuBody::default()
    };
    let qemu = qemu_settings(qemu)?;
    let data_path = body.data_path.unwrap_or(daemon.config.data_path);
    let asked = (body.recoverable, body.recover_timeout);
    let (recoverable, recover_timeout) = recovery(daemon, asked, &qemu)?;
    let resume_timeout = resume_timeout(daemon, body.resume_timeout)?;
    let request = incoming::Request {
        id,
        target,
        max_channels: body.max_channels,
        recoverable,
        recover_timeout,
        resume_timeout,
        qemu,
        group: checked_group(body.group)?,
        data_path,
    };
    let created = in_daemon_task(daemon, |daemon| async move {
        incoming::create(&daemon, request).await
    })
    .await?;
    let (migration, token) = created.map_err(|e| match e {
        incoming::CreateError::Register(e) => register_error(e),
        incoming::CreateError::Qemu(e) => qemu_error(&e),
        e @ (incoming::CreateError::NoTarget | incoming::CreateError::PathTooLong(_)) => {
            ApiError::bad_request(e.to_string())
        }
        e @ incoming::CreateError::DataPath(_) => ApiError::chain(StatusCode::BAD_REQUEST, &e),
    })?;
    let body = CreatedIncoming {
        id: migration.spec.id.clone(),
        token: token.to_hex(),
        peer: migration.spec.peer.clone(),
        target: migration.spec.local.to_string(),
        state: migration.state(),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

/// Checks the QEMU fields of a request; `None` when the request names no QMP socket.
fn qemu_settings(body: QemuBody) -> Result<Option<crate::daemon::qemu::Settings>, ApiError> {
    let Some(qmp) = body.qmp else {
        let stray = [
            ("multifd", body.multifd.is_some()),
            ("postcopy", body.postcopy),
            ("postcopy_after", body.postcopy_after.is_some()),
            ("max_bandwidth", body.max_bandwidth.is_some()),
            ("downtime_limit", body.downtime_limit.is_some()),
        ];
        return match stray.iter().find(|(_, given)| *given) {
            Some((field, _)) => Err(ApiError::bad_request(format!(
                "{field}: only with qmp (the daemon sets it on the QEMU it drives)"
            ))),
            None => Ok(None),
        };
    };
    let qmp = std::path::PathBuf::from(qmp);
    if !qmp.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "qmp: \"{}\" must be an absolute path to QEMU's QMP socket",
            qmp.display()
        )));
    }
    if body.multifd.is_some_and(|n| !(1..=255).contains(&n)) {
        return Err(ApiError::bad_request("multifd: 1 to 255 channels"));
    }
    let postcopy_after = match body.postcopy_after {
        Some(secs) => Some(
            std::time::Duration::try_from_secs_f64(secs)
                .map_err(|_| ApiError::bad_request("postcopy_after: seconds, 0 or more"))?,
        ),
        None => None,
    };
    if body.max_bandwidth == Some(0) {
        return Err(ApiError::bad_request(
            "max_bandwidth: bytes per second, at least 1 (leave it out for unlimited)",
        ));
    }
    if body.downtime_limit.is_some_and(|ms| ms > 2_000_000) {
        return Err(ApiError::bad_request(
            "downtime_limit: milliseconds, at most 2000000 (QEMU's limit)",
        ));
    }
    Ok(Some(crate::daemon::qemu::Settings {
        qmp,
        multifd: body.multifd,
        postcopy: body.postcopy || postcopy_after.is_some(),
        postcopy_after_ms: postcopy_after.map(|d| d.as_millis() as u64),
        max_bandwidth: body.max_bandwidth,
        downtime_limit_ms: body.downtime_limit,
    }))
}

/// Whether the migration recovers from a break in postcopy, and how long it may take.
/// With QMP and postcopy it does by default (both hosts decide alike from the same request,
/// and the control link checks that they agree). The deadline defaults to the daemon's with QMP;
/// without QMP a person recovers by hand, and only a deadline asked for applies.
fn recovery(
    daemon: &Daemon,
    (recoverable, timeout): (Option<bool>, Option<f64>),
    qemu: &Option<crate::daemon::qemu::Settings>,
) -> Result<(bool, Option<std::time::Duration>), ApiError> {
    let postcopy = qemu.as_ref().is_some_and(|q| q.postcopy);
    let recoverable = recoverable.unwrap_or(postcopy);
    let timeout = match timeout {
        Some(secs) => Some(
            std::time::Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| ApiError::bad_request("recover_timeout: seconds, more than 0"))?,
        ),
        None => None,
    };
    if timeout.is_some() && !recoverable {
        return Err(ApiError::bad_request(
            "recover_timeout: only for a recoverable migration (recoverable, or qmp with postcopy)",
        ));
    }
    let timeout =
        timeout.or((recoverable && qemu.is_some()).then_some(daemon.config.recover_timeout));
    Ok((recoverable, timeout))
}

/// How long the migration's resumable channels may go without a peer connection: as asked
/// (0: not resumable), or the daemon's.
fn resume_timeout(
    daemon: &Daemon,
    asked: Option<f64>,
) -> Result<Option<std::time::Duration>, ApiError> {
    // A day at most: QEMU waits as long as its socket blocks, an operator not.
    const MAX: f64 = 86_400.0;
    let timeout = match asked {
        Some(secs) => std::time::Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|_| secs <= MAX)
            .ok_or_else(|| ApiError::bad_request("resume_timeout: seconds, 0 to 86400"))?,
        None => daemon.config.resume_timeout,
    };
    Ok((!timeout.is_zero()).then_some(timeout))
}

/// A QEMU that could not be prepared: a wrong path is the request's fault, a QEMU in the
/// wrong state a conflict.
fn qemu_error(error: &crate::daemon::qemu::QemuError) -> ApiError {
    use crate::daemon::qemu::Fault;
    let status = match error.fault() {
        Fault::Request => StatusCode::BAD_REQUEST,
        Fault::State => StatusCode::CONFLICT,
        Fault::Qemu => StatusCode::BAD_GATEWAY,
    };
    let mut answer = ApiError::chain(status, error);
    answer.error = format!("qmp: {}", answer.error);
    answer
}

/// Runs a creation in a task of the daemon's, not in the request: a client that hangs up
/// must not leave a half-made migration behind.
async fn in_daemon_task<F, T>(
    daemon: &Arc<Daemon>,
    work: impl FnOnce(Arc<Daemon>) -> F,
) -> Result<T, ApiError>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    daemon
        .tasks
        .spawn(work(Arc::clone(daemon)))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "creation failed").caused_by(&e)
        })
}

async fn create_outgoing(
    daemon: &Arc<Daemon>,
    body: OutgoingRequest,
) -> Result<(StatusCode, Json<CreatedOutgoing>), ApiError> {
    let id = checked_id(body.id)?;
    let token = Token::from_hex(&body.token)
        .ok_or_else(|| ApiError::bad_request("token: expected the 64 hex digits handed out"))?;
    let peer = checked_peer(&body.peer)?;
    if body.tls_hostname.is_some() && daemon.config.tls.is_none() {
        return Err(ApiError::bad_request(
            "tls_hostname: this daemon's peer link is plaintext (no --tls-dir), there is no \
             certificate to check",
        ));
    }
    let qemu = QemuBody {
        qmp: body.qmp,
        multifd: body.multifd,
        postcopy: body.postcopy,
        postcopy_after: body.postcopy_after,
        max_bandwidth: body.max_bandwidth,
        downtime_limit: body.downtime_limit,
    };
    let qemu = qemu_settings(qemu)?;
    let data_path = body.data_path.unwrap_or(daemon.config.data_path);
    let asked = (body.recoverable, body.recover_timeout);
    let (recoverable, recover_timeout) = recovery(daemon, asked, &qemu)?;
    let resume_timeout = resume_timeout(daemon, body.resume_timeout)?;
    let request = outgoing::Request {
        id,
        token,
        peer,
        recoverable,
        recover_timeout,
        resume_timeout,
        tls_hostname: body.tls_hostname,
        qemu,
        group: checked_group(body.group)?,
        data_path,
    };
    let created = in_daemon_task(daemon, |daemon| async move {
        outgoing::create(&daemon, request).await
    })
    .await?;
    let migration = created.map_err(|e| match e {
        outgoing::CreateError::Qemu(e) => qemu_error(&e),
        outgoing::CreateError::Register(e) => register_error(e),
        outgoing::CreateError::Listen(e) => ApiError::chain(StatusCode::INTERNAL_SERVER_ERROR, &e),
        outgoing::CreateError::Peer(e) => ApiError::chain(StatusCode::BAD_GATEWAY, &e),
        e @ outgoing::CreateError::Ended(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        e @ (outgoing::CreateError::DataPath(_) | outgoing::CreateError::Declined(_)) => {
            ApiError::chain(StatusCode::BAD_REQUEST, &e)
        }
        e @ outgoing::CreateError::KernelSocket(_) => ApiError::chain(StatusCode::BAD_GATEWAY, &e),
    })?;
    let body = CreatedOutgoing {
        id: migration.spec.id.clone(),
        qemu_uri: migration.local_uri(),
        state: migration.state(),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

fn checked_id(id: String) -> Result<String, ApiError> {
    if valid_id(&id) {
        Ok(id)
    } else {
        Err(ApiError::bad_request(format!(
            "id: \"{id}\" must be 1 to 64 characters from A-Z a-z 0-9 . _ -"
        )))
    }
}

fn checked_group(group: Option<String>) -> Result<Option<String>, ApiError> {
    match group {
        Some(group) if !valid_id(&group) => Err(ApiError::bad_request(format!(
            "group: \"{group}\" must be 1 to 64 characters from A-Z a-z 0-9 . _ -"
        ))),
        group => Ok(group),
    }
}

/// `HOST:PORT` (or `tcp:HOST:PORT`), with brackets around an IPv6 address.
fn checked_peer(peer: &str) -> Result<String, ApiError> {
    let uri = if peer.starts_with("tcp:") {
        peer.to_owned()
    } else {
        format!("tcp:{peer}")
    };
    match uri.parse::<Endpoint>() {
        Ok(Endpoint::Tcp { host, port }) if !host.is_empty() && port != 0 => {
            Ok(uri.trim_start_matches("tcp:").to_owned())
        }
        Ok(_) => Err(ApiError::bad_request(format!(
            "peer: \"{peer}\" needs a host and a port"
        ))),
        Err(e) => Err(ApiError::bad_request(format!("peer: {}", e.reason))),
    }
}

fn register_error(error: RegisterError) -> ApiError {
    let status = match error {
        RegisterError::Exists(_) | RegisterError::SocketTaken { .. } => StatusCode::CONFLICT,
        RegisterError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        // The daemon's own directory is at fault, not the request.
        RegisterError::RuntimeDir(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::chain(status, &error)
}

/// A state as the API spells it (`active`, `completed`…), for messages; ids keep their case.
pub(super) fn state_name(state: crate::daemon::migration::State) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(super) fn find(daemon: &Daemon, id: &str) -> Result<Arc<Migration>, ApiError> {
    daemon
        .get(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no migration \"{id}\"")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    state: Option<String>,
}

pub(super) async fn list(
    State(daemon): State<Arc<Daemon>>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MigrationList>, ApiError> {
    let query = query.map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))?;
    use crate::daemon::migration::State as Wanted;
    let wanted = match &query.state {
        None => None,
        Some(name) => Some(Wanted::parse(name).ok_or_else(|| {
            let names: Vec<_> = Wanted::ALL.iter().map(|s| s.name()).collect();
            ApiError::bad_request(format!(
                "state: \"{name}\" is not one of {}",
                names.join(", ")
            ))
        })?),
    };
    let all: Vec<_> = daemon
        .list()
        .iter()
        .map(|m| m.snapshot())
        // `resuming` is `active` with a connection down: asking for the active ones gets those.
        .filter(|snapshot| {
            wanted.is_none_or(|state| {
                snapshot.state == state
                    || (state == Wanted::Active && snapshot.state == Wanted::Resuming)
            })
        })
        .collect();
    Ok(Json(MigrationList { migrations: all }))
}

pub(super) async fn forget(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match daemon.forget(&id) {
        Ok(Some(_)) => Ok(StatusCode::NO_CONTENT),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no migration \"{id}\""),
        )),
        Err(state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "migration \"{id}\" is still {}: cancel it first",
                state_name(state)
            ),
        )),
    }
}

pub(super) async fn show(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    let migration = find(&daemon, &id)?;
    Ok(Json(migration.snapshot()))
}

pub(super) async fn cancel(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    let migration = find(&daemon, &id)?;
    let cancelled = migration
        .cancel_through_qemu(migration.host())
        .await
        .map_err(|e| ApiError::chain(StatusCode::CONFLICT, &e))?;
    if !cancelled {
        let state = migration.state();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "migration \"{id}\" has already ended: {}",
                state_name(state)
            ),
        ));
    }
    Ok(Json(migration.snapshot()))
}
