//! A middlebox between two daemons that resets (RST, both ends) chosen data connections at
//! a chosen depth, for the resumable channels' tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A middlebox between the daemons: the first connection (the control link) passes
/// untouched; the data connections `cuts` names are reset, both ends, after that many bytes
/// from the source (`usize::MAX`: not at all); later ones pass.
pub async fn cutting_proxy(to: SocketAddr, cuts: Vec<usize>, cut: Arc<AtomicU32>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = TcpStream::connect(to).await.unwrap();
            let limit = (n > 0).then(|| cuts.get(n - 1).copied()).flatten();
            let limit = limit.filter(|limit| *limit != usize::MAX);
            tokio::spawn(forward(client, server, limit, Arc::clone(&cut)));
        }
    });
    addr
}

async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    limit: Option<usize>,
    cut: Arc<AtomicU32>,
) {
    let Some(limit) = limit else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    };
    if !cut_at(&mut client, &mut server, limit).await {
        // Ended before its cut: it went through as it was.
        return;
    }
    cut.fetch_add(1, Ordering::SeqCst);
    // A reset, both ways: SO_LINGER 0 then close (a close that cannot block: nothing waits
    // to be sent once the linger is zero).
    for stream in [&client, &server] {
        socket2::SockRef::from(stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
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

/// A middlebox that passes the control link, resets the first data connection after `at`
/// bytes from the source, and resets every later connection at once (the peer is gone for
/// good, as far as new connections go).
pub async fn cut_for_good(to: SocketAddr, at: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            if n > 1 {
                socket2::SockRef::from(&client)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                continue;
            }
            let server = TcpStream::connect(to).await.unwrap();
            let limit = (n == 1).then_some(at);
            tokio::spawn(forward(client, server, limit, Arc::default()));
        }
    });
    addr
}

/// A middlebox that resets the first connection (the control link) `after` it was made;
/// every other connection passes, the control link that takes over too.
pub async fn cut_control_after(to: SocketAddr, after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let mut server = TcpStream::connect(to).await.unwrap();
            tokio::spawn(async move {
                if n > 0 {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
                let pass = tokio::io::copy_bidirectional(&mut client, &mut server);
                let _ = tokio::time::timeout(after, pass).await;
                for stream in [&client, &server] {
                    socket2::SockRef::from(stream)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
            });
        }
    });
    addr
}

/// A middlebox that forwards every connection to its current target; [`Switch::to`]
/// resets every connection open (both ends) and sends the next ones elsewhere: a daemon
/// that crashed and came back at the same address.
pub struct Switch {
    target: tokio::sync::watch::Sender<SocketAddr>,
    pub addr: SocketAddr,
}

impl Switch {
    pub async fn new(to: SocketAddr) -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (target, seen) = tokio::sync::watch::channel(to);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut seen = seen.clone();
                let to = *seen.borrow_and_update();
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                tokio::spawn(async move {
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = seen.changed() => {
                            for stream in [&client, &server] {
                                socket2::SockRef::from(stream)
                                    .set_linger(Some(Duration::ZERO))
                                    .unwrap();
                            }
                        }
                    }
                });
            }
        });
        Switch { target, addr }
    }

    pub fn to(&self, to: SocketAddr) {
        self.target.send_replace(to);
    }
}

/// A middlebox whose first connection (the control link) is reset `after` it was made,
/// and which then resets every new connection until [`LinkOutage::restore`]: the control
/// link down for as long as a test wants. Connections made before the cut pass.
pub struct LinkOutage {
    pub addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl LinkOutage {
    pub async fn new(to: SocketAddr, after: Duration) -> LinkOutage {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let gate = Arc::clone(&open);
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !gate.load(Ordering::SeqCst) {
                    reset(&client);
                    continue;
                }
                let mut server = TcpStream::connect(to).await.unwrap();
                let gate = Arc::clone(&gate);
                tokio::spawn(async move {
                    let pass = tokio::io::copy_bidirectional(&mut client, &mut server);
                    if n > 0 {
                        let _ = pass.await;
                        return;
                    }
                    let _ = tokio::time::timeout(after, pass).await;
                    gate.store(false, Ordering::SeqCst);
                    reset(&client);
                    reset(&server);
                });
            }
        });
        LinkOutage { addr, open }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Closes with a reset: SO_LINGER 0 (the close that follows sends an RST).
fn reset(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}
