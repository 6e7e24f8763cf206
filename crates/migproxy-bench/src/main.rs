//! migproxy-bench: migproxy measured side by side with a direct connection and other proxies,
//! in one run, interleaved, on this machine. See `docs/benchmarks.md`.
//!
//! `synthetic`: a Rust source writes a pseudo-random stream over TCP to a Rust sink that
//! hashes it, directly or through a proxy; the sink's digest must equal the source's. For
//! each path: throughput, CPU seconds per GiB of the proxy process (utime+stime from
//! /proc/PID/stat) and its peak RSS. Runs are interleaved (ABCABC…) and summarised by median
//! and spread, with ratios to the direct connection.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

mod cancel;
mod chart;
mod concurrency;
mod daemons;
mod floor;
mod pki;
mod qemu;
mod tls_records;

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
    /// Real QEMU migrations, interleaved: direct, migproxy (plaintext, TLS), QEMU's own TLS,
    /// socat, and multifd direct against migproxy.
    Qemu {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The yardstick of the benchmarks: the simplest splice relay (see floor.rs). LISTEN and
    /// CONNECT are each a TCP port on 127.0.0.1 or `unix:PATH`.
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
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
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

/// A way from the source to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Relay,
    RelayCopy,
    /// Two blocking threads splicing, nothing else: what every splice relay must do.
    SpliceFloor,
    Socat,
    Haproxy,
    /// A stunnel client and server: TLS between them.
    Stunnel,
    /// unix → source daemon → TCP → destination daemon → unix, as QEMU's stream goes.
    Daemons,
    DaemonsTls,
}

impl Route {
    const ALL: [Route; 9] = [
        Route::Direct,
        Route::Relay,
        Route::RelayCopy,
        Route::SpliceFloor,
        Route::Socat,
        Route::Haproxy,
        Route::Stunnel,
        Route::Daemons,
        Route::DaemonsTls,
    ];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct TCP",
            Route::Relay => "migproxy relay (splice)",
            Route::RelayCopy => "migproxy relay --no-splice",
            Route::SpliceFloor => "simplest splice relay (yardstick)",
            Route::Socat => "socat 1.7",
            Route::Haproxy => "haproxy (splice-auto)",
            Route::Stunnel => "stunnel pair (TLS)",
            Route::Daemons => "two migproxy daemons, plaintext (unix legs)",
            Route::DaemonsTls => "two migproxy daemons, TLS (unix legs)",
        }
    }

    /// A route through another project's proxy (socat, haproxy, stunnel).
    fn is_peer(self) -> bool {
        matches!(self, Route::Socat | Route::Haproxy | Route::Stunnel)
    }

    /// The program this route needs, if it is missing here.
    fn missing(self, migproxy: &Path) -> Option<String> {
        let program = match self {
            Route::Direct | Route::SpliceFloor => return None,
            Route::Relay | Route::RelayCopy | Route::Daemons | Route::DaemonsTls => {
                return (!migproxy.exists()).then(|| migproxy.display().to_string());
            }
            Route::Socat => "socat",
            Route::Haproxy => "haproxy",
            Route::Stunnel => "stunnel4",
        };
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!found).then(|| program.to_owned())
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    cpu_seconds: Option<f64>,
    peak_rss_kib: Option<u64>,
    /// What the whole machine and the source and sink (this process) spent meanwhile.
    spent: Spent,
}

/// CPU spent during one run, beyond the proxies' own.
#[derive(Debug, Clone, Copy)]
struct Spent {
    /// The source and the sink: this process's utime + stime, in seconds.
    endpoints: f64,
    /// Every core of the machine, busy (not idle or waiting for I/O), in seconds.
    machine: f64,
}

/// Reads the CPU clocks at the start of a run; [`Meter::stop`] says what the run spent.
struct Meter {
    endpoints: f64,
    machine: f64,
}

impl Meter {
    fn start() -> Meter {
        Meter {
            endpoints: cpu_seconds(std::process::id()).unwrap_or(0.0),
            machine: machine_busy_seconds(),
        }
    }

    fn stop(self) -> Spent {
        Spent {
            endpoints: cpu_seconds(std::process::id()).unwrap_or(0.0) - self.endpoints,
            machine: machine_busy_seconds() - self.machine,
        }
    }
}

