//! `migproxy daemon`: one per host; see [`crate::daemon`].

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::process::EXIT_FAILED;
use crate::config::{self, ConfigError, Flags, Settings};
use crate::daemon::runtime::RuntimeDir;
use crate::daemon::runtime::RuntimeDirError;
use crate::daemon::{Config, Daemon};
use crate::human::Chain;
use crate::tls::{TlsError, TlsHandle};
use crate::transport::bind_unix;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML configuration file (see docs/config.md); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket of the local REST API (created 0600).
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// TCP address where other daemons connect (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    peer_listen: Option<String>,
    /// Address handed to source daemons; default the --peer-listen address.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Directory for the per-migration sockets handed to the source QEMU (default
    /// /run/migproxy; created 0700; it must belong to the daemon's user, must not be a
    /// symbolic link, and must not be writable by its group or others).
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Let this group (QEMU's, e.g. kvm) create sockets in the runtime directory: it must
    /// then be owned by the daemon's user and this group, mode 1770 (created so if missing).
    #[arg(long, value_name = "GROUP")]
    runtime_dir_group: Option<String>,
    /// Allow incoming migrations to target unix sockets only inside this directory
    /// (repeatable; default: any absolute path).
    #[arg(long, value_name = "DIR")]
    target_dir: Vec<PathBuf>,
    /// Let this group use the API socket too (mode 0660 instead of 0600).
    #[arg(long, value_name = "GROUP")]
    api_group: Option<String>,
    /// Also serve the API on TCP (HOST:PORT) behind the peer port's mutual TLS.
    #[arg(long, value_name = "HOST:PORT")]
    api_listen: Option<String>,
    /// Directory of x509 material in QEMU's layout (ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem, optional ca-crl.pem): mutual TLS on
    /// every peer connection.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure_plaintext")]
    tls_dir: Option<PathBuf>,
    /// Accept only source daemons whose certificate matches: a subject DN (`CN=src*, O=Example`)
    /// or a subject alternative name (`DNS:*.example.org`, `IP:10.0.0.1`). Repeatable.
    #[arg(long, value_name = "PATTERN")]
    tls_allow: Vec<String>,
    /// Record layer of the TLS peer connections: `migproxy` (its own, the default) or
    /// `stock` (rustls's, through tokio-rustls): the escape hatch.
    #[arg(long, value_name = "migproxy|stock")]
    tls_records: Option<crate::tls::Records>,
    /// Carry migrations between daemons unencrypted and unauthenticated (but for the token).
    #[arg(long)]
    insecure_plaintext: bool,
    /// With TLS: let migrations take the kernel data path, whose data goes in clear while
    /// TLS keeps guarding the control link and the admission (docs/security.md).
    #[arg(long)]
    allow_clear_data: bool,
    /// The data path of migrations that do not ask for one (default relay).
    #[arg(long, value_name = "relay|kernel|auto")]
    data_path: Option<crate::daemon::data_path::DataPath>,
    /// Declare the peer daemon gone after this many seconds without a word (default 10).
    #[arg(long, value_name = "SECONDS", value_parser = super::args::positive_seconds)]
    peer_timeout: Option<Duration>,
    /// Fail an active migration when no byte moves on any channel for this many seconds
    /// (default 30).
    #[arg(long, value_name = "SECONDS", value_parser = super::args::positive_seconds)]
    stall_timeout: Option<Duration>,
    /// How long an incoming migration waits for its source daemon (default 300).
    #[arg(long, value_name = "SECONDS", value_parser = super::args::positive_seconds)]
    token_ttl: Option<Duration>,
    /// Fail a migration whose source QEMU has not connected this many seconds after the
    /// daemons linked up (default 300): a `migrate` that never came holds no slot for ever.
    #[arg(long, value_name = "SECONDS", value_parser = super::args::positive_seconds)]
    first_channel_timeout: Option<Duration>,
    /// How long a paused postcopy migration driven over QMP may take to recover before it
    /// fails for good (default 600), unless it asks otherwise (`recover_timeout`).
    #[arg(long, value_name = "SECONDS", value_parser = super::args::positive_seconds)]
    recover_timeout: Option<Duration>,
    /// How long a resumable channel may go without a working peer connection before the
    /// migration fails (issue #18; relay path only), unless it asks otherwise
    /// (`resume_timeout`). Default 60; 0: channels are not resumable.
    #[arg(long, value_name = "SECONDS", value_parser = super::args::seconds)]
    resume_timeout: Option<Duration>,
}

