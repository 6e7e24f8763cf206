//! Cancel latency under full load: a stream runs at full speed through two daemons; the
//! source daemon's API cancels it; the time until both ends of the stream (the source QEMU's
//! socket and the destination QEMU's) have seen their connection end.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::chart::{self, Bar, Panel};
use crate::daemons;
use crate::measure::{BenchError, machine};

/// Cancel latencies in seconds, as the table and the chart show them.
#[derive(Debug)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// None for no latencies.
    fn of(mut latencies: Vec<f64>) -> Option<Self> {
        latencies.sort_by(f64::total_cmp);
        let last = latencies.len().checked_sub(1)?;
        let at = |p: f64| latencies[(last as f64 * p).round() as usize];
        Some(Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: latencies[last],
        })
    }
}

/// The kernel data path with real QEMU pairs: a guest of `mib` MiB migrating at full speed
/// (QEMU to QEMU over the daemons' own connection) is cancelled through the source daemon's
/// API 100 ms after `migrate`; the time until the source QEMU says `cancelled` and the
/// destination QEMU's migration has ended (`failed`, or the process gone).
pub fn run_kernel(migproxy: &Path, count: usize, mib: u64, out: &Path) -> Result<(), BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("migproxy-bench-ck{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let latencies = runtime.block_on(kernel_cancels(migproxy, count, mib, &dir))?;
    let _ = std::fs::remove_dir_all(&dir);
    let latency = Percentiles::of(latencies).ok_or("no cancel was measured")?;
    let title =
        format!("Cancel latency on the kernel data path, {count} cancels, {mib} MiB guests");
    let machine = machine();
    let table = render_kernel(&latency, &title, &machine);
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("cancel-kernel.md"), table)?;
    Ok(())
}

async fn kernel_cancels(
    migproxy: &Path,
    count: usize,
    mib: u64,
    dir: &Path,
) -> Result<Vec<f64>, BenchError> {
    use migproxy::testkit::vm::{Ram, Vm, random_ram_file};
    let ram = dir.join("ram.img");
    random_ram_file(&ram, mib, 17)?;
    let source = daemons::start(migproxy, dir, "source", None)?;
    let destination = daemons::start(migproxy, dir, "destination", None)?;
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        let mut src = Vm::start(dir, &format!("s{n}"), Ram::File(&ram), mib, None).await?;
        let mut dst = Vm::start(dir, &format!("d{n}"), Ram::Preallocated, mib, None).await?;
        let id = format!("kcancel-{n}");
        let qmps = (src.spare_qmp.as_path(), dst.spare_qmp.as_path());
        daemons::create_kernel(&source, &destination, &id, qmps).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = Instant::now();
        let (api, who) = (source.api.clone(), id.clone());
        let cancel =
            tokio::spawn(async move { migproxy::client::Client::new(&api).cancel(&who).await });
        let (src_end, dst_end) = tokio::join!(ended(&mut src, asked), ended(&mut dst, asked));
        cancel
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| migproxy::human::Chain(&e).to_string())?;
        let (src_end, dst_end) = (src_end?, dst_end?);
        eprintln!(
            "{id}: source QEMU {:.1} ms, destination QEMU {:.1} ms",
            src_end * 1e3,
            dst_end * 1e3
        );
        latencies.push(src_end.max(dst_end));
        let _ = (src.kill().await, dst.kill().await);
    }
    Ok(latencies)
}

