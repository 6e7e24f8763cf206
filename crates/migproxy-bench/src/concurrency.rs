//! Concurrency: 1, 4 and 16 simultaneous streams through one pair of daemons (one migration
//! each, each stream's digest checked), the total throughput and how fairly it is shared
//! (Jain's index).
//!
//! Fairness is measured while every stream competes: all streams start writing at one
//! barrier, and each stream's rate is what it delivered between the barrier and the moment
//! the first stream finished. (Rates over each stream's whole life would reward a stream
//! that ran alone at the end, after the others had finished, and blame the daemons for the
//! benchmark's own thread scheduling.)

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::chart::{self, Bar, Panel};
use crate::daemons;
use crate::measure::{BenchError, gib, human, machine};
use crate::report::{Target, render_targets};
use crate::stream::{expected_digest, random_block, sink_digest, source_write};

/// One stream count's result, as the table and the chart show it.
#[derive(Debug)]
pub struct Streams {
    pub streams: usize,
    /// GiB/s of all streams together.
    pub total: f64,
    /// GiB/s of the slowest and the fastest stream.
    pub slowest: f64,
    pub fastest: f64,
    /// Jain's fairness index over the streams' throughputs while all of them ran.
    pub jain: f64,
}

pub fn run(
    migproxy: &Path,
    per_stream: u64,
    counts: &[usize],
    out: &Path,
) -> Result<(), BenchError> {
    let dir = std::env::temp_dir().join(format!("migproxy-bench-n{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let source = daemons::start(migproxy, &dir, "source", None)?;
    let destination = daemons::start(migproxy, &dir, "destination", None)?;
    let pair = Pair {
        source: &source,
        destination: &destination,
        dir: &dir,
    };
    // Pseudo-random, and every stream's digest checked: a daemon that mixed up two streams'
    // bytes would be caught, not measured.
    let block = random_block();
    let data = Data {
        expected: expected_digest(&block, per_stream),
        block,
        per_stream,
    };
    let mut results = Vec::new();
    let mut round = 0;
    for &count in counts {
        let sockets = (0..count)
            .map(|_| {
                round += 1;
                create(&pair, &format!("s{round}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        results.push(measure(sockets, &data)?);
    }
    drop((source, destination));
    let _ = std::fs::remove_dir_all(&dir);
    let title = format!(
        "Concurrent streams through one pair of daemons, {} each",
        human(per_stream)
    );
    let machine = machine();
    let table = render(&results, &title, &machine);
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("concurrency.md"), &table)?;
    chart::draw(
        &out.join("concurrency.png"),
        &title,
        &machine,
        &panels(&results),
    )
}

/// The daemons the streams go through, and where their sockets live.
struct Pair<'a> {
    source: &'a daemons::Daemon,
    destination: &'a daemons::Daemon,
    dir: &'a Path,
}

/// What every stream carries: `block` repeated up to `per_stream` bytes, whose digest is
/// `expected`.
#[derive(Clone)]
struct Data {
    block: Vec<u8>,
    per_stream: u64,
    expected: blake3::Hash,
}

/// A migration `id` on both daemons, with a sink listening where the destination delivers;
/// returns the sink and the socket the source connects to.
fn create(pair: &Pair<'_>, id: &str) -> Result<(UnixListener, String), BenchError> {
    let target = pair.dir.join(format!("{id}.sock"));
    let sink = UnixListener::bind(&target)?;
    let uri = daemons::create_blocking(
        pair.source,
        pair.destination,
        id,
        &format!("unix:{}", target.display()),
    )?;
    Ok((sink, uri))
}

/// Runs one stream per socket at once (released together by a barrier), and measures
/// them while all of them run.
fn measure(sockets: Vec<(UnixListener, String)>, data: &Data) -> Result<Streams, BenchError> {
    let count = sockets.len();
    let barrier = Arc::new(Barrier::new(count + 1));
    let delivered: Vec<Arc<AtomicU64>> = (0..count).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let streams: Vec<_> = sockets
        .into_iter()
        .zip(&delivered)
        .map(|((sink, uri), counter)| {
            let (data, barrier, counter) =
                (data.clone(), Arc::clone(&barrier), Arc::clone(counter));
            std::thread::spawn(move || stream(sink, &uri, &data, &barrier, counter))
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let rates = window_rates(&delivered, data.per_stream, started, || {
        streams.iter().any(|s| s.is_finished())
    });
    for stream in streams {
        stream
            .join()
            .map_err(|_| "a stream panicked".to_owned())
            .and_then(|r| r)?;
    }
    let total = gib(data.per_stream * count as u64) / started.elapsed().as_secs_f64();
    Ok(summarize(count, total, &rates))
}

/// One stream: writes `data` into the source's socket once the barrier opens, and checks
/// that the sink got all of it, unchanged.
fn stream(
    sink: UnixListener,
    uri: &str,
    data: &Data,
    barrier: &Barrier,
    counter: Arc<AtomicU64>,
) -> Result<(), String> {
    let receiver = std::thread::spawn(move || {
        let (stream, _) = sink.accept().map_err(|e| e.to_string())?;
        sink_digest(Counted {
            inner: stream,
            counter,
        })
        .map_err(|e| e.to_string())
    });
    let mut stream = UnixStream::connect(uri).map_err(|e| e.to_string())?;
    barrier.wait();
    source_write(&mut stream, &data.block, data.per_stream).map_err(|e| e.to_string())?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let (received, digest) = receiver.join().map_err(|_| "sink panicked")??;
    if received != data.per_stream || digest != data.expected {
        return Err(format!(
            "received {received} of {} bytes, {}",
            data.per_stream,
            if digest == data.expected {
                "equal"
            } else {
                "different"
            }
        ));
    }
    Ok(())
}

/// One row of the results: the total, the slowest and fastest stream, and Jain's index.
fn summarize(count: usize, total: f64, rates: &[f64]) -> Streams {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    let jain = sum * sum / (rates.len() as f64 * squares);
    let (slowest, fastest) = rates
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    eprintln!("{count:>2} streams: {total:.2} GiB/s in total, Jain {jain:.3}");
    Streams {
        streams: count,
        total,
        slowest,
        fastest,
        jain,
    }
}

/// The chart: total throughput, and fairness against its target.
fn panels(rows: &[Streams]) -> [Panel; 2] {
    let mut total = Panel::new("Total throughput of all streams", "GiB/s", 2);
    let mut jain = Panel::new("Jain's fairness index over the streams", "index", 3);
    jain.target = Some((0.95, "target ≥ 0.95"));
    for row in rows {
        let label = match row.streams {
            1 => "1 stream".to_owned(),
            n => format!("{n} streams"),
        };
        total.bars.push(Bar::of_migproxy(label.clone(), row.total));
        jain.bars.push(Bar::of_migproxy(label, row.jain));
    }
    [total, jain]
}

/// Each stream's GiB/s from `started` until the first stream has delivered everything (or
/// a stream has ended otherwise: `ended`).
fn window_rates(
    delivered: &[Arc<AtomicU64>],
    per_stream: u64,
    started: Instant,
    ended: impl Fn() -> bool,
) -> Vec<f64> {
    loop {
        let now: Vec<u64> = delivered
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect();
        if now.iter().any(|&bytes| bytes >= per_stream) || ended() {
            let secs = started.elapsed().as_secs_f64();
            return now.iter().map(|&bytes| gib(bytes) / secs).collect();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A reader that counts what it delivers, for the window rates.
struct Counted<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn render(results: &[Streams], title: &str, machine: &str) -> String {
    let mut table = format!(
        "# {title}\n\n{machine}\n\n\
         | streams | total GiB/s | slowest stream GiB/s | fastest GiB/s | Jain's index |\n\
         | --- | --- | --- | --- | --- |\n"
    );
    for r in results {
        table.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.3} |\n",
            r.streams, r.total, r.slowest, r.fastest, r.jain
        ));
    }
    let most = results.iter().max_by_key(|r| r.streams);
    let single = results.iter().find(|r| r.streams == 1);
    let targets = [
        Target {
            goal: "Jain's index ≥ 0.95 with the most streams",
            measured: most.map_or("not measured".into(), |r| format!("{:.3}", r.jain)),
            holds: most.map(|r| r.jain >= 0.95),
        },
        Target::ratio(
            "total with the most streams ≥ the single stream's",
            most.zip(single).map(|(m, s)| m.total / s.total),
            1.0,
        ),
    ];
    table.push_str(&render_targets(&targets));
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_chart() {
        let dir = tempfile::tempdir().unwrap();
        let streams = |streams, total, jain| Streams {
            streams,
            total,
            slowest: 0.0,
            fastest: 0.0,
            jain,
        };
        let rows = [streams(1, 1.05, 1.0), streams(16, 1.39, 0.994)];
        let path = dir.path().join("concurrency.png");
        chart::draw(&path, "Concurrent", chart::tests::MACHINE, &panels(&rows)).unwrap();
        chart::tests::assert_png(&path);
    }
}