/// Seconds all cores have been busy since boot: /proc/stat's first line, every field but
/// idle and iowait (guest time is already inside user).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / 100.0
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
            synthetic(size, reps, only.as_deref(), &out)
        }
        Bench::Concurrency { size, out } => sibling("migproxy")
            .and_then(|migproxy| concurrency::run(&migproxy, size, &[1, 4, 16], &out)),
        Bench::Qemu { mib, reps, out } => {
            sibling("migproxy").and_then(|migproxy| qemu::run(&migproxy, mib, reps, &out))
        }
        Bench::TlsRecords { size, rounds, out } => {
            sibling("migproxy").and_then(|migproxy| tls_records::run(&migproxy, size, rounds, &out))
        }
        Bench::SpliceFloor { listen, connect } => floor::run(&listen, &connect),
        Bench::Cancel { count, out } => {
            sibling("migproxy").and_then(|migproxy| cancel::run(&migproxy, count, &out))
        }
    };
    if let Err(error) = result {
        eprintln!("migproxy-bench: {error}");
        std::process::exit(1);
    }
}

type BenchError = Box<dyn std::error::Error>;

fn synthetic(size: u64, reps: usize, only: Option<&str>, out: &Path) -> Result<(), BenchError> {
    let migproxy = sibling("migproxy")?;
    let mut routes = Vec::new();
    let chosen = |route: &Route| {
        *route == Route::Direct || only.is_none_or(|text| route.name().contains(text))
    };
    for route in Route::ALL.into_iter().filter(chosen) {
        match route.missing(&migproxy) {
            None => routes.push(route),
            Some(program) => eprintln!("{}: skipped, {program} is not installed", route.name()),
        }
    }
    let block = random_block();
    let expected = expected_digest(&block, size);
    let mut samples: Vec<(Route, Vec<Sample>)> = routes.iter().map(|r| (*r, Vec::new())).collect();
    for rep in 0..reps {
        for (route, runs) in &mut samples {
            let sample = match run(*route, &migproxy, &block, size, expected) {
                Ok(sample) => sample,
                // Another project's tool failing is reported, not fatal; migproxy failing is.
                Err(error) if route.is_peer() => {
                    eprintln!("rep {}/{reps} {}: FAILED: {error}", rep + 1, route.name());
                    continue;
                }
                Err(error) => return Err(error),
            };
            eprintln!(
                "rep {}/{reps} {:<28} {:>6.2} GiB/s, CPU s/GiB: proxy {:.2}, source and sink {:.2}, machine {:.2}; busy cores {:.2}",
                rep + 1,
                route.name(),
                gib(size) / sample.seconds,
                sample.cpu_seconds.unwrap_or(0.0) / gib(size),
                sample.spent.endpoints / gib(size),
                sample.spent.machine / gib(size),
                sample.spent.machine / sample.seconds,
            );
            runs.push(sample);
        }
    }
    let summaries: Vec<Summary> = samples
        .iter()
        .map(|(r, s)| summarise(*r, s, size))
        .collect();
    let title = format!(
        "Synthetic stream, {} per run, {reps} interleaved repetitions",
        human(size)
    );
    let machine = machine();
    let table = render(&summaries, &title, &machine);
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("synthetic.md"), &table)?;
    chart::synthetic(&out.join("synthetic.png"), &title, &machine, &summaries)
}

/// A binary built next to this one (`cargo build --release` builds both).
fn sibling(name: &str) -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name(name))
}

const BLOCK: usize = 16 << 20;

fn random_block() -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    SmallRng::seed_from_u64(7).fill_bytes(&mut block);
    block
}

