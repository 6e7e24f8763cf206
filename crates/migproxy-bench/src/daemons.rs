//! The two-daemon route: the stream enters the source daemon on a unix socket (as from QEMU's
//! `migrate`), crosses TCP to the destination daemon, and leaves on a unix socket (as into
//! QEMU's `-incoming`). CPU is the sum of both daemons'.

use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migproxy::api::types::{IncomingRequest, OutgoingRequest};
use migproxy::client::{Client, ClientError};
use migproxy::daemon::migration::view::Snapshot;
use migproxy::human::Chain;

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
/// Without resumable channels unless `extra` says otherwise: the daemon's default (60 s)
/// would put every route through the resume engine, and the relay (splice, or a copy
/// through TLS) is what these routes measure.
pub fn start_with(
    migproxy: &Path,
    dir: &Path,
    name: &str,
    tls: Option<&Path>,
    extra: &[&str],
) -> Result<Daemon, BenchError> {
    let relay: &[&str] = match extra.contains(&"--resume-timeout") {
        true => &[],
        false => &["--resume-timeout", "0"],
    };
    let flags = [["--peer-listen", "127.0.0.1:0"].as_slice(), relay, extra].concat();
    launch(Command::new(migproxy), dir, name, tls, &flags)
}

/// As [`start_with`], inside network namespace `netns` (`ip netns exec`, which execs the
/// daemon: the child is the daemon), listening for peers on `listen` (`ADDR:0`).
pub fn start_in(
    (netns, listen): (&str, &str),
    migproxy: &Path,
    dir: &Path,
    (name, tls): (&str, Option<&Path>),
    extra: &[&str],
) -> Result<Daemon, BenchError> {
    let flags = [["--peer-listen", listen].as_slice(), extra].concat();
    let command = crate::netns::TwoHosts::command(netns, migproxy);
    launch(command, dir, name, tls, &flags)
}

/// Starts `command` (which runs migproxy) as `daemon` with `flags`; waits for its API.
fn launch(
    mut command: Command,
    dir: &Path,
    name: &str,
    tls: Option<&Path>,
    flags: &[&str],
) -> Result<Daemon, BenchError> {
    let api = dir.join(format!("{name}.sock"));
    command
        .arg("daemon")
        .arg("--api")
        .arg(&api)
        .arg("--runtime-dir")
        .arg(dir.join(format!("{name}-run")));
    match tls {
        Some(tls) => command.arg("--tls-dir").arg(tls),
        None => command.arg("--insecure-plaintext"),
    };
    command.args(flags);
    // With MIGPROXY_LOG set (the daemon reads it), its log goes to `NAME.log` beside its API.
    let stderr = match std::env::var_os("MIGPROXY_LOG") {
        Some(_) => Stdio::from(std::fs::File::create(dir.join(format!("{name}.log")))?),
        None => Stdio::null(),
    };
    let child = command.stdout(Stdio::null()).stderr(stderr).spawn()?;
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

/// The API of one daemon, through the library's client.
fn client(daemon: &Daemon) -> Client {
    Client::new(&daemon.api)
}

fn refused(error: ClientError) -> BenchError {
    format!("the daemon refused: {}", Chain(&error)).into()
}

/// Runs an API call on a thread of its own with a runtime of its own: the callers are plain
/// threads, and async code that already blocks on the daemons' sockets.
fn blocking<T, F>(call: impl FnOnce() -> F + Send + 'static) -> Result<T, BenchError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, ClientError>>,
{
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(call()).map_err(|e| Chain(&e).to_string())
    });
    match thread.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("the daemon refused: {error}").into()),
        Err(_) => Err("an API call panicked".into()),
    }
}

/// Creates migration `id` on both daemons, the destination delivering to `target`
/// (`unix:PATH`); returns the socket path the source QEMU (or stand-in) connects to.
pub async fn create(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    target: &str,
) -> Result<String, BenchError> {
    create_with(source, destination, id, target, None).await
}

/// As [`create`], the migration `"recoverable": true` on both hosts (postcopy recovery by
/// hand: QEMU's `migrate-recover` and `migrate resume=true`, the daemons not driving QEMU).
pub async fn create_recoverable(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    target: &str,
) -> Result<String, BenchError> {
    create_with(source, destination, id, target, Some(true)).await
}

async fn create_with(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    target: &str,
    recoverable: Option<bool>,
) -> Result<String, BenchError> {
    let (id, target) = (id.to_owned(), target.to_owned());
    create_pair(client(source), client(destination), id, target, recoverable)
        .await
        .map_err(refused)
}

/// [`create`], from a plain thread.
pub fn create_blocking(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    target: &str,
) -> Result<String, BenchError> {
    let (source, destination) = (client(source), client(destination));
    let (id, target) = (id.to_owned(), target.to_owned());
    blocking(move || create_pair(source, destination, id, target, None))
}

async fn create_pair(
    source: Client,
    destination: Client,
    id: String,
    target: String,
    recoverable: Option<bool>,
) -> Result<String, ClientError> {
    let incoming = IncomingRequest {
        id: Some(id.clone()),
        target: Some(target),
        recoverable,
        ..IncomingRequest::default()
    };
    let incoming = destination.create_incoming(&incoming).await?;
    let outgoing = OutgoingRequest {
        id,
        token: incoming.token,
        peer: incoming.peer,
        recoverable,
        ..OutgoingRequest::default()
    };
    let outgoing = source.create_outgoing(&outgoing).await?;
    Ok(outgoing.qemu_uri.trim_start_matches("unix:").to_owned())
}

/// Kernel path: creates migration `id` on both daemons, each driving its QEMU over QMP
/// (`src_qmp`, `dst_qmp`) with `data_path: kernel`. The source daemon's creation starts the
/// migration (`migrate fd:…`).
pub async fn create_kernel(
    source: &Daemon,
    destination: &Daemon,
    id: &str,
    (src_qmp, dst_qmp): (&Path, &Path),
) -> Result<(), BenchError> {
    use migproxy::api::types::DataPath;
    let incoming = IncomingRequest {
        id: Some(id.to_owned()),
        qmp: Some(dst_qmp.display().to_string()),
        data_path: Some(DataPath::Kernel),
        ..IncomingRequest::default()
    };
    let incoming = client(destination)
        .create_incoming(&incoming)
        .await
        .map_err(refused)?;
    let outgoing = OutgoingRequest {
        id: id.to_owned(),
        token: incoming.token,
        peer: incoming.peer,
        qmp: Some(src_qmp.display().to_string()),
        data_path: Some(DataPath::Kernel),
        ..OutgoingRequest::default()
    };
    client(source)
        .create_outgoing(&outgoing)
        .await
        .map_err(refused)?;
    Ok(())
}

/// Migration `id` as daemon `daemon`'s API shows it, from a plain thread.
pub fn view_blocking(daemon: &Daemon, id: &str) -> Result<Snapshot, BenchError> {
    let (client, id) = (client(daemon), id.to_owned());
    blocking(move || async move { client.migration(&id).await })
}

/// Cancels migration `id` on both hosts, from a plain thread.
pub fn cancel_blocking(daemon: &Daemon, id: &str) -> Result<(), BenchError> {
    let (client, id) = (client(daemon), id.to_owned());
    blocking(move || async move { client.cancel(&id).await.map(drop) })
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
    let socket = create_blocking(
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
