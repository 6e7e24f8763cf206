//! The `migproxy` command line.
//!
//! Exit codes: 0 success; 1 a relay or migration failed or was cancelled, or the command could
//! not do its job (a listen address in use, a request the daemon refused); 2 usage (bad flags
//! or endpoints); 3 the daemon could not be reached (`migproxy migration …`).

/// `println!` for the command's output on stdout. When the reader has gone away
/// (`migproxy migration show ID | head -1`), the process ends as other Unix tools do, killed by
/// SIGPIPE, without the panic `println!` would raise. (Restoring SIGPIPE's default at start
/// would do the same for stdout, but would also kill the daemon and the relay on every write
/// to a unix socket whose reader has gone.)
macro_rules! say {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod daemon;
mod demo;
mod demo_qemu;
mod libvirt;
mod migrate;
mod migration;
mod relay;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::endpoint::Endpoint;

#[derive(Debug, Parser)]
#[command(
    name = "migproxy",
    version,
    about = "Carries QEMU live-migration streams between hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing syntax), e.g. `info` or `migproxy=debug`; also MIGPROXY_LOG.
    #[arg(long, global = true, env = "MIGPROXY_LOG", default_value = "warn")]
    log: String,
    /// Log lines as text for people or as JSON objects for collectors; also
    /// MIGPROXY_LOG_FORMAT.
    #[arg(
        long,
        global = true,
        env = "MIGPROXY_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Accept connections on one endpoint and relay each to another, zero-copy.
    Relay(relay::Args),
    /// Run the daemon of this host: REST API, peer port, migrations.
    Daemon(daemon::Args),
    /// Create, watch, cancel and inspect migrations through a daemon's API.
    Migration(migration::Args),
    /// Migrate a QEMU VM in one command, run on the source host: QMP on both hosts, live
    /// progress, Ctrl-C cancels, one report.
    Migrate(migrate::Args),
    /// Migrate a real QEMU VM (or, without QEMU, a synthetic stream) through two daemons on
    /// this machine, and check it.
    Demo(demo::Args),
}

/// Exit code for a command that ran but did not succeed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad flags or arguments (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("migproxy: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Relay(args) => relay::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Daemon(args) => daemon::run(args).await,
            Command::Migration(args) => migration::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
        }
    });
    ExitCode::from(code)
}

/// Writes the command's output; see [`say!`].
pub(crate) fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
        eprintln!(
            "migproxy: cannot write to stdout: {}",
            crate::human::OsError(&error)
        );
        std::process::exit(EXIT_FAILED.into());
    }
}

/// Ends the process as the kernel ends a writer to a closed pipe, so that the shell sees
/// what it sees of `yes | head -1`.
#[allow(unsafe_code)]
fn die_of_sigpipe() -> ! {
    use nix::sys::signal::{SigHandler, Signal, raise, signal};
    // SAFETY: SIG_DFL installs no handler of ours, so no code of ours runs in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = raise(Signal::SIGPIPE);
    // Not reached: SIGPIPE's default action ends the process. 128 + 13 as the shell would say.
    std::process::exit(141)
}

/// Logs go to stderr; every line inside a migration's work carries its id (and channel).
fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|error| {
        eprintln!("migproxy: ignoring log filter {filter:?}: {error}");
        tracing_subscriber::EnvFilter::new("warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; says on stderr, as `who`, that `what`
/// is being cancelled.
fn cancel_on_signals(
    shutdown: tokio_util::sync::CancellationToken,
    who: &'static str,
    what: &'static str,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        eprintln!("{who}: {name} received, cancelling {what}");
        shutdown.cancel();
    });
    Ok(())
}

/// clap parser for endpoints: errors read `invalid endpoint "tcp:foo": missing port`.
fn endpoint(text: &str) -> Result<Endpoint, String> {
    text.parse()
        .map_err(|e: crate::endpoint::EndpointError| e.to_string())
}

/// clap parser for durations in seconds, fractions allowed: `10`, `0.5`.
fn seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("\"{text}\" is not a number of seconds"))?;
    Duration::try_from_secs_f64(value).map_err(|_| format!("{text} s is not a usable duration"))
}

/// As [`seconds`], for the daemon's timeouts, with the config file's bounds: 0 would mean
/// "at once" and fail everything, and an absurd value overflows the clock's arithmetic.
fn positive_seconds(text: &str) -> Result<Duration, String> {
    let duration = seconds(text)?;
    if duration.is_zero() || duration.as_secs_f64() >= 1e9 {
        return Err("must be a positive number of seconds (below 1e9)".to_owned());
    }
    Ok(duration)
}

/// clap parser for sizes: `1073741824`, `512M`, `1G`, `1GiB` (binary units).
fn size(text: &str) -> Result<u64, String> {
    let bad = || format!("\"{text}\" is not a size (examples: 4096, 512M, 1G)");
    let trimmed = text.trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'K' | 'k')) => (&trimmed[..i], 10),
        Some((i, 'M' | 'm')) => (&trimmed[..i], 20),
        Some((i, 'G' | 'g')) => (&trimmed[..i], 30),
        Some((i, 'T' | 't')) => (&trimmed[..i], 40),
        _ => (trimmed, 0),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("512M"), Ok(512 << 20));
        assert_eq!(size("1G"), Ok(1 << 30));
        assert_eq!(size("1GiB"), Ok(1 << 30));
        assert_eq!(size("2KB"), Ok(2048));
        assert!(size("").is_err());
        assert!(size("G").is_err());
        assert!(size("-1G").is_err());
        assert!(size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(seconds("-1").is_err());
        assert!(seconds("soon").is_err());
        assert!(seconds("inf").is_err());
        assert_eq!(positive_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(positive_seconds("0").is_err());
        assert!(positive_seconds("0.0").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