/// The digest of `size` bytes made of `block` repeated.
fn expected_digest(block: &[u8], size: u64) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hasher.finalize()
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn free_port() -> Result<u16, BenchError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts the proxy of `route` in front of the sink; returns where the source connects.
fn start_proxy(
    route: Route,
    migproxy: &Path,
    sink: u16,
    dir: &Path,
) -> Result<(u16, Vec<Child>), BenchError> {
    if route == Route::Direct {
        return Ok((sink, Vec::new()));
    }
    let port = free_port()?;
    if route == Route::Stunnel {
        return stunnel_pair(port, sink, dir);
    }
    let mut command = match route {
        Route::Relay | Route::RelayCopy => {
            let mut c = Command::new(migproxy);
            c.args(["relay", "--listen", &format!("tcp:127.0.0.1:{port}")])
                .args(["--connect", &format!("tcp:127.0.0.1:{sink}")]);
            if route == Route::RelayCopy {
                c.arg("--no-splice");
            }
            c
        }
        Route::SpliceFloor => {
            let mut c = Command::new(std::env::current_exe()?);
            c.args(["splice-floor", &port.to_string(), &sink.to_string()]);
            c
        }
        Route::Socat => {
            let mut c = Command::new("socat");
            c.arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"))
                .arg(format!("TCP:127.0.0.1:{sink}"));
            c
        }
        Route::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(
                &config,
                format!(
                    "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                     timeout client 60s\n  timeout server 60s\n  option splice-auto\n\
                     listen bench\n  bind 127.0.0.1:{port}\n  server sink 127.0.0.1:{sink}\n"
                ),
            )?;
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(config);
            c
        }
        Route::Direct | Route::Stunnel | Route::Daemons | Route::DaemonsTls => {
            unreachable!("handled apart")
        }
    };
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((port, vec![child]))
}

