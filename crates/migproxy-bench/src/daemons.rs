//! The two-daemon route: the stream enters the source daemon on a unix socket (as from QEMU's
//! `migrate`), crosses TCP to the destination daemon, and leaves on a unix socket (as into
//! QEMU's `-incoming`). CPU is the sum of both daemons'.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::measure::{BenchError, Meter, Sample, cpu_seconds, peak_rss};
use crate::pki;
use crate::stream::{sink_digest, source_write};

pub struct Daemon {
    pub child: Child,
    pub api: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(
    migproxy: &Path,
    dir: &Path,
    name: &str,
    tls: Option<&Path>,
) -> Result<Daemon, BenchError> {
    start_with(migproxy, dir, name, tls, &[])
}

/// As [`start`], with more flags for `migproxy daemon` (e.g. `--tls-records stock`).
pub fn start_with(
    migproxy: &Path,
    dir: &Path,
    name: &str,
    tls: Option<&Path>,
    extra: &[&str],
) -> Result<Daemon, BenchError> {
    let api = dir.join(format!("{name}.sock"));
    let mut command = Command::new(migproxy);
    command
        .arg("daemon")
        .arg("--api")
        .arg(&api)
        .args(["--peer-listen", "127.0.0.1:0"])
        .arg("--runtime-dir")
        .arg(dir.join(format!("{name}-run")));
    match tls {
        Some(tls) => command.arg("--tls-dir").arg(tls),
        None => command.arg("--insecure-plaintext"),
    };
    command.args(extra);
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let daemon = Daemon { child, api };
    let started = Instant::now();
    while UnixStream::connect(&daemon.api).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("migproxy daemon {name} did not start").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

/// POSTs `body` to a daemon's API; the JSON answer of a 2xx response.
pub fn post(api: &Path, path: &str, body: &Value) -> Result<Value, BenchError> {
    let body = body.to_string();
    let failed = |error: std::io::Error| format!("POST {path} to {}: {error}", api.display());
    let mut stream = UnixStream::connect(api).map_err(failed)?;
    // One write: the server may answer (and close) as soon as it has the head, and a body
    // still being written in pieces would then meet a closed socket.
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(failed)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(failed)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 2") => {
            Ok(serde_json::from_str(body).unwrap_or(Value::Null))
        }
        _ => Err(format!("the daemon refused: {response}").into()),
    }
}

/// Creates migration `id` on both daemons, the destination delivering to `target`
/// (`unix:PATH`); returns the socket path the source QEMU (or stand-in) connects to.
pub fn create(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    target: &str,
) -> Result<String, BenchError> {
    let incoming = post(
        &destination.api,
        "/v1/migrations",
        &json!({"direction": "incoming", "id": id, "target": target}),
    )?;
    let outgoing = post(
        &source.api,
        "/v1/migrations",
        &json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                "peer": incoming["peer"]}),
    )?;
    let uri = outgoing["qemu_uri"]
        .as_str()
        .ok_or_else(|| format!("unexpected answer {outgoing}"))?;
    Ok(uri.trim_start_matches("unix:").to_owned())
}

pub fn run(
    tls: bool,
    migproxy: &Path,
    block: &[u8],
    size: u64,
    expected: blake3::Hash,
) -> Result<Sample, BenchError> {
    run_with(tls, &[], migproxy, block, size, expected)
}

/// As [`run`], both daemons started with the flags `extra`.
pub fn run_with(
    tls: bool,
    extra: &[&str],
    migproxy: &Path,
    block: &[u8],
    size: u64,
    expected: blake3::Hash,
) -> Result<Sample, BenchError> {
    let dir = std::env::temp_dir().join(format!("migproxy-bench-d{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = dir.join("pki");
    if tls {
        pki::write(&pki)?;
    }
    let tls_dir = tls.then_some(pki.as_path());
    let source = start_with(migproxy, &dir, "source", tls_dir, extra)?;
    let destination = start_with(migproxy, &dir, "destination", tls_dir, extra)?;
    let target = dir.join("incoming.sock");
    let sink = UnixListener::bind(&target)?;
    let socket = create(
        &source,
        &destination,
        "bench",
        &format!("unix:{}", target.display()),
    )?;
    let receiver = std::thread::spawn(move || {
        let (stream, _) = sink.accept()?;
        sink_digest(stream)
    });
    let mut stream = UnixStream::connect(socket)?;
    let meter = Meter::start();
    let started = Instant::now();
    source_write(&mut stream, block, size)?;
    stream.shutdown(Shutdown::Write)?;
    let (received, digest) = receiver.join().map_err(|_| "the sink panicked")??;
    let seconds = started.elapsed().as_secs_f64();
    let spent = meter.stop();
    if received != size || digest != expected {
        return Err("two daemons: the sink received different data".into());
    }
    let cpu = cpu_seconds(source.child.id())
        .zip(cpu_seconds(destination.child.id()))
        .map(|(a, b)| a + b);
    let rss = peak_rss(source.child.id())
        .zip(peak_rss(destination.child.id()))
        .map(|(a, b)| a.max(b));
    drop((source, destination));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample {
        seconds,
        cpu_seconds: cpu,
        peak_rss_kib: rss,
        spent,
    })
}
