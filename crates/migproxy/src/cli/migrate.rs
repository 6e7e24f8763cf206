//! `migproxy migrate`: one command, run on the source host, migrates a QEMU VM through the
//! daemons of both hosts.
//!
//! ```text
//!  migproxy migrate                  destination daemon            source daemon
//!     │ POST incoming {qmp, multifd} ──► QMP: checks, capabilities,
//!     │ ◄── id, token, peer ─────────    migrate-incoming
//!     │ POST outgoing {token, peer, qmp, …} ─────────────────────► QMP: checks, capabilities,
//!     │                                                             migrate
//!     │ GET both, every interval: QEMU status, pass, RAM left, dirty rate, channels
//!     │ Ctrl-C ─► POST cancel (source) ───────────────────────────► migrate_cancel, teardown
//!     │ final report: QEMU on both hosts, migproxy's channels, the error if any
//! ```
//!
//! The destination daemon's API is its unix socket (same host) or its mutual-TLS listener
//! (`--api-listen` on the destination), reached with this host's certificates.
//!
//! Exit codes: 0 completed; 1 failed, cancelled or refused; 2 usage; 3 a daemon could not
//! be reached. With `--libvirt DOMAIN` libvirt drives QEMU instead (see [`super::libvirt`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::failure::Failure;
use super::migration::{self, QemuFlags};
use super::process::{EXIT_FAILED, EXIT_USAGE};
use crate::api::types::{DataPath, IncomingRequest, OutgoingRequest};
use crate::client::Client;
use crate::daemon::migration::State;
use crate::daemon::migration::view::Snapshot;
use crate::human::{Bytes, Elapsed};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The destination daemon's API: unix:PATH (or a path) on this host, or HOST:PORT of
    /// its mutual-TLS API listener (`--api-listen`) on another host.
    #[arg(long, value_name = "DEST_API")]
    to: String,
    /// The destination QEMU's QMP socket, on the destination host (QEMU started with
    /// -incoming defer).
    #[arg(long, value_name = "PATH", required_unless_present = "libvirt")]
    dest_qmp: Option<PathBuf>,
    #[command(flatten)]
    qemu: QemuFlags,
    /// A libvirt guest instead of a bare QEMU (see `--libvirt`).
    #[command(flatten)]
    libvirt: super::libvirt::LibvirtFlags,
    /// The migration's id (default: generated).
    #[arg(long)]
    id: Option<String>,
    /// This host's daemon API socket. Default: MIGPROXY_API, else `api` in the config file,
    /// else /run/migproxy/api.sock.
    #[arg(long, value_name = "PATH", env = "MIGPROXY_API")]
    api: Option<PathBuf>,
    /// This host's config file (default /etc/migproxy/migproxy.toml, when it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Certificates to reach a remote destination API, in QEMU's layout (default: the
    /// config file's tls dir, else /etc/pki/qemu).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The name the destination API's certificate must carry (default: its host).
    #[arg(long, value_name = "NAME")]
    tls_hostname: Option<String>,
    /// Seconds between progress updates (at least 0.05).
    #[arg(long, default_value = "0.5", value_parser = interval)]
    interval: Duration,
    /// Print the final reports of both daemons as JSON.
    #[arg(long)]
    json: bool,
}

fn interval(text: &str) -> Result<Duration, String> {
    let interval = super::args::seconds(text)?;
    if interval < Duration::from_millis(50) {
        return Err(format!("{text} s: at least 0.05"));
    }
    Ok(interval)
}

pub async fn run(args: Args) -> u8 {
    let json = args.json;
    match migrate(args).await {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            if json {
                say!(
                    "{}",
                    json!({"error": failure.message, "exit_code": failure.code})
                );
            }
            failure.code
        }
    }
}

/// The first SIGINT or SIGTERM cancels `shutdown`; a second one leaves at once (exit 1),
/// for when the cancel itself hangs.
fn watch_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        for n in 0.. {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            if n > 0 {
                eprintln!("migproxy: {name} again: leaving without waiting for the cancel");
                std::process::exit(EXIT_FAILED.into());
            }
            eprintln!("migproxy: {name} received, cancelling the migration");
            shutdown.cancel();
        }
    });
    Ok(())
}

