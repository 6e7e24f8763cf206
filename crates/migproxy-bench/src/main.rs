//! migproxy-bench: migproxy measured side by side with a direct connection and other proxies,
//! in one run, interleaved, on this machine. See `docs/benchmarks.md`.
//!
//!
//! One module per benchmark ([`synthetic`], [`concurrency`], [`qemu`], [`cancel`],
//! [`outage`], [`recover`], and [`floor`], the yardstick relay); they measure with [`measure`], stream
//! with [`stream`], run daemons with [`daemons`] (TLS material from [`pki`], two hosts on one
//! machine from [`netns`]), summarise with [`report`] and draw plain series with [`chart`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod cancel;
mod chart;
mod concurrency;
mod daemons;
mod floor;
mod measure;
mod netns;
mod outage;
mod pki;
mod qemu;
mod recover;
mod report;
mod stream;
mod synthetic;
mod tls_records;

use measure::BenchError;

#[derive(Debug, Parser)]
#[command(
    name = "migproxy-bench",
    about = "migproxy against direct and other proxies, side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// A verified synthetic stream through each path.
    Synthetic {
        /// Bytes per run (binary units: 512M, 2G).
        #[arg(long, default_value = "2G", value_parser = size)]
        size: u64,
        /// Repetitions of every path, interleaved.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Seconds-long configuration for CI: 128 MiB, one repetition.
        #[arg(long)]
        smoke: bool,
        /// Only the paths whose name contains this text (direct TCP always runs: every
        /// ratio is to it), e.g. `--only daemons`.
        #[arg(long)]
        only: Option<String>,
        /// Where to write the markdown table.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// 1, 4 and 16 simultaneous streams through one pair of daemons: total and fairness.
    Concurrency {
        /// Bytes per stream.
        #[arg(long, default_value = "256M", value_parser = size)]
        size: u64,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Real QEMU migrations, interleaved: direct, migproxy (plaintext, TLS; without and with
    /// resumable channels), QEMU's own TLS, socat, and multifd direct against migproxy.
    Qemu {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Only the paths whose name contains this text (direct TCP always runs: every
        /// ratio is to it), e.g. `--only "migproxy daemons, "`
        #[arg(long)]
        only: Option<String>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The yardstick of the benchmarks: the simplest splice relay (see floor.rs). LISTEN and
    /// CONNECT are each a TCP port on 127.0.0.1, `ADDR:PORT` or `unix:PATH`.
    #[command(hide = true)]
    SpliceFloor { listen: String, connect: String },
    /// migproxy's TLS record layer against stock rustls (tokio-rustls) through two daemons,
    /// interleaved rounds, with the plaintext pair as the bound.
    TlsRecords {
        /// Bytes per run.
        #[arg(long, default_value = "2G", value_parser = size)]
        size: u64,
        /// Rounds; every variant runs once per round, in a rotating order.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Cancel latency under full load, through two daemons.
    Cancel {
        /// How many migrations to cancel.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Real QEMU pairs on the kernel data path (guest RAM in MiB), instead of stand-ins
        /// through the relay.
        #[arg(long, value_name = "MIB")]
        kernel: Option<u64>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Resumable channels across a blackholed link, two hosts in network namespaces (needs
    /// root): the time from the link's return to bytes moving again, through two daemons
    /// (plaintext, TLS) and across direct TCP, interleaved.
    Outage {
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Seconds every packet to and from the destination's host is dropped.
        #[arg(long, default_value_t = 6.0, value_parser = seconds)]
        blackhole: f64,
        /// The daemons' `--peer-timeout`, in seconds.
        #[arg(long, default_value_t = 2.0, value_parser = seconds)]
        peer_timeout: f64,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The delay two daemons add to QEMU's own postcopy recovery (`migrate-pause`, then
    /// `migrate-recover` and `migrate resume=true` by hand), against direct TCP, interleaved.
    Recover {
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        mib: u64,
        /// Milliseconds between both QEMUs paused and the recovery (0: at once).
        #[arg(long, default_value_t = 0)]
        settle_ms: u64,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 86_400.0 => Ok(value),
        _ => Err(format!(
            "\"{text}\" is not a number of seconds (up to a day)"
        )),
    }
}

fn size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'M')) => (&text[..i], 20),
        Some((i, 'G')) => (&text[..i], 30),
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size"))?;
    Ok(value << shift)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Bench::Synthetic {
            size,
            reps,
            smoke,
            only,
            out,
        } => {
            let (size, reps) = if smoke { (128 << 20, 1) } else { (size, reps) };
            sibling("migproxy")
                .and_then(|migproxy| synthetic::run(&migproxy, size, reps, only.as_deref(), &out))
        }
        Bench::Concurrency { size, out } => sibling("migproxy")
            .and_then(|migproxy| concurrency::run(&migproxy, size, &[1, 4, 16], &out)),
        Bench::Qemu {
            mib,
            reps,
            only,
            out,
        } => sibling("migproxy")
            .and_then(|migproxy| qemu::run(&migproxy, (mib, reps), only.as_deref(), &out)),
        Bench::TlsRecords { size, rounds, out } => {
            sibling("migproxy").and_then(|migproxy| tls_records::run(&migproxy, size, rounds, &out))
        }
        Bench::SpliceFloor { listen, connect } => floor::run(&listen, &connect),
        Bench::Cancel { count, kernel, out } => {
            sibling("migproxy").and_then(|migproxy| match kernel {
                Some(mib) => cancel::run_kernel(&migproxy, count, mib, &out),
                None => cancel::run(&migproxy, count, &out),
            })
        }
        Bench::Outage {
            reps,
            blackhole,
            peer_timeout,
            out,
        } => {
            let settings = outage::Settings {
                reps,
                blackhole: std::time::Duration::from_secs_f64(blackhole),
                peer_timeout,
            };
            sibling("migproxy").and_then(|migproxy| outage::run(&migproxy, settings, &out))
        }
        Bench::Recover {
            reps,
            mib,
            settle_ms,
            out,
        } => {
            let settings = recover::Settings {
                reps,
                mib,
                settle: std::time::Duration::from_millis(settle_ms),
            };
            sibling("migproxy").and_then(|migproxy| recover::run(&migproxy, settings, &out))
        }
    };
    if let Err(error) = result {
        eprintln!("migproxy-bench: {}", migproxy::human::Chain(error.as_ref()));
        std::process::exit(1);
    }
}

/// A binary built next to this one (`cargo build --release` builds both).
fn sibling(name: &str) -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name(name))
}
