//! `migproxy daemon`: one per host; see [`crate::daemon`].

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::EXIT_FAILED;
use crate::daemon::{self, Config, Daemon};
use crate::human::OsError;
use crate::transport::bind_unix;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unix socket of the local REST API (created 0600).
    #[arg(long, value_name = "PATH")]
    api: PathBuf,
    /// TCP address where other daemons connect (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    peer_listen: String,
    /// Address handed to source daemons; default the --peer-listen address.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Directory for the per-migration sockets handed to the source QEMU.
    #[arg(long, value_name = "DIR", default_value = "/run/migproxy")]
    runtime_dir: PathBuf,
    /// Carry migrations between daemons unencrypted and unauthenticated (but for the token).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Declare the peer daemon gone after this many seconds without a word.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = super::seconds)]
    peer_timeout: Duration,
    /// Fail an active migration when no byte moves on any channel for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = super::seconds)]
    stall_timeout: Duration,
    /// How long an incoming migration waits for its source daemon.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = super::seconds)]
    token_ttl: Duration,
}

pub async fn run(args: Args) -> u8 {
    match start(args).await {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("migproxy daemon: {message}");
            EXIT_FAILED
        }
    }
}

async fn start(args: Args) -> Result<(), String> {
    let peers = TcpListener::bind(&args.peer_listen)
        .await
        .map_err(|e| format!("listen on tcp:{} failed: {}", args.peer_listen, OsError(&e)))?;
    let bound = peers
        .local_addr()
        .map_err(|e| format!("peer listener: {}", OsError(&e)))?;
    let advertise = advertised(args.advertise, bound)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.runtime_dir)
        .map_err(|e| {
            format!(
                "runtime dir {}: {}",
                args.runtime_dir.display(),
                OsError(&e)
            )
        })?;
    let api = bind_unix(&args.api).map_err(|e| {
        format!(
            "listen on unix:{} failed: {}",
            args.api.display(),
            OsError(&e)
        )
    })?;
    std::fs::set_permissions(&args.api, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("API socket {}: {}", args.api.display(), OsError(&e)))?;

    if !args.insecure_plaintext {
        tracing::warn!("TLS is not available yet: the peer link is plaintext");
    }
    tracing::warn!("peer link is PLAINTEXT: migration data crosses the network unencrypted");
    eprintln!(
        "migproxy daemon: API on unix:{}, peers on tcp:{bound} (advertised as {advertise}), plaintext",
        args.api.display()
    );
    let mut config = Config::new(advertise, args.runtime_dir);
    config.timing.peer_timeout = args.peer_timeout;
    config.token_ttl = args.token_ttl;
    config.stall_timeout = args.stall_timeout;
    let shutdown = CancellationToken::new();
    super::cancel_on_signals(shutdown.clone(), "migproxy daemon", "every migration")
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    daemon::run(Daemon::new(config), api, peers, shutdown).await;
    let _ = std::fs::remove_file(&args.api);
    Ok(())
}

/// The address source daemons are told to dial.
fn advertised(advertise: Option<String>, bound: SocketAddr) -> Result<String, String> {
    match advertise {
        Some(address) => Ok(address),
        None if bound.ip().is_unspecified() => Err(format!(
            "--peer-listen {bound} listens on every address: say which one sources should \
             dial with --advertise HOST:PORT"
        )),
        None => Ok(bound.to_string()),
    }
}
