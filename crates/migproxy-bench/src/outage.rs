//! `outage`: resumable channels across a blackholed link. Two hosts on one machine (network
//! namespaces A and B, a veth pair between them); a verified pseudo-random stream runs from
//! A to B, written by this process into a unix socket on A's side and read, hashed and
//! timed by it from a unix socket on B's side. Once bytes flow, every packet in or out of B is
//! dropped (nftables) for D seconds, then the blackhole is lifted at instant T; the sample is
//! the time from T to the first byte the sink reads after it. Routes, interleaved: two
//! migproxy daemons with resumable channels (plaintext, TLS), and for reference the same
//! blackhole across one plain TCP connection (two splice forwarders from `floor.rs`, unix
//! legs like the daemons'), where only TCP's retransmissions bring the bytes back.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migproxy::daemon::migration::view::{ResumeView, Snapshot};

use crate::chart::{self, Bar, Panel};
use crate::daemons::{self, Daemon};
use crate::measure::{BenchError, human, machine};
use crate::netns::TwoHosts;
use crate::pki;
use crate::report::{Target, render_targets};
use crate::stream::{BLOCK, expected_digest, random_block};

/// Bytes the sink must have read before the cut: the stream is running.
const FLOWING: u64 = 64 << 20;
/// How long the stream goes on after its bytes came back, before the source ends it.
const AFTER: Duration = Duration::from_millis(300);
/// The longest wait for bytes after the return before the run is an error.
const BACK_WITHIN: Duration = Duration::from_secs(60);
/// The source's writes.
const CHUNK: usize = 1 << 20;
/// The target: bytes move again within this of the link's return (p50).
const TARGET_SECONDS: f64 = 1.0;

/// A way from A to B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// One TCP connection between the hosts, splice forwarders at its ends.
    Direct,
    Daemons,
    DaemonsTls,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Daemons, Route::DaemonsTls];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct TCP (the kernel's retransmissions)",
            Route::Daemons => "two migproxy daemons, plaintext, resumable channels",
            Route::DaemonsTls => "two migproxy daemons, TLS, resumable channels",
        }
    }
}

/// What was asked: repetitions, the blackhole's length, the daemons' peer timeout.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub reps: usize,
    pub blackhole: Duration,
    /// Seconds: the daemons' `--peer-timeout`.
    pub peer_timeout: f64,
}

/// One run of one route.
#[derive(Debug)]
struct Outage {
    /// Seconds from the blackhole's removal to the first byte the sink read after it.
    delay: f64,
    /// Seconds from the sink's last byte before the return to the return.
    silence: f64,
    /// Bytes carried (and verified).
    bytes: u64,
    /// The daemons' resume views after the run: source, destination.
    resume: Option<[ResumeView; 2]>,
}

/// What one run needs: the programs, the hosts, a directory for sockets, the stream.
struct Bench<'a> {
    migproxy: &'a Path,
    hosts: &'a TwoHosts,
    dir: &'a Path,
    block: Vec<u8>,
    settings: Settings,
}

