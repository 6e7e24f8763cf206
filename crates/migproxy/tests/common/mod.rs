//! Helpers shared by the integration tests: real socket pairs and checked data streams.
#![allow(dead_code)]

pub mod certs;
pub mod cut;
pub mod daemon;
pub mod libvirt;
pub mod netns;
pub mod openapi;
pub mod openapi_call;
pub mod orchestration;
pub mod peer;
pub mod process;
pub mod qemu;
pub mod resume;
pub mod scenario;
pub mod tls;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migproxy::transport::Stream;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unix,
    Tcp,
}

/// A connected pair of real sockets: (the test's peer end, the end handed to the relay).
pub async fn pair(kind: Kind) -> (Stream, Stream) {
    match kind {
        Kind::Unix => {
            let (a, b) = UnixStream::pair().unwrap();
            (Stream::Unix(a), Stream::Unix(b))
        }
        Kind::Tcp => {
            let (a, b) = tcp_pair().await;
            (Stream::Tcp(a), Stream::Tcp(b))
        }
    }
}

pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (a, b) = (connected.unwrap(), accepted.unwrap().0);
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_data(seed: u64, len: usize) -> Arc<Vec<u8>> {
    let mut data = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    Arc::new(data)
}

/// Writes `data` in writes of random sizes (1 B to 256 KiB), then shuts the write side down.
pub async fn send_all(
    mut writer: impl AsyncWrite + Unpin,
    data: Arc<Vec<u8>>,
    seed: u64,
) -> io::Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut at = 0;
    while at < data.len() {
        let n = rng.gen_range(1..=256 * 1024).min(data.len() - at);
        writer.write_all(&data[at..at + n]).await?;
        at += n;
    }
    writer.shutdown().await
}

/// Reads to end of stream; returns the byte count and digest.
pub async fn receive_all(mut reader: impl AsyncRead + Unpin) -> io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// The one polling loop of the tests: runs `probe` every 10 ms until it returns `Ok`, and
/// returns that; after `limit`, fails the test naming `what` and the last thing the probe saw
/// (its `Err`). In-process daemons, daemon processes and QEMU are all waited for with it.
pub async fn poll<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(done) => return done,
            Err(seen) if start.elapsed() >= limit => {
                panic!("timed out after {limit:?} waiting for {what}: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Polls `check` every 10 ms until it holds or `limit` passes.
pub async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    poll(
        what,
        limit,
        async || if check() { Ok(()) } else { Err("no") },
    )
    .await
}

/// Whether an API view of a migration names a final state (`State::FINAL`).
pub fn is_final(view: &serde_json::Value) -> bool {
    let state = view["state"].as_str().unwrap_or_default();
    migproxy::daemon::migration::State::FINAL
        .iter()
        .any(|s| s.name() == state)
}

/// A fresh temporary directory with a short path (unix socket paths are limited to 107 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mp-")
        .tempdir_in("/tmp")
        .unwrap()
}

pub fn sock(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The log level of the daemons a test starts: `info`, or `MIGPROXY_TEST_LOG` to look
/// closer at one run (`info,migproxy::daemon::migration=debug`).
pub fn daemon_log_level() -> String {
    std::env::var("MIGPROXY_TEST_LOG").unwrap_or_else(|_| "info".to_owned())
}