impl Args {
    /// The configuration in force: flags over the file over the defaults.
    fn settings(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => config::File::load(path)?,
            None => config::File::default(),
        };
        let flags = Flags {
            api: self.api,
            api_group: self.api_group,
            api_listen: self.api_listen,
            peer_listen: self.peer_listen,
            advertise: self.advertise,
            runtime_dir: self.runtime_dir,
            runtime_dir_group: self.runtime_dir_group,
            target_dirs: self.target_dir,
            insecure_plaintext: self.insecure_plaintext,
            allow_clear_data: self.allow_clear_data,
            data_path: self.data_path,
            tls_dir: self.tls_dir,
            tls_allow: self.tls_allow,
            tls_records: self.tls_records,
            peer_timeout: self.peer_timeout,
            stall_timeout: self.stall_timeout,
            token_ttl: self.token_ttl,
            first_channel_timeout: self.first_channel_timeout,
            recover_timeout: self.recover_timeout,
            resume_timeout: self.resume_timeout,
        };
        Settings::resolve(flags, file)
    }
}

pub async fn run(args: Args) -> u8 {
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("migproxy daemon: {}", Chain(&error));
            return super::process::EXIT_USAGE;
        }
    };
    if settings.tls_dir.is_some() && settings.insecure_plaintext {
        eprintln!(
            "migproxy daemon: TLS (--tls-dir, tls.dir) and insecure_plaintext exclude each other"
        );
        return super::process::EXIT_USAGE;
    }
    if settings.api_listen.is_some() && settings.tls_dir.is_none() {
        eprintln!(
            "error: --api-listen needs --tls-dir: the API on TCP is only served over mutual TLS"
        );
        return super::process::EXIT_USAGE;
    }
    if !settings.tls_allow.is_empty() && settings.tls_dir.is_none() {
        eprintln!("error: --tls-allow needs --tls-dir: only TLS peers have identities to allow");
        return super::process::EXIT_USAGE;
    }
    if settings.tls_records != crate::tls::Records::default() && settings.tls_dir.is_none() {
        eprintln!("error: --tls-records needs --tls-dir: a plaintext link has no TLS records");
        return super::process::EXIT_USAGE;
    }
    match start(settings).await {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("migproxy daemon: {}", Chain(&error));
            EXIT_FAILED
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "no --tls-dir given: the peer link must be secured with mutual TLS (QEMU's x509 \
         directory layout), or --insecure-plaintext must say that it need not be"
    )]
    NoSecurity,
    #[error("listen on tcp:{address}{role} failed")]
    Listen {
        address: String,
        /// `" (API)"` for the API's TLS listener, empty for the peer port.
        role: &'static str,
        #[source]
        error: io::Error,
    },
    #[error("peer listener")]
    PeerAddress(#[source] io::Error),
    #[error(
        "--peer-listen {0} listens on every address and this host has no name other hosts could \
         dial (it is empty or localhost): say which address sources should dial with \
         --advertise HOST:PORT"
    )]
    EveryAddress(SocketAddr),
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
    #[error("cannot install SIGHUP handler")]
    Sighup(#[source] io::Error),
    #[error("listen on unix:{} failed", .0.display())]
    ApiListen(PathBuf, #[source] io::Error),
    #[error("API socket {}", .0.display())]
    ApiSocket(PathBuf, #[source] io::Error),
    #[error("--api-group {0}: no such group")]
    NoGroup(String),
}

async fn start(args: Settings) -> Result<(), StartError> {
    // Everything that can be refused is checked before anything is bound or created.
    let tls = security(&args)?;
    let peers = bind(&args.peer_listen, "").await?;
    let bound = peers.local_addr().map_err(StartError::PeerAddress)?;
    let advertise = advertised(args.advertise.clone(), bound)?;
    let runtime = RuntimeDir::open(&args.runtime_dir, args.runtime_dir_group.as_deref())?;
    for stale in runtime.remove_stale_sockets().await? {
        tracing::info!(path = %stale.display(), "removed a stale socket (its daemon did not stop cleanly)");
    }
    let shutdown = CancellationToken::new();
    super::process::cancel_on_signals(shutdown.clone(), "migproxy daemon", "every migration")
        .map_err(StartError::Signals)?;
    if let Some(tls) = &tls {
        reload_on_sighup(Arc::clone(tls)).map_err(StartError::Sighup)?;
    }
    let api_tls = match &args.api_listen {
        Some(address) => Some(bind(address, " (API)").await?),
        None => None,
    };
    let api_tls_address = api_tls.as_ref().and_then(|l| l.local_addr().ok());
    let (api_file, api) = ApiSocket::bind(&args.api, args.api_group.as_deref())?;
    eprintln!(
        "migproxy daemon: API on unix:{}, peers on tcp:{bound} (advertised as {advertise}), {}",
        args.api.display(),
        match &args.tls_dir {
            Some(dir) => format!("mutual TLS from {}", dir.display()),
            None => "PLAINTEXT".to_owned(),
        }
    );
    let mut config = daemon_config(args, advertise, runtime);
    config.tls = tls;
    config.api_tls = api_tls_address.map(|a| a.to_string());
    crate::server::run_with(Daemon::new(config), api, api_tls, peers, shutdown).await;
    drop(api_file);
    Ok(())
}

/// A TCP listener on `address`; `role` names it in the error (empty for the peer port).
async fn bind(address: &str, role: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|error| StartError::Listen {
            address: address.to_owned(),
            role,
            error,
        })
}

/// The daemon's configuration from the settings (flags over the config file).
fn daemon_config(args: Settings, advertise: String, runtime: RuntimeDir) -> Config {
    let mut config = Config::new(advertise, args.runtime_dir);
    config.runtime = Some(Arc::new(runtime));
    config.allow_clear_data = args.allow_clear_data;
    config.data_path = args.data_path;
    config.timing.peer_timeout = args.peer_timeout;
    config.timing.connect_timeout = args.connect_timeout;
    config.timing.handshake_timeout = args.handshake_timeout;
    config.timing.heartbeat_interval = args.heartbeat_interval;
    config.token_ttl = args.token_ttl;
    config.first_channel_timeout = args.first_channel_timeout;
    config.recover_timeout = args.recover_timeout;
    config.resume_timeout = args.resume_timeout;
    config.stall_timeout = args.stall_timeout;
    config.target_dirs = args.target_dirs;
    config.max_migrations = args.max_migrations;
    config.max_channels = args.max_channels;
    config.max_handshakes = args.max_handshakes;
    config.max_handshakes_per_address = args.max_handshakes_per_address;
    config.reserved_handshakes = args.reserved_handshakes;
    config.max_silent_connections = args.max_silent_connections;
    config.first_byte_timeout = args.first_byte_timeout;
    config.api_limits = args.api_limits;
    config
}

/// The API socket file, removed when dropped (also on an early error).
struct ApiSocket(PathBuf);

impl ApiSocket {
    /// Binds the API socket, usable by this user only (and `group`, when given).
    fn bind(
        path: &std::path::Path,
        group: Option<&str>,
    ) -> Result<(ApiSocket, tokio::net::UnixListener), StartError> {
        let listener = bind_unix(path).map_err(|e| StartError::ApiListen(path.to_owned(), e))?;
        let file = ApiSocket(path.to_owned());
        let failed = |e: io::Error| StartError::ApiSocket(path.to_owned(), e);
        let mode = match group {
            Some(name) => {
                let group = nix::unistd::Group::from_name(name)
                    .map_err(|e| failed(e.into()))?
                    .ok_or_else(|| StartError::NoGroup(name.to_owned()))?;
                nix::unistd::chown(path, None, Some(group.gid)).map_err(|e| failed(e.into()))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
        Ok((file, listener))
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// TLS material, or the operator's explicit consent to plaintext.
fn security(args: &Settings) -> Result<Option<Arc<TlsHandle>>, StartError> {
    match (&args.tls_dir, args.insecure_plaintext) {
        (Some(dir), _) => Ok(Some(Arc::new(TlsHandle::load_with(
            dir,
            args.tls_allow.clone(),
            args.tls_records,
        )?))),
        (None, true) => {
            tracing::warn!(
                "peer link is PLAINTEXT: migration data crosses the network unencrypted"
            );
            Ok(None)
        }
        (None, false) => Err(StartError::NoSecurity),
    }
}

/// Reloads the TLS material on every SIGHUP; connections already made keep theirs.
fn reload_on_sighup(tls: Arc<TlsHandle>) -> io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => eprintln!(
                    "migproxy daemon: SIGHUP: TLS material reloaded from {}",
                    tls.dir().display()
                ),
                Err(error) => {
                    // One write: a reader of the log never sees the line without its reason.
                    let line = format!(
                        "migproxy daemon: SIGHUP: reload failed, keeping the old TLS material: {}\n",
                        Chain(&error)
                    );
                    eprint!("{line}");
                }
            }
        }
    });
    Ok(())
}

