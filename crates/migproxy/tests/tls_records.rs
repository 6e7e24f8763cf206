//! migproxy's TLS record layer (`RecordStream`) against rustls's own, over real sockets and
//! real handshakes: both ways interoperable with a stock rustls peer, key updates, half-close
//! with close_notify, truncation detected, and no allocation per record.

#![allow(clippy::unwrap_used)]
// The project's only unsafe code: a global allocator that counts, for the allocation test.
// It forwards every call to the system allocator unchanged.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use common::certs::Ca;
use common::{random_data, short_tempdir};
use migproxy::tls::{PeerStream, RecordStream, Records, Tls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts every allocation, per thread.
struct Counting;

thread_local! {
    /// Allocations made on this thread. The allocation test runs on a current-thread runtime
    /// and counts its own thread's only: tests that `cargo test` runs beside it, on other
    /// threads of this process, do not add to its count. Const-initialised and without a
    /// destructor, so reaching it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: a thread being torn down may still free and allocate.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations_here() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn pki(root: &Path) -> (Tls, Tls) {
    let mut ca = Ca::new("record test CA");
    let (a, b) = (root.join("a"), root.join("b"));
    ca.write_host(&a, &["client.test"], "client");
    ca.write_host(&b, &["server.test"], "server");
    (
        Tls::load(&a, Vec::new()).unwrap(),
        Tls::load(&b, Vec::new()).unwrap(),
    )
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

/// Sends `data` in `chunk`-sized writes, then shuts down (close_notify, FIN).
async fn send(mut writer: impl AsyncWrite + Unpin, data: Arc<Vec<u8>>, chunk: usize) {
    for piece in data.chunks(chunk) {
        writer.write_all(piece).await.unwrap();
    }
    writer.shutdown().await.unwrap();
}

/// Reads to the end; returns the length and digest.
async fn receive(mut reader: impl AsyncRead + Unpin) -> std::io::Result<(usize, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        total += n;
    }
}

/// Both directions at once, each ending with close_notify; each side checks what it got.
async fn exchange(
    a: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    b: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    size: usize,
) {
    let (to_b, to_a) = (random_data(1, size), random_data(2, size / 3));
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let sends = tokio::spawn({
        let (to_b, to_a) = (Arc::clone(&to_b), Arc::clone(&to_a));
        async move {
            tokio::join!(send(a_write, to_b, 100_003), send(b_write, to_a, 7_777));
        }
    });
    let (at_b, at_a) = tokio::join!(receive(b_read), receive(a_read));
    sends.await.unwrap();
    assert_eq!(at_b.unwrap(), (size, blake3::hash(&to_b)));
    assert_eq!(at_a.unwrap(), (size / 3, blake3::hash(&to_a)));
}

/// migproxy's record layer under a peer connection.
fn ours(stream: PeerStream) -> RecordStream {
    match stream {
        PeerStream::Migproxy(stream) => stream,
        other => panic!("not migproxy's record layer: {other:?}"),
    }
}

/// Two peer connection ends, client and server.
async fn peer_pair(client: &Tls, server: &Tls) -> (PeerStream, PeerStream) {
    let (c, s) = tcp_pair().await;
    let (a, b) = tokio::join!(
        client.connect_peer(c, "server.test"),
        server.accept_peer(s, "t")
    );
    (a.unwrap(), b.unwrap().0)
}

/// Two migproxy ends connected: client and server.
async fn our_pair(client: &Tls, server: &Tls) -> (RecordStream, RecordStream) {
    let (a, b) = peer_pair(client, server).await;
    (ours(a), ours(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migproxy_records_interoperate_with_rustls_records_both_ways() {
    let root = short_tempdir();
    let (client, server) = pki(root.path());

    // migproxy's server, rustls's client.
    let (c, s) = tcp_pair().await;
    let (rustls_client, ours) = tokio::join!(
        client.connect(c, "server.test"),
        server.accept_peer(s, "test")
    );
    let (server_end, identity) = ours.unwrap();
    assert!(identity.subject.contains("client"), "{identity}");
    exchange(rustls_client.unwrap(), server_end, 8 << 20).await;

    // migproxy's client, rustls's server.
    let (c, s) = tcp_pair().await;
    let (ours, rustls_server) = tokio::join!(
        client.connect_peer(c, "server.test"),
        server.accept(s, "test")
    );
    exchange(ours.unwrap(), rustls_server.unwrap().0, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_updated_and_rustls_follows() {
    let root = short_tempdir();
    let (client, server) = pki(root.path());
    let (c, s) = tcp_pair().await;
    let (ours, rustls_server) = tokio::join!(
        client.connect_peer(c, "server.test"),
        server.accept(s, "test")
    );
    let mut ours = self::ours(ours.unwrap());
    // A new key every 3 records: dozens of KeyUpdate messages, under the old key each.
    ours.set_key_limit(3);
    exchange(ours, rustls_server.unwrap().0, 4 << 20).await;

    // And between two migproxy ends, each updating its own direction.
    let (mut a, mut b) = our_pair(&client, &server).await;
    a.set_key_limit(2);
    b.set_key_limit(5);
    exchange(a, b, 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_record_layer_talks_to_the_other() {
    let root = short_tempdir();
    let (client, server) = pki(root.path());
    let stock = |tls: Tls| tls.with_records(Records::Stock);
    let (client, server) = (stock(client), server);
    let (a, b) = peer_pair(&client, &server).await;
    assert_eq!(
        (a.records(), b.records()),
        (Records::Stock, Records::Migproxy)
    );
    exchange(a, b, 8 << 20).await;

    let (client, server) = pki(root.path());
    let server = stock(server);
    let (a, b) = peer_pair(&client, &server).await;
    assert_eq!(
        (a.records(), b.records()),
        (Records::Migproxy, Records::Stock)
    );
    exchange(a, b, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_without_close_notify_is_reported_truncated() {
    for records in [Records::Migproxy, Records::Stock] {
        let root = short_tempdir();
        let (client, server) = pki(root.path());
        let client = client.with_records(records);
        let server = server.with_records(records);
        truncated(peer_pair(&client, &server).await).await;
    }
}

async fn truncated((mut a, b): (PeerStream, PeerStream)) {
    a.write_all(b"some bytes").await.unwrap();
    a.flush().await.unwrap();
    // FIN with no close_notify before it: an attacker (or a crash) cutting the stream short.
    socket2::SockRef::from(a.tcp())
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    let error = receive(b).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(error.to_string().contains("truncated"), "{error}");
    assert!(error.to_string().contains("close_notify"), "{error}");
}

/// Allocations made on this thread while `a` sends 64 MiB to `b` in 256 KiB writes (one
/// task on a current-thread runtime, so that all the work is on this thread).
async fn allocations_moving(
    mut a: impl AsyncWrite + Unpin,
    mut b: impl AsyncRead + Unpin,
) -> (u64, usize) {
    let block = vec![0x5au8; 256 << 10];
    let mut sink = vec![0u8; 256 << 10];
    let before = allocations_here();
    let writing = async {
        for _ in 0..TOTAL / block.len() {
            a.write_all(&block).await.unwrap();
        }
        a.shutdown().await.unwrap();
    };
    let reading = async {
        let mut total = 0;
        loop {
            let n = b.read(&mut sink).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    };
    let ((), received) = tokio::join!(writing, reading);
    (allocations_here() - before, received)
}

const TOTAL: usize = 64 << 20;
const RECORDS: u64 = (TOTAL >> 14) as u64;

#[tokio::test(flavor = "current_thread")]
async fn the_record_path_does_not_allocate_per_record() {
    let root = short_tempdir();
    let (client, server) = pki(root.path());
    let (a, b) = our_pair(&client, &server).await;
    let (allocations, received) = allocations_moving(a, b).await;
    assert_eq!(received, TOTAL);
    eprintln!("migproxy's records: {allocations} allocations for {RECORDS} records");
    assert!(
        allocations < 64,
        "{allocations} allocations for {RECORDS} records"
    );

    // The same through rustls's own record path, to show what is counted.
    let (c, s) = tcp_pair().await;
    let (a, b) = tokio::join!(client.connect(c, "server.test"), server.accept(s, "t"));
    let (allocations, received) = allocations_moving(a.unwrap(), b.unwrap().0).await;
    assert_eq!(received, TOTAL);
    eprintln!("rustls's records: {allocations} allocations for {RECORDS} records");
    assert!(allocations >= RECORDS, "{allocations}");
}
