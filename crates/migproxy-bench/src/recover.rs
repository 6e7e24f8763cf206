//! `recover`: the delay two migproxy daemons add to QEMU's own postcopy recovery, against a
//! direct QEMU-to-QEMU connection, interleaved in one run.
//!
//! Each run starts a source QEMU (random RAM) and a destination QEMU (`-incoming defer`),
//! both with `postcopy-ram`, migrates, switches to postcopy, lets postcopy carry some pages,
//! and pauses it from QEMU (`migrate-pause` on the source: both QEMUs `postcopy-paused`).
//! Then, at T0, the recovery by hand: `migrate-recover` on the destination and `migrate …
//! resume=true` on the source. The sample is the time from T0 to the source QEMU's
//! `postcopy-active` (`query-migrate` every 5 ms). The run must then complete on both QEMUs
//! (and on both daemons), with equal RAM, or it is an error, not a sample.
//!
//! - **direct**: the destination listens on TCP; it recovers on a new port, which the
//!   source resumes to.
//! - **daemons**: two `migproxy daemon`s with `--resume-timeout 0` (a break reaches QEMU's
//!   own recovery, as in `tests/postcopy_recovery.rs`), the migration created `recoverable`
//!   on both, neither driving QEMU over QMP. The destination QEMU listens on the unix socket
//!   the destination daemon targets and recovers on that same path (as libvirt does); the
//!   source resumes to the source daemon's socket, the one it first migrated to.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use migproxy::daemon::migration::state::State;
use migproxy::testkit::vm::{Ram, Vm, accel, random_ram_file};
use serde_json::{Value, json};

use crate::chart::{self, Bar, Panel};
use crate::daemons::{self, Daemon};
use crate::measure::{BenchError, free_port, machine};
use crate::report::{Target, median_of, render_targets};

/// Precopy's bandwidth (bytes per second): slow enough to switch to postcopy early.
const PRECOPY_BANDWIDTH: u64 = 64 << 20;
/// Postcopy's until the recovery: it lasts long enough to be paused and recovered.
const POSTCOPY_BANDWIDTH: u64 = 32 << 20;
/// After the recovery: no limit worth the name (the rest of the guest as fast as it goes).
const UNLIMITED: u64 = 107_374_182_400;
/// RAM sent in precopy before `migrate-start-postcopy`.
const SWITCH_AFTER: u64 = 32 << 20;
/// RAM sent in postcopy before the pause: pausing inside the switch makes QEMU 7.2 fail
/// instead of pause (see tests/two_hosts.rs).
const BEFORE_PAUSE: u64 = 16 << 20;
/// How often QEMU's status is read while it is timed.
const POLL: Duration = Duration::from_millis(5);
/// The target: what the daemons may add to a recovery (p50 against direct's p50).
const TARGET_MS: f64 = 50.0;
/// The migration's id on both daemons.
const ID: &str = "recover";
/// QEMU states that end a wait for any other.
const ENDED: &[&str] = &["failed", "cancelled"];

/// A way from the source QEMU to the destination QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Daemons,
    DaemonsTls,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Daemons, Route::DaemonsTls];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct TCP, QEMU to QEMU",
            Route::Daemons => "two migproxy daemons, plaintext",
            Route::DaemonsTls => "two migproxy daemons, mutual TLS",
        }
    }
}

/// What was asked.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub reps: usize,
    /// Guest RAM, MiB.
    pub mib: u64,
    /// How long after both QEMUs read `postcopy-paused` the recovery starts.
    pub settle: Duration,
}

/// One recovery, measured.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// Seconds from T0 (just before `migrate-recover`) to the source's `postcopy-active`.
    delay: f64,
    /// Seconds from T0 until both QMP commands had returned.
    issued: f64,
    /// Seconds from T0 to the source's `completed`.
    completed: f64,
    /// Seconds from `migrate-pause` until both QEMUs read `postcopy-paused`.
    pausing: f64,
    /// Pauses each daemon recorded (source, destination); none on the direct route.
    pauses: Option<[usize; 2]>,
}

/// How one run's source QEMU reaches its destination QEMU.
struct Way {
    /// The source's first `migrate` URI.
    migrate: String,
    /// The daemons' route: the destination's unix target (its `migrate-recover` URI too)
    /// and the daemons, source and destination (stopped when dropped).
    daemons: Option<(String, [Daemon; 2])>,
}

