//! `migproxy relay`: accept on one endpoint, relay each connection to another.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::process::EXIT_FAILED;
use crate::endpoint::Endpoint;
use crate::proxy::{self, Config};
use crate::relay::Options;
use crate::transport::Listener;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to accept connections: unix:PATH, tcp:HOST:PORT or tcp:[IPV6]:PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = super::args::endpoint)]
    listen: Endpoint,
    /// Where to carry each accepted connection, in the same syntax.
    #[arg(long, value_name = "ENDPOINT", value_parser = super::args::endpoint)]
    connect: Endpoint,
    /// Stop accepting after N connections, exit once their relays have ended.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Give up connecting onwards after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = super::args::seconds)]
    connect_timeout: Duration,
    /// Copy through user space instead of splice(2) (for comparison and diagnosis).
    #[arg(long)]
    no_splice: bool,
}

/// Runs until SIGINT/SIGTERM or `--max-connections`; one report line per connection on
/// stdout, then a summary.
pub async fn run(args: Args) -> u8 {
    let listener = match Listener::bind(&args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("migproxy relay: {}", crate::human::Chain(&error));
            return EXIT_FAILED;
        }
    };
    let shutdown = CancellationToken::new();
    if let Err(error) =
        super::process::cancel_on_signals(shutdown.clone(), "migproxy relay", "every relay")
    {
        eprintln!("migproxy relay: cannot install signal handlers: {error}");
        return EXIT_FAILED;
    }
    eprintln!(
        "migproxy relay: listening on {}, relaying to {}",
        listener.endpoint(),
        args.connect
    );
    let config = Config {
        connect: args.connect,
        max_connections: args.max_connections,
        connect_timeout: args.connect_timeout,
        relay: Options {
            zero_copy: !args.no_splice,
            ..Options::default()
        },
    };
    let summary = proxy::run(listener, config, shutdown, |n, report| {
        say!("#{n} {} → {}: {report}", report.source, report.destination);
    })
    .await;
    say!("migproxy relay: {summary}");
    if summary.all_completed() {
        0
    } else {
        EXIT_FAILED
    }
}
