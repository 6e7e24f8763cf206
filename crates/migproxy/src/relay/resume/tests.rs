//! The engine against stand-in peers over real sockets: what it refuses, bounds and gives
//! up on. Two engines through connections reset and blackholed, in the clear and over TLS:
//! tests/resume.rs.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use rand::{RngCore, SeedableRng, rngs::SmallRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;

use super::*;

struct Dial(SocketAddr);

impl PeerLink for Dial {
    async fn connect(&mut self) -> io::Result<Stream> {
        let stream = TcpStream::connect(self.0).await?;
        stream.set_nodelay(true)?;
        Ok(Stream::Tcp(stream))
    }
}

/// Never connects.
struct Refused;

impl PeerLink for Refused {
    async fn connect(&mut self) -> io::Result<Stream> {
        Err(io::ErrorKind::ConnectionRefused.into())
    }
}

/// Both sides' progress wired to each other (the control link's part), and one break
/// signal for both (each daemon finds a silent link dead by its heartbeats).
fn sides() -> (Sides, Sides) {
    Sides::wired(watch::channel(0).1)
}

/// One engine against a stand-in peer (its own progress unwired), never cancelled.
async fn alone(
    local: UnixStream,
    link: impl PeerLink,
    options: Options,
) -> Result<Report, ResumeError> {
    let (sides, _peer) = sides();
    carry(
        Stream::Unix(local),
        link,
        sides,
        options,
        CancellationToken::new(),
    )
    .await
}

fn small() -> Options {
    Options {
        retention: 256 << 10,
        resume_timeout: Duration::from_secs(20),
        hello_timeout: Duration::from_secs(2),
        end_grace: Duration::from_millis(500),
        chunk: 16 << 10,
        ..Options::default()
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

#[tokio::test]
async fn nothing_past_the_end_a_peer_announced_reaches_qemu() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut peer, _) = listener.accept().await.unwrap();
        let hello = Progress {
            delivered: 0,
            end: Some(5),
        };
        peer.write_all(&hello.encode()).await.unwrap();
        peer.write_all(b"0123456789").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let (mut qemu, local) = UnixStream::pair().unwrap();
    let ended = alone(local, Dial(addr), small());
    let error = ended.await.unwrap_err();
    assert!(
        matches!(error, ResumeError::BeyondEnd { end: 5, .. }),
        "{error:?}"
    );
    let mut got = Vec::new();
    qemu.read_to_end(&mut got).await.unwrap();
    assert!(got.len() <= 5, "QEMU got past the end: {got:?}");
}