/// Runs every route `settings.reps` times, interleaved; writes the table and the chart.
pub fn run(migproxy: &Path, settings: Settings, out: &Path) -> Result<(), BenchError> {
    if !migproxy.exists() {
        return Err(format!("{} is not built", migproxy.display()).into());
    }
    let hosts = TwoHosts::new("ou")?;
    let dir = std::env::temp_dir().join(format!("migproxy-bench-o{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Both hosts' certificates name both addresses: the source verifies B's by its address.
    pki::write_for(&dir.join("pki"), &[&hosts.a_addr, &hosts.b_addr])?;
    let bench = Bench {
        migproxy,
        hosts: &hosts,
        dir: &dir,
        block: random_block(),
        settings,
    };
    let built = build_of(migproxy);
    let runs = bench.all();
    let _ = std::fs::remove_dir_all(&dir);
    let runs = runs?;
    // The target directory is shared: a build during the run mixes two daemons in it.
    let rebuilt = build_of(migproxy) != built;
    let title = format!(
        "Outage recovery: a {:.1} s blackhole, {} interleaved repetitions",
        settings.blackhole.as_secs_f64(),
        settings.reps
    );
    let machine = machine();
    let summaries: Vec<Summary> = runs.iter().map(|(r, o)| summarise(*r, o)).collect();
    let mut table = render(&summaries, &title, &machine, settings);
    if rebuilt {
        table.push_str(&format!(
            "\n**{} was rebuilt during this run: its runs may mix two builds.**\n",
            migproxy.display()
        ));
    }
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("outage.md"), &table)?;
    chart::draw(
        &out.join("outage.png"),
        &title,
        &machine,
        &[panel(&summaries)],
    )
}

impl Bench<'_> {
    /// Every route once per repetition.
    fn all(&self) -> Result<Vec<(Route, Vec<Outage>)>, BenchError> {
        let mut runs: Vec<(Route, Vec<Outage>)> =
            Route::ALL.iter().map(|r| (*r, Vec::new())).collect();
        let reps = self.settings.reps;
        let mut n = 0;
        for rep in 1..=reps {
            for (route, outages) in &mut runs {
                n += 1;
                let outage = self
                    .one(*route, n)
                    .map_err(|e| format!("rep {rep}/{reps} {}: {e}", route.name()))?;
                eprintln!("rep {rep}/{reps} {}", progress(*route, &outage));
                outages.push(outage);
            }
        }
        Ok(runs)
    }

    /// One run of `route`, the `n`th of the benchmark, in a directory of its own.
    fn one(&self, route: Route, n: usize) -> Result<Outage, BenchError> {
        let dir = self.dir.join(n.to_string());
        std::fs::create_dir_all(&dir)?;
        let outage = match route {
            Route::Direct => self.direct(&dir, n),
            Route::Daemons => self.daemons(&dir, false),
            Route::DaemonsTls => self.daemons(&dir, true),
        };
        let _ = std::fs::remove_dir_all(&dir);
        outage
    }

    /// Two daemons with resumable channels, the source in A and the destination in B.
    fn daemons(&self, dir: &Path, tls: bool) -> Result<Outage, BenchError> {
        let pki = self.dir.join("pki");
        let tls = tls.then_some(pki.as_path());
        let timeout = self.settings.peer_timeout.to_string();
        let flags = ["--peer-timeout", &timeout, "--resume-timeout", "60"];
        let hosts = self.hosts;
        let start = |ns: &str, addr: &str, name: &str| {
            let listen = format!("{addr}:0");
            daemons::start_in((ns, &listen), self.migproxy, dir, (name, tls), &flags)
        };
        let destination = start(&hosts.b, &hosts.b_addr, "destination")?;
        let source = start(&hosts.a, &hosts.a_addr, "source")?;
        let target = dir.join("incoming.sock");
        let sink = UnixListener::bind(&target)?;
        let id = "outage";
        let to = format!("unix:{}", target.display());
        let socket = daemons::create_blocking(&source, &destination, id, &to)?;
        let (delay, silence, bytes) = self.measure(sink, Path::new(&socket))?;
        let resume = [final_resume(&source, id)?, final_resume(&destination, id)?];
        Ok(Outage {
            delay,
            silence,
            bytes,
            resume: Some(resume),
        })
    }

    /// One TCP connection from A to B: the stream enters a splice forwarder in A on a unix
    /// socket, crosses to a splice forwarder in B, and leaves it on a unix socket.
    fn direct(&self, dir: &Path, n: usize) -> Result<Outage, BenchError> {
        let target = dir.join("incoming.sock");
        let sink = UnixListener::bind(&target)?;
        let entry = dir.join("outgoing.sock");
        // A namespace of this benchmark's own: any port is free there.
        let across = format!("{}:{}", self.hosts.b_addr, 20_000 + n);
        // This very binary, even if a build has replaced the file meanwhile.
        let exe = format!("/proc/{}/exe", std::process::id());
        let forwarder = |ns: &str, listen: String, connect: String| {
            let child = TwoHosts::command(ns, &exe)
                .args(["splice-floor", &listen, &connect])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            Ok::<_, BenchError>(Process(child))
        };
        let unix = |path: &Path| format!("unix:{}", path.display());
        let _far = forwarder(&self.hosts.b, across.clone(), unix(&target))?;
        let _near = forwarder(&self.hosts.a, unix(&entry), across)?;
        let (delay, silence, bytes) = self.measure(sink, &entry)?;
        Ok(Outage {
            delay,
            silence,
            bytes,
            resume: None,
        })
    }

    /// The stream from `entry` to `sink`, cut and restored: (delay, silence, bytes).
    fn measure(&self, sink: UnixListener, entry: &Path) -> Result<(f64, f64, u64), BenchError> {
        let arrivals = Arc::new(Arrivals::new());
        let reader = spawn_sink(sink, Arc::clone(&arrivals));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = spawn_source(entry, self.block.clone(), Arc::clone(&stop))?;
        let timed = self.cut_and_restore(&arrivals);
        // Whatever happened, the source ends its stream: the threads end with the run.
        std::thread::sleep(AFTER);
        stop.store(true, Ordering::SeqCst);
        let (delay, silence) = timed?;
        let written = writer.join().map_err(|_| "the source panicked")??;
        let (received, digest) = reader.join().map_err(|_| "the sink panicked")??;
        if received != written || digest != expected_digest(&self.block, written) {
            return Err(format!(
                "the sink received {received} of {written} bytes, or different bytes"
            )
            .into());
        }
        Ok((delay, silence, written))
    }

    /// Waits for the stream to run, blackholes B for D, lifts it at T, and waits for the
    /// first byte after T: (seconds from T to it, seconds the sink saw nothing before T).
    fn cut_and_restore(&self, arrivals: &Arrivals) -> Result<(f64, f64), BenchError> {
        wait(Duration::from_secs(30), "64 MiB at the sink", || {
            arrivals.bytes.load(Ordering::SeqCst) >= FLOWING
        })?;
        let blackhole = self.hosts.blackhole_b()?;
        let cut = arrivals.now();
        std::thread::sleep(self.settings.blackhole);
        let restored = Instant::now();
        blackhole.restore()?;
        let back = arrivals.since(restored);
        let last = arrivals.last_before(back).unwrap_or(0);
        // Bytes read well after the cut: the blackhole let them through.
        if last > cut + 1_000_000_000 {
            return Err("bytes reached the sink during the blackhole".into());
        }
        wait(BACK_WITHIN, "a byte after the link's return", || {
            arrivals.first_after(back).is_some()
        })?;
        let first = arrivals.first_after(back).unwrap_or(back);
        Ok(((first - back) as f64 / 1e9, (back - last) as f64 / 1e9))
    }
}