/// The address source daemons are told to dial. Listening on every address, it is this host's
/// name (as `hostname` prints it), as libvirt's default migration URI is: the name the other
/// hosts know it by, and the one its TLS certificate names. The packaged config relies on it.
/// A host named `localhost`, or whose name cannot be read, must say.
fn advertised(advertise: Option<String>, bound: SocketAddr) -> Result<String, StartError> {
    advertised_with(advertise, bound, host_name)
}

fn advertised_with(
    advertise: Option<String>,
    bound: SocketAddr,
    host_name: impl FnOnce() -> Option<String>,
) -> Result<String, StartError> {
    match advertise {
        Some(address) => Ok(address),
        None if bound.ip().is_unspecified() => match host_name().and_then(usable_host_name) {
            Some(name) => Ok(format!("{name}:{}", bound.port())),
            None => Err(StartError::EveryAddress(bound)),
        },
        None => Ok(bound.to_string()),
    }
}

fn host_name() -> Option<String> {
    nix::unistd::gethostname().ok()?.into_string().ok()
}

/// A name other hosts could dial: not empty, not loopback, letters, digits, `-` and `.` only.
fn usable_host_name(name: String) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let loopback = lower == "localhost" || lower.starts_with("localhost.");
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
    (valid && !loopback).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_address() -> SocketAddr {
        "0.0.0.0:4700".parse().unwrap()
    }

    #[test]
    fn a_wildcard_listener_advertises_the_host_name() {
        let name = || Some("hv-1.example.org".to_owned());
        let advertised = advertised_with(None, every_address(), name).unwrap();
        assert_eq!(advertised, "hv-1.example.org:4700");
        let ipv6: SocketAddr = "[::]:4700".parse().unwrap();
        assert_eq!(
            advertised_with(None, ipv6, || Some("hv-1".into())).unwrap(),
            "hv-1:4700"
        );
    }

    #[test]
    fn the_configured_or_bound_address_wins() {
        let name = || Some("hv-1".to_owned());
        let configured = Some("10.0.0.2:4700".to_owned());
        assert_eq!(
            advertised_with(configured, every_address(), name).unwrap(),
            "10.0.0.2:4700"
        );
        let bound: SocketAddr = "10.0.0.3:4700".parse().unwrap();
        assert_eq!(advertised_with(None, bound, name).unwrap(), "10.0.0.3:4700");
    }

    #[test]
    fn a_name_no_other_host_could_dial_is_refused() {
        for name in [
            None,
            Some(""),
            Some("localhost"),
            Some("LocalHost.localdomain"),
            Some("a b"),
        ] {
            let error = advertised_with(None, every_address(), || name.map(str::to_owned))
                .unwrap_err()
                .to_string();
            assert!(error.contains("--advertise HOST:PORT"), "{name:?}: {error}");
        }
    }
}