/// What the flags ask for, checked before anything is contacted.
fn check(args: &Args) -> Result<(), Failure> {
    if args.qemu.qmp.is_none() && args.libvirt.libvirt.is_none() {
        return Err(Failure::usage(
            "--qmp (the source QEMU's QMP socket) or --libvirt (a libvirt domain) is needed".into(),
        ));
    }
    if args.libvirt.libvirt.is_some()
        && args
            .qemu
            .data_path
            .is_some_and(|path| path != DataPath::Relay)
    {
        return Err(Failure::usage(
            "--data-path: libvirt drives QEMU with --libvirt, so the daemons cannot hand it the \
             socket: only the relay serves"
                .into(),
        ));
    }
    Ok(())
}

async fn migrate(args: Args) -> Result<u8, Failure> {
    check(&args)?;
    let shutdown = CancellationToken::new();
    if let Err(error) = watch_signals(shutdown.clone()) {
        eprintln!("migproxy: cannot watch for signals ({error}); Ctrl-C will not cancel cleanly");
    }
    let (api, tls_dir) = migration::local_daemon(args.api.as_ref(), args.config.as_ref())
        .map_err(|e| Failure::usage(crate::human::Chain(&e).to_string()))?;
    let source = Client::new(api);
    let destination = destination(&args, tls_dir)?;
    let id = args.id.clone().unwrap_or_else(|| {
        format!(
            "migrate-{}",
            &crate::daemon::token::Token::generate().to_hex()[..12]
        )
    });
    if args.libvirt.libvirt.is_some() {
        let run = super::libvirt::Run {
            source: &source,
            destination: &destination,
            id: &id,
            flags: &args.libvirt,
            qemu: &args.qemu,
            interval: args.interval,
            json: args.json,
            shutdown: &shutdown,
        };
        return run.migrate().await;
    }
    let (token, peer) = create_incoming(&destination, &args, &id).await?;
    let outgoing = match shutdown.is_cancelled() {
        true => Err(Failure::interrupted()),
        false => create_outgoing(&source, &args, &id, &token, &peer).await,
    };
    if let Err(failure) = outgoing {
        // Nothing moved: take the destination's half back.
        let _ = destination.cancel(&id).await;
        return Err(failure);
    }
    if !args.json {
        eprintln!(
            "migrating {id}: {} → {} (Ctrl-C cancels)",
            source.target(),
            destination.target()
        );
    }
    let end = follow(&source, &id, args.interval, &shutdown).await?;
    let far = final_of(&destination, &id).await;
    report(&end, far.as_ref(), args.json);
    Ok(if end.state == State::Completed {
        0
    } else {
        EXIT_FAILED
    })
}

/// The destination daemon's API client, from `--to`.
fn destination(args: &Args, tls_dir: Option<PathBuf>) -> Result<Client, Failure> {
    let to = args.to.as_str();
    if let Some(path) = to.strip_prefix("unix:") {
        return Ok(Client::new(path));
    }
    if to.starts_with('/') {
        return Ok(Client::new(to));
    }
    let address = to
        .strip_prefix("https://")
        .unwrap_or(to)
        .trim_end_matches('/');
    let host = match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => {
            return Err(Failure::usage(format!(
                "--to: \"{to}\" is neither unix:PATH nor HOST:PORT of a destination API"
            )));
        }
    };
    let dir = args
        .tls_dir
        .clone()
        .or(tls_dir)
        .unwrap_or_else(|| PathBuf::from("/etc/pki/qemu"));
    let tls = crate::tls::Tls::load(&dir, Vec::new()).map_err(|e| Failure {
        message: format!("--tls-dir: {}", crate::human::Chain(&e)),
        code: EXIT_USAGE,
    })?;
    let name = args.tls_hostname.clone().unwrap_or_else(|| host.to_owned());
    Ok(Client::tls(address.to_owned(), name, Arc::new(tls)))
}

