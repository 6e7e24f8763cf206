//! The demo's two daemons, run in this process on loopback, and what a management layer
//! does with them: create the migration on both, then read both reports.

use std::path::Path;
use std::time::Duration;

use crate::api::types::{IncomingRequest, OutgoingRequest};
use crate::daemon::migration::view::Snapshot;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::daemon::{Config, Daemon};

/// Whatever stops the demo, shown as one line.
pub(crate) type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// A daemon run in this process, on loopback.
pub(crate) struct DemoDaemon {
    pub(crate) client: Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DemoDaemon {
    pub(crate) async fn start(dir: &Path, name: &str) -> Result<DemoDaemon, DemoError> {
        let api_path = dir.join(format!("{name}-api.sock"));
        let api = UnixListener::bind(&api_path)?;
        let peers = TcpListener::bind("127.0.0.1:0").await?;
        let runtime = dir.join(format!("{name}-run"));
        std::fs::create_dir(&runtime)?;
        let mut config = Config::new(peers.local_addr()?.to_string(), runtime);
        // As the shipped daemon: resumable channels on.
        config.resume_timeout = crate::config::DEFAULT_RESUME_TIMEOUT;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(crate::server::run(
            Daemon::new(config),
            api,
            peers,
            shutdown.clone(),
        ));
        Ok(DemoDaemon {
            client: Client::new(api_path),
            shutdown,
            task,
        })
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Creates the incoming half from `incoming`, then the outgoing half with `outgoing`'s
/// extra fields; returns the destination's peer address and the source QEMU's URI.
pub(crate) async fn create_both(
    source: &DemoDaemon,
    destination: &DemoDaemon,
    incoming: IncomingRequest,
    outgoing: OutgoingRequest,
) -> Result<(String, String), DemoError> {
    let incoming = destination.client.create_incoming(&incoming).await?;
    let request = OutgoingRequest {
        id: "demo".to_owned(),
        token: incoming.token,
        peer: incoming.peer.clone(),
        ..outgoing
    };
    let outgoing = source.client.create_outgoing(&request).await?;
    Ok((incoming.peer, outgoing.qemu_uri))
}

/// Both daemons' final reports, printed one after the other.
pub(crate) async fn reports(
    source: &DemoDaemon,
    destination: &DemoDaemon,
) -> Result<(Snapshot, Snapshot), DemoError> {
    let at_source = wait_final(&source.client).await?;
    let at_destination = wait_final(&destination.client).await?;
    say!("\nthe source daemon reports:");
    crate::cli::migration::print_report(&at_source, false);
    say!("the destination daemon reports:");
    crate::cli::migration::print_report(&at_destination, false);
    Ok((at_source, at_destination))
}

/// The migration once it has ended on this daemon (both daemons agree before they end).
pub(crate) async fn wait_final(client: &Client) -> Result<Snapshot, DemoError> {
    for _ in 0..100 {
        let migration = client.migration("demo").await?;
        if migration.state.is_final() {
            return Ok(migration);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the migration did not end within 5 s of the stream".into())
}
