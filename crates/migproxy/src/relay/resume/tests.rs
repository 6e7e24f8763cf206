//! The engine over real sockets: unix socket pairs for the two QEMUs, TCP between the two
//! sides, through a proxy that resets its connections (RST) at random moments.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rand::{Rng, RngCore, SeedableRng, rngs::SmallRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::*;

struct Dial(SocketAddr);

impl PeerLink for Dial {
    async fn connect(&mut self) -> io::Result<Stream> {
        let stream = TcpStream::connect(self.0).await?;
        stream.set_nodelay(true)?;
        Ok(Stream::Tcp(stream))
    }
}

struct Accept(TcpListener);

impl PeerLink for Accept {
    async fn connect(&mut self) -> io::Result<Stream> {
        Ok(Stream::Tcp(self.0.accept().await?.0))
    }
}

/// Never connects.
struct Refused;

impl PeerLink for Refused {
    async fn connect(&mut self) -> io::Result<Stream> {
        Err(io::ErrorKind::ConnectionRefused.into())
    }
}

fn abort(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// What the proxy does to a connection it cuts.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Resets it, both ways.
    Reset,
    /// Stops forwarding, both ways, and keeps it open: a blackholed link.
    Blackhole,
}

/// A TCP proxy to `to` that cuts each of its first `cuts` connections once it has forwarded
/// a random 0–1 MiB towards `to`, counting them in `count`; returns its address.
async fn chaos(
    to: SocketAddr,
    cuts: u32,
    seed: u64,
    fault: Fault,
    count: Arc<AtomicU32>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut accepted = 0;
        while let Ok((a, _)) = listener.accept().await {
            let Ok(b) = TcpStream::connect(to).await else {
                continue;
            };
            let cut = (accepted < cuts).then(|| rng.gen_range(0..1 << 20));
            accepted += 1;
            tokio::spawn(forward(a, b, cut, fault, Arc::clone(&count)));
        }
    });
    addr
}

