//! `migproxy migration …`: drive a daemon through its API socket.
//!
//! Exit codes: 0 success; 1 the migration failed, was cancelled or expired (for `watch` and
//! `create-outgoing --watch`), or the daemon refused the request; 2 usage; 3 the daemon could
//! not be reached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::process::EXIT_FAILED;
use crate::api::types::{
    CreatedIncoming, CreatedOutgoing, DataPath, IncomingRequest, MigrationList, OutgoingRequest,
};
use crate::client::{Client, ClientError};
use crate::config::ConfigError;
use crate::daemon::migration::State;
use crate::daemon::migration::view::{ChannelSnapshot, QemuView, Snapshot};
use crate::daemon::qemu::report::Status;
use crate::human::{Bytes, Chain, Elapsed};

/// Exit code when the daemon cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The daemon's API socket. Default: MIGPROXY_API, else `api` in the config file, else
    /// /run/migproxy/api.sock.
    #[arg(long, value_name = "PATH", env = "MIGPROXY_API", global = true)]
    api: Option<PathBuf>,
    /// The daemon's config file, to find its API socket (default
    /// /etc/migproxy/migproxy.toml, when it exists).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Print the API's JSON instead of text, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// On the destination host: accept a migration into the QEMU listening on TARGET.
    CreateIncoming(CreateIncoming),
    /// On the source host: carry a migration to the destination daemon.
    CreateOutgoing(CreateOutgoing),
    /// Every migration, or those in one state.
    List {
        /// Only those in this state: pending, active, paused, completed, transferred,
        /// failed, cancelled or expired.
        #[arg(long, value_parser = super::args::state)]
        state: Option<State>,
    },
    /// One migration in full.
    Show { id: String },
    /// Cancel on both hosts.
    Cancel { id: String },
    /// Live progress per channel until the migration ends, then its report.
    Watch {
        id: String,
        /// Seconds between updates.
        #[arg(long, default_value = "0.5", value_parser = super::args::seconds)]
        interval: Duration,
    },
    /// Forget an ended migration.
    Forget { id: String },
}

/// `create-incoming`'s flags.
#[derive(Debug, clap::Args)]
struct CreateIncoming {
    /// Where the destination QEMU listens: unix:PATH or tcp:HOST:PORT. Optional with
    /// --qmp: the daemon then picks a socket and runs migrate-incoming on it.
    #[arg(long, value_name = "ENDPOINT", required_unless_present = "qmp")]
    target: Option<String>,
    /// The destination QEMU's QMP socket (one of its own for migproxy; QEMU started with
    /// -incoming defer): the daemon sets it up and takes its verdict.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// multifd with N channels (the source must ask the same); needs --qmp.
    #[arg(long, value_name = "N", requires = "qmp")]
    multifd: Option<u32>,
    /// Enable postcopy (the source must too); needs --qmp.
    #[arg(long, requires = "qmp")]
    postcopy: bool,
    /// The migration's id (default: generated).
    #[arg(long)]
    id: Option<String>,
    #[arg(long, value_name = "N")]
    max_channels: Option<u32>,
    /// Pause instead of failing when a channel breaks (postcopy recovery). With --qmp and
    /// --postcopy this is the default.
    #[arg(long, conflicts_with = "no_recover")]
    recoverable: bool,
    /// With --qmp and --postcopy: fail on a break in postcopy instead of recovering (the
    /// source must say the same).
    #[arg(long)]
    no_recover: bool,
    /// Fail for good when a pause has not recovered after this many seconds (default: the
    /// daemon's, 600, with --qmp).
    #[arg(long, value_name = "SECS", value_parser = super::args::positive_seconds)]
    recover_timeout: Option<Duration>,
    /// Carry each channel across peer connections that break, for up to this many seconds
    /// without one (relay path; give the source the same); 0: not resumable. Default: the
    /// daemon's.
    #[arg(long, value_name = "SECS", value_parser = super::args::seconds)]
    resume_timeout: Option<Duration>,
    /// The migration group (a guest's RAM and its disks): its migrations share one stall
    /// watch, so an idle disk connection beside moving RAM is no stall. Give the source the
    /// same group.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// relay (through both daemons), kernel (QEMU to QEMU over the daemons' own
    /// connection; needs --qmp on both hosts) or auto (default: the daemon's).
    #[arg(long, value_name = "relay|kernel|auto")]
    data_path: Option<DataPath>,
}

