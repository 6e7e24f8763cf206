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
        $crate::cli::process::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::process::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod args;
mod assets;
mod daemon;
mod demo;
mod failure;
mod libvirt;
mod migrate;
mod migration;
mod process;
mod relay;

pub use process::{EXIT_FAILED, EXIT_USAGE};

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// `migproxy --version`: the package's version and the git revision it was built from
/// (`unknown` outside a checkout; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("MIGPROXY_GIT_REVISION"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "migproxy",
    version = VERSION,
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

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    // `migproxy assets` (hidden) sits beside the derived commands, not among them: the man
    // pages and completions it writes from `Cli::command()` then do not offer it.
    let matches = Cli::command().subcommand(assets::command()).get_matches();
    if let Some((assets::NAME, matches)) = matches.subcommand() {
        return ExitCode::from(assets::run(matches, Cli::command()));
    }
    // As `Cli::parse` does: a mismatch prints clap's usage error and exits 2.
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
        Cli::command().subcommand(assets::command()).debug_assert();
    }

    #[test]
    fn assets_is_parsed_but_not_documented() {
        let full = Cli::command().subcommand(assets::command());
        let matches = full
            .try_get_matches_from(["migproxy", "assets", "/tmp/x"])
            .unwrap();
        assert_eq!(matches.subcommand_name(), Some(assets::NAME));
        // What the man pages and completions are made from.
        assert!(Cli::command().find_subcommand(assets::NAME).is_none());
    }
}