impl Way {
    /// (`migrate-recover` URI on the destination, `migrate resume=true` URI on the source).
    fn recovery(&self) -> Result<(String, String), BenchError> {
        Ok(match &self.daemons {
            Some((target, _)) => (target.clone(), self.migrate.clone()),
            None => {
                let uri = format!("tcp:127.0.0.1:{}", free_port()?);
                (uri.clone(), uri)
            }
        })
    }
}

/// What every run needs.
struct Bench {
    /// A copy of migproxy taken at the start: the target directory is shared, and a build
    /// during the run would otherwise mix two daemons.
    migproxy: PathBuf,
    dir: PathBuf,
    ram: PathBuf,
    settings: Settings,
    /// MIGPROXY_LOG is set: the daemons log to files, kept with the QEMUs' after the run.
    logs: bool,
}

/// Runs both routes `settings.reps` times, interleaved; writes the table and the chart.
pub fn run(migproxy: &Path, settings: Settings, out: &Path) -> Result<(), BenchError> {
    if !migproxy.exists() {
        return Err(format!("{} is not built", migproxy.display()).into());
    }
    let dir = std::env::temp_dir().join(format!("migproxy-bench-r{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bench = Bench {
        migproxy: dir.join("migproxy"),
        ram: dir.join("ram.img"),
        logs: std::env::var_os("MIGPROXY_LOG").is_some(),
        dir,
        settings,
    };
    std::fs::copy(migproxy, &bench.migproxy)?;
    crate::pki::write(&bench.dir.join("pki"))?;
    random_ram_file(&bench.ram, settings.mib, 11)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let runs = runtime.block_on(bench.all());
    bench.clean_up();
    let summaries: Vec<Summary> = runs?
        .into_iter()
        .map(|(route, runs)| Summary { route, runs })
        .collect();
    let title = format!(
        "Postcopy recovery: {} MiB guest ({}), {} interleaved repetitions",
        settings.mib,
        accel().to_uppercase(),
        settings.reps
    );
    let machine = machine();
    let table = render(&summaries, &title, &machine, settings);
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("recover.md"), &table)?;
    let png = out.join("recover.png");
    chart::draw(&png, &title, &machine, &[panel(&summaries)])
}

impl Bench {
    /// Every route once per repetition, the first route turning between repetitions.
    async fn all(&self) -> Result<Vec<(Route, Vec<Recovery>)>, BenchError> {
        let mut runs: Vec<(Route, Vec<Recovery>)> =
            Route::ALL.iter().map(|r| (*r, Vec::new())).collect();
        let reps = self.settings.reps;
        let mut n = 0;
        for rep in 1..=reps {
            let routes = Route::ALL.len();
            for i in (0..routes).map(|k| (k + rep - 1) % routes) {
                let (route, recoveries) = &mut runs[i];
                n += 1;
                let recovery = self
                    .once(*route, n)
                    .await
                    .map_err(|e| format!("rep {rep}/{reps} {}: {e}", route.name()))?;
                eprintln!("rep {rep}/{reps} {}", progress(*route, &recovery));
                recoveries.push(recovery);
            }
        }
        Ok(runs)
    }