/// Seconds from `asked` until `vm`'s migration is over: a final status, or its monitor gone
/// (a destination QEMU exits when its incoming migration breaks).
async fn ended(vm: &mut migproxy::testkit::vm::Vm, asked: Instant) -> Result<f64, BenchError> {
    loop {
        match vm
            .qmp
            .execute("query-migrate", serde_json::Value::Null)
            .await
        {
            Ok(info) => match info["status"].as_str() {
                Some("cancelled" | "failed") => return Ok(asked.elapsed().as_secs_f64()),
                Some("completed") => return Err("the migration completed before the cancel".into()),
                _ => {}
            },
            Err(_) => return Ok(asked.elapsed().as_secs_f64()),
        }
        if asked.elapsed() > Duration::from_secs(10) {
            return Err("a QEMU was still migrating 10 s after the cancel".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn render_kernel(latency: &Percentiles, title: &str, machine: &str) -> String {
    format!(
        "# {title}\n\n{machine}\n\n\
         From the source daemon's cancel API call until the source QEMU says `cancelled` and\n\
         the destination QEMU's migration has ended, real QEMU pairs on the kernel data path\n\
         (the daemons run `migrate_cancel` and shut their duplicates of the connection down),\n\
         QMP polled every millisecond, two daemons on loopback.\n\n\
         | p50 | p90 | p99 | max | target p99 |\n| --- | --- | --- | --- | --- |\n\
         | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | < 50 ms: {} |\n",
        latency.p50 * 1e3,
        latency.p90 * 1e3,
        latency.p99 * 1e3,
        latency.max * 1e3,
        if latency.p99 < 0.05 {
            "holds"
        } else {
            "NOT met"
        },
    )
}

pub fn run(migproxy: &Path, count: usize, out: &Path) -> Result<(), BenchError> {
    let dir = std::env::temp_dir().join(format!("migproxy-bench-c{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let source = daemons::start(migproxy, &dir, "source", None)?;
    let destination = daemons::start(migproxy, &dir, "destination", None)?;
    let block = vec![0x5a_u8; 1 << 20];
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        latencies.push(one_cancel(&source, &destination, &dir, n, &block)?);
    }
    drop((source, destination));
    let _ = std::fs::remove_dir_all(&dir);
    let latency = Percentiles::of(latencies).ok_or("no cancel was measured")?;
    let title = format!("Cancel latency under full load, {count} cancels");
    let machine = machine();
    let table = render(&latency, &title, &machine);
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("cancel.md"), table)?;
    chart::draw(
        &out.join("cancel.png"),
        &title,
        &machine,
        &[panel(&latency)],
    )
}

/// One migration carried at full speed, then cancelled on the source: the seconds from the
/// API call until both QEMU stand-ins' connections have ended.
fn one_cancel(
    source: &daemons::Daemon,
    destination: &daemons::Daemon,
    dir: &Path,
    n: usize,
    block: &[u8],
) -> Result<f64, BenchError> {
    let target = dir.join(format!("in-{n}.sock"));
    let sink = UnixListener::bind(&target)?;
    let id = format!("cancel-{n}");
    let socket = daemons::create_blocking(
        source,
        destination,
        &id,
        &format!("unix:{}", target.display()),
    )?;
    let (ended, ends) = mpsc::channel::<Instant>();
    // The destination QEMU stand-in reads as fast as it can, until its connection ends.
    let sink_ended = ended.clone();
    let reader = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = sink.accept() {
            let mut buf = vec![0u8; 1 << 20];
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        }
        let _ = sink_ended.send(Instant::now());
    });
    // The source QEMU stand-in writes as fast as it can, until its connection ends.
    let mut stream = UnixStream::connect(socket)?;
    let writer_block = block.to_vec();
    let writer = std::thread::spawn(move || {
        while stream.write_all(&writer_block).is_ok() {}
        let _ = ended.send(Instant::now());
    });
    std::thread::sleep(Duration::from_millis(100)); // full speed by now
    let asked = Instant::now();
    daemons::cancel_blocking(source, &id)?;
    let mut last = asked;
    for _ in 0..2 {
        let at = ends
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| format!("{id}: a socket was still open 10 s after the cancel"))?;
        last = last.max(at);
    }
    let _ = (reader.join(), writer.join());
    let _ = std::fs::remove_file(&target);
    Ok(last.duration_since(asked).as_secs_f64())
}

/// The chart: the percentiles against the target.
fn panel(latency: &Percentiles) -> Panel {
    let mut panel = Panel::new(
        "From the cancel API call to both stream ends closed",
        "milliseconds",
        1,
    );
    panel.target = Some((100.0, "target p99 < 100 ms"));
    for (label, seconds) in [
        ("p50", latency.p50),
        ("p90", latency.p90),
        ("p99", latency.p99),
        ("max", latency.max),
    ] {
        panel.bars.push(Bar::of_migproxy(label, seconds * 1e3));
    }
    panel
}

fn render(latency: &Percentiles, title: &str, machine: &str) -> String {
    format!(
        "# {title}\n\n{machine}\n\n\
         From the source daemon's cancel API call to both stream ends closed (source and\n\
         destination QEMU stand-ins), two daemons on loopback, plaintext.\n\n\
         | p50 | p90 | p99 | max | target p99 |\n| --- | --- | --- | --- | --- |\n\
         | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | < 100 ms: {} |\n",
        latency.p50 * 1e3,
        latency.p90 * 1e3,
        latency.p99 * 1e3,
        latency.max * 1e3,
        if latency.p99 < 0.1 {
            "holds"
        } else {
            "NOT met"
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_chart() {
        let dir = tempfile::tempdir().unwrap();
        let latency = Percentiles {
            p50: 0.0043,
            p90: 0.0394,
            p99: 0.0709,
            max: 0.0743,
        };
        let path = dir.path().join("cancel.png");
        chart::draw(&path, "Cancel", chart::tests::MACHINE, &[panel(&latency)]).unwrap();
        chart::tests::assert_png(&path);
    }
}
