//! `migproxy demo` without QEMU: a synthetic migration through two daemons on this machine.
//!
//! ```text
//!  source ─unix─► source daemon ══tcp (loopback)══► destination daemon ─unix─► destination
//!    │  pseudo-random stream, hashed as sent                    hashed as received  │
//!    ◄──────────────── acknowledgements every 64 MiB, then the digest ───────────────┘
//! ```
//!
//! The migration is created through both daemons' REST APIs, as a management layer would,
//! and both daemons' reports are printed at the end.
//!
//! The destination sends small messages back while the stream flows, as QEMU's return path
//! does, and its digest of everything it received comes back last: the demo checks it against
//! the source's own digest, so a lost, reordered or duplicated byte fails the demo.

use std::path::Path;
use std::time::Duration;

use crate::api::types::{IncomingRequest, OutgoingRequest};
use crate::daemon::migration::State;
use crate::daemon::migration::view::Snapshot;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::daemons::{DemoDaemon, DemoError, create_both, reports};
use crate::client::Client;
use crate::endpoint::Endpoint;
use crate::human::Bytes;
use crate::transport::{Listener, Stream};

/// The destination acknowledges this much data at a time.
const ACK_EVERY: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

/// Streams `size` pseudo-random bytes through two daemons run in `dir`.
pub(super) async fn demo(dir: &Path, size: u64) -> Result<bool, DemoError> {
    // Two daemons, as on two hosts: here both on loopback, plaintext.
    let source_host = DemoDaemon::start(dir, "source").await?;
    let destination_host = DemoDaemon::start(dir, "destination").await?;
    let target = Endpoint::Unix(dir.join("qemu-incoming.sock"));
    let qemu_in = Listener::bind(&target).await?;

    let (peer, qemu_uri) =
        create_migration(&source_host, &destination_host, &target.to_string()).await?;
    say!(
        "migproxy demo: QEMU is not installed here (or --synthetic): streaming {} of \
         pseudo-random migration data between two daemons instead\n  \
         source \"QEMU\" → {qemu_uri} → source daemon ═ tcp:{} ═ destination daemon → {target} → destination \"QEMU\"",
        Bytes(size),
        peer,
    );

    let destination = tokio::spawn(destination(qemu_in));
    let socket = qemu_uri.trim_start_matches("unix:");
    let source = tokio::spawn(source(UnixStream::connect(socket).await?, size));
    show_progress(&source_host.client, size).await?;
    let sent = source.await??;
    let received = destination.await??;

    let (at_source, at_destination) = reports(&source_host, &destination_host).await?;
    source_host.stop().await;
    destination_host.stop().await;
    Ok(print_result(&at_source, &at_destination, &sent, &received))
}

/// What a management layer does: the migration `demo` incoming on the destination (delivering
/// to `target`), then outgoing on the source. Returns the destination's peer address and the
/// URI for the source QEMU.
pub(super) async fn create_migration(
    source: &DemoDaemon,
    destination: &DemoDaemon,
    target: &str,
) -> Result<(String, String), DemoError> {
    let incoming = IncomingRequest {
        id: Some("demo".to_owned()),
        target: Some(target.to_owned()),
        ..IncomingRequest::default()
    };
    create_both(source, destination, incoming, OutgoingRequest::default()).await
}

/// Draws a progress bar from the source daemon's API until the migration ends.
async fn show_progress(client: &Client, size: u64) -> Result<(), DemoError> {
    let bar = ProgressBar::new(size).with_style(ProgressStyle::with_template(
        "  {bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )?);
    loop {
        let migration = client.migration("demo").await?;
        bar.set_position(migration.bytes.to_destination);
        if migration.state.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    Ok(())
}

/// What the source sent and what came back on the return path.
struct Sent {
    digest: blake3::Hash,
    acks: u64,
    digest_from_destination: Option<blake3::Hash>,
}

/// What the destination received.
struct Received {
    bytes: u64,
    digest: blake3::Hash,
}

/// Writes `size` pseudo-random bytes, then reads the return path to its end.
async fn source(stream: UnixStream, size: u64) -> Result<Sent, DemoError> {
    let (mut reader, mut writer) = stream.into_split();
    let send = async move {
        let mut rng = SmallRng::seed_from_u64(0x6d69_6770_726f_7879);
        let mut hasher = blake3::Hasher::new();
        let mut chunk = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            rng.fill_bytes(&mut chunk[..n]);
            hasher.update(&chunk[..n]);
            writer.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(hasher.finalize())
    };
    let receive = async move {
        let mut back = Vec::new();
        reader.read_to_end(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    let (digest, back) = tokio::try_join!(send, receive)?;
    // The return path is 8-byte acknowledgements followed by a 32-byte digest.
    let digest_from_destination = back
        .len()
        .checked_sub(32)
        .filter(|acks| acks % 8 == 0)
        .and_then(|at| <[u8; 32]>::try_from(&back[at..]).ok())
        .map(blake3::Hash::from);
    Ok(Sent {
        digest,
        acks: (back.len().saturating_sub(32) / 8) as u64,
        digest_from_destination,
    })
}

/// Receives one stream to its end, acknowledging as it goes, then sends its digest back.
async fn destination(listener: Listener) -> Result<Received, DemoError> {
    let (stream, _) = listener.accept().await?;
    receive_and_acknowledge(stream).await
}

async fn receive_and_acknowledge(mut stream: Stream) -> Result<Received, DemoError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        let before = bytes / ACK_EVERY;
        bytes += n as u64;
        if bytes / ACK_EVERY > before {
            stream.write_all(&bytes.to_le_bytes()).await?;
        }
    }
    let digest = hasher.finalize();
    stream.write_all(digest.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(Received { bytes, digest })
}

/// Prints the end-to-end check; true when everything agrees.
fn print_result(
    at_source: &Snapshot,
    at_destination: &Snapshot,
    sent: &Sent,
    received: &Received,
) -> bool {
    let intact =
        sent.digest == received.digest && sent.digest_from_destination == Some(received.digest);
    say!(
        "received {} with blake3 {}…, the source sent {}…: {}",
        Bytes(received.bytes),
        &received.digest.to_hex()[..16],
        &sent.digest.to_hex()[..16],
        if intact { "identical" } else { "MISMATCH" }
    );
    say!(
        "return path: {} acknowledgements and the digest came back through both daemons",
        sent.acks
    );
    let agree =
        at_source.bytes == at_destination.bytes && at_source.bytes.to_destination == received.bytes;
    say!(
        "both daemons report {} and the same byte counts: {}",
        at_source.state,
        if agree { "yes" } else { "NO" }
    );
    // No QEMU, so no QEMU verdict: `transferred` is the most the daemons can claim.
    let ok = intact
        && agree
        && at_source.state == State::Transferred
        && at_destination.state == State::Transferred;
    say!("migproxy demo: {}", if ok { "OK" } else { "FAILED" });
    ok
}