/// `create-outgoing`'s flags.
#[derive(Debug, clap::Args)]
struct CreateOutgoing {
    #[arg(long)]
    id: String,
    /// The token the destination handed out. On the command line every local user can
    /// read it (ps, /proc/PID/cmdline) until the command ends: prefer --token-file or
    /// MIGPROXY_TOKEN.
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    token: Option<String>,
    /// Read the token from this file, or from stdin with `-` (its first line). Without
    /// --token or --token-file, the token is taken from MIGPROXY_TOKEN.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The destination daemon's peer address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    peer: String,
    /// The name the destination's certificate must carry (default: the peer's host).
    #[arg(long, value_name = "NAME")]
    tls_hostname: Option<String>,
    /// Pause instead of failing when a channel breaks (postcopy recovery). With --qmp and
    /// --postcopy this is the default.
    #[arg(long, conflicts_with = "no_recover")]
    recoverable: bool,
    /// Then watch it to its end.
    #[arg(long)]
    watch: bool,
    /// The migration group (a guest's RAM and its disks): its migrations share one stall
    /// watch, so an idle disk connection beside moving RAM is no stall. Give the destination
    /// the same group.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    #[command(flatten)]
    qemu: QemuFlags,
}

/// How the source daemon drives its QEMU (`create-outgoing`, `migrate`). The settings need
/// something that drives QEMU: `--qmp` (or, on `migrate`, `--libvirt`), the `driver` group.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("driver").multiple(true)))]
pub(super) struct QemuFlags {
    /// The source QEMU's QMP socket (one of its own for migproxy): the daemon configures
    /// QEMU, runs migrate, follows it and takes its verdict.
    #[arg(long, value_name = "PATH", group = "driver")]
    pub qmp: Option<PathBuf>,
    /// multifd with N channels (the destination must ask the same).
    #[arg(long, value_name = "N", requires = "qmp")]
    pub multifd: Option<u32>,
    /// Enable postcopy (the destination must too).
    #[arg(long, requires = "qmp")]
    pub postcopy: bool,
    /// Switch to postcopy this many seconds after migrate starts (implies --postcopy).
    #[arg(long, value_name = "SECS", value_parser = super::args::seconds, requires = "driver")]
    pub postcopy_after: Option<Duration>,
    /// QEMU's bandwidth limit per second, e.g. 512M or 1G (default: unlimited).
    #[arg(long, value_name = "RATE", value_parser = super::args::size, requires = "driver")]
    pub max_bandwidth: Option<u64>,
    /// The longest pause of the guest QEMU should aim for, in milliseconds.
    #[arg(long, value_name = "MS", requires = "driver")]
    pub downtime_limit: Option<u64>,
    /// relay (through both daemons), kernel (QEMU to QEMU over the daemons' own
    /// connection; needs --qmp on both hosts) or auto (default: the daemon's).
    #[arg(long, value_name = "relay|kernel|auto")]
    pub data_path: Option<DataPath>,
    /// Fail on a break in postcopy instead of recovering by itself (recovery is the default
    /// with postcopy).
    #[arg(long, requires = "driver")]
    pub no_recover: bool,
    /// Fail for good when postcopy stays paused this many seconds (default: the daemons',
    /// 600).
    #[arg(long, value_name = "SECS", value_parser = super::args::positive_seconds, requires = "driver")]
    pub recover_timeout: Option<Duration>,
    /// Carry each channel across peer connections that break, for up to this many seconds
    /// without one (relay path); 0: not resumable. Default: the daemons'.
    #[arg(long, value_name = "SECS", value_parser = super::args::seconds)]
    pub resume_timeout: Option<Duration>,
}

impl QemuFlags {
    /// Sets the request's QEMU fields from the flags given.
    pub(super) fn apply(&self, request: &mut OutgoingRequest) {
        request.qmp = self.qmp.as_ref().map(|p| absolute(p).display().to_string());
        request.multifd = self.multifd;
        request.postcopy = self.postcopy || self.postcopy_after.is_some();
        request.postcopy_after = self.postcopy_after.map(|d| d.as_secs_f64());
        request.max_bandwidth = self.max_bandwidth;
        request.downtime_limit = self.downtime_limit;
        request.data_path = self.data_path;
        request.recoverable = self.recoverable();
        request.recover_timeout = self.recover_timeout.map(|t| t.as_secs_f64());
        request.resume_timeout = self.resume_timeout.map(|t| t.as_secs_f64());
    }

