//! Runs a daemon: wires its REST API (a unix socket, and TCP behind mutual TLS if asked) and
//! its peer port to one [`Daemon`], on listeners the caller has bound (port 0 in tests), until
//! a shutdown token is cancelled — mini-redis's `server::run(listener, shutdown)`.
//!
//! [`daemon`](crate::daemon) knows nothing of the API; the API serves a daemon; this module
//! starts both and ends them in order: the peers are told of every cancel before the API goes.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::daemon::{Daemon, incoming, migration};

/// Runs a daemon on bound listeners until `shutdown` is cancelled; then cancels what is
/// still running and returns once the peers have been told.
pub async fn run(
    daemon: Arc<Daemon>,
    api: UnixListener,
    peers: TcpListener,
    shutdown: CancellationToken,
) {
    run_with(daemon, api, None, peers, shutdown).await;
}

/// As [`run`], also serving the API on `api_tls` behind mutual TLS (the daemon must have TLS).
pub async fn run_with(
    daemon: Arc<Daemon>,
    api: UnixListener,
    api_tls: Option<TcpListener>,
    peers: TcpListener,
    shutdown: CancellationToken,
) {
    let api_task = tokio::spawn(api::serve(Arc::clone(&daemon), api, shutdown.clone()));
    let tls_api_task = match (api_tls, &daemon.config.tls) {
        (Some(listener), Some(tls)) => Some(tokio::spawn(api::serve_tls(
            Arc::clone(&daemon),
            listener,
            Arc::clone(tls),
            shutdown.clone(),
        ))),
        _ => None,
    };
    incoming::serve_peers(Arc::clone(&daemon), peers, shutdown.clone()).await;
    daemon.cancel_all();
    // After the cancellations' own events: event streams end here.
    let _ = daemon.events.send(migration::Event::shutdown());
    // Let the control links carry the cancels out, but do not hang on a dead peer.
    daemon.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), daemon.tasks.wait()).await;
    // In-flight API requests get a moment to finish; long-lived ones (event streams) do not
    // hold the daemon up beyond it.
    for task in std::iter::once(api_task).chain(tls_api_task) {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}
