//! Real QEMU migrations, interleaved: direct TCP, through two migproxy daemons in plaintext
//! and with TLS (each without and with resumable channels), QEMU's own TLS, and socat; plus
//! multifd (4 channels) direct against through migproxy. A paused guest whose RAM is one random file (written once, reused: a freshly
//! written file makes every migration slow), an anonymous destination RAM faulted in before
//! the run (see [`Ram::Preallocated`]: first-touch faults here cost 0–2 s per GiB at random),
//! the RAM compared by `pmemsave` digest after every run. Timed from `migrate` to `completed`
//! here (a paused guest's `total-time` is not reliable).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migproxy::testkit::vm::{Ram, Vm, accel, random_ram_file};
use serde_json::{Value, json};

use crate::chart::{self, Bar, Panel};
use crate::measure::{BenchError, cores, cpu_seconds, free_port, machine};
use crate::report::{Paired, Spread, Target, median_of, render_targets};
use crate::{daemons, pki};

/// One path's migration times, as the table and the chart show them.
#[derive(Debug)]
pub struct PathTimes {
    pub path: &'static str,
    pub seconds: Spread,
    /// QEMU's own `total-time`, median.
    pub total_time: f64,
    /// The median over direct TCP's median.
    pub ratio: f64,
    /// Median CPU seconds of both QEMUs, and of the proxy processes, during a migration.
    pub qemu_cpu: f64,
    pub proxy_cpu: f64,
    /// Median cores kept busy: all that CPU over the wall time.
    pub busy_cores: f64,
    /// The shortest time this machine could give the path with the CPU it took: all of it
    /// spread over every core, none idle (median over the runs).
    pub cpu_floor: f64,
    /// Guest RAM migrated, GiB.
    pub gib: f64,
    /// Each repetition's wall time and proxies' CPU, by repetition, for ratios paired by
    /// repetition.
    pub walls: Vec<(usize, f64)>,
    pub proxy_cpus: Vec<(usize, f64)>,
}

/// One measured migration.
#[derive(Debug, Clone, Copy)]
struct Run {
    seconds: f64,
    /// QEMU's own `total-time` (seconds), as the source QEMU reports it when completed.
    total_time: f64,
    qemu_cpu: f64,
    proxy_cpu: f64,
}

/// CPU seconds of these processes so far (those gone count nothing).
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&pid| cpu_seconds(pid)).sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path_ {
    DirectTcp,
    Daemons,
    /// The daemons hand each QEMU its end of their own TCP connection (`fd:`).
    DaemonsKernel,
    DaemonsTls,
    /// The same pairs with resumable channels (issue #18): the cost of keeping every byte
    /// until it is acknowledged, with real QEMU at both ends.
    DaemonsResumable,
    DaemonsTlsResumable,
    QemuTls,
    Socat,
    /// unix → the simplest splice relay → TCP → another → unix: the daemons' two hops with
    /// nothing else (see floor.rs).
    SpliceFloor,
    MultifdDirect,
    MultifdDaemons,
}

impl Path_ {
    const ALL: [Path_; 11] = [
        Path_::DirectTcp,
        Path_::Daemons,
        Path_::DaemonsKernel,
        Path_::DaemonsTls,
        Path_::DaemonsResumable,
        Path_::DaemonsTlsResumable,
        Path_::QemuTls,
        Path_::Socat,
        Path_::SpliceFloor,
        Path_::MultifdDirect,
        Path_::MultifdDaemons,
    ];

    fn name(self) -> &'static str {
        match self {
            Path_::DirectTcp => "direct TCP",
            Path_::Daemons => "two migproxy daemons, plaintext",
            Path_::DaemonsKernel => "two migproxy daemons, kernel path",
            Path_::DaemonsTls => "two migproxy daemons, TLS",
            Path_::DaemonsResumable => "two migproxy daemons, plaintext, resumable channels",
            Path_::DaemonsTlsResumable => "two migproxy daemons, TLS, resumable channels",
            Path_::QemuTls => "QEMU native TLS (x509)",
            Path_::Socat => "socat (unix → TCP)",
            Path_::SpliceFloor => "two simplest splice relays (yardstick)",
            Path_::MultifdDirect => "multifd ×4, direct TCP",
            Path_::MultifdDaemons => "multifd ×4, two migproxy daemons",
        }
    }
}