/// Creates the destination's half: returns its token and peer address.
async fn create_incoming(
    destination: &Client,
    args: &Args,
    id: &str,
) -> Result<(String, String), Failure> {
    let Some(dest_qmp) = &args.dest_qmp else {
        return Err(Failure::usage(
            "--dest-qmp: the destination QEMU's QMP socket is needed".into(),
        ));
    };
    // A relative path means something only on this host: when the destination is here.
    let dest_qmp = if destination.is_local() {
        migration::absolute(dest_qmp)
    } else {
        dest_qmp.clone()
    };
    let request = IncomingRequest {
        id: Some(id.to_owned()),
        qmp: Some(dest_qmp.display().to_string()),
        multifd: args.qemu.multifd,
        postcopy: args.qemu.postcopy || args.qemu.postcopy_after.is_some(),
        data_path: args.qemu.data_path,
        recoverable: args.qemu.recoverable(),
        recover_timeout: args.qemu.recover_timeout.map(|t| t.as_secs_f64()),
        resume_timeout: args.qemu.resume_timeout.map(|t| t.as_secs_f64()),
        ..IncomingRequest::default()
    };
    let created = destination
        .create_incoming(&request)
        .await
        .map_err(|e| Failure::from_client("destination daemon", e))?;
    Ok((created.token, created.peer))
}

async fn create_outgoing(
    source: &Client,
    args: &Args,
    id: &str,
    token: &str,
    peer: &str,
) -> Result<(), Failure> {
    if args.qemu.qmp.is_none() {
        return Err(Failure::usage(
            "--qmp: the source QEMU's QMP socket is needed".into(),
        ));
    }
    let mut request = OutgoingRequest {
        id: id.to_owned(),
        token: token.to_owned(),
        peer: peer.to_owned(),
        ..OutgoingRequest::default()
    };
    args.qemu.apply(&mut request);
    source
        .create_outgoing(&request)
        .await
        .map_err(|e| Failure::from_client("source daemon", e))?;
    Ok(())
}

/// Shows progress until the migration ends; the first signal cancels it (and the watch
/// goes on until the cancel has taken effect). Returns the source's final report.
async fn follow(
    source: &Client,
    id: &str,
    interval: Duration,
    shutdown: &CancellationToken,
) -> Result<Snapshot, Failure> {
    let line = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut cancel_sent = false;
    let mut ended_at = None;
    let end = loop {
        if shutdown.is_cancelled() && !cancel_sent {
            cancel_sent = true;
            line.suspend(|| eprintln!("cancelling {id} on both hosts"));
            if let Err(error) = source.cancel(id).await {
                line.suspend(|| eprintln!("cancel refused: {error}"));
            }
        }
        let m = source
            .migration(id)
            .await
            .map_err(|e| Failure::from_client("source daemon", e))?;
        // Once migproxy's verdict is in, QEMU gets a moment to settle (`cancelling` →
        // `cancelled`) so that the report shows its last word.
        if m.state.is_final() {
            let since = *ended_at.get_or_insert_with(std::time::Instant::now);
            if migration::settled(&m) || since.elapsed() > SETTLE {
                break m;
            }
        }
        line.set_message(progress(&m));
        line.tick();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled(), if !cancel_sent => {}
        }
    };
    line.finish_and_clear();
    Ok(end)
}

/// One line: QEMU's status and pass, RAM left, dirty rate, throughput, channels; while
/// postcopy is paused, how long the link has been down.
fn progress(m: &Snapshot) -> String {
    if let Some(line) = recovery_line(m).or_else(|| resuming_line(m)) {
        return line;
    }
    let q = m.qemu.as_ref().map(|q| &q.report);
    let channels = m.channels.len();
    let status = q.map_or_else(|| "?".to_owned(), |q| q.status.to_string());
    let mut text = format!("{} · QEMU {status}", m.state);
    if let Some(pass) = q.map(|q| q.pass).filter(|p| *p > 0) {
        text += &format!(" pass {pass}");
    }
    if let Some(ram) = q.and_then(|q| q.ram.as_ref()) {
        text += &format!(
            " · RAM {} left of {} · dirty {}/s",
            Bytes(ram.remaining),
            Bytes(ram.total),
            Bytes(ram.dirty_bytes_per_second),
        );
    }
    text += &format!(
        " · {}/s · {} moved · {channels} channel{}",
        Bytes(m.throughput.current_bytes_per_second),
        Bytes(m.bytes.to_destination),
        if channels == 1 { "" } else { "s" },
    );
    text
}