/// When `program` was last written (none if unreadable).
fn build_of(program: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(program).and_then(|m| m.modified()).ok()
}

/// A forwarder process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the sink read and when: bytes so far, and the instant of every read, in
/// nanoseconds after `epoch`.
struct Arrivals {
    epoch: Instant,
    bytes: AtomicU64,
    reads: Mutex<Vec<u64>>,
}

impl Arrivals {
    fn new() -> Arrivals {
        Arrivals {
            epoch: Instant::now(),
            bytes: AtomicU64::new(0),
            reads: Mutex::new(Vec::with_capacity(1 << 16)),
        }
    }

    fn now(&self) -> u64 {
        self.since(Instant::now())
    }

    /// `at` in nanoseconds after the epoch.
    fn since(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn read(&self, n: usize) {
        let at = self.now();
        self.bytes.fetch_add(n as u64, Ordering::SeqCst);
        if let Ok(mut reads) = self.reads.lock() {
            reads.push(at);
        }
    }

    /// The last read at or before `at`.
    fn last_before(&self, at: u64) -> Option<u64> {
        let reads = self.reads.lock().ok()?;
        reads.iter().rev().find(|r| **r <= at).copied()
    }

    /// The first read after `at`.
    fn first_after(&self, at: u64) -> Option<u64> {
        let reads = self.reads.lock().ok()?;
        // Sorted: one thread pushes them in time order.
        let i = reads.partition_point(|r| *r <= at);
        reads.get(i).copied()
    }
}

/// Accepts one connection on `sink` and reads it to its end, hashing it and noting every
/// read in `arrivals`; returns the bytes and their digest.
fn spawn_sink(
    sink: UnixListener,
    arrivals: Arc<Arrivals>,
) -> JoinHandle<std::io::Result<(u64, blake3::Hash)>> {
    std::thread::spawn(move || {
        let (stream, _) = sink.accept()?;
        crate::stream::sink_digest(Noted { stream, arrivals })
    })
}

/// A stream whose every read is noted in `arrivals`, with its time.
struct Noted<R> {
    stream: R,
    arrivals: Arc<Arrivals>,
}

impl<R: Read> Read for Noted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n > 0 {
            self.arrivals.read(n);
        }
        Ok(n)
    }
}

