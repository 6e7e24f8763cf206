//! Middleboxes between two daemons for the resumable channels' tests: each accepts on
//! loopback, forwards to the destination daemon, and resets (RST, both ends) or refuses
//! the connections it is told to. The connections are numbered in the order they come:
//! 0 is the control link, which the source dials first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts on loopback until the test ends, handing each connection, with its number, to
/// `handle` on a task of its own; returns the address to dial.
async fn middlebox<F, H>(mut handle: H) -> SocketAddr
where
    H: FnMut(usize, TcpStream) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(handle(n, client));
        }
    });
    addr
}

/// Closes with a reset: SO_LINGER 0, then the close (which cannot block: nothing waits to
/// be sent once the linger is zero) sends an RST.
fn reset(streams: &[&TcpStream]) {
    for stream in streams {
        socket2::SockRef::from(*stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
}

/// Both ways, untouched, until either side ends.
async fn pass(mut client: TcpStream, to: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(to).await else {
        return reset(&[&client]);
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// Every connection passes untouched; `count` counts them.
pub async fn counting_proxy(to: SocketAddr, count: Arc<AtomicU32>) -> SocketAddr {
    middlebox(move |_, client| {
        count.fetch_add(1, Ordering::SeqCst);
        pass(client, to)
    })
    .await
}

/// Every connection passes until [`Unplug::pull`]; then those open are dropped and nothing
/// listens any more (a new one is refused): the destination host gone.
pub struct Unplug {
    pub addr: SocketAddr,
    plug: tokio::task::JoinHandle<()>,
}

impl Unplug {
    pub async fn new(to: SocketAddr) -> Unplug {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plug = tokio::spawn(async move {
            let mut passing = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                passing.spawn(pass(client, to));
            }
        });
        Unplug { addr, plug }
    }

    pub fn pull(&self) {
        self.plug.abort();
    }
}

/// The control link passes untouched; the data connections `cuts` names are reset after
/// that many bytes from the source (`usize::MAX`: not at all), `cut` counting those
/// reset; later ones pass.
pub async fn cutting_proxy(to: SocketAddr, cuts: Vec<usize>, cut: Arc<AtomicU32>) -> SocketAddr {
    middlebox(move |n, client| {
        let limit = n.checked_sub(1).and_then(|data| cuts.get(data).copied());
        let limit = limit.filter(|limit| *limit != usize::MAX);
        forward(client, to, limit, Arc::clone(&cut))
    })
    .await
}

/// The control link passes; the first data connection is reset after `at` bytes from the
/// source, and every later connection at once (the peer is gone for good, as far as new
/// connections go).
pub async fn cut_for_good(to: SocketAddr, at: usize) -> SocketAddr {
    middlebox(move |n, client| async move {
        match n {
            0 | 1 => forward(client, to, (n == 1).then_some(at), Arc::default()).await,
            _ => reset(&[&client]),
        }
    })
    .await
}

/// The control link is reset `after` it was made; every other connection passes, the
/// control link that takes over too.
pub async fn cut_control_after(to: SocketAddr, after: Duration) -> SocketAddr {
    middlebox(move |n, client| async move {
        match n {
            0 => reset_after(client, to, after).await,
            _ => pass(client, to).await,
        }
    })
    .await
}

/// Forwards both ways for `after`, then resets both ends.
async fn reset_after(client: TcpStream, to: SocketAddr, after: Duration) {
    pass_until(client, to, tokio::time::sleep(after)).await;
}

/// Forwards both ways until `stop`, then resets both ends (if they are still open).
async fn pass_until(mut client: TcpStream, to: SocketAddr, stop: impl Future) {
    let Ok(mut server) = TcpStream::connect(to).await else {
        return reset(&[&client]);
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = stop => {}
    }
    reset(&[&client, &server]);
}

/// Forwards `client` to `to`; with a `limit`, resets both ends once that many bytes went
/// up (and counts it in `cut`), unless the connection ended first.
async fn forward(client: TcpStream, to: SocketAddr, limit: Option<usize>, cut: Arc<AtomicU32>) {
    let Some(limit) = limit else {
        return pass(client, to).await;
    };
    let (mut client, mut server) = (client, TcpStream::connect(to).await.unwrap());
    if !cut_at(&mut client, &mut server, limit).await {
        // Ended before its cut: it went through as it was.
        return;
    }
    cut.fetch_add(1, Ordering::SeqCst);
    reset(&[&client, &server]);
}

/// Forwards both ways until `limit` bytes went up (true), or the connection ended first.
async fn cut_at(client: &mut TcpStream, server: &mut TcpStream, limit: usize) -> bool {
    let (mut client_r, mut client_w) = client.split();
    let (mut server_r, mut server_w) = server.split();
    // True once `limit` bytes went up; false when the source's side ended first.
    let up = async {
        let mut buf = vec![0; 64 << 10];
        let mut moved = 0;
        while moved < limit {
            let want = buf.len().min(limit - moved);
            match client_r.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => {
                    let _ = server_w.shutdown().await;
                    return false;
                }
                Ok(n) => {
                    if server_w.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                    moved += n;
                }
            }
        }
        true
    };
    let down = tokio::io::copy(&mut server_r, &mut client_w);
    tokio::pin!(up, down);
    let mut down_done = false;
    let reached = loop {
        tokio::select! {
            reached = &mut up => break reached,
            _ = &mut down, if !down_done => down_done = true,
        }
    };
    if !reached && !down_done {
        let _ = down.await;
    }
    reached
}

/// Forwards every connection to its current target; [`Switch::to`] resets every
/// connection open (both ends) and sends the next ones elsewhere: a daemon that crashed
/// and came back at the same address.
pub struct Switch {
    target: tokio::sync::watch::Sender<SocketAddr>,
    pub addr: SocketAddr,
}

impl Switch {
    pub async fn new(to: SocketAddr) -> Switch {
        let (target, seen) = tokio::sync::watch::channel(to);
        let addr = middlebox(move |_, client| {
            let mut seen = seen.clone();
            async move {
                let to = *seen.borrow_and_update();
                pass_until(client, to, seen.changed()).await;
            }
        })
        .await;
        Switch { target, addr }
    }

    pub fn to(&self, to: SocketAddr) {
        self.target.send_replace(to);
    }
}

/// The control link is reset `after` it was made, and every new connection is reset at
/// once until [`LinkOutage::restore`]: the control link down for as long as a test wants.
/// Connections made before the cut pass.
pub struct LinkOutage {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
}

impl LinkOutage {
    pub async fn new(to: SocketAddr, after: Duration) -> LinkOutage {
        let open = Arc::new(AtomicBool::new(true));
        let gate = Arc::clone(&open);
        let addr = middlebox(move |n, client| {
            let gate = Arc::clone(&gate);
            async move {
                if !gate.load(Ordering::SeqCst) {
                    return reset(&[&client]);
                }
                if n > 0 {
                    return pass(client, to).await;
                }
                reset_after(client, to, after).await;
                gate.store(false, Ordering::SeqCst);
            }
        })
        .await;
        LinkOutage { addr, open }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Every connection passes until [`ControlGate::close`], which resets those open; from then
/// on a new control link (told by its hello) is reset at once while data connections pass:
/// the control link stays down while the channels come back.
pub struct ControlGate {
    pub addr: SocketAddr,
    closed: tokio::sync::watch::Sender<bool>,
}

impl ControlGate {
    pub async fn new(to: SocketAddr) -> ControlGate {
        let (closed, seen) = tokio::sync::watch::channel(false);
        let addr = middlebox(move |_, client| {
            let mut seen = seen.clone();
            async move {
                if *seen.borrow_and_update() && is_control(&client).await {
                    return reset(&[&client]);
                }
                pass_until(client, to, seen.changed()).await;
            }
        })
        .await;
        ControlGate { addr, closed }
    }

    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// Whether the connection's hello, peeked at, is a control link's.
async fn is_control(client: &TcpStream) -> bool {
    let mut head = [0; migproxy_proto::HELLO_HEADER + 1];
    for _ in 0..100 {
        if matches!(client.peek(&mut head).await, Ok(n) if n == head.len()) {
            // The hello's body starts with its kind: 1 is a control link.
            return head[migproxy_proto::HELLO_HEADER] == 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// The control link (connection 0) passes until [`Swallow::arm`]; from then on what the
/// source daemon sends on it is read and dropped — the destination hears nothing, and
/// neither side sees an error — until [`Swallow::cut`] resets both ends: frames lost with a
/// link that breaks. Every later connection passes.
pub struct Swallow {
    pub addr: SocketAddr,
    armed: Arc<AtomicBool>,
    cut: tokio_util::sync::CancellationToken,
}

impl Swallow {
    pub async fn new(to: SocketAddr) -> Swallow {
        Swallow::swallowing(to, false).await
    }

    /// Once armed, what the destination sends is swallowed too: a link blackholed both
    /// ways, on which each side finds the other silent.
    pub async fn both_ways(to: SocketAddr) -> Swallow {
        Swallow::swallowing(to, true).await
    }

    async fn swallowing(to: SocketAddr, both: bool) -> Swallow {
        let armed = Arc::new(AtomicBool::new(false));
        let cut = tokio_util::sync::CancellationToken::new();
        let (armed_, cut_) = (Arc::clone(&armed), cut.clone());
        let addr = middlebox(move |n, client| {
            let (armed, cut) = (Arc::clone(&armed_), cut_.clone());
            async move {
                match n {
                    0 => swallow(client, to, (armed, both), cut).await,
                    _ => pass(client, to).await,
                }
            }
        })
        .await;
        Swallow { addr, armed, cut }
    }

    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn cut(&self) {
        self.cut.cancel();
    }
}

async fn swallow(
    mut client: TcpStream,
    to: SocketAddr,
    (armed, both): (Arc<AtomicBool>, bool),
    cut: tokio_util::sync::CancellationToken,
) {
    let Ok(mut server) = TcpStream::connect(to).await else {
        return reset(&[&client]);
    };
    {
        let (mut client_r, mut client_w) = client.split();
        let (mut server_r, mut server_w) = server.split();
        let up = forward_unless(&mut client_r, &mut server_w, &armed);
        let armed_down = Arc::new(AtomicBool::new(false));
        let down_armed = if both { &armed } else { &armed_down };
        let down = forward_unless(&mut server_r, &mut client_w, down_armed);
        // A side that breaks, on a direction still passing, breaks the other too.
        tokio::select! {
            () = up => {}
            () = down => {}
            () = cut.cancelled() => {}
        }
    }
    reset(&[&client, &server]);
}

/// Forwards what `from` sends to `to`, its end of stream too, until `armed`; then reads
/// and drops it, its end of stream and its errors too. Returns when `from` breaks, or `to`,
/// while it passes.
async fn forward_unless(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    armed: &AtomicBool,
) {
    let mut buf = vec![0; 64 << 10];
    loop {
        let read = from.read(&mut buf).await;
        if armed.load(Ordering::SeqCst) {
            match read {
                Ok(1..) => continue,
                _ => return std::future::pending().await,
            }
        }
        match read {
            Ok(0) => {
                let _ = to.shutdown().await;
                return std::future::pending().await;
            }
            Ok(n) if to.write_all(&buf[..n]).await.is_ok() => {}
            _ => return,
        }
    }
}

/// A destination that stops acknowledging while alive: every connection passes, except that
/// on the control link (connection 0) the destination's `Progress` frames are dropped (the
/// source's hello and everything else pass: heartbeats keep the link alive). Counts the
/// frames it dropped.
pub async fn ack_dropping_proxy(to: SocketAddr, dropped: Arc<AtomicU32>) -> SocketAddr {
    middlebox(move |n, client| {
        let dropped = Arc::clone(&dropped);
        async move {
            if n > 0 {
                return pass(client, to).await;
            }
            let (mut client, mut server) = (client, TcpStream::connect(to).await.unwrap());
            let (mut client_r, mut client_w) = client.split();
            let (mut server_r, mut server_w) = server.split();
            let up = tokio::io::copy(&mut client_r, &mut server_w);
            let down = drop_progress(&mut server_r, &mut client_w, &dropped);
            tokio::select! {
                _ = up => {}
                () = down => {}
            }
        }
    })
    .await
}

/// Passes the hello's reply, then the control frames but `Progress`, until either side
/// ends.
async fn drop_progress(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    dropped: &AtomicU32,
) {
    use migproxy_proto::{Control, HelloReply, control_frame_len, reply_len};
    let mut header = [0; HelloReply::HEADER];
    if from.read_exact(&mut header).await.is_err() {
        return;
    }
    let mut message = vec![0; reply_len(&header).unwrap()];
    if from.read_exact(&mut message).await.is_err()
        || to
            .write_all(&[&header[..], &message].concat())
            .await
            .is_err()
    {
        return;
    }
    loop {
        let mut prefix = [0; 4];
        if from.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let mut body = vec![0; control_frame_len(prefix).unwrap()];
        if from.read_exact(&mut body).await.is_err() {
            return;
        }
        if let Ok(Control::Progress { .. }) = Control::decode(&body) {
            dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&[&prefix[..], &body].concat()).await.is_err() {
            return;
        }
    }
}
