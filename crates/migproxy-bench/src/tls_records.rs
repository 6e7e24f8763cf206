//! `tls-records`: migproxy's own TLS record layer against stock rustls (tokio-rustls), both
//! through two daemons with the relay's 1 MiB reads and writes, and the plaintext pair as the
//! bound. Rounds are interleaved and the order rotates every round, so that load from
//! elsewhere on the machine falls on every variant alike; each round's ratios are taken
//! between runs seconds apart, and the table gives their median and spread.

use std::fmt::Write as _;
use std::path::Path;

use crate::daemons;
use crate::measure::{BenchError, Sample, gib, human, machine};
use crate::report::median_of;
use crate::stream::{expected_digest, random_block};

/// One way through the two daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Migproxy,
    Stock,
    Plaintext,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Migproxy, Variant::Stock, Variant::Plaintext];

    fn name(self) -> &'static str {
        match self {
            Variant::Migproxy => "TLS, migproxy's record layer (--tls-records migproxy)",
            Variant::Stock => "TLS, stock rustls / tokio-rustls (--tls-records stock)",
            Variant::Plaintext => "plaintext (the bound: no encryption)",
        }
    }

    fn run(
        self,
        migproxy: &Path,
        block: &[u8],
        size: u64,
        expected: blake3::Hash,
    ) -> Result<Sample, BenchError> {
        let (tls, extra): (bool, &[&str]) = match self {
            Variant::Migproxy => (true, &["--tls-records", "migproxy"]),
            Variant::Stock => (true, &["--tls-records", "stock"]),
            Variant::Plaintext => (false, &[]),
        };
        daemons::run_with(tls, extra, migproxy, block, size, expected)
    }
}

/// One variant's run in one round: GiB/s and the daemons' CPU seconds per GiB.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    cpu: f64,
}

/// `/proc/loadavg`'s first three fields.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn run(migproxy: &Path, size: u64, rounds: usize, out: &Path) -> Result<(), BenchError> {
    let block = random_block();
    let expected = expected_digest(&block, size);
    let load_before = load();
    let mut runs: Vec<Vec<(Variant, Run)>> = Vec::new();
    for round in 0..rounds {
        let mut this = Vec::new();
        for i in 0..Variant::ALL.len() {
            let variant = Variant::ALL[(i + round) % Variant::ALL.len()];
            let sample = variant.run(migproxy, &block, size, expected)?;
            let run = Run {
                rate: gib(size) / sample.seconds,
                cpu: sample.cpu_seconds.ok_or("no CPU figure for the daemons")? / gib(size),
            };
            eprintln!(
                "round {}/{rounds} {:<56} {:>5.2} GiB/s, daemons {:.3} CPU-s/GiB",
                round + 1,
                variant.name(),
                run.rate,
                run.cpu
            );
            this.push((variant, run));
        }
        runs.push(this);
    }
    let load_after = load();
    let table = render(&runs, size, &load_before, &load_after);
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("tls-records.md"), &table)?;
    Ok(())
}

/// Median and min–max of some values, as `1.23 (1.10–1.40)`.
fn spread(values: &[f64], digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let median = median_of(values.iter().copied());
    format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
}

fn of(round: &[(Variant, Run)], variant: Variant) -> Run {
    round
        .iter()
        .find(|(v, _)| *v == variant)
        .map(|(_, r)| *r)
        .unwrap_or(Run {
            rate: f64::NAN,
            cpu: f64::NAN,
        })
}

fn render(runs: &[Vec<(Variant, Run)>], size: u64, before: &str, after: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# TLS record layers, {} per run, {} interleaved rounds\n\n{}\n",
        human(size),
        runs.len(),
        machine()
    );
    let _ = writeln!(
        out,
        "Two daemons, unix legs at both ends, TCP between them; the relay copies with 1 MiB \
         reads and writes in every variant. CPU: utime+stime of both daemons per GiB carried. \
         Load average (1, 5, 15 min) before: {before}; after: {after}.\n"
    );
    let _ = writeln!(
        out,
        "| variant | GiB/s median (min–max) | daemons CPU-s/GiB median (min–max) |"
    );
    let _ = writeln!(out, "| --- | --- | --- |");
    for variant in Variant::ALL {
        let rates: Vec<f64> = runs.iter().map(|r| of(r, variant).rate).collect();
        let cpus: Vec<f64> = runs.iter().map(|r| of(r, variant).cpu).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            variant.name(),
            spread(&rates, 2),
            spread(&cpus, 3)
        );
    }
    // Paired per round: each round's two TLS runs ran seconds apart under the same load.
    let throughput: Vec<f64> = runs
        .iter()
        .map(|r| of(r, Variant::Migproxy).rate / of(r, Variant::Stock).rate)
        .collect();
    let cpu: Vec<f64> = runs
        .iter()
        .map(|r| of(r, Variant::Migproxy).cpu / of(r, Variant::Stock).cpu)
        .collect();
    let (t, c) = (
        median_of(throughput.iter().copied()),
        median_of(cpu.iter().copied()),
    );
    let _ = writeln!(
        out,
        "\nmigproxy's record layer against stock rustls, per round:\n\n\
         | ratio | median (min–max) | keep the custom layer when |\n| --- | --- | --- |\n\
         | throughput, migproxy ÷ stock | {} | ≥ 1.10 |\n\
         | CPU per GiB, migproxy ÷ stock | {} | ≤ 0.85 |\n",
        spread(&throughput, 3),
        spread(&cpu, 3)
    );
    let verdict = if t >= 1.10 || c <= 0.85 {
        "keep migproxy's record layer"
    } else {
        "delete migproxy's record layer: stock rustls is not clearly worse"
    };
    let _ = writeln!(
        out,
        "By the rule (≥ 10 % throughput or ≥ 15 % less CPU): **{verdict}**."
    );
    out
}