/// While a pause is open: "paused: link down for 12 s, retrying" (or recovering).
fn recovery_line(m: &Snapshot) -> Option<String> {
    let open = m.recoveries.last().filter(|r| r.frozen_ms.is_none())?;
    let down = Elapsed(Duration::from_millis(
        m.elapsed_ms.saturating_sub(open.paused_at_ms),
    ));
    let status = m.qemu.as_ref().map(|q| q.report.status.to_string());
    let status = status.unwrap_or_else(|| "?".to_owned());
    Some(match m.state {
        State::Paused if open.failed_attempts > 0 => format!(
            "paused: link down for {down}, retrying ({} tries failed: {}) · QEMU {status}",
            open.failed_attempts,
            m.error.as_ref().map_or("", |e| e.message.as_str()),
        ),
        State::Paused => format!("paused: link down for {down}, retrying · QEMU {status}"),
        _ => format!("recovering: link back, frozen {down} so far · QEMU {status}"),
    })
}

/// While a resumable channel has no connection: "link down 4 s, resuming (channel 0)"; while
/// only the control link is down: "control link down 4 s, resuming".
fn resuming_line(m: &Snapshot) -> Option<String> {
    let resume = m.resume.as_ref()?;
    let ms = |ms| Elapsed(Duration::from_millis(ms));
    let what = match (resume.down_ms, resume.link_down_ms) {
        (Some(down), _) => {
            let channels: Vec<String> = resume.resuming.iter().map(u32::to_string).collect();
            format!(
                "link down {}, resuming (channel {})",
                ms(down),
                channels.join(", ")
            )
        }
        (None, Some(down)) => format!("control link down {}, resuming", ms(down)),
        (None, None) => return None,
    };
    let status = m.qemu.as_ref().map(|q| q.report.status.to_string());
    let status = status.unwrap_or_else(|| "?".to_owned());
    Some(format!("{what} · QEMU {status}"))
}

/// How long QEMU may take to settle after migproxy's verdict, in the report.
const SETTLE: Duration = Duration::from_secs(4);

/// The destination's report once it has settled too (it may lag by a moment); `None` if the
/// destination cannot tell.
async fn final_of(destination: &Client, id: &str) -> Option<Snapshot> {
    let mut last = None;
    for _ in 0..40 {
        match destination.migration(id).await {
            Ok(m) if migration::settled(&m) => return Some(m),
            Ok(m) => last = Some(m),
            Err(_) => return last,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Both daemons' final reports, as `--json` prints them.
#[derive(serde::Serialize)]
struct Reports<'a> {
    source: &'a Snapshot,
    destination: Option<&'a Snapshot>,
}

/// The merged report: migproxy's story (the source's, which both hosts share), then QEMU on
/// each host.
fn report(source: &Snapshot, destination: Option<&Snapshot>, json: bool) {
    if json {
        say!(
            "{}",
            migration::json_line(&Reports {
                source,
                destination
            })
        );
        return;
    }
    let elapsed = Elapsed(Duration::from_millis(source.elapsed_ms));
    let qemu_verdict = |m: Option<&Snapshot>| {
        m.and_then(|m| m.qemu.as_ref())
            .map_or_else(|| "unknown".to_owned(), |q| q.report.status.to_string())
    };
    say!(
        "migration {}: {} in {elapsed} (QEMU: {} on the source, {} on the destination)",
        source.id,
        source.state,
        qemu_verdict(Some(source)),
        qemu_verdict(destination),
    );
    migration::print_qemu(source.qemu.as_ref(), "source QEMU");
    if let Some(destination) = destination {
        migration::print_qemu(destination.qemu.as_ref(), "destination QEMU");
    }
    say!(
        "  data path: {} ({})",
        source.data_path,
        source.data_path_reason
    );
    say!(
        "  migproxy ({}): {} to destination, {} to source, average {}/s",
        source.link,
        Bytes(source.bytes.to_destination),
        Bytes(source.bytes.to_source),
        Bytes(source.throughput.average_bytes_per_second),
    );
    for c in &source.channels {
        migration::print_channel(c, "    ");
    }
    migration::print_recoveries(source);
    match (source.cancelled_by, &source.verdict) {
        (Some(by), Some(verdict)) if source.recoveries.iter().any(|r| r.frozen_ms.is_none()) => {
            say!("  cancelled by the {by} host, {verdict}");
        }
        (Some(by), _) => say!("  cancelled by the {by} host; the VM stays on the source"),
        _ => {}
    }
    if let Some(error) = &source.error {
        say!("  error: {}", error.message);
    }
}
