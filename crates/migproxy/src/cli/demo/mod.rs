//! `migproxy demo`: a migration through two daemons on this machine — a real VM when QEMU is
//! installed ([`qemu`]), else a synthetic stream ([`synthetic`]). Both create the migration
//! through the daemons' REST APIs, as a management layer would ([`daemons`]).

mod daemons;
mod qemu;
mod synthetic;

use self::daemons::DemoError;
use super::process::EXIT_FAILED;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How much to migrate: the guest RAM, or the synthetic stream (binary units: 512M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::cli::args::size)]
    size: u64,
    /// Stream synthetic data even when QEMU is installed.
    #[arg(long)]
    synthetic: bool,
}

pub async fn run(args: Args) -> u8 {
    match demo(args).await {
        Ok(true) => 0,
        Ok(false) => EXIT_FAILED,
        Err(error) => {
            eprintln!("migproxy demo: {}", crate::human::Chain(error.as_ref()));
            EXIT_FAILED
        }
    }
}

async fn demo(args: Args) -> Result<bool, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("migproxy-demo-")
        .tempdir()?;
    if !args.synthetic && crate::testkit::vm::available() {
        return qemu::demo(dir.path(), args.size).await;
    }
    synthetic::demo(dir.path(), args.size).await
}