    /// `recoverable` as both requests carry it: false with --no-recover, else the daemons'
    /// default.
    pub(super) fn recoverable(&self) -> Option<bool> {
        self.no_recover.then_some(false)
    }
}

/// `--recoverable` / `--no-recover`: asked one way, or left to the daemon's default.
fn asked_recoverable(recoverable: bool, no_recover: bool) -> Option<bool> {
    match (recoverable, no_recover) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// A path as the daemon (whose working directory differs) must see it.
pub(super) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// An API body as `--json` prints it: one line, keys in order.
pub(super) fn json_line(body: &impl Serialize) -> String {
    serde_json::to_value(body)
        .map(|value| value.to_string())
        .unwrap_or_default()
}

/// The config file read when none is named.
const DEFAULT_CONFIG: &str = "/etc/migproxy/migproxy.toml";

/// Where the API socket is: the flag (or MIGPROXY_API), else the config file, else the default.
fn api_socket(args: &Args) -> Result<PathBuf, ConfigError> {
    Ok(local_daemon(args.api.as_ref(), args.config.as_ref())?.0)
}

/// This host's daemon: its API socket (the flag, else the config file, else the default)
/// and its TLS directory (from the config file), to reach other daemons' APIs.
pub(super) fn local_daemon(
    api: Option<&PathBuf>,
    config: Option<&PathBuf>,
) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    let config = match config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
    };
    let file = match config {
        Some(path) => Some(crate::config::File::load(&path)?),
        None => None,
    };
    let (from_file, tls_dir) = file.map_or((None, None), |f| (f.api, f.tls.dir));
    let api = api
        .cloned()
        .or(from_file)
        .unwrap_or_else(|| PathBuf::from("/run/migproxy/api.sock"));
    Ok((api, tls_dir))
}

pub async fn run(args: Args) -> u8 {
    let api = match api_socket(&args) {
        Ok(api) => api,
        Err(error) => {
            eprintln!("error: {}", Chain(&error));
            return super::process::EXIT_USAGE;
        }
    };
    let command = match with_token(args.command) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("error: {}", Chain(&error));
            return super::process::EXIT_USAGE;
        }
    };
    let client = Client::new(&api);
    match execute(&client, command, args.json).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            for (n, cause) in error.causes().iter().enumerate() {
                eprintln!("  {}: {cause}", n + 1);
            }
            match error {
                ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
                error if error.is_usage() => super::process::EXIT_USAGE,
                _ => EXIT_FAILED,
            }
        }
    }
}

/// Why the token of `create-outgoing` could not be had.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    #[error("--token-file {}: cannot read it", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("--token-file {}: no token in it", .0.display())]
    Empty(PathBuf),
    #[error(
        "create-outgoing needs the token: --token-file PATH (or - for stdin), MIGPROXY_TOKEN, or --token"
    )]
    Missing,
}

/// `create-outgoing` with its token from wherever it was given: the flag, a file, stdin
/// (`--token-file -`) or `MIGPROXY_TOKEN`, in that order.
fn with_token(mut command: Command) -> Result<Command, TokenError> {
    if let Command::CreateOutgoing(CreateOutgoing {
        token, token_file, ..
    }) = &mut command
        && token.is_none()
    {
        let found = match token_file {
            Some(path) => read_token(path),
            None => std::env::var("MIGPROXY_TOKEN")
                .map(|t| t.trim().to_owned())
                .map_err(|_| TokenError::Missing),
        };
        *token = Some(found?);
    }
    Ok(command)
}

/// The first line of `path` (stdin for `-`), without surrounding whitespace.
fn read_token(path: &Path) -> Result<String, TokenError> {
    let read = |error| TokenError::Read {
        path: path.to_owned(),
        error,
    };
    let mut line = String::new();
    if path == Path::new("-") {
        std::io::stdin().read_line(&mut line).map_err(read)?;
    } else {
        let text = std::fs::read_to_string(path).map_err(read)?;
        line = text.lines().next().unwrap_or_default().to_owned();
    }
    match line.trim() {
        "" => Err(TokenError::Empty(path.to_owned())),
        token => Ok(token.to_owned()),
    }
}

