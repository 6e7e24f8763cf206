//! The resumable channel engine (`relay::resume`) end to end: two engines between two
//! QEMU stand-ins on unix sockets, TCP between them through a proxy that resets (RST) or
//! blackholes its connections at random byte counts, in the clear and over migproxy's
//! mutual TLS (each new connection a new handshake). Every byte arrives in order, exactly
//! once.

#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::certs::Ca;
use common::short_tempdir;
use migproxy::relay::resume::{Keeping, Observe, Options, Outage, PeerLink, Report, Sides, carry};
use migproxy::relay::{Direction, TapFn};
use migproxy::tls::Tls;
use migproxy::transport::Stream;
use rand::{Rng, RngCore, SeedableRng, rngs::SmallRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The dialling side: TCP, then a TLS handshake when it has a client.
struct Dial(SocketAddr, Option<Arc<Tls>>);

impl PeerLink for Dial {
    async fn connect(&mut self) -> io::Result<Stream> {
        let tcp = TcpStream::connect(self.0).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.1 else {
            return Ok(Stream::Tcp(tcp));
        };
        let stream = tls.connect_peer(tcp, "server.test").await;
        Ok(Stream::Tls(Box::new(stream.map_err(io::Error::other)?)))
    }
}

/// The accepting side, as the destination daemon accepts. Two of the daemon's words on a
/// connection are kept: a new connection for the channel replaces the one in use (that
/// side's session is cut: `mine`), and each time this side needs a new connection it tells
/// the peer the one in use broke (`peer`), as a daemon reports a break on the control link.
/// Without them a side that has read the peer's end, waiting only for acknowledgements, never
/// sees a reset, and its peer waits for it until the resume timeout.
struct Accept {
    queue: mpsc::UnboundedReceiver<TcpStream>,
    tls: Option<Arc<Tls>>,
    peer: watch::Sender<u64>,
    /// A connection was handed out: the next call means it broke.
    handed: bool,
}

impl Accept {
    fn new(listener: TcpListener, tls: Option<Arc<Tls>>, breaks: &Breaks) -> Accept {
        let (arrived, queue) = mpsc::unbounded_channel();
        let mine = breaks.b.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                bump(&mine);
                if arrived.send(tcp).is_err() {
                    return;
                }
            }
        });
        let peer = breaks.a.clone();
        Accept {
            queue,
            tls,
            peer,
            handed: false,
        }
    }
}

impl PeerLink for Accept {
    async fn connect(&mut self) -> io::Result<Stream> {
        if self.handed {
            bump(&self.peer);
        }
        self.handed = true;
        let arrived = self.queue.recv().await;
        let mut tcp = arrived.ok_or(io::ErrorKind::NotConnected)?;
        // The newest: the peer gave up on those before it.
        while let Ok(newer) = self.queue.try_recv() {
            tcp = newer;
        }
        let Some(tls) = &self.tls else {
            return Ok(Stream::Tcp(tcp));
        };
        let (stream, _identity) = tls
            .accept_peer(tcp, "client")
            .await
            .map_err(io::Error::other)?;
        Ok(Stream::Tls(Box::new(stream)))
    }
}

/// Each side's break signal (the daemon's word, [`Sides::breaks`]): the dialler's and the
/// acceptor's.
#[derive(Clone)]
struct Breaks {
    a: watch::Sender<u64>,
    b: watch::Sender<u64>,
}

impl Breaks {
    fn new() -> Breaks {
        Breaks {
            a: watch::channel(0).0,
            b: watch::channel(0).0,
        }
    }

    /// Both sides' progress wired to each other (the control link's part), each with its
    /// own break signal.
    fn sides(&self) -> (Sides, Sides) {
        let (mut a, mut b) = Sides::wired(self.a.subscribe());
        (a.breaks, b.breaks) = (self.a.subscribe(), self.b.subscribe());
        (a, b)
    }
}

fn bump(breaks: &watch::Sender<u64>) {
    breaks.send_modify(|n| *n += 1);
}

/// How the two engines reach each other.
enum Links {
    Clear,
    /// Mutual TLS: the client's and the server's.
    Tls(Arc<Tls>, Arc<Tls>),
}

fn tls() -> (tempfile::TempDir, Links) {
    let dir = short_tempdir();
    let mut ca = Ca::new("resume test CA");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ca.write_host(&a, &["client.test"], "client");
    ca.write_host(&b, &["server.test"], "server");
    let load = |path| Arc::new(Tls::load(path, Vec::new()).unwrap());
    let links = Links::Tls(load(&a), load(&b));
    (dir, links)
}