/// Waits for a proxy's unix socket to appear, failing if a proxy exits or 10 s pass.
async fn listening(socket: &Path, proxies: &mut [Child]) -> Result<(), BenchError> {
    let started = Instant::now();
    while !socket.exists() {
        for proxy in proxies.iter_mut() {
            if let Some(status) = proxy.try_wait()? {
                return Err(format!("a proxy for {} exited: {status}", socket.display()).into());
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("nothing listens on {} after 10 s", socket.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// One migration along `path`: its wall time and the CPU the QEMUs and the proxies spent.
async fn once(
    path: Path_,
    migproxy: &Path,
    dir: &Path,
    ram: &Path,
    mib: u64,
    pki: &Path,
) -> Result<Run, BenchError> {
    // Fresh names every run: the previous run's QEMUs may still be on their way out.
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut src = Vm::start(dir, &format!("src{run}"), Ram::File(ram), mib, None).await?;
    let mut dst = Vm::start(dir, &format!("dst{run}"), Ram::Preallocated, mib, None).await?;
    let multifd = matches!(path, Path_::MultifdDirect | Path_::MultifdDaemons);
    configure(&mut src, &mut dst, multifd).await?;
    let route = match path {
        Path_::DirectTcp | Path_::QemuTls | Path_::MultifdDirect => {
            if path == Path_::QemuTls {
                qemu_tls(&mut src, &mut dst, pki).await?;
            }
            direct(&mut dst).await?
        }
        Path_::Socat => socat(&mut dst, dir, run).await?,
        Path_::SpliceFloor => splice_floor(&mut dst, dir, run).await?,
        Path_::Daemons
        | Path_::DaemonsTls
        | Path_::DaemonsResumable
        | Path_::DaemonsTlsResumable
        | Path_::MultifdDaemons => {
            let tls = matches!(path, Path_::DaemonsTls | Path_::DaemonsTlsResumable);
            let resumable = matches!(path, Path_::DaemonsResumable | Path_::DaemonsTlsResumable);
            // The daemon's default resume timeout: resumable channels on.
            let flags: &[&str] = match resumable {
                true => &["--resume-timeout", "60"],
                false => &[],
            };
            let tls = tls.then_some(pki);
            through_daemons(&mut dst, migproxy, dir, run, (tls, flags)).await?
        }
        Path_::DaemonsKernel => Route {
            start: Start::Kernel,
            daemons: vec![
                daemons::start(migproxy, dir, "srcd", None)?,
                daemons::start(migproxy, dir, "dstd", None)?,
            ],
            children: Vec::new(),
        },
    };
    let measured = migrate(&mut src, &dst, &route).await?;
    if measured.status != "completed" {
        return Err(format!("{}: {}", path.name(), measured.status).into());
    }
    let size = mib << 20;
    if src.ram_digest(dir, "src", size).await? != dst.ram_digest(dir, "dst", size).await? {
        return Err(format!("{}: destination RAM differs", path.name()).into());
    }
    drop(route);
    Ok(measured.run)
}

/// multifd (4 channels) on both QEMUs when asked, and no bandwidth limit on the source
/// (QEMU's default limit would make every path look the same).
async fn configure(src: &mut Vm, dst: &mut Vm, multifd: bool) -> Result<(), BenchError> {
    for vm in [&mut *src, &mut *dst] {
        if multifd {
            let caps = json!({"capabilities": [{"capability": "multifd", "state": true}]});
            vm.qmp.execute("migrate-set-capabilities", caps).await?;
            vm.qmp
                .execute("migrate-set-parameters", json!({"multifd-channels": 4}))
                .await?;
        }
    }
    src.qmp
        .execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 107_374_182_400u64}),
        )
        .await?;
    Ok(())
}

/// What carries a migration along one path: the URI the source QEMU migrates to, and the
/// processes in between.
struct Route {
    start: Start,
    /// migproxy daemons (stopped when dropped).
    daemons: Vec<daemons::Daemon>,
    /// socat, or the yardstick's two relays.
    children: Vec<Child>,
}

impl Route {
    /// Straight to the destination QEMU: no process in between.
    fn direct(uri: String) -> Route {
        Route {
            start: Start::Uri(uri),
            daemons: Vec::new(),
            children: Vec::new(),
        }
    }
}

/// How a route's migration starts.
enum Start {
    /// The source QEMU's `migrate` to this URI.
    Uri(String),
    /// The kernel path: the two daemons (the route's) create the migration, each driving its
    /// QEMU; the source daemon's creation runs `migrate fd:…`.
    Kernel,
}

/// The processes in between end with the run, also when it fails (a `Child` dropped is not
/// killed).
impl Drop for Route {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// QEMU's own TLS (x509) on both QEMUs, the destination verifying the source.
async fn qemu_tls(src: &mut Vm, dst: &mut Vm, pki: &Path) -> Result<(), BenchError> {
    for (vm, endpoint) in [(&mut *src, "client"), (&mut *dst, "server")] {
        let mut creds = json!({"qom-type": "tls-creds-x509", "id": "tls0",
                               "dir": pki.display().to_string(), "endpoint": endpoint});
        if endpoint == "server" {
            creds["verify-peer"] = json!(true);
        }
        vm.qmp.execute("object-add", creds).await?;
    }
    dst.qmp
        .execute("migrate-set-parameters", json!({"tls-creds": "tls0"}))
        .await?;
    src.qmp
        .execute(
            "migrate-set-parameters",
            json!({"tls-creds": "tls0", "tls-hostname": "localhost"}),
        )
        .await?;
    Ok(())
}

/// The destination QEMU listens on TCP, and the source goes there directly.
async fn direct(dst: &mut Vm) -> Result<Route, BenchError> {
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    dst.qmp
        .execute("migrate-incoming", json!({"uri": uri}))
        .await?;
    Ok(Route::direct(uri))
}

/// socat from a unix socket to the destination QEMU's TCP port.
async fn socat(dst: &mut Vm, dir: &Path, run: usize) -> Result<Route, BenchError> {
    let port = free_port()?;
    dst.qmp
        .execute(
            "migrate-incoming",
            json!({"uri": format!("tcp:127.0.0.1:{port}")}),
        )
        .await?;
    let listen = dir.join(format!("socat{run}.sock"));
    let _ = std::fs::remove_file(&listen);
    // One connection, no probe: the socket file appearing means socat listens.
    let mut children = vec![
        Command::new("socat")
            .arg(format!("UNIX-LISTEN:{}", listen.display()))
            .arg(format!("TCP:127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ];
    listening(&listen, &mut children).await?;
    Ok(Route {
        start: Start::Uri(format!("unix:{}", listen.display())),
        daemons: Vec::new(),
        children,
    })
}

/// The yardstick: two of the simplest splice relays, unix → TCP → unix, as the daemons' hops.
async fn splice_floor(dst: &mut Vm, dir: &Path, run: usize) -> Result<Route, BenchError> {
    let target = format!("unix:{}", dir.join(format!("incoming{run}.sock")).display());
    dst.qmp
        .execute("migrate-incoming", json!({"uri": target}))
        .await?;
    let port = free_port()?;
    let listen = dir.join(format!("floor{run}.sock"));
    let _ = std::fs::remove_file(&listen);
    // The destination's relay first: the source's connects to it once QEMU has come.
    let bench = std::env::current_exe()?;
    let mut children = Vec::new();
    for (from, to) in [
        (port.to_string(), target),
        (format!("unix:{}", listen.display()), port.to_string()),
    ] {
        children.push(
            Command::new(&bench)
                .args(["splice-floor", &from, &to])
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    // The socket file appears only once it listens (see floor.rs).
    listening(&listen, &mut children).await?;
    Ok(Route {
        start: Start::Uri(format!("unix:{}", listen.display())),
        daemons: Vec::new(),
        children,
    })
}

/// Two migproxy daemons (with TLS from `tls` when given, and more daemon `flags`) and a
/// migration created on both.
async fn through_daemons(
    dst: &mut Vm,
    migproxy: &Path,
    dir: &Path,
    run: usize,
    (tls, flags): (Option<&Path>, &[&str]),
) -> Result<Route, BenchError> {
    let source = daemons::start_with(migproxy, dir, "srcd", tls, flags)?;
    let destination = daemons::start_with(migproxy, dir, "dstd", tls, flags)?;
    let target = format!("unix:{}", dir.join(format!("incoming{run}.sock")).display());
    dst.qmp
        .execute("migrate-incoming", json!({"uri": target}))
        .await?;
    let socket = daemons::create(&source, &destination, "q", &target).await?;
    Ok(Route {
        start: Start::Uri(format!("unix:{socket}")),
        daemons: vec![source, destination],
        children: Vec::new(),
    })
}

/// A migration measured: how it ended, and its time and CPU.
struct Measured {
    status: String,
    run: Run,
}

/// Migrates along `route` and follows the source QEMU to its end (at most 300 s), counting
/// the wall time and the CPU of the QEMUs and of the processes in between.
async fn migrate(src: &mut Vm, dst: &Vm, route: &Route) -> Result<Measured, BenchError> {
    let qemus: Vec<u32> = [src.pid(), dst.pid()].into_iter().flatten().collect();
    let proxies: Vec<u32> = route
        .daemons
        .iter()
        .map(|d| d.child.id())
        .chain(route.children.iter().map(Child::id))
        .collect();
    let cpu_before = (cpu_of(&qemus), cpu_of(&proxies));
    let started = Instant::now();
    match &route.start {
        Start::Uri(uri) => {
            src.qmp.execute("migrate", json!({"uri": uri})).await?;
        }
        Start::Kernel => {
            let qmps = (src.spare_qmp.as_path(), dst.spare_qmp.as_path());
            daemons::create_kernel(&route.daemons[0], &route.daemons[1], "q", qmps).await?;
        }
    }
    let mut total_time = f64::NAN;
    let status = loop {
        let info: Value = src.qmp.execute("query-migrate", Value::Null).await?;
        match info["status"].as_str() {
            Some("completed") => {
                total_time = info["total-time"].as_f64().map_or(f64::NAN, |ms| ms / 1e3);
                break "completed".to_owned();
            }
            Some("failed") | Some("cancelled") => break format!("{info}"),
            _ if started.elapsed() > Duration::from_secs(300) => break "timed out".to_owned(),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    Ok(Measured {
        status,
        run: Run {
            seconds: started.elapsed().as_secs_f64(),
            total_time,
            qemu_cpu: cpu_of(&qemus) - cpu_before.0,
            proxy_cpu: cpu_of(&proxies) - cpu_before.1,
        },
    })
}

pub fn run(
    migproxy: &Path,
    (mib, reps): (u64, usize),
    only: Option<&str>,
    out: &Path,
) -> Result<(), BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let dir: PathBuf = std::env::temp_dir().join(format!("migproxy-bench-q{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pki = dir.join("pki");
        pki::write(&pki)?;
        let ram = dir.join("ram.img");
        random_ram_file(&ram, mib, 11)?;
        let socat_here = Command::new("sh").args(["-c", "command -v socat"]).stdout(Stdio::null()).status()?.success();
        if !socat_here {
            eprintln!("{}: skipped, socat is not installed", Path_::Socat.name());
        }
        // Direct TCP always runs: the ratios are to it.
        let chosen = |p: &Path_| *p == Path_::DirectTcp || only.is_none_or(|text| p.name().contains(text));
        let paths: Vec<Path_> = Path_::ALL.into_iter().filter(|p| (*p != Path_::Socat || socat_here) && chosen(p)).collect();
        let mut times: Vec<(Path_, Vec<Run>)> = paths.iter().map(|p| (*p, Vec::new())).collect();
        // One discarded run first: it pages the RAM file in and warms QEMU up.
        once(Path_::DirectTcp, migproxy, &dir, &ram, mib, &pki).await?;
        for rep in 0..reps {
            // Each repetition starts one path later (as `synthetic`): none always follows
            // the same one.
            let n = times.len();
            for i in 0..n {
                let (path, runs) = &mut times[(i + rep) % n];
                let run = once(*path, migproxy, &dir, &ram, mib, &pki).await?;
                eprintln!(
                    "rep {}/{reps} {:<36} {:.2} s (CPU: QEMUs {:.2} s, proxies {:.2} s)",
                    rep + 1,
                    path.name(),
                    run.seconds,
                    run.qemu_cpu,
                    run.proxy_cpu
                );
                runs.push(run);
            }
        }
        let rows = summarise(&times, mib as f64 / 1024.0);
        let title = format!(
            "Real QEMU, {mib} MiB of random guest RAM, paused guest ({}), {reps} interleaved repetitions",
            accel().to_uppercase()
        );
        let machine = machine();
        let table = render(&rows, &title, &machine);
        println!("{table}");
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("qemu.md"), table)?;
        chart::draw(&out.join("qemu.png"), &title, &machine, &[panel(&rows)])?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
}

/// The chart: wall time per path, with its spread.
fn panel(rows: &[PathTimes]) -> Panel {
    let mut panel = Panel::new(
        "Wall time from migrate to completed, median (whiskers: min–max; lower is better)",
        "seconds",
        2,
    );
    for row in rows {
        let s = row.seconds;
        panel
            .bars
            .push(Bar::new(row.path, s.median).spread(s.min, s.max));
    }
    panel
}

fn summarise(times: &[(Path_, Vec<Run>)], gib: f64) -> Vec<PathTimes> {
    let seconds = |runs: &[Run]| runs.iter().map(|r| r.seconds).collect::<Vec<f64>>();
    let direct = median_of(
        times
            .iter()
            .find(|(p, _)| *p == Path_::DirectTcp)
            .map(|(_, runs)| seconds(runs))
            .unwrap_or_default(),
    );
    times
        .iter()
        .map(|(path, runs)| {
            let wall = seconds(runs);
            let median_wall = median_of(wall.iter().copied());
            PathTimes {
                path: path.name(),
                seconds: Spread {
                    median: median_wall,
                    min: wall.iter().copied().fold(f64::NAN, f64::min),
                    max: wall.iter().copied().fold(f64::NAN, f64::max),
                },
                ratio: median_wall / direct,
                total_time: median_of(runs.iter().map(|r| r.total_time)),
                qemu_cpu: median_of(runs.iter().map(|r| r.qemu_cpu)),
                proxy_cpu: median_of(runs.iter().map(|r| r.proxy_cpu)),
                busy_cores: median_of(runs.iter().map(|r| (r.qemu_cpu + r.proxy_cpu) / r.seconds)),
                cpu_floor: median_of(
                    runs.iter()
                        .map(|r| (r.qemu_cpu + r.proxy_cpu) / cores() as f64),
                ),
                gib,
                walls: wall.iter().copied().enumerate().collect(),
                proxy_cpus: runs.iter().map(|r| r.proxy_cpu).enumerate().collect(),
            }
        })
        .collect()
}

fn render(rows: &[PathTimes], title: &str, machine: &str) -> String {
    let mut table = format!(
        "# {title}\n\n{machine}\n\n\
         Wall time from `migrate` to `completed` (on the kernel path from the daemons' \
         creation of the migration, which runs `migrate`), destination RAM verified equal \
         every run; QEMU total-time: the source QEMU's own `total-time`. CPU: utime+stime of both QEMUs and of the proxy processes during the migration \
         (medians); busy cores: all of it over the wall time; CPU floor: all of it spread over \
         the {cores} cores, the least time this machine could give that path without spending \
         less CPU.\n\n\
         | path | median s | min–max s | × direct TCP time | QEMU total-time s | QEMUs CPU s | proxies CPU s | busy cores | CPU floor s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        cores = cores()
    );
    for row in rows {
        let s = row.seconds;
        table.push_str(&format!(
            "| {} | {:.2} | {:.2}–{:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            row.path,
            s.median,
            s.min,
            s.max,
            row.ratio,
            row.total_time,
            row.qemu_cpu,
            row.proxy_cpu,
            row.busy_cores,
            row.cpu_floor
        ));
    }
    table.push_str(&render_targets(&targets(rows)));
    table
}

/// Through migproxy in plaintext nearly as fast as direct; with TLS twice as fast as QEMU's.
/// Each also says what bounds it on this machine: the ratio at migproxy's CPU floor (when even
/// that misses, no scheduling could reach the target, only spending less CPU), and the ratio
/// of the yardstick (two of the simplest splice relays: the two socket hops and nothing else).
/// For TLS, plaintext through migproxy too: encryption only adds work.
fn targets(rows: &[PathTimes]) -> Vec<Target> {
    let row = |path: Path_| rows.iter().find(|r| r.path == path.name());
    let time = |path: Path_| row(path).map(|r| r.seconds.median);
    let floor = |path: Path_| row(path).map(|r| r.cpu_floor);
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let plaintext = Target::ratio(
        "plaintext through migproxy ≥ 0.95× direct TCP's speed",
        over(time(Path_::DirectTcp), time(Path_::Daemons)),
        0.95,
    )
    .bounded_by(&[
        (
            "at migproxy's CPU floor",
            over(time(Path_::DirectTcp), floor(Path_::Daemons)),
        ),
        (
            "two simplest splice relays",
            over(time(Path_::DirectTcp), time(Path_::SpliceFloor)),
        ),
    ]);
    let tls = Target::ratio(
        "TLS through migproxy ≥ 2× QEMU native TLS's speed",
        over(time(Path_::QemuTls), time(Path_::DaemonsTls)),
        2.0,
    )
    .bounded_by(&[
        (
            "at migproxy's CPU floor",
            over(time(Path_::QemuTls), floor(Path_::DaemonsTls)),
        ),
        (
            "no encryption: plaintext through migproxy",
            over(time(Path_::QemuTls), time(Path_::Daemons)),
        ),
        (
            "two simplest splice relays",
            over(time(Path_::QemuTls), time(Path_::SpliceFloor)),
        ),
    ]);
    let total = |path: Path_| row(path).map(|r| r.total_time);
    let kernel = Target::ratio(
        "kernel path: QEMU's total-time ≥ 0.97× direct TCP's speed",
        over(total(Path_::DirectTcp), total(Path_::DaemonsKernel)),
        0.97,
    )
    .bounded_by(&[(
        "wall time, from the daemons' creation",
        over(time(Path_::DirectTcp), time(Path_::DaemonsKernel)),
    )]);
    let kernel_cpu = Target::at_most(
        "daemons' CPU on the kernel path ≤ 0.02 CPU-s per GiB",
        row(Path_::DaemonsKernel).map(|r| r.proxy_cpu / r.gib),
        0.02,
        "CPU-s/GiB",
    );
    let mut all = vec![plaintext, tls, kernel, kernel_cpu];
    all.extend(resumable_targets(rows));
    all
}

/// Issue #18's targets, with real QEMU at both ends: each pair with resumable channels
/// against the same pair without, in the same run.
fn resumable_targets(rows: &[PathTimes]) -> Vec<Target> {
    let row = |path: Path_| rows.iter().find(|r| r.path == path.name());
    let pairs = [
        (
            Path_::Daemons,
            Path_::DaemonsResumable,
            "real QEMU: resumable daemon pair (plaintext) speed ≥ 0.95× the same pair without",
            "real QEMU: resumable daemon pair (plaintext) CPU ≤ 1.10× the same pair's without",
        ),
        (
            Path_::DaemonsTls,
            Path_::DaemonsTlsResumable,
            "real QEMU: resumable daemon pair (TLS) speed ≥ 0.95× the same pair without",
            "real QEMU: resumable daemon pair (TLS) CPU ≤ 1.10× the same pair's without",
        ),
    ];
    let mut targets = Vec::new();
    for (without, with, speed, cpu) in pairs {
        let both = row(without).zip(row(with));
        // Ratios of the medians, and the same paired by repetition (each repetition runs
        // every path back to back): speed is the time without over the time with.
        let faster = both.map(|(a, b)| a.seconds.median / b.seconds.median);
        let paired = both.and_then(|(a, b)| Paired::of(&b.walls, &a.walls));
        targets.push(Target::ratio(speed, faster, 0.95).paired(paired));
        let dearer = both.map(|(a, b)| b.proxy_cpu / a.proxy_cpu);
        let paired = both.and_then(|(a, b)| Paired::of(&a.proxy_cpus, &b.proxy_cpus));
        targets.push(Target::at_most(cpu, dearer, 1.10, "×").paired(paired));
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_chart() {
        let dir = tempfile::tempdir().unwrap();
        let row = |path, median, min, max| PathTimes {
            path,
            seconds: Spread { median, min, max },
            ratio: 1.0,
            total_time: 0.5,
            qemu_cpu: 0.9,
            proxy_cpu: 0.0,
            busy_cores: 1.6,
            cpu_floor: 0.45,
            gib: 1.0,
            walls: vec![(0, median)],
            proxy_cpus: vec![(0, 0.0)],
        };
        let rows = [
            row("direct TCP", 0.55, 0.52, 2.42),
            row("two migproxy daemons, TLS", 2.25, 2.17, 2.61),
        ];
        let path = dir.path().join("qemu.png");
        chart::draw(&path, "Real QEMU", chart::tests::MACHINE, &[panel(&rows)]).unwrap();
        chart::tests::assert_png(&path);
    }
}