/// A stunnel client on `port` and a stunnel server in front of the sink, TLS between them.
fn stunnel_pair(port: u16, sink: u16, dir: &Path) -> Result<(u16, Vec<Child>), BenchError> {
    let pki = dir.join("pki");
    pki::write(&pki)?;
    let middle = free_port()?;
    let server = dir.join("stunnel-server.conf");
    std::fs::write(
        &server,
        format!(
            "foreground = yes\npid =\ncert = {}\nkey = {}\n[s]\naccept = 127.0.0.1:{middle}\n\
             connect = 127.0.0.1:{sink}\n",
            pki.join("server-cert.pem").display(),
            pki.join("server-key.pem").display()
        ),
    )?;
    let client = dir.join("stunnel-client.conf");
    std::fs::write(
        &client,
        format!(
            "foreground = yes\npid =\n[c]\nclient = yes\naccept = 127.0.0.1:{port}\n\
             connect = 127.0.0.1:{middle}\nCAfile = {}\nverifyChain = yes\n",
            pki.join("ca-cert.pem").display()
        ),
    )?;
    let start = |config: &Path| {
        Command::new("stunnel4")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    let mut children = vec![start(&server)?];
    // The client stunnel drops connections it cannot carry on: the server must listen first.
    let waited = Instant::now();
    while TcpStream::connect(("127.0.0.1", middle)).is_err() {
        if waited.elapsed() > Duration::from_secs(5) {
            return Err("the stunnel server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    children.push(start(&client)?);
    Ok((port, children))
}

/// Connects, retrying while the proxy starts.
fn connect(port: u16) -> Result<TcpStream, BenchError> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => return Ok(stream),
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(error) => return Err(format!("connect to 127.0.0.1:{port}: {error}").into()),
        }
    }
}

fn run(
    route: Route,
    migproxy: &Path,
    block: &[u8],
    size: u64,
    expected: blake3::Hash,
) -> Result<Sample, BenchError> {
    if let Route::Daemons | Route::DaemonsTls = route {
        return daemons::run(route == Route::DaemonsTls, migproxy, block, size, expected);
    }
    let dir = std::env::temp_dir().join(format!("migproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sink = TcpListener::bind("127.0.0.1:0")?;
    let sink_port = sink.local_addr()?.port();
    let receiver = std::thread::spawn(move || {
        let (stream, _) = sink.accept()?;
        sink_digest(stream)
    });
    let (port, mut proxies) = start_proxy(route, migproxy, sink_port, &dir)?;
    let mut stream = connect(port)?;
    let meter = Meter::start();
    let started = Instant::now();
    source_write(&mut stream, block, size)?;
    stream.shutdown(Shutdown::Write)?;
    let (received, digest) = receiver.join().map_err(|_| "the sink panicked")??;
    let seconds = started.elapsed().as_secs_f64();
    let spent = meter.stop();
    if received != size || digest != expected {
        return Err(format!(
            "{}: the sink received {received} bytes with a different digest",
            route.name()
        )
        .into());
    }
    // Every process of the proxy counts (both ends of a stunnel pair).
    let cpu: Option<Vec<f64>> = proxies.iter().map(|c| cpu_seconds(c.id())).collect();
    let cpu_seconds = cpu.filter(|c| !c.is_empty()).map(|c| c.iter().sum());
    let peak_rss_kib = proxies.iter().filter_map(|c| peak_rss(c.id())).max();
    for child in &mut proxies {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample {
        seconds,
        cpu_seconds,
        peak_rss_kib,
        spent,
    })
}

/// Hashes a stream to its end.
fn sink_digest(mut stream: impl Read) -> std::io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Writes `size` bytes of `block` repeated.
fn source_write(stream: &mut impl Write, block: &[u8], size: u64) -> std::io::Result<()> {
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        stream.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// utime + stime of process `pid` (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// The median (sorting `values` in place); NaN for none.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// The median of some values; NaN for none.
pub fn median_of(values: impl IntoIterator<Item = f64>) -> f64 {
    median(&mut values.into_iter().collect::<Vec<f64>>())
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cores();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, Linux {}, {}",
        kernel.trim(),
        qemu_version()
    )
}

/// "QEMU 7.2.22 (Debian …)", from the first line of `qemu-system-x86_64 --version`.
fn qemu_version() -> String {
    Command::new(migproxy::vm::QEMU)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|text| {
            let line = text.lines().next()?.trim();
            Some(line.replace("QEMU emulator version", "QEMU"))
        })
        .unwrap_or_else(|| format!("no {}", migproxy::vm::QEMU))
}

/// Median, min and max of a set of runs.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

/// A route's runs as the table and the chart show them.
#[derive(Debug)]
struct Summary {
    route: Route,
    /// GiB/s; none when every run failed.
    rate: Option<Spread>,
    /// Median CPU seconds of the proxy processes per GiB; none without a proxy process.
    cpu_per_gib: Option<f64>,
    peak_rss_kib: Option<u64>,
    /// Median CPU seconds per GiB of the source and the sink (this process).
    endpoints_per_gib: f64,
    /// Median cores of the machine kept busy during a run.
    busy_cores: f64,
}

fn summarise(route: Route, runs: &[Sample], size: u64) -> Summary {
    let mut rates: Vec<f64> = runs.iter().map(|s| gib(size) / s.seconds).collect();
    let rate = (!rates.is_empty()).then(|| {
        let median = median(&mut rates);
        Spread {
            median,
            min: rates[0],
            max: rates[rates.len() - 1],
        }
    });
    let mut cpu: Vec<f64> = runs
        .iter()
        .filter_map(|s| s.cpu_seconds)
        .map(|c| c / gib(size))
        .collect();
    let mut endpoints: Vec<f64> = runs.iter().map(|s| s.spent.endpoints / gib(size)).collect();
    let mut busy: Vec<f64> = runs.iter().map(|s| s.spent.machine / s.seconds).collect();
    Summary {
        route,
        rate,
        cpu_per_gib: (!cpu.is_empty()).then(|| median(&mut cpu)),
        peak_rss_kib: runs.iter().filter_map(|s| s.peak_rss_kib).max(),
        endpoints_per_gib: median(&mut endpoints),
        busy_cores: median(&mut busy),
    }
}

fn render(summaries: &[Summary], title: &str, machine: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {title}\n\n{machine}\n");
    let _ = writeln!(
        out,
        "CPU: utime+stime per GiB of the proxy processes, and of the source and sink (one \
         process, which hashes what it receives); busy cores: the whole machine's busy time \
         over the wall time.\n"
    );
    let _ = writeln!(
        out,
        "| path | median GiB/s | min–max | × direct | proxy CPU s/GiB | source+sink CPU s/GiB | busy cores | proxy peak RSS |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let direct = summaries
        .iter()
        .find(|s| s.route == Route::Direct)
        .and_then(|s| s.rate);
    for summary in summaries {
        let name = summary.route.name();
        let Some(rate) = summary.rate else {
            let _ = writeln!(out, "| {name} | failed | - | - | - | - | - | - |");
            continue;
        };
        let (med, min, max) = (rate.median, rate.min, rate.max);
        let ratio = direct.map_or("-".into(), |d| format!("{:.2}", med / d.median));
        let cpu = summary
            .cpu_per_gib
            .map_or("-".into(), |c| format!("{c:.2}"));
        let rss = summary
            .peak_rss_kib
            .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let (ends, busy) = (summary.endpoints_per_gib, summary.busy_cores);
        let _ = writeln!(
            out,
            "| {name} | {med:.2} | {min:.2}–{max:.2} | {ratio} | {cpu} | {ends:.2} | {busy:.2} | {rss} |"
        );
    }
    out.push_str(&render_targets(&synthetic_targets(summaries)));
    out
}

/// One target of the benchmark issue: what it asks, what was measured, whether it holds.
#[derive(Debug)]
pub struct Target {
    pub goal: &'static str,
    pub measured: String,
    pub holds: Option<bool>,
}

impl Target {
    /// A ratio that must reach `at_least` (none when a path did not run).
    pub fn ratio(goal: &'static str, ratio: Option<f64>, at_least: f64) -> Target {
        Target {
            goal,
            measured: ratio.map_or("not measured".into(), |r| format!("{r:.2}×")),
            holds: ratio.map(|r| r >= at_least),
        }
    }

    /// Appends what bounds the target on this machine, measured in the same run:
    /// "(label: 1.23×; …)" for each bound that was measured.
    pub fn bounded_by(mut self, bounds: &[(&str, Option<f64>)]) -> Target {
        let known: Vec<String> = bounds
            .iter()
            .filter_map(|(label, ratio)| ratio.map(|r| format!("{label}: {r:.2}×")))
            .collect();
        if !known.is_empty() {
            self.measured = format!("{} ({})", self.measured, known.join("; "));
        }
        self
    }
}

/// The targets as a markdown table, printed with every result.
pub fn render_targets(targets: &[Target]) -> String {
    let mut out = String::from("\n| target | measured | holds |\n| --- | --- | --- |\n");
    for t in targets {
        let holds = match t.holds {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let _ = writeln!(out, "| {} | {} | {holds} |", t.goal, t.measured);
    }
    out
}

/// The synthetic stream's targets: the relay against haproxy and socat, the TLS pair
/// against stunnel.
fn synthetic_targets(summaries: &[Summary]) -> Vec<Target> {
    let find = |route| summaries.iter().find(|s| s.route == route);
    let rate = |route| find(route).and_then(|s| s.rate).map(|r| r.median);
    let cpu = |route| find(route).and_then(|s| s.cpu_per_gib);
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let cpu_ratio = over(cpu(Route::Relay), cpu(Route::Haproxy));
    // The yardstick: what the plainest splice relay reaches here. Beside migproxy's ratio it
    // shows whether the gap to the target is the engine's or the kernel's splice path's.
    let against_haproxy = Target::ratio(
        "relay throughput ≥ 1.5× haproxy's",
        over(rate(Route::Relay), rate(Route::Haproxy)),
        1.5,
    )
    .bounded_by(&[(
        "the simplest splice relay",
        over(rate(Route::SpliceFloor), rate(Route::Haproxy)),
    )]);
    // No proxy is faster than no proxy: when direct TCP itself is not 3× socat, no relay is.
    let against_socat = Target::ratio(
        "relay throughput ≥ 3× socat's",
        over(rate(Route::Relay), rate(Route::Socat)),
        3.0,
    )
    .bounded_by(&[(
        "direct TCP, no proxy at all",
        over(rate(Route::Direct), rate(Route::Socat)),
    )]);
    vec![
        against_haproxy,
        Target {
            goal: "relay CPU per GiB ≤ haproxy's",
            measured: cpu_ratio.map_or("not measured".into(), |r| format!("{r:.2}×")),
            holds: cpu_ratio.map(|r| r <= 1.0),
        },
        against_socat,
        Target::ratio(
            "TLS daemon pair throughput ≥ 1.5× the stunnel pair's",
            over(rate(Route::DaemonsTls), rate(Route::Stunnel)),
            1.5,
        ),
    ]
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", gib(bytes))
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn a_target_shows_the_bounds_that_were_measured() {
        let target = Target::ratio("relay ≥ 1.5× haproxy's", Some(1.06), 1.5)
            .bounded_by(&[("yardstick", Some(1.04)), ("not run", None)]);
        assert_eq!(target.measured, "1.06× (yardstick: 1.04×)");
        assert_eq!(target.holds, Some(false));
        let unmeasured = Target::ratio("x", None, 1.0).bounded_by(&[("not run", None)]);
        assert_eq!(unmeasured.measured, "not measured");
        assert_eq!(unmeasured.holds, None);
    }
}