fn abort(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// What the proxy does to a connection it cuts.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// No proxy: the engines connect straight to each other, so that the kernel may hand
    /// one's pages to the other's local end (splice(2) on loopback).
    Direct,
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

/// A QEMU: writes `out` in writes of at most `piece` bytes, then ends its direction, while
/// reading everything sent to it; `slow`, 16 KiB a millisecond, so that what the engine
/// delivered waits in its socket.
async fn qemu(mut end: UnixStream, out: Vec<u8>, piece: usize, slow: bool) -> Vec<u8> {
    let (mut r, mut w) = end.split();
    let write = async {
        for chunk in out.chunks(piece.max(1)) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        if !slow {
            r.read_to_end(&mut got).await.unwrap();
            return got;
        }
        let mut buf = vec![0; 16 << 10];
        loop {
            match r.read(&mut buf).await.unwrap() {
                0 => return got,
                n => got.extend_from_slice(&buf[..n]),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let ((), got) = tokio::join!(write, read);
    got
}

/// Two QEMUs exchanging `len` random bytes each way through two engines and the chaos proxy.
async fn exchange(len: usize, cuts: u32, seed: u64) -> (Report, Report, u32) {
    let setup = Setup::new(Links::Clear);
    let resets = Arc::clone(&setup.cut);
    let (a, b) = exchange_with(len, (cuts, seed), setup).await;
    (a, b, resets.load(Ordering::SeqCst))
}

/// How the two engines of one exchange are set up.
struct Setup {
    fault: Fault,
    breaks: Breaks,
    /// Counts the connections the proxy cut.
    cut: Arc<AtomicU32>,
    /// The destination's QEMU reads slowly.
    slow_destination: bool,
    /// The largest write of the source's QEMU.
    source_writes: usize,
    links: Links,
    /// The source's and the destination's.
    observe: (Observe, Observe),
}

impl Setup {
    fn new(links: Links) -> Setup {
        let destination = Observe {
            up: Direction::ToSource,
            ..Observe::default()
        };
        Setup {
            fault: Fault::Reset,
            breaks: Breaks::new(),
            cut: Arc::default(),
            slow_destination: false,
            source_writes: usize::MAX,
            links,
            observe: (Observe::default(), destination),
        }
    }
}

async fn exchange_with(len: usize, (cuts, seed): (u32, u64), setup: Setup) -> (Report, Report) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap();
    let via = match setup.fault {
        Fault::Direct => to,
        fault => chaos(to, cuts, seed, fault, Arc::clone(&setup.cut)).await,
    };
    let (src_qemu, src_local) = UnixStream::pair().unwrap();
    let (dst_qemu, dst_local) = UnixStream::pair().unwrap();
    let cancel = CancellationToken::new();
    let breaks = &setup.breaks;
    let (dial, accept) = match setup.links {
        Links::Clear => (Dial(via, None), Accept::new(listener, None, breaks)),
        Links::Tls(client, server) => (
            Dial(via, Some(client)),
            Accept::new(listener, Some(server), breaks),
        ),
    };
    let (a_sides, b_sides) = breaks.sides();
    let (a_observe, b_observe) = setup.observe;
    let a_options = Options {
        observe: a_observe,
        ..small()
    };
    let b_options = Options {
        observe: b_observe,
        ..small()
    };
    let a = carry(
        Stream::Unix(src_local),
        dial,
        a_sides,
        a_options,
        cancel.clone(),
    );
    let b = carry(Stream::Unix(dst_local), accept, b_sides, b_options, cancel);
    let (to_dst, to_src) = (random(len, seed), random(len, seed + 1));
    let src = qemu(src_qemu, to_dst.clone(), setup.source_writes, false);
    let dst = qemu(dst_qemu, to_src.clone(), len, setup.slow_destination);
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
    let len = 4 << 20;
    let setup = Setup {
        fault: Fault::Blackhole,
        ..Setup::new(Links::Clear)
    };
    let breaks = setup.breaks.clone();
    let cut = Arc::clone(&setup.cut);
    let exchange = exchange_with(len, (1, 4), setup);
    // The daemon's verdict, as its heartbeats would give it: the link is silent.
    let verdict = async {
        while cut.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        bump(&breaks.a);
        bump(&breaks.b);
    };
    let ((a, b), ()) = tokio::join!(exchange, verdict);
    assert_eq!((a.resumptions, b.resumptions), (1, 1));
    assert_eq!((a.sent, b.delivered), (len as u64, len as u64));
}

/// What a daemon acknowledges it may no longer hold, even when the bytes it delivered still
/// wait in its QEMU's socket as references to pages (splice on loopback hands them from
/// one engine's socket to the other's QEMU). Handing the retention's own pages to the
/// kernel (vmsplice) failed this: the source reused them once acknowledged, and a slow
/// reader found them rewritten.
#[tokio::test]
async fn a_slow_reader_behind_a_direct_link_gets_the_bytes_that_were_sent_not_newer_ones() {
    let len = 8 << 20;
    let setup = Setup {
        fault: Fault::Direct,
        slow_destination: true,
        ..Setup::new(Links::Clear)
    };
    let (a, b) = exchange_with(len, (0, 9), setup).await;
    assert_eq!((a.sent, b.delivered), (len as u64, len as u64));
}

/// Small writes fill a pipe's slots long before its bytes: the pipes that keep the bytes
/// run out of slots first, which must read as a full retention, not a loss.
#[tokio::test]
async fn small_writes_through_random_resets_arrive_exactly_once() {
    let len = 1 << 20;
    let setup = Setup {
        source_writes: 97,
        ..Setup::new(Links::Clear)
    };
    let resets = Arc::clone(&setup.cut);
    let (a, b) = exchange_with(len, (4, 11), setup).await;
    assert!(
        resets.load(Ordering::SeqCst) > 0,
        "the proxy reset connections"
    );
    assert_eq!((a.sent, b.delivered), (len as u64, len as u64));
}

#[tokio::test]
async fn without_a_break_nothing_is_replayed() {
    let (a, b, resets) = exchange(1 << 20, 0, 7).await;
    assert_eq!(resets, 0);
    assert_eq!((a.resumptions, a.replayed), (0, 0));
    assert_eq!((b.resumptions, b.replayed), (0, 0));
}

#[tokio::test]
async fn over_mutual_tls_every_byte_arrives_through_random_resets_each_with_a_new_handshake() {
    for seed in [11, 12] {
        let (_dir, links) = tls();
        let setup = Setup::new(links);
        let resets = Arc::clone(&setup.cut);
        let len = 2 << 20;
        let (a, b) = exchange_with(len, (6, seed), setup).await;
        assert!(
            resets.load(Ordering::SeqCst) > 0,
            "connections were reset (seed {seed})"
        );
        assert!(a.resumptions >= 1, "resumed over a new TLS session");
        assert_eq!((a.sent, b.delivered), (len as u64, len as u64));
        assert_eq!((b.sent, a.delivered), (len as u64, len as u64));
        // QEMU's bytes are kept in the kernel's pipes over TLS too (read through a small
        // buffer to be sealed), not in the daemon's memory: 16 MiB a channel otherwise.
        assert_eq!((a.kept_in, b.kept_in), (Keeping::Pipes, Keeping::Pipes));
    }
}

#[tokio::test]
async fn counters_and_the_return_path_tap_see_each_byte_once_and_each_outage_is_told() {
    let len = 2 << 20;
    let mut setup = Setup::new(Links::Clear);
    let taps = [(); 2].map(|()| Arc::new(std::sync::Mutex::new(Vec::new())));
    let (outages, mut told) = mpsc::unbounded_channel();
    for (observe, tap) in [&mut setup.observe.0, &mut setup.observe.1]
        .into_iter()
        .zip(&taps)
    {
        let tap = Arc::clone(tap);
        observe.tap_to_source = Some(TapFn(Arc::new(move |bytes| {
            tap.lock().unwrap().extend_from_slice(bytes);
        })));
    }
    setup.observe.0.outages = Some(outages);
    let counters = [&setup.observe.0, &setup.observe.1].map(|o| Arc::clone(&o.counters));
    let (a, b) = exchange_with(len, (6, 21), setup).await;
    assert!(a.resumptions >= 1, "connections were reset and resumed");
    // The source's direction is spliced and kept in pipes; the destination's, the return
    // path the tap must see, passes through user space and is kept in memory.
    assert_eq!((a.kept_in, b.kept_in), (Keeping::Pipes, Keeping::Memory));
    assert!(a.replayed > 0, "bytes were sent again");
    for counters in &counters {
        let bytes = counters.bytes();
        // A replay is not counted again: each direction counts its length, exactly.
        assert_eq!(
            (bytes.to_destination, bytes.to_source),
            (len as u64, len as u64)
        );
    }
    // In the clear both ends are plain sockets: the migration stream is spliced on both
    // hosts (kept in pipes on the source, delivered by splice on the destination); the
    // return path, which the tap must see, is copied on both.
    let [source, destination] = &counters;
    assert_eq!(source.spliced().to_destination, len as u64);
    assert_eq!(destination.spliced().to_destination, len as u64);
    let copied = (source.spliced().to_source, destination.spliced().to_source);
    assert_eq!(copied, (0, 0), "a tapped direction is copied");
    let to_src = random(len, 22);
    for tap in &taps {
        assert!(
            *tap.lock().unwrap() == to_src,
            "the tap saw each byte once, in order"
        );
    }
    let mut events = Vec::new();
    while let Ok(outage) = told.try_recv() {
        events.push(outage);
    }
    let resumed = events
        .iter()
        .filter(|e| matches!(e, Outage::Resumed { .. }))
        .count();
    assert_eq!(resumed as u32, a.resumptions, "{events:?}");
    for pair in events.chunks(2) {
        assert!(
            matches!(pair, [Outage::Interrupted { .. }, Outage::Resumed { .. }]),
            "each outage starts, then ends: {events:?}"
        );
    }
}