/// Carries out one subcommand; the exit code when the daemon answered.
async fn execute(client: &Client, command: Command, json: bool) -> Result<u8, ClientError> {
    match command {
        Command::CreateIncoming(args) => create_incoming(client, args, json).await,
        Command::CreateOutgoing(args) => create_outgoing(client, args, json).await,
        Command::List { state } => list(client, state, json).await,
        Command::Show { id } => {
            print_report(&client.migration(&id).await?, json);
            Ok(0)
        }
        Command::Cancel { id } => {
            print_report(&client.cancel(&id).await?, json);
            Ok(0)
        }
        Command::Watch { id, interval } => watch_until_end(client, &id, interval, json).await,
        Command::Forget { id } => {
            client.forget(&id).await?;
            if !json {
                say!("forgot migration {id}");
            }
            Ok(0)
        }
    }
}

/// `create-incoming`: registers the migration and prints what the source host needs.
async fn create_incoming(
    client: &Client,
    args: CreateIncoming,
    json: bool,
) -> Result<u8, ClientError> {
    let request = IncomingRequest {
        target: args.target,
        id: args.id,
        max_channels: args.max_channels,
        recoverable: asked_recoverable(args.recoverable, args.no_recover),
        recover_timeout: args.recover_timeout.map(|t| t.as_secs_f64()),
        resume_timeout: args.resume_timeout.map(|t| t.as_secs_f64()),
        // The daemon's working directory is not ours.
        qmp: args.qmp.map(|p| absolute(&p).display().to_string()),
        multifd: args.multifd,
        postcopy: args.postcopy,
        group: args.group,
        data_path: args.data_path,
    };
    let created = client.create_incoming(&request).await?;
    print_created_incoming(&created, json);
    Ok(0)
}

/// `create-outgoing`: starts the migration, then follows it when `--watch` asks.
async fn create_outgoing(
    client: &Client,
    args: CreateOutgoing,
    json: bool,
) -> Result<u8, ClientError> {
    let mut request = OutgoingRequest {
        id: args.id.clone(),
        // `with_token` has filled it in from wherever it was given.
        token: args.token.unwrap_or_default(),
        peer: args.peer,
        tls_hostname: args.tls_hostname,
        group: args.group,
        ..OutgoingRequest::default()
    };
    args.qemu.apply(&mut request);
    request.recoverable = asked_recoverable(args.recoverable, args.qemu.no_recover);
    let created = client.create_outgoing(&request).await?;
    print_created_outgoing(&created, args.qemu.qmp.is_some(), json);
    if args.watch {
        return watch_until_end(client, &args.id, Duration::from_millis(500), json).await;
    }
    Ok(0)
}

/// `list`: a table, or the API's JSON.
async fn list(client: &Client, state: Option<State>, json: bool) -> Result<u8, ClientError> {
    let migrations = client.list(state).await?;
    if json {
        say!("{}", json_line(&MigrationList { migrations }));
    } else {
        print_list(&migrations);
    }
    Ok(0)
}

/// What `create-outgoing` prints: who starts the source QEMU's migration, and to where.
fn print_created_outgoing(created: &CreatedOutgoing, driven: bool, json: bool) {
    if json {
        say!("{}", json_line(created));
        return;
    }
    say!("created outgoing migration {}", created.id);
    if driven {
        say!("  source QEMU: migrating (driven by the daemon)");
    } else {
        say!("  source QEMU: migrate {}", created.qemu_uri);
    }
}

fn print_created_incoming(created: &CreatedIncoming, json: bool) {
    if json {
        say!("{}", json_line(created));
        return;
    }
    let CreatedIncoming {
        id,
        token,
        peer,
        target,
        ..
    } = created;
    say!("created incoming migration {id}");
    say!("  token  {token}");
    say!("  peer   {peer}");
    say!("  target {target}");
    say!("on the source host:");
    say!("  migproxy migration create-outgoing --id {id} --token {token} --peer {peer}");
}

fn print_list(migrations: &[Snapshot]) {
    if migrations.is_empty() {
        say!("no migrations");
        return;
    }
    say!(
        "{:<24} {:<9} {:<10} {:>11} {:>11} {:<9}",
        "ID",
        "DIRECTION",
        "STATE",
        "TO DEST",
        "TO SOURCE",
        "LINK"
    );
    for m in migrations {
        say!(
            "{:<24} {:<9} {:<10} {:>11} {:>11} {:<9}",
            m.id,
            m.direction.to_string(),
            m.state.to_string(),
            Bytes(m.bytes.to_destination).to_string(),
            Bytes(m.bytes.to_source).to_string(),
            m.link.to_string(),
        );
    }
}