    /// The RAM file and the copy of migproxy go; with logs, the rest stays for reading.
    fn clean_up(&self) {
        if self.logs {
            let _ = std::fs::remove_file(&self.ram);
            let _ = std::fs::remove_file(&self.migproxy);
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// One run of `route`, the `n`th of the benchmark, in a directory of its own.
    async fn once(&self, route: Route, n: usize) -> Result<Recovery, BenchError> {
        let dir = self.dir.join(n.to_string());
        std::fs::create_dir_all(&dir)?;
        let (mut src, mut dst) = self.guests(&dir).await?;
        let way = match route {
            Route::Direct => direct(&mut dst).await?,
            Route::Daemons => self.daemons(&mut dst, &dir, false).await?,
            Route::DaemonsTls => self.daemons(&mut dst, &dir, true).await?,
        };
        let recovery = self.measure(&mut src, &mut dst, &way).await;
        let recovery = match (recovery, &way.daemons) {
            (Err(error), Some((_, daemons))) => {
                Err(format!("{error}; the daemons: {}", explain(daemons)).into())
            }
            (recovery, _) => recovery,
        };
        let mut recovery = recovery?;
        if let Some((_, daemons)) = &way.daemons {
            recovery.pauses = Some(completed(daemons)?);
        }
        let size = self.settings.mib << 20;
        if src.ram_digest(&dir, "src", size).await? != dst.ram_digest(&dir, "dst", size).await? {
            return Err("the destination's RAM differs from the source's".into());
        }
        drop((way, src, dst));
        if !self.logs {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(recovery)
    }

    /// Migrates along `way` into postcopy, pauses it, recovers it (timed) and follows it to
    /// its end on both QEMUs.
    async fn measure(&self, src: &mut Vm, dst: &mut Vm, way: &Way) -> Result<Recovery, BenchError> {
        src.qmp
            .execute("migrate", json!({"uri": way.migrate}))
            .await?;
        into_postcopy(src).await?;
        let pausing = pause(src, dst).await?;
        tokio::time::sleep(self.settings.settle).await;
        let uris = way.recovery()?;
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let (delay, issued) = recover(src, dst, &uris, t0).await?;
        if self.logs {
            eprintln!("  T0 at {} UTC: {}", clock(wall), uris.0);
        }
        src.qmp
            .execute(
                "migrate-set-parameters",
                json!({"max-postcopy-bandwidth": UNLIMITED}),
            )
            .await?;
        let failed = &["failed", "cancelled", "postcopy-paused"];
        status(src, "completed", Duration::from_secs(300), failed).await?;
        let completed = t0.elapsed().as_secs_f64();
        status(dst, "completed", Duration::from_secs(30), failed).await?;
        Ok(Recovery {
            delay,
            issued,
            completed,
            pausing,
            pauses: None,
        })
    }

    /// Two paused guests with `postcopy-ram`, the source's bandwidth capped; QEMU's stderr
    /// in `dir`.
    async fn guests(&self, dir: &Path) -> Result<(Vm, Vm), BenchError> {
        let mib = self.settings.mib;
        let log = |name: &str| dir.join(format!("{name}.qemu.log"));
        let mut src = Vm::start(dir, "src", Ram::File(&self.ram), mib, Some(&log("src"))).await?;
        let mut dst = Vm::start(dir, "dst", Ram::Anonymous, mib, Some(&log("dst"))).await?;
        let postcopy = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
        for vm in [&mut src, &mut dst] {
            vm.qmp
                .execute("migrate-set-capabilities", postcopy.clone())
                .await?;
        }
        let limits = json!({"max-bandwidth": PRECOPY_BANDWIDTH,
                            "max-postcopy-bandwidth": POSTCOPY_BANDWIDTH});
        src.qmp.execute("migrate-set-parameters", limits).await?;
        Ok((src, dst))
    }

    /// Two daemons (`--resume-timeout 0`; mutual TLS if `tls`), the destination QEMU
    /// listening on the unix target, a recoverable migration created on both.
    async fn daemons(&self, dst: &mut Vm, dir: &Path, tls: bool) -> Result<Way, BenchError> {
        let pki = self.dir.join("pki");
        let tls = tls.then_some(pki.as_path());
        let source = daemons::start(&self.migproxy, dir, "srcd", tls)?;
        let destination = daemons::start(&self.migproxy, dir, "dstd", tls)?;
        let target = format!("unix:{}", dir.join("incoming.sock").display());
        dst.qmp
            .execute("migrate-incoming", json!({"uri": target}))
            .await?;
        let socket = daemons::create_recoverable(&source, &destination, ID, &target).await?;
        Ok(Way {
            migrate: format!("unix:{socket}"),
            daemons: Some((target, [source, destination])),
        })
    }
}

/// The destination QEMU listens on TCP; the source goes there directly.
async fn direct(dst: &mut Vm) -> Result<Way, BenchError> {
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    dst.qmp
        .execute("migrate-incoming", json!({"uri": uri}))
        .await?;
    Ok(Way {
        migrate: uri,
        daemons: None,
    })
}

/// Polls the QEMU's `query-migrate` every [`POLL`] until its status is `wanted` (its
/// answer), failing on a status in `failed` or past `limit`.
async fn status(
    vm: &mut Vm,
    wanted: &str,
    limit: Duration,
    failed: &[&str],
) -> Result<Value, BenchError> {
    let started = Instant::now();
    loop {
        let info = vm.qmp.execute("query-migrate", Value::Null).await?;
        let now = info["status"].as_str().unwrap_or("none");
        if now == wanted {
            return Ok(info);
        }
        if failed.contains(&now) || started.elapsed() > limit {
            return Err(format!("waiting for {wanted} (at most {limit:?}): {info}").into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the source until it has sent more than `bytes` of RAM, in postcopy when
/// `in_postcopy` (it must stay there), otherwise in precopy.
async fn transferred_past(src: &mut Vm, bytes: u64, in_postcopy: bool) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        let info = src.qmp.execute("query-migrate", Value::Null).await?;
        let now = info["status"].as_str().unwrap_or("none");
        let expected = match in_postcopy {
            true => now == "postcopy-active",
            false => matches!(now, "setup" | "active"),
        };
        if !expected || started.elapsed() > Duration::from_secs(60) {
            return Err(format!("waiting for {bytes} B sent: {info}").into());
        }
        if info["ram"]["transferred"].as_u64().unwrap_or(0) > bytes {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Some precopy, the switch, and some postcopy.
async fn into_postcopy(src: &mut Vm) -> Result<(), BenchError> {
    transferred_past(src, SWITCH_AFTER, false).await?;
    src.qmp
        .execute("migrate-start-postcopy", Value::Null)
        .await?;
    let limit = Duration::from_secs(30);
    let active = status(src, "postcopy-active", limit, ENDED).await?;
    let switched = active["ram"]["transferred"].as_u64().unwrap_or(0) + BEFORE_PAUSE;
    transferred_past(src, switched, true).await
}

/// `migrate-pause` on the source; both QEMUs must read `postcopy-paused`. The seconds it took.
async fn pause(src: &mut Vm, dst: &mut Vm) -> Result<f64, BenchError> {
    let started = Instant::now();
    src.qmp.execute("migrate-pause", Value::Null).await?;
    let limit = Duration::from_secs(30);
    status(src, "postcopy-paused", limit, ENDED)
        .await
        .map_err(|e| format!("the source after migrate-pause: {e}"))?;
    status(dst, "postcopy-paused", limit, ENDED)
        .await
        .map_err(|e| format!("the destination after migrate-pause: {e}"))?;
    Ok(started.elapsed().as_secs_f64())
}

/// The recovery from T0 (`t0`, taken just before): `migrate-recover` on the destination,
/// `migrate resume=true` on the source, until the source reads `postcopy-active`.
/// (Seconds to it, seconds until both commands had returned.)
async fn recover(
    src: &mut Vm,
    dst: &mut Vm,
    (recover, resume): &(String, String),
    t0: Instant,
) -> Result<(f64, f64), BenchError> {
    dst.qmp
        .execute("migrate-recover", json!({"uri": recover}))
        .await
        .map_err(|e| format!("migrate-recover {recover} on the destination: {e}"))?;
    src.qmp
        .execute("migrate", json!({"uri": resume, "resume": true}))
        .await
        .map_err(|e| format!("migrate {resume} resume=true on the source: {e}"))?;
    let issued = t0.elapsed().as_secs_f64();
    status(src, "postcopy-active", Duration::from_secs(30), ENDED)
        .await
        .map_err(|e| format!("the source after the resume: {e}"))?;
    Ok((t0.elapsed().as_secs_f64(), issued))
}

/// Both daemons end the migration `completed` (within 15 s of QEMU): the pauses each
/// recorded (source, destination).
fn completed(daemons: &[Daemon; 2]) -> Result<[usize; 2], BenchError> {
    let mut pauses = [0; 2];
    for (daemon, pauses) in daemons.iter().zip(&mut pauses) {
        let started = Instant::now();
        let view = loop {
            let view = daemons::view_blocking(daemon, ID)?;
            if view.state.is_final() || started.elapsed() > Duration::from_secs(15) {
                break view;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if view.state != State::Completed {
            let error = serde_json::to_string(&view.error)?;
            return Err(format!("the {} daemon: {}, {error}", view.direction, view.state).into());
        }
        *pauses = view.pauses.len();
    }
    Ok(pauses)
}

/// What the daemons say of the migration, for an error: state and error on each.
fn explain(daemons: &[Daemon; 2]) -> String {
    let views = daemons.iter().map(|daemon| {
        daemons::view_blocking(daemon, ID).map_or_else(
            |e| format!("no view ({e})"),
            |v| {
                let error = v.error.map_or("none".into(), |e| e.message);
                format!("{} {}, error: {error}", v.direction, v.state)
            },
        )
    });
    views.collect::<Vec<String>>().join("; ")
}

/// A wall-clock instant as the daemons' logs show it (UTC, time of day).
fn clock(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let day = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        since.subsec_micros()
    )
}

/// One run's progress line.
fn progress(route: Route, r: &Recovery) -> String {
    let pauses = r.pauses.map_or(String::new(), |[s, d]| {
        format!(", pauses on the daemons {s}/{d}")
    });
    format!(
        "{:<32} recovered in {:>7.1} ms (commands returned after {:.1} ms), completed {:.2} s \
         after T0; paused in {:.0} ms{pauses}",
        route.name(),
        r.delay * 1e3,
        r.issued * 1e3,
        r.completed,
        r.pausing * 1e3,
    )
}

/// A route's runs, in the order they ran.
#[derive(Debug)]
struct Summary {
    route: Route,
    runs: Vec<Recovery>,
}

impl Summary {
    /// Nearest rank over the recovery delays, in ms: the value at `p` of the way from the
    /// smallest to the largest.
    fn percentile(&self, p: f64) -> Option<f64> {
        let mut delays: Vec<f64> = self.runs.iter().map(|r| r.delay * 1e3).collect();
        delays.sort_by(f64::total_cmp);
        let last = delays.len().checked_sub(1)?;
        Some(delays[(last as f64 * p).round() as usize])
    }
}

/// Direct's p50 and `route`'s (ms), when both ran.
fn p50s(summaries: &[Summary], route: Route) -> Option<(f64, f64)> {
    let p50 = |route| {
        summaries
            .iter()
            .find(|s| s.route == route)
            .and_then(|s| s.percentile(0.5))
    };
    p50(Route::Direct).zip(p50(route))
}

/// The routes through the daemons.
const DAEMONS: [Route; 2] = [Route::Daemons, Route::DaemonsTls];

fn render(summaries: &[Summary], title: &str, machine: &str, settings: Settings) -> String {
    let mut out = format!("# {title}\n\n{machine}\n\n");
    let settle = match settings.settle.as_millis() {
        0 => "at once".to_owned(),
        ms => format!("{ms} ms"),
    };
    let _ = writeln!(
        out,
        "Paused guest, random source RAM; precopy at {} MiB/s, `migrate-start-postcopy` after \
         {} MiB, postcopy at {} MiB/s, `migrate-pause` on the source after {} MiB more (both \
         QEMUs `postcopy-paused`). T0 {settle} after that, just before `migrate-recover` on \
         the destination, then `migrate resume=true` on the source; the delay is from T0 to \
         the source QEMU's `postcopy-active` (`query-migrate` every 5 ms). Then postcopy's \
         limit is lifted; every run completed on both QEMUs (and both daemons) with equal RAM. \
         Daemons: `--resume-timeout 0`, the migration `recoverable` on both, no QMP. \
         Percentiles by nearest rank.\n",
        PRECOPY_BANDWIDTH >> 20,
        SWITCH_AFTER >> 20,
        POSTCOPY_BANDWIDTH >> 20,
        BEFORE_PAUSE >> 20,
    );
    out.push_str(
        "| route | p50 ms | min ms | max ms | × direct (p50) | runs, ms (in order) | T0 → completed, median s | pauses on the daemons (source / destination) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let direct = p50s(summaries, Route::Direct).map(|(direct, _)| direct);
    for s in summaries {
        let _ = writeln!(out, "{}", row(s, direct));
    }
    out.push('\n');
    for route in DAEMONS {
        if let Some((direct, daemons)) = p50s(summaries, route) {
            let _ = writeln!(
                out,
                "Added by the daemons, {}: {:.1} ms (p50 {daemons:.1} − direct p50 {direct:.1}).",
                route.name(),
                daemons - direct
            );
        }
    }
    out.push_str(&render_targets(&targets(summaries)));
    out
}

/// One route's row of the table.
fn row(s: &Summary, direct: Option<f64>) -> String {
    let ms = |p: f64| s.percentile(p).map_or("-".into(), |v| format!("{v:.1}"));
    let ratio = s
        .percentile(0.5)
        .zip(direct)
        .map_or("-".into(), |(p50, direct)| format!("{:.2}", p50 / direct));
    let runs: Vec<String> = s
        .runs
        .iter()
        .map(|r| format!("{:.0}", r.delay * 1e3))
        .collect();
    let completed = median_of(s.runs.iter().map(|r| r.completed));
    let pauses: Vec<String> = s
        .runs
        .iter()
        .filter_map(|r| r.pauses.map(|[a, b]| format!("{a}/{b}")))
        .collect();
    let pauses = match pauses.is_empty() {
        true => "-".to_owned(),
        false => pauses.join(", "),
    };
    format!(
        "| {} | {} | {} | {} | {ratio} | {} | {completed:.2} | {pauses} |",
        s.route.name(),
        ms(0.5),
        ms(0.0),
        ms(1.0),
        runs.join(", "),
    )
}

/// The daemons add less than [`TARGET_MS`] to a recovery: their p50 against direct's, on
/// each route through them.
fn targets(summaries: &[Summary]) -> Vec<Target> {
    DAEMONS
        .iter()
        .map(|&route| {
            let added = p50s(summaries, route);
            Target {
                goal: match route {
                    Route::DaemonsTls => {
                        "daemons (TLS) add < 50 ms to a postcopy recovery (p50 − direct p50)"
                    }
                    _ => "daemons add < 50 ms to a postcopy recovery (p50 − direct p50)",
                },
                measured: added.map_or("not measured".into(), |(direct, daemons)| {
                    format!(
                        "{:.1} ms (daemons {daemons:.1} ms, direct {direct:.1} ms: {:.2}×)",
                        daemons - direct,
                        daemons / direct
                    )
                }),
                holds: added.map(|(direct, daemons)| daemons - direct < TARGET_MS),
            }
        })
        .collect()
}

/// The chart: each route's p50, the runs' min–max as whiskers, direct's p50 + 50 ms as the
/// target.
fn panel(summaries: &[Summary]) -> Panel {
    let mut panel = Panel::new(
        "From migrate-recover to the source QEMU's postcopy-active, p50 (whiskers: min–max)",
        "milliseconds",
        1,
    );
    let direct = p50s(summaries, Route::Direct);
    panel.target = direct.map(|(direct, _)| (direct + TARGET_MS, "direct p50 + 50 ms"));
    for s in summaries {
        let name = s.route.name();
        panel.bars.push(
            match (s.percentile(0.5), s.percentile(0.0), s.percentile(1.0)) {
                (Some(p50), Some(min), Some(max)) => Bar::new(name, p50).spread(min, max),
                _ => Bar::failed(name, "no run"),
            },
        );
    }
    panel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(route: Route, delays: &[f64], pauses: Option<[usize; 2]>) -> Summary {
        let runs = delays
            .iter()
            .map(|&delay| Recovery {
                delay,
                issued: 0.001,
                completed: 4.0,
                pausing: 0.01,
                pauses,
            })
            .collect();
        Summary { route, runs }
    }

    fn settings() -> Settings {
        Settings {
            reps: 3,
            mib: 512,
            settle: Duration::ZERO,
        }
    }

    #[test]
    fn the_table_shows_the_added_delay_and_the_target() {
        let summaries = [
            summary(Route::Direct, &[0.012, 0.010, 0.020], None),
            summary(Route::Daemons, &[0.090, 0.050, 0.070], Some([1, 1])),
        ];
        let table = render(&summaries, "Recover", "machine", settings());
        assert!(
            table.contains("| 12.0 | 10.0 | 20.0 | 1.00 | 12, 10, 20 | 4.00 | - |"),
            "{table}"
        );
        assert!(
            table.contains("| 70.0 | 50.0 | 90.0 | 5.83 | 90, 50, 70 | 4.00 | 1/1, 1/1, 1/1 |"),
            "{table}"
        );
        assert!(
            table.contains("Added by the daemons, two migproxy daemons, plaintext: 58.0 ms"),
            "{table}"
        );
        assert!(table.contains("| daemons (TLS) add < 50 ms to a postcopy recovery (p50 − direct p50) | not measured | - |"), "{table}");
        assert!(
            table.contains("| 58.0 ms (daemons 70.0 ms, direct 12.0 ms: 5.83×) | no |"),
            "{table}"
        );
    }

    #[test]
    fn without_runs_nothing_is_claimed() {
        let summaries = [summary(Route::Direct, &[0.012], None)];
        let table = render(&summaries, "Recover", "machine", settings());
        assert!(table.contains("| not measured | - |"), "{table}");
    }

    #[test]
    fn the_clock_reads_as_the_logs_do() {
        let at = UNIX_EPOCH + Duration::from_micros(86_400_000_000 + 3_723_000_042);
        assert_eq!(clock(at), "01:02:03.000042");
    }

    #[test]
    fn recover_chart() {
        let dir = tempfile::tempdir().unwrap();
        let summaries = [
            summary(Route::Direct, &[0.012, 0.010, 0.020], None),
            summary(Route::Daemons, &[0.52, 0.51, 0.55], Some([1, 1])),
        ];
        let path = dir.path().join("recover.png");
        chart::draw(
            &path,
            "Recover",
            chart::tests::MACHINE,
            &[panel(&summaries)],
        )
        .unwrap();
        chart::tests::assert_png(&path);
    }
}
