//! `synthetic`: a Rust source writes a pseudo-random stream over TCP to a Rust sink that
//! hashes it, directly or through a proxy; the sink's digest must equal the source's. For
//! each path: throughput, CPU seconds per GiB of the proxy process (utime+stime from
//! /proc/PID/stat) and its peak RSS. Runs are interleaved (ABC BCA CAB…) and summarised by median
//! and spread, with ratios to the direct connection.

use std::fmt::Write as _;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::chart::{self, Bar, Panel};
use crate::measure::{
    BenchError, Meter, Sample, cpu_seconds, free_port, gib, human, machine, peak_rss,
};
use crate::report::{Paired, Spread, Target, median, render_targets};
use crate::stream::{connect, expected_digest, random_block, sink_digest, source_write};
use crate::{daemons, pki};

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
    /// The same two, carrying the channel resumable (retention, acknowledgements).
    DaemonsResumable,
    DaemonsTlsResumable,
}

impl Route {
    const ALL: [Route; 11] = [
        Route::Direct,
        Route::Relay,
        Route::RelayCopy,
        Route::SpliceFloor,
        Route::Socat,
        Route::Haproxy,
        Route::Stunnel,
        Route::Daemons,
        Route::DaemonsTls,
        Route::DaemonsResumable,
        Route::DaemonsTlsResumable,
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
            Route::DaemonsResumable => "two migproxy daemons, plaintext, resumable channels",
            Route::DaemonsTlsResumable => "two migproxy daemons, TLS, resumable channels",
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
            Route::Relay
            | Route::RelayCopy
            | Route::Daemons
            | Route::DaemonsTls
            | Route::DaemonsResumable
            | Route::DaemonsTlsResumable => {
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

/// Runs every route `reps` times, interleaved; writes the table and the chart to `out`.
pub fn run(
    migproxy: &Path,
    size: u64,
    reps: usize,
    only: Option<&str>,
    out: &Path,
) -> Result<(), BenchError> {
    let routes = available(migproxy, only);
    let block = random_block();
    let expected = expected_digest(&block, size);
    // Each run with its repetition's number: runs of one repetition are compared in pairs.
    let mut samples: Vec<(Route, Vec<(usize, Sample)>)> =
        routes.iter().map(|r| (*r, Vec::new())).collect();
    for rep in 0..reps {
        // Each repetition starts one route later (ABC, BCA, CAB…): no route always runs right
        // after the same other one, on the machine that one left behind.
        let n = samples.len();
        for i in 0..n {
            let (route, runs) = &mut samples[(i + rep) % n];
            let sample = match run_route(*route, migproxy, &block, size, expected) {
                Ok(sample) => sample,
                // Another project's tool failing is reported, not fatal; migproxy failing is.
                Err(error) if route.is_peer() => {
                    eprintln!("rep {}/{reps} {}: FAILED: {error}", rep + 1, route.name());
                    continue;
                }
                Err(error) => return Err(error),
            };
            eprintln!("rep {}/{reps} {}", rep + 1, progress(*route, &sample, size));
            runs.push((rep, sample));
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
    chart::draw(
        &out.join("synthetic.png"),
        &title,
        &machine,
        &panels(&summaries),
    )
}

/// The routes to run: direct TCP always (the ratios are to it), the others when `only` (if
/// given) is in their name and their program is installed.
fn available(migproxy: &Path, only: Option<&str>) -> Vec<Route> {
    let chosen = |route: &Route| {
        *route == Route::Direct || only.is_none_or(|text| route.name().contains(text))
    };
    let mut routes = Vec::new();
    for route in Route::ALL.into_iter().filter(chosen) {
        match route.missing(migproxy) {
            None => routes.push(route),
            Some(program) => eprintln!("{}: skipped, {program} is not installed", route.name()),
        }
    }
    routes
}

/// One sample's progress line: throughput, CPU per GiB, busy cores.
fn progress(route: Route, sample: &Sample, size: u64) -> String {
    format!(
        "{:<28} {:>6.2} GiB/s, CPU s/GiB: proxy {:.2}, source and sink {:.2}, machine {:.2}; busy cores {:.2}; proxy peak RSS {:.1} MiB",
        route.name(),
        gib(size) / sample.seconds,
        sample.cpu_seconds.unwrap_or(0.0) / gib(size),
        sample.spent.endpoints / gib(size),
        sample.spent.machine / gib(size),
        sample.spent.machine / sample.seconds,
        sample.peak_rss_kib.unwrap_or(0) as f64 / 1024.0,
    )
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
        Route::Direct
        | Route::Stunnel
        | Route::Daemons
        | Route::DaemonsTls
        | Route::DaemonsResumable
        | Route::DaemonsTlsResumable => {
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

fn run_route(
    route: Route,
    migproxy: &Path,
    block: &[u8],
    size: u64,
    expected: blake3::Hash,
) -> Result<Sample, BenchError> {
    if let Route::Daemons | Route::DaemonsTls = route {
        return daemons::run(route == Route::DaemonsTls, migproxy, block, size, expected);
    }
    if let Route::DaemonsResumable | Route::DaemonsTlsResumable = route {
        // The same daemons with retention and acknowledgements on: the cost of resuming.
        let tls = route == Route::DaemonsTlsResumable;
        let resumable = ["--resume-timeout", "60"];
        return daemons::run_with(tls, &resumable, migproxy, block, size, expected);
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
    /// Each run's GiB/s and proxy CPU seconds per GiB, with its repetition's number.
    rates: Vec<(usize, f64)>,
    cpus: Vec<(usize, f64)>,
}

fn summarise(route: Route, numbered: &[(usize, Sample)], size: u64) -> Summary {
    let by_rep: Vec<(usize, f64)> = numbered
        .iter()
        .map(|(rep, s)| (*rep, gib(size) / s.seconds))
        .collect();
    let cpus: Vec<(usize, f64)> = numbered
        .iter()
        .filter_map(|(rep, s)| Some((*rep, s.cpu_seconds? / gib(size))))
        .collect();
    let runs: Vec<&Sample> = numbered.iter().map(|(_, s)| s).collect();
    let mut rates: Vec<f64> = by_rep.iter().map(|(_, r)| *r).collect();
    let rate = (!rates.is_empty()).then(|| {
        let median = median(&mut rates);
        Spread {
            median,
            min: rates[0],
            max: rates[rates.len() - 1],
        }
    });
    let mut cpu: Vec<f64> = cpus.iter().map(|(_, c)| *c).collect();
    let mut endpoints: Vec<f64> = runs.iter().map(|s| s.spent.endpoints / gib(size)).collect();
    let mut busy: Vec<f64> = runs.iter().map(|s| s.spent.machine / s.seconds).collect();
    Summary {
        route,
        rate,
        cpu_per_gib: (!cpu.is_empty()).then(|| median(&mut cpu)),
        peak_rss_kib: runs.iter().filter_map(|s| s.peak_rss_kib).max(),
        endpoints_per_gib: median(&mut endpoints),
        busy_cores: median(&mut busy),
        rates: by_rep,
        cpus,
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

/// The synthetic stream's targets: the relay against haproxy and socat, the TLS pair
/// against stunnel.
fn synthetic_targets(summaries: &[Summary]) -> Vec<Target> {
    let find = |route| summaries.iter().find(|s| s.route == route);
    let rate = |route| find(route).and_then(|s| s.rate).map(|r| r.median);
    let cpu = |route| find(route).and_then(|s| s.cpu_per_gib);
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let cpu_ratio = over(cpu(Route::Relay), cpu(Route::Haproxy));
    let rates: fn(&Summary) -> &Vec<(usize, f64)> = |s| &s.rates;
    let cpus: fn(&Summary) -> &Vec<(usize, f64)> = |s| &s.cpus;
    let paired =
        |a, b, of: fn(&Summary) -> &Vec<(usize, f64)>| Paired::of(of(find(a)?), of(find(b)?));
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
        // Issue #18: resumable channels cost at most 5 % of throughput and 10 % of CPU.
        // Each beside its pairs by repetition: on a busy 2-core machine single runs stray
        // by several per cent, and the pairs show how far.
        Target::ratio(
            "resumable daemon pair (TLS) throughput ≥ 0.95× the same pair without",
            over(rate(Route::DaemonsTlsResumable), rate(Route::DaemonsTls)),
            0.95,
        )
        .paired(paired(Route::DaemonsTls, Route::DaemonsTlsResumable, rates)),
        Target::at_most(
            "resumable daemon pair (TLS) CPU per GiB ≤ 1.10× the same pair's without",
            over(cpu(Route::DaemonsTlsResumable), cpu(Route::DaemonsTls)),
            1.10,
            "×",
        )
        .paired(paired(Route::DaemonsTls, Route::DaemonsTlsResumable, cpus)),
        Target::ratio(
            "resumable daemon pair (plaintext) throughput ≥ 0.95× the same pair without",
            over(rate(Route::DaemonsResumable), rate(Route::Daemons)),
            0.95,
        )
        .paired(paired(Route::Daemons, Route::DaemonsResumable, rates)),
        Target::at_most(
            "resumable daemon pair (plaintext) CPU per GiB ≤ 1.10× the same pair's without",
            over(cpu(Route::DaemonsResumable), cpu(Route::Daemons)),
            1.10,
            "×",
        )
        .paired(paired(Route::Daemons, Route::DaemonsResumable, cpus)),
    ]
}

/// The chart: throughput with its spread, and the proxies' CPU per GiB.
fn panels(summaries: &[Summary]) -> [Panel; 2] {
    let mut rate = Panel::new(
        "Throughput, median of the runs (whiskers: min–max)",
        "GiB/s",
        2,
    );
    let mut cpu = Panel::new(
        "CPU seconds of the proxy processes per GiB carried, median (lower is better)",
        "CPU s/GiB",
        2,
    );
    for summary in summaries {
        let name = summary.route.name();
        rate.bars.push(match summary.rate {
            Some(r) => Bar::new(name, r.median).spread(r.min, r.max),
            None => Bar::failed(name, "every run failed"),
        });
        cpu.bars.push(match summary.cpu_per_gib {
            Some(c) => Bar::new(name, c),
            None if summary.rate.is_none() => Bar::failed(name, "every run failed"),
            None => Bar::failed(name, "no proxy process"),
        });
    }
    [rate, cpu]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_chart_with_failed_and_proxyless_routes() {
        let dir = tempfile::tempdir().unwrap();
        let spread = |median, min, max| Some(Spread { median, min, max });
        let summary = |route, rate, cpu_per_gib| Summary {
            route,
            rate,
            cpu_per_gib,
            peak_rss_kib: None,
            endpoints_per_gib: 0.7,
            busy_cores: 1.5,
            rates: Vec::new(),
            cpus: Vec::new(),
        };
        let summaries = [
            summary(Route::Direct, spread(2.75, 2.56, 2.82), None),
            summary(Route::Relay, spread(1.57, 1.46, 1.58), Some(0.29)),
            summary(Route::Socat, None, None),
            summary(Route::DaemonsTls, spread(1.25, 1.11, 1.56), Some(1.04)),
        ];
        let path = dir.path().join("synthetic.png");
        chart::draw(
            &path,
            "Synthetic stream",
            chart::tests::MACHINE,
            &panels(&summaries),
        )
        .unwrap();
        chart::tests::assert_png(&path);
    }
}
