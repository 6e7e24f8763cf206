//! `migproxy demo`: a synthetic migration through the relay engine on this machine.
//!
//! ```text
//!  source ──unix:DIR/migrate.sock──► relay (splice) ──tcp:127.0.0.1:PORT──► destination
//!    │  pseudo-random stream, hashed as sent                hashed as received  │
//!    ◄──────────── acknowledgements every 64 MiB, then the digest ──────────────┘
//! ```
//!
//! The destination sends small messages back while the stream flows, as QEMU's return path
//! does, and its digest of everything it received comes back last: the demo checks it against
//! the source's own digest, so a lost, reordered or duplicated byte fails the demo.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::EXIT_FAILED;
use crate::endpoint::Endpoint;
use crate::human::{Bytes, Elapsed};
use crate::relay::{Leg, Options, Relay, Report};
use crate::transport::{self, Listener, Stream};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How much synthetic migration data to stream (binary units: 512M, 1G, 4G).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = super::size)]
    size: u64,
    /// Copy through user space instead of splice(2), to compare.
    #[arg(long)]
    no_splice: bool,
}

/// The destination acknowledges this much data at a time.
const ACK_EVERY: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

pub async fn run(args: Args) -> u8 {
    match demo(args).await {
        Ok(true) => 0,
        Ok(false) => EXIT_FAILED,
        Err(error) => {
            eprintln!("migproxy demo: {error}");
            EXIT_FAILED
        }
    }
}

type DemoError = Box<dyn std::error::Error + Send + Sync>;

async fn demo(args: Args) -> Result<bool, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("migproxy-demo-")
        .tempdir()?;
    let source_path = dir.path().join("migrate.sock");
    let source_side = Listener::bind(&Endpoint::Unix(source_path.clone())).await?;
    let destination_side = Listener::bind(&"tcp:127.0.0.1:0".parse()?).await?;
    let onward = destination_side.endpoint().clone();
    println!(
        "migproxy demo: streaming {} of pseudo-random migration data\n  \
         source → {} → migproxy relay → {onward} → destination",
        Bytes(args.size),
        source_side.endpoint(),
    );

    let source = tokio::spawn(source(UnixStream::connect(&source_path).await?, args.size));
    let destination = tokio::spawn(destination(destination_side));
    let (stream, label) = source_side.accept().await?;
    let onward_stream = transport::connect(&onward, Duration::from_secs(10)).await?;
    let relay = Relay::new(
        Leg::new(label, stream),
        Leg::new(onward.to_string(), onward_stream),
    )
    .with_options(Options {
        zero_copy: !args.no_splice,
        ..Options::default()
    });
    let report = show_progress(relay, args.size).await?;

    let sent = source.await??;
    let received = destination.await??;
    Ok(print_result(&report, &sent, &received))
}

/// Runs the relay while drawing a progress bar from its live counters.
async fn show_progress(relay: Relay, size: u64) -> Result<Report, DemoError> {
    let counters = relay.counters();
    let bar = ProgressBar::new(size).with_style(ProgressStyle::with_template(
        "  {bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )?);
    let mut running = tokio::spawn(relay.run());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let report = loop {
        tokio::select! {
            report = &mut running => break report?,
            _ = tick.tick() => bar.set_position(counters.bytes().to_destination),
        }
    };
    bar.finish_and_clear();
    Ok(report)
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
    let Stream::Tcp(stream) = stream else {
        return Err("the destination expected a TCP connection".into());
    };
    receive_and_acknowledge(stream).await
}

async fn receive_and_acknowledge(mut stream: TcpStream) -> Result<Received, DemoError> {
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

/// Prints the relay's report and the end-to-end check; true when everything agrees.
fn print_result(report: &Report, sent: &Sent, received: &Received) -> bool {
    println!("migproxy demo: relay {report}");
    let intact = sent.digest == received.digest
        && sent.digest_from_destination == Some(received.digest)
        && received.bytes == report.bytes.to_destination;
    println!(
        "  received {} with blake3 {}…, source sent {}… : {}",
        Bytes(received.bytes),
        &received.digest.to_hex()[..16],
        &sent.digest.to_hex()[..16],
        if intact { "identical" } else { "MISMATCH" }
    );
    println!(
        "  return path: {} acknowledgements and the digest came back in {} ({})",
        sent.acks,
        Bytes(report.bytes.to_source),
        Elapsed(report.elapsed)
    );
    let ok = intact && report.is_completed();
    println!("migproxy demo: {}", if ok { "OK" } else { "FAILED" });
    ok
}