/// Forwards both ways; cuts both connections after `cut` bytes towards `b`.
async fn forward(
    mut a: TcpStream,
    mut b: TcpStream,
    cut: Option<usize>,
    fault: Fault,
    cuts: Arc<AtomicU32>,
) {
    let Some(cut) = cut else {
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        return;
    };
    let reached = {
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let towards_b = async {
            let mut buf = vec![0; 16 << 10];
            let mut moved = 0;
            loop {
                let room = (cut - moved).min(buf.len());
                let n = match room {
                    0 => return true,
                    _ => ar.read(&mut buf[..room]).await.unwrap_or(0),
                };
                if n == 0 {
                    let _ = bw.shutdown().await;
                    return false;
                }
                if bw.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
                moved += n;
            }
        };
        let back = async {
            let _ = tokio::io::copy(&mut br, &mut aw).await;
            let _ = aw.shutdown().await;
        };
        // Both directions to their ends, unless the cut comes first.
        tokio::pin!(towards_b, back);
        tokio::select! {
            reached = &mut towards_b => {
                if !reached {
                    back.await;
                }
                reached
            }
            () = &mut back => towards_b.await,
        }
    };
    if !reached {
        return;
    }
    cuts.fetch_add(1, Ordering::SeqCst);
    if fault == Fault::Blackhole {
        // Held open, never read nor written again, until the test ends.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    abort(a);
    abort(b);
}

/// Both sides' progress wired to each other (the control link's part), and one break
/// signal for both (each daemon finds a silent link dead by its heartbeats).
fn sides() -> (Sides, Sides) {
    sides_breaking(watch::channel(0).1)
}

fn sides_breaking(breaks: watch::Receiver<u64>) -> (Sides, Sides) {
    let (a, a_seen) = watch::channel(Progress::default());
    let (b, b_seen) = watch::channel(Progress::default());
    (
        Sides {
            mine: a,
            peer: b_seen,
            breaks: breaks.clone(),
        },
        Sides {
            mine: b,
            peer: a_seen,
            breaks,
        },
    )
}

fn small() -> Options {
    Options {
        retention: 256 << 10,
        resume_timeout: Duration::from_secs(20),
        hello_timeout: Duration::from_secs(2),
        end_grace: Duration::from_millis(500),
        chunk: 16 << 10,
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// A QEMU: writes `out`, then ends its direction, while reading everything sent to it.
async fn qemu(mut end: UnixStream, out: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = end.split();
    let write = async {
        w.write_all(&out).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let ((), read) = tokio::join!(write, read);
    read.unwrap();
    got
}

/// Two QEMUs exchanging `len` random bytes each way through two engines and the chaos proxy.
async fn exchange(len: usize, cuts: u32, seed: u64) -> (Report, Report, u32) {
    let resets = Arc::new(AtomicU32::new(0));
    let (a, b) = exchange_with(len, (cuts, seed), Fault::Reset, sides(), &resets).await;
    (a, b, resets.load(Ordering::SeqCst))
}

async fn exchange_with(
    len: usize,
    (cuts, seed): (u32, u64),
    fault: Fault,
    (a_sides, b_sides): (Sides, Sides),
    cut: &Arc<AtomicU32>,
) -> (Report, Report) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap();
    let via = chaos(to, cuts, seed, fault, Arc::clone(cut)).await;
    let (src_qemu, src_local) = UnixStream::pair().unwrap();
    let (dst_qemu, dst_local) = UnixStream::pair().unwrap();
    let cancel = CancellationToken::new();
    let a = carry(
        Stream::Unix(src_local),
        Dial(via),
        a_sides,
        small(),
        cancel.clone(),
    );
    let b = carry(
        Stream::Unix(dst_local),
        Accept(listener),
        b_sides,
        small(),
        cancel,
    );
    let (to_dst, to_src) = (random(len, seed), random(len, seed + 1));
    let src = qemu(src_qemu, to_dst.clone());
    let dst = qemu(dst_qemu, to_src.clone());
    let all = async { tokio::join!(a, b, src, dst) };
    let (a, b, got_src, got_dst) = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .unwrap();
    assert!(got_dst == to_dst, "source → destination: bytes differ");
    assert!(got_src == to_src, "destination → source: bytes differ");
    (a.unwrap(), b.unwrap())
}

#[tokio::test]
async fn every_byte_arrives_in_order_exactly_once_through_random_resets() {
    for seed in [1, 2, 3] {
        let len = 4 << 20;
        let (a, b, resets) = exchange(len, 8, seed).await;
        assert!(resets > 0, "the proxy reset connections (seed {seed})");
        // A reset during a hello costs an attempt, not a resumption.
        assert!(
            (1..=resets).contains(&a.resumptions),
            "{} resumptions for {resets} resets",
            a.resumptions
        );
        assert!(a.replayed + b.replayed > 0, "bytes were sent again");
        assert_eq!((a.sent, a.delivered), (len as u64, len as u64));
        assert_eq!((b.sent, b.delivered), (len as u64, len as u64));
    }
}

#[tokio::test]
async fn a_blackholed_connection_found_dead_by_the_daemon_resumes_on_a_new_one() {
    let (breaker, breaks) = watch::channel(0u64);
    let len = 4 << 20;
    let cut = Arc::new(AtomicU32::new(0));
    let sides = sides_breaking(breaks);
    let exchange = exchange_with(len, (1, 4), Fault::Blackhole, sides, &cut);
    // The daemon's verdict, as its heartbeats would give it: the link is silent.
    let verdict = async {
        while cut.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        breaker.send_modify(|n| *n += 1);
    };
    let ((a, b), ()) = tokio::join!(exchange, verdict);
    assert_eq!((a.resumptions, b.resumptions), (1, 1));
    assert_eq!((a.sent, b.delivered), (len as u64, len as u64));
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
    let (sides, _peer) = sides();
    let ended = carry(
        Stream::Unix(local),
        Dial(addr),
        sides,
        small(),
        CancellationToken::new(),
    );
    let error = ended.await.unwrap_err();
    assert!(
        matches!(error, ResumeError::BeyondEnd { end: 5, .. }),
        "{error:?}"
    );
    let mut got = Vec::new();
    qemu.read_to_end(&mut got).await.unwrap();
    assert!(got.len() <= 5, "QEMU got past the end: {got:?}");
}

#[tokio::test]
async fn without_a_break_nothing_is_replayed() {
    let (a, b, resets) = exchange(1 << 20, 0, 7).await;
    assert_eq!(resets, 0);
    assert_eq!((a.resumptions, a.replayed), (0, 0));
    assert_eq!((b.resumptions, b.replayed), (0, 0));
}

/// A stand-in peer: answers the hello with `hello`, then reads whatever comes.
async fn stand_in(hello: Progress) -> (SocketAddr, tokio::sync::mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
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
    let (sides, _peer) = sides();
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
    let (sides, _peer) = sides();
    let ended = carry(
        Stream::Unix(local),
        Dial(addr),
        sides,
        small(),
        CancellationToken::new(),
    );
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
    let (sides, _peer) = sides();
    let options = Options {
        resume_timeout: Duration::from_millis(400),
        ..small()
    };
    let start = Instant::now();
    let error = carry(
        Stream::Unix(local),
        Refused,
        sides,
        options,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
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
    let (sides, _peer) = sides();
    let options = Options {
        resume_timeout: Duration::from_millis(500),
        end_grace: Duration::from_millis(100),
        ..small()
    };
    let engine = tokio::spawn(carry(
        Stream::Unix(local),
        Dial(addr),
        sides,
        options,
        CancellationToken::new(),
    ));
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

#[tokio::test]
async fn a_cancel_ends_the_channel_at_once() {
    let (_qemu, local) = UnixStream::pair().unwrap();
    let (sides, _peer) = sides();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let error = carry(Stream::Unix(local), Refused, sides, small(), cancel).await;
    assert!(matches!(error, Err(ResumeError::Cancelled)));
}