/// A stand-in peer: answers the hello with `hello`, then reads whatever comes.
async fn stand_in(hello: Progress) -> (SocketAddr, mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let (mut peer, _) = listener.accept().await.unwrap();
        peer.write_all(&hello.encode()).await.unwrap();
        let mut buf = vec![0; 64 << 10];
        let mut total = 0;
        let _ = peer.read_exact(&mut [0; PROGRESS_LEN]).await;
        while let Ok(n) = peer.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n;
            let _ = tx.send(total).await;
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_peer_that_stops_acknowledging_gets_no_more_than_the_retention() {
    let (addr, mut received) = stand_in(Progress::default()).await;
    let (mut qemu, local) = UnixStream::pair().unwrap();
    let options = Options {
        retention: 64 << 10,
        ..small()
    };
    let engine = tokio::spawn(alone(local, Dial(addr), options));
    let data = random(8 << 20, 9);
    let wrote = tokio::time::timeout(Duration::from_millis(500), qemu.write_all(&data)).await;
    assert!(wrote.is_err(), "QEMU is blocked, as on a full socket");
    let mut last = 0;
    while let Ok(total) = received.try_recv() {
        last = total;
    }
    assert_eq!(last, 64 << 10, "exactly the retention went out, no more");
    engine.abort();
}

#[tokio::test]
async fn a_peer_claiming_bytes_never_sent_is_refused() {
    let claim = Progress {
        delivered: 1000,
        end: None,
    };
    let (addr, _received) = stand_in(claim).await;
    let (_qemu, local) = UnixStream::pair().unwrap();
    let ended = alone(local, Dial(addr), small());
    let error = ended.await.unwrap_err();
    assert!(
        matches!(
            error,
            ResumeError::Offsets(RetentionError::BeyondSent {
                claimed: 1000,
                sent: 0
            })
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_peer_gone_for_longer_than_the_resume_timeout_fails_with_the_attempts() {
    let (_qemu, local) = UnixStream::pair().unwrap();
    let options = Options {
        resume_timeout: Duration::from_millis(400),
        ..small()
    };
    let start = Instant::now();
    let error = alone(local, Refused, options).await.unwrap_err();
    let ResumeError::Timeout { attempts, last, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(*attempts >= 3, "tried again with backoff: {attempts}");
    assert_eq!(last.kind(), io::ErrorKind::ConnectionRefused);
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert!(error.to_string().contains("attempts"), "{error}");
}

#[tokio::test]
async fn a_fin_short_of_the_announced_end_is_a_break_not_the_end() {
    // A peer daemon killed closes its sockets with a FIN: the destination QEMU must not
    // read the end of the stream from it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut peer, _) = listener.accept().await.unwrap();
        peer.write_all(&Progress::default().encode()).await.unwrap();
        peer.write_all(b"half of it").await.unwrap();
        // Then gone, with a FIN; a second connection is never accepted.
        drop(peer);
        drop(listener);
    });
    let (mut qemu, local) = UnixStream::pair().unwrap();
    let options = Options {
        resume_timeout: Duration::from_millis(500),
        end_grace: Duration::from_millis(100),
        ..small()
    };
    let engine = tokio::spawn(alone(local, Dial(addr), options));
    let mut got = [0; 10];
    qemu.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"half of it");
    let mut more = [0; 1];
    let early = tokio::time::timeout(Duration::from_millis(50), qemu.read(&mut more)).await;
    assert!(early.is_err(), "QEMU read no end at the FIN: {early:?}");
    // Taken for a break: resumed, and failed when no new connection came (an end taken at
    // the FIN would have left the engine waiting for QEMU's own direction for ever).
    let ended = tokio::time::timeout(Duration::from_secs(5), engine).await;
    let error = ended.unwrap().unwrap().unwrap_err();
    let ResumeError::Timeout {
        cause: Some(cause), ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(cause.kind(), io::ErrorKind::UnexpectedEof);
    assert!(error.to_string().contains("after it broke"), "{error}");
}

/// Dials the stand-in once; every later connection is refused, as a destination whose
/// channel ended refuses it.
struct OnceThenRefused(Option<SocketAddr>);

impl PeerLink for OnceThenRefused {
    async fn connect(&mut self) -> io::Result<Stream> {
        match self.0.take() {
            Some(addr) => Dial(addr).connect().await,
            None => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "channel 2 is not a resumable channel running here",
            )),
        }
    }
}

#[tokio::test]
async fn a_refusal_that_races_the_peers_last_progress_is_the_end_not_a_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sides, peer) = sides();
    let (qemu, local) = UnixStream::pair().unwrap();
    let (mut qemu_r, mut qemu_w) = qemu.into_split();
    qemu_w.write_all(b"abc").await.unwrap();
    qemu_w.shutdown().await.unwrap();
    let Sides {
        mine: peer_says,
        peer: mut heard,
        ..
    } = peer;
    tokio::spawn(async move {
        let (mut connection, _) = listener.accept().await.unwrap();
        connection
            .write_all(&Progress::default().encode())
            .await
            .unwrap();
        let mut got = vec![0; PROGRESS_LEN + 3];
        connection.read_exact(&mut got).await.unwrap();
        // Everything came, and the engine said its direction ended: the peer's channel
        // ends, and its data connection goes (reset, as a socket closed with bytes unread)
        // before its last progress (delivered all, its own direction empty) goes out on
        // the control link.
        heard.wait_for(|p| p.end == Some(3)).await.unwrap();
        socket2::SockRef::from(&connection)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(connection);
        tokio::time::sleep(Duration::from_millis(200)).await;
        peer_says.send_replace(Progress {
            delivered: 3,
            end: Some(0),
        });
        // Held until the engine is done.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let link = OnceThenRefused(Some(addr));
    let report = carry(
        Stream::Unix(local),
        link,
        sides,
        small(),
        CancellationToken::new(),
    );
    let report = tokio::time::timeout(Duration::from_secs(5), report).await;
    let report = report.unwrap().unwrap();
    assert_eq!(report.sent, 3, "{report:?}");
    // QEMU's side of the peer's direction ends too.
    let mut rest = Vec::new();
    qemu_r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn a_cancel_ends_the_channel_at_once() {
    let (_qemu, local) = UnixStream::pair().unwrap();
    let (sides, _peer) = sides();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let error = carry(Stream::Unix(local), Refused, sides, small(), cancel).await;
    assert!(matches!(error, Err(ResumeError::Cancelled)));
}

#[tokio::test]
async fn a_full_retention_hurries_the_peer_which_acknowledges_only_when_asked() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The peer: reads all, and acknowledges nothing unless hurried.
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&received);
    tokio::spawn(async move {
        let (mut peer, _) = listener.accept().await.unwrap();
        peer.write_all(&Progress::default().encode()).await.unwrap();
        let _ = peer.read_exact(&mut [0; PROGRESS_LEN]).await;
        let mut buf = vec![0; 64 << 10];
        while let Ok(n @ 1..) = peer.read(&mut buf).await {
            counted.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let (mut sides, peer) = sides();
    let hurries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (asked, mine) = (Arc::clone(&hurries), Arc::new(peer.mine));
    sides.hurry = Some(Hurry(Arc::new(move || {
        asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (received, mine) = (Arc::clone(&received), Arc::clone(&mine));
        // Told once there is news, as the daemon tells it.
        tokio::spawn(async move {
            loop {
                let now = received.load(std::sync::atomic::Ordering::SeqCst);
                let newer = |p: &mut Progress| {
                    let newer = now > p.delivered;
                    p.delivered = p.delivered.max(now);
                    newer
                };
                if mine.send_if_modified(newer) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    })));
    let (mut qemu, local) = UnixStream::pair().unwrap();
    let options = Options {
        retention: 64 << 10,
        ..small()
    };
    let engine = tokio::spawn(carry(
        Stream::Unix(local),
        Dial(addr),
        sides,
        options,
        CancellationToken::new(),
    ));
    // 1 MiB through a 64 KiB retention: it moves only because each full retention asks.
    let data = random(1 << 20, 12);
    let wrote = tokio::time::timeout(Duration::from_secs(10), qemu.write_all(&data)).await;
    assert!(wrote.is_ok(), "QEMU's bytes all went out");
    // At least what left QEMU's socket buffer, 64 KiB at a time.
    assert!(hurries.load(std::sync::atomic::Ordering::SeqCst) >= 8);
    engine.abort();
}
