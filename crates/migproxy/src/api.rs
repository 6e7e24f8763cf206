//! The daemon's REST API, on a unix socket.
//!
//! | route | does |
//! | --- | --- |
//! | `GET /v1/info` | version, protocol, TLS or plaintext, limits, uptime |
//! | `POST /v1/migrations` | create an incoming (destination) or outgoing (source) migration |
//! | `GET /v1/migrations[?state=S]` | every migration (or those in state S) |
//! | `GET /v1/migrations/{id}` | one migration: state, bytes, throughput, channels, error |
//! | `DELETE /v1/migrations/{id}` | forget an ended migration |
//! | `POST /v1/migrations/{id}/cancel` | cancel on both hosts |
//! | `GET /v1/events[?migration=ID]` | server-sent events: state changes (with the error when failed or paused), channels opening and closing |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are JSON `{"error": "...", "causes": [...]}` with a status that says whose fault it
//! is: 400 bad input (naming the field), 404 unknown id, 409 conflict, 502 the peer daemon
//! refused or could not be reached, 503 a limit was reached.
//!
//! One file per resource: `api/migrations.rs`, `api/events.rs`, `api/metrics.rs`,
//! `api/info.rs`; `api/error.rs` the error answer, `api/server.rs` connections and their
//! limits. This file serves them, on the unix socket and behind mutual TLS.

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsStream;

use crate::tls::TlsHandle;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::daemon::gate::{self, FirstByte, Gate};

mod error;
mod events;
mod info;
mod metrics;
mod migrations;
mod server;
pub mod types;

pub use self::error::ApiError;

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener, shutdown: CancellationToken) {
    let router = router(Arc::clone(&daemon));
    server::serve(daemon, listener, router, shutdown).await;
}

/// Serves the same API on TCP behind the peer port's mutual TLS (same CA, CRL and
/// allow-list), for management from other hosts.
pub async fn serve_tls(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    tls: Arc<TlsHandle>,
    shutdown: CancellationToken,
) {
    let (sender, accepted) = mpsc::channel(16);
    let local = listener.local_addr();
    let handshakes = tokio::spawn(tls_handshakes(
        Arc::clone(&daemon),
        listener,
        tls,
        sender,
        shutdown.clone(),
    ));
    let listener = TlsListener { accepted, local };
    let router = router(Arc::clone(&daemon));
    server::serve(daemon, listener, router, shutdown).await;
    handshakes.abort();
}

/// Accepts TCP connections and runs their TLS handshakes concurrently (a slow client cannot
/// hold up the others), admitting them through the same [`gate`] as the peer port (without
/// its reserve), and hands authenticated, allowed ones to the HTTP server.
async fn tls_handshakes(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    tls: Arc<TlsHandle>,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let gate = Gate::new(gate::Limits {
        reserved: 0,
        ..daemon.config.gate_limits()
    });
    let mut spare = gate::Spare::new();
    // The handshakes in flight belong to this task: when it ends (shutdown, or aborted with
    // the server), dropping the set aborts them, rather than leaving them detached.
    let mut admitting = tokio::task::JoinSet::new();
    loop {
        while admitting.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, from) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                gate::accept_failed(&daemon.rejections, "TLS API port", &error);
                if let Some(tcp) = spare.answer_one(&listener, &error).await {
                    gate.refuse(tcp, &gate::TLS_BUSY_ALERT).await;
                    spare.restore();
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        spare.restore();
        let (waiting, _) = gate.wait(from.ip());
        let (tls, sender, daemon, gate) = (
            tls.current(),
            sender.clone(),
            Arc::clone(&daemon),
            Arc::clone(&gate),
        );
        admitting.spawn(admit(daemon, gate, tls, sender, (tcp, from), waiting));
    }
}

/// One connection to the TLS API port: waits for its first byte and a handshake slot, runs
/// the handshake within the deadline, and hands the connection on if its identity is
/// allowed. Refusals are counted and logged (throttled).
async fn admit(
    daemon: Arc<Daemon>,
    gate: Arc<Gate>,
    tls: Arc<crate::tls::Tls>,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    (tcp, from): (TcpStream, SocketAddr),
    waiting: gate::Waiting,
) {
    let deadline = tokio::time::Instant::now() + daemon.config.timing.handshake_timeout;
    let heard = waiting.first_byte(&tcp).await;
    drop(waiting);
    let refusal = match heard {
        FirstByte::Heard => match gate.enter(from.ip()) {
            Ok(slot) => {
                let handshake =
                    tokio::time::timeout_at(deadline, tls.accept(tcp, &from.to_string())).await;
                match handshake {
                    Ok(Ok((stream, identity))) if tls.allows(&identity) => {
                        let _ = sender.send((stream, from)).await;
                        drop(slot);
                        return;
                    }
                    Ok(Ok((_, identity))) => format!("identity {identity} is not allowed"),
                    Ok(Err(error)) => crate::human::Chain(&error).to_string(),
                    Err(_) => "no TLS handshake in time".to_owned(),
                }
            }
            Err(refused) => {
                if let Some(suppressed) = daemon.rejections.record("api_busy") {
                    tracing::warn!(%from, suppressed, "API connection refused: {refused}");
                }
                gate.refuse(tcp, &gate::TLS_BUSY_ALERT).await;
                return;
            }
        },
        FirstByte::Gone | FirstByte::Evicted => return,
        FirstByte::Silent => "nothing sent within the first-byte deadline".to_owned(),
    };
    if let Some(suppressed) = daemon.rejections.record("api_tls") {
        tracing::warn!(%from, suppressed, "API connection refused: {refusal}");
    }
}

/// Authenticated TLS connections, for axum.
struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: std::io::Result<SocketAddr>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The handshake task is gone (shutdown): wait for the server to stop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local {
            Ok(addr) => Ok(*addr),
            Err(error) => Err(std::io::Error::new(error.kind(), error.to_string())),
        }
    }
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/info", get(info::info))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/events", get(events::events))
        .route(
            "/v1/migrations",
            post(migrations::create).get(migrations::list),
        )
        .route(
            "/v1/migrations/{id}",
            get(migrations::show).delete(migrations::forget),
        )
        .route("/v1/migrations/{id}/cancel", post(migrations::cancel))
        .with_state(daemon)
}