/// Connects to `entry` (retrying while it is not there yet) and writes `block` repeated, a
/// chunk at a time, until `stop`; then ends the stream. Returns the bytes written.
fn spawn_source(
    entry: &Path,
    block: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<std::io::Result<u64>>, BenchError> {
    let mut stream = connect_unix(entry)?;
    Ok(std::thread::spawn(move || {
        let mut written = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let at = (written % BLOCK as u64) as usize;
            let chunk = &block[at..(at + CHUNK).min(BLOCK)];
            stream.write_all(chunk)?;
            written += chunk.len() as u64;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(written)
    }))
}

/// Connects to a unix socket that a process just started is about to create.
fn connect_unix(path: &Path) -> Result<UnixStream, BenchError> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(format!("connect to {}: {error}", path.display()).into()),
        }
    }
}

/// Polls `ready` every millisecond until it holds, or `limit` passes (an error naming
/// `what`).
fn wait(limit: Duration, what: &str, ready: impl Fn() -> bool) -> Result<(), BenchError> {
    let started = Instant::now();
    while !ready() {
        if started.elapsed() > limit {
            return Err(format!("no {what} within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The migration's resume view once it has ended on `daemon` (which must not have failed).
fn final_resume(daemon: &Daemon, id: &str) -> Result<ResumeView, BenchError> {
    let started = Instant::now();
    let view: Snapshot = loop {
        let view = daemons::view_blocking(daemon, id)?;
        if view.state.is_final() || started.elapsed() > Duration::from_secs(10) {
            break view;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !view.state.is_final() {
        return Err(format!(
            "{} {id} still {} after the stream",
            view.direction, view.state
        )
        .into());
    }
    if let Some(error) = &view.error {
        let error = serde_json::to_string(error)?;
        return Err(format!("{} {id} ended {}: {error}", view.direction, view.state).into());
    }
    view.resume.ok_or_else(|| {
        format!(
            "{} {id}: resumable channels were not agreed",
            view.direction
        )
        .into()
    })
}

/// One run's progress line.
fn progress(route: Route, outage: &Outage) -> String {
    let resume = outage.resume.as_ref().map_or(String::new(), |[s, d]| {
        format!(
            "; resumptions {}/{}, link outages {}/{}, link down {}/{} ms (source/destination)",
            s.resumptions,
            d.resumptions,
            s.link_outages,
            d.link_outages,
            s.link_lost_ms,
            d.link_lost_ms
        )
    });
    format!(
        "{:<52} back after {:>7.1} ms (silent {:.2} s), {} verified{resume}",
        route.name(),
        outage.delay * 1e3,
        outage.silence,
        human(outage.bytes),
    )
}

/// A route's runs as the table and the chart show them.
#[derive(Debug)]
struct Summary {
    route: Route,
    /// Seconds, sorted.
    delays: Vec<f64>,
    /// Per run: the source's and the destination's resumptions and control-link outages,
    /// and the source's link-down time in ms; empty without daemons.
    resumptions: Vec<(u32, u32)>,
    link_outages: Vec<(u64, u64)>,
    link_lost_ms: Vec<u64>,
}

impl Summary {
    /// Nearest rank: the value at `p` of the way from the smallest to the largest.
    fn percentile(&self, p: f64) -> Option<f64> {
        let last = self.delays.len().checked_sub(1)?;
        Some(self.delays[(last as f64 * p).round() as usize])
    }
}

fn summarise(route: Route, outages: &[Outage]) -> Summary {
    let mut delays: Vec<f64> = outages.iter().map(|o| o.delay).collect();
    delays.sort_by(f64::total_cmp);
    let views = || outages.iter().filter_map(|o| o.resume.as_ref());
    Summary {
        route,
        delays,
        resumptions: views()
            .map(|[s, d]| (s.resumptions, d.resumptions))
            .collect(),
        link_outages: views()
            .map(|[s, d]| (s.link_outages, d.link_outages))
            .collect(),
        link_lost_ms: views().map(|[s, _]| s.link_lost_ms).collect(),
    }
}

/// "1" when every value is 1, else "1–2".
fn range<T: Ord + Copy + std::fmt::Display>(values: impl Iterator<Item = T>) -> String {
    let values: Vec<T> = values.collect();
    match (values.iter().min(), values.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
        (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
        _ => "-".to_owned(),
    }
}

fn render(summaries: &[Summary], title: &str, machine: &str, settings: Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {title}\n\n{machine}\n");
    let _ = writeln!(
        out,
        "Two network namespaces joined by a veth pair; every packet in or out of the \
         destination's namespace dropped (nftables) for {:.1} s while a verified stream runs \
         at full speed; the delay is from the blackhole's removal to the first byte the sink \
         reads after it. Daemons: `--peer-timeout {}`, `--resume-timeout 60`. Resumptions and \
         control-link outages per run as the daemons' API shows them (source / destination); \
         link down: the source's `link_lost_ms`, median. Percentiles by nearest rank over {} \
         runs.\n",
        settings.blackhole.as_secs_f64(),
        settings.peer_timeout,
        settings.reps
    );
    let _ = writeln!(
        out,
        "| path | p50 ms | p90 ms | max ms | min ms | resumptions per run | control-link outages per run | link down, median ms |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for s in summaries {
        let ms = |p: f64| {
            s.percentile(p)
                .map_or("-".into(), |v| format!("{:.0}", v * 1e3))
        };
        let pair = |values: Vec<(u64, u64)>| {
            if values.is_empty() {
                return "-".to_owned();
            }
            let (src, dst): (Vec<u64>, Vec<u64>) = values.into_iter().unzip();
            format!("{} / {}", range(src.into_iter()), range(dst.into_iter()))
        };
        let resumptions = s.resumptions.iter().map(|(a, b)| (*a as u64, *b as u64));
        let lost = crate::report::median_of(s.link_lost_ms.iter().map(|v| *v as f64));
        let lost = if lost.is_nan() {
            "-".into()
        } else {
            format!("{lost:.0}")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {lost} |",
            s.route.name(),
            ms(0.5),
            ms(0.9),
            ms(1.0),
            ms(0.0),
            pair(resumptions.collect()),
            pair(s.link_outages.clone()),
        );
    }
    out.push_str(&render_targets(&targets(summaries)));
    out
}

/// The target for each daemon route, beside direct TCP's p50 in the same run.
fn targets(summaries: &[Summary]) -> Vec<Target> {
    let p50 = |route| {
        summaries
            .iter()
            .find(|s| s.route == route)
            .and_then(|s| s.percentile(0.5))
    };
    let direct = p50(Route::Direct).map_or(String::new(), |d| {
        format!(
            " (direct TCP through the same blackhole: {:.0} ms)",
            d * 1e3
        )
    });
    [
        (
            Route::Daemons,
            "plaintext daemon pair: p50 from the link's return to bytes moving < 1 s",
        ),
        (
            Route::DaemonsTls,
            "TLS daemon pair: p50 from the link's return to bytes moving < 1 s",
        ),
    ]
    .into_iter()
    .map(|(route, goal)| Target {
        goal,
        measured: p50(route).map_or("not measured".into(), |v| {
            format!("{:.0} ms{direct}", v * 1e3)
        }),
        holds: p50(route).map(|v| v < TARGET_SECONDS),
    })
    .collect()
}

/// The chart: each route's median delay, the runs' min–max as whiskers, and the target.
fn panel(summaries: &[Summary]) -> Panel {
    let mut panel = Panel::new(
        "From the link's return to bytes moving again, median (whiskers: min–max)",
        "milliseconds",
        0,
    );
    panel.target = Some((TARGET_SECONDS * 1e3, "target p50 < 1 s"));
    for s in summaries {
        let name = s.route.name();
        panel.bars.push(
            match (s.percentile(0.5), s.percentile(0.0), s.percentile(1.0)) {
                (Some(p50), Some(min), Some(max)) => {
                    Bar::new(name, p50 * 1e3).spread(min * 1e3, max * 1e3)
                }
                _ => Bar::failed(name, "no run"),
            },
        );
    }
    panel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(route: Route, delays: Vec<f64>) -> Summary {
        Summary {
            route,
            delays,
            resumptions: vec![(1, 1), (1, 2)],
            link_outages: vec![(1, 1), (1, 1)],
            link_lost_ms: vec![5_000, 5_200],
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = summary(Route::Daemons, vec![0.1, 0.2, 0.3, 0.4, 3.0]);
        assert_eq!(s.percentile(0.5), Some(0.3));
        assert_eq!(s.percentile(0.9), Some(3.0));
        assert_eq!(s.percentile(0.0), Some(0.1));
        assert_eq!(summary(Route::Direct, vec![]).percentile(0.5), None);
    }

    #[test]
    fn the_table_shows_ranges_and_the_target() {
        let summaries = [
            summary(Route::Direct, vec![0.2, 6.4]),
            summary(Route::Daemons, vec![0.5, 0.7, 0.9]),
            summary(Route::DaemonsTls, vec![2.9, 3.0, 3.1]),
        ];
        let settings = Settings {
            reps: 3,
            blackhole: Duration::from_secs(6),
            peer_timeout: 2.0,
        };
        let table = render(&summaries, "Outage", "machine", settings);
        assert!(
            table.contains("| 700 | 900 | 900 | 500 | 1 / 1–2 | 1 / 1 | 5100 |"),
            "{table}"
        );
        assert!(
            table.contains(
                "< 1 s | 700 ms (direct TCP through the same blackhole: 6400 ms) | yes |"
            ),
            "{table}"
        );
        assert!(table.contains("< 1 s | 3000 ms (direct TCP"), "{table}");
        assert!(table.contains("| no |"), "{table}");
    }

    #[test]
    fn outage_chart() {
        let dir = tempfile::tempdir().unwrap();
        let summaries = [
            summary(Route::Direct, vec![0.2, 6.4]),
            summary(Route::Daemons, vec![2.9, 3.0, 3.1]),
            summary(Route::DaemonsTls, vec![]),
        ];
        let path = dir.path().join("outage.png");
        chart::draw(&path, "Outage", chart::tests::MACHINE, &[panel(&summaries)]).unwrap();
        chart::tests::assert_png(&path);
    }
}