/// The final (or current) report of a migration.
pub(super) fn print_report(m: &Snapshot, json: bool) {
    if json {
        say!("{}", json_line(m));
        return;
    }
    say!(
        "migration {} ({}, {}): {}",
        m.id,
        m.direction,
        m.link,
        m.state
    );
    say!("  peer {} · local {}", m.peer, m.local);
    say!("  data path: {} ({})", m.data_path, m.data_path_reason);
    if m.state == State::Transferred {
        say!("  QEMU's verdict unknown (no QMP, no return path): ask QEMU whether it finished");
    }
    say!(
        "  {} to destination, {} to source in {} (average {}/s)",
        Bytes(m.bytes.to_destination),
        Bytes(m.bytes.to_source),
        Elapsed(Duration::from_millis(m.elapsed_ms)),
        Bytes(m.throughput.average_bytes_per_second),
    );
    for c in &m.channels {
        print_channel(c, "  ");
    }
    print_qemu(m.qemu.as_ref(), "QEMU");
    print_recoveries(m);
    if let Some(by) = m.cancelled_by {
        say!("  cancelled by the {by} host");
    }
    if let Some(verdict) = m.verdict.as_ref().filter(|_| m.state == State::Cancelled) {
        say!("  {verdict}");
    }
    if let Some(error) = &m.error {
        say!("  error: {}", error.message);
        for (n, cause) in error.causes.iter().enumerate() {
            say!("    {}: {cause}", n + 1);
        }
    }
    if let Some(late) = &m.peer_view.ended_late {
        let by = late
            .cancelled_by
            .map_or_else(String::new, |by| format!(" by the {by} host"));
        let why = late
            .error
            .as_ref()
            .map_or_else(String::new, |e| format!(": {}", e.message));
        say!(
            "  the peer daemon, heard once the link came back after both had ended: {}{by}{why}",
            late.state
        );
    }
}

/// The recoveries in the final report, one line each.
pub(super) fn print_recoveries(m: &Snapshot) {
    for (n, r) in m.recoveries.iter().enumerate() {
        let outcome = match r.frozen_ms {
            Some(ms) => format!("resumed after {}", Elapsed(Duration::from_millis(ms))),
            None => "not recovered".to_owned(),
        };
        let tries = match r.failed_attempts {
            0 => String::new(),
            n => format!(", {n} failed tries to bring the link back"),
        };
        say!("  pause {}: {outcome}{tries} ({})", n + 1, r.cause.message);
    }
    if !m.recoveries.is_empty() {
        say!(
            "  recoveries: {}, guest frozen {} in all",
            m.recovered,
            Elapsed(Duration::from_millis(m.frozen_ms))
        );
    }
    let Some(resume) = m.resume.as_ref() else {
        return;
    };
    if resume.resumptions > 0 {
        say!(
            "  resumptions: {} (a channel's peer connection broke), {} lost, {} sent again",
            resume.resumptions,
            Elapsed(Duration::from_millis(resume.lost_ms)),
            Bytes(resume.replayed)
        );
    }
    if resume.link_outages > 0 {
        say!(
            "  control link outages: {}, down {} in all",
            resume.link_outages,
            Elapsed(Duration::from_millis(resume.link_lost_ms))
        );
    }
}

/// One channel's line of a report, indented by `indent`.
pub(super) fn print_channel(c: &ChannelSnapshot, indent: &str) {
    say!(
        "{indent}channel {}: {}, {} to destination, {} to source",
        c.index,
        c.state,
        Bytes(c.bytes.to_destination),
        Bytes(c.bytes.to_source)
    );
}

/// QEMU's side of a report, when the daemon drives QEMU: one or two lines.
pub(super) fn print_qemu(q: Option<&QemuView>, who: &str) {
    let Some(QemuView { report: q, .. }) = q else {
        return;
    };
    let ms = |ms: u64| Elapsed(Duration::from_millis(ms)).to_string();
    let mut line = format!("  {who}: {}", q.status);
    if q.status != Status::None {
        line += &format!(" after {}", ms(q.wall_time_ms));
    }
    if let Some(total) = q.total_time_ms.filter(|total| *total != 0) {
        line += &format!(", QEMU total {}", ms(total));
    }
    if let Some(downtime) = q.downtime_ms {
        line += &format!(", downtime {}", ms(downtime));
    }
    if q.pass > 0 {
        line += &format!(", {} passes", q.pass);
    }
    if q.postcopy_started {
        line += ", switched to postcopy";
    }
    if let Some(refused) = &q.postcopy_error {
        line += &format!(", did not switch to postcopy: {refused}");
    }
    if q.monitor_closed {
        line += ", then QEMU exited (its monitor closed)";
    }
    say!("{line}");
    if let Some(ram) = &q.ram {
        say!(
            "    RAM {} of {} transferred, {} remaining, {:.0} Mbit/s",
            Bytes(ram.transferred),
            Bytes(ram.total),
            Bytes(ram.remaining),
            ram.mbps
        );
    }
    if let Some(desc) = &q.error_desc {
        say!("    QEMU error: {desc}");
    }
}

/// Whether a migration's report will not change any more: migproxy's state is final, and
/// QEMU (when the daemon drives it) has given its verdict or gone.
pub(super) fn settled(m: &Snapshot) -> bool {
    m.state.is_final() && m.qemu.as_ref().is_none_or(|q| q.report.is_settled())
}

/// Whether migproxy carried the migration to its end: QEMU finished (`completed`), or every
/// byte crossed and QEMU's verdict is unknown (`transferred`, no QMP).
pub(super) fn succeeded(m: &Snapshot) -> bool {
    matches!(m.state, State::Completed | State::Transferred)
}

/// Draws a line per channel until the migration ends; exit code 0 only if it completed.
async fn watch_until_end(
    client: &Client,
    id: &str,
    interval: Duration,
    json: bool,
) -> Result<u8, ClientError> {
    let mut lines = WatchLines::new(id);
    let migration = loop {
        let m = client.migration(id).await?;
        lines.show(&m);
        if m.state.is_final() {
            break m;
        }
        tokio::time::sleep(interval).await;
    };
    lines.clear();
    print_report(&migration, json);
    Ok(if succeeded(&migration) {
        0
    } else {
        EXIT_FAILED
    })
}

/// `watch`'s live lines: the migration's, then one per channel with its own rate.
struct WatchLines {
    bars: MultiProgress,
    style: ProgressStyle,
    overall: ProgressBar,
    channels: Vec<ProgressBar>,
    last: HashMap<u32, (u64, Instant)>,
}

impl WatchLines {
    fn new(id: &str) -> WatchLines {
        let bars = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>10} {spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let overall = bars.add(
            ProgressBar::new_spinner()
                .with_style(style.clone())
                .with_prefix(id.to_owned()),
        );
        WatchLines {
            bars,
            style,
            overall,
            channels: Vec::new(),
            last: HashMap::new(),
        }
    }

    fn show(&mut self, m: &Snapshot) {
        self.overall.set_message(format!(
            "{}  {} → {} ←  {}/s",
            m.state,
            Bytes(m.bytes.to_destination),
            Bytes(m.bytes.to_source),
            Bytes(m.throughput.current_bytes_per_second),
        ));
        for c in &m.channels {
            self.show_channel(c);
        }
        self.overall.tick();
    }

    fn show_channel(&mut self, c: &ChannelSnapshot) {
        let index = c.index as usize;
        while self.channels.len() <= index {
            let line = ProgressBar::new_spinner()
                .with_style(self.style.clone())
                .with_prefix(format!("channel {}", self.channels.len()));
            self.channels.push(self.bars.add(line));
        }
        let sent = c.bytes.to_destination;
        let now = Instant::now();
        let rate = self.last.get(&c.index).map_or(0, |(before, at)| {
            let secs = now.duration_since(*at).as_secs_f64();
            if secs > 0.0 {
                (sent.saturating_sub(*before) as f64 / secs) as u64
            } else {
                0
            }
        });
        self.last.insert(c.index, (sent, now));
        self.channels[index].set_message(format!(
            "{}  {} → {} ←  {}/s",
            c.state,
            Bytes(sent),
            Bytes(c.bytes.to_source),
            Bytes(rate)
        ));
        self.channels[index].tick();
    }

    fn clear(&self) {
        for line in self.channels.iter().chain(std::iter::once(&self.overall)) {
            line.finish_and_clear();
        }
    }
}
