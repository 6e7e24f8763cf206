//! One stream type over unix sockets, TCP and (later) TLS, and the listeners that make them.
//!
//! The relay engine takes a [`Stream`] and does not care which transport it holds, except to
//! ask [`Stream::socket`] whether a plain kernel socket sits underneath: only then can bytes
//! move with splice(2). Any other byte stream (TLS, an in-memory pipe in a test) goes in
//! [`Stream::Other`] and is carried by the copying path, through the same interface.
//!
//! TCP streams always get `TCP_NODELAY`: QEMU's return path (postcopy page requests, the final
//! acknowledgement) is made of small latency-critical messages that must not wait for Nagle.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::endpoint::Endpoint;
use crate::human::Elapsed;

/// Any byte stream the relay can carry by copying.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

/// A connected, bidirectional byte stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS over TCP (between daemons); relayed by copying through the TLS buffers.
    Tls(Box<crate::tls::PeerStream>),
    /// Any other stream with no plain socket underneath (in-memory); relayed by copying.
    Other(Box<dyn AsyncStream>),
}

/// Failures to set up a stream, each naming the endpoint at fault.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("listen on {endpoint} failed")]
    Listen {
        endpoint: Endpoint,
        #[source]
        error: io::Error,
    },
    #[error("accept on {endpoint} failed")]
    Accept {
        endpoint: Endpoint,
        #[source]
        error: io::Error,
    },
    #[error("connect to {endpoint} failed")]
    Connect {
        endpoint: Endpoint,
        #[source]
        error: io::Error,
    },
    #[error("connect to {endpoint} failed: no answer within {}", Elapsed(*.timeout))]
    ConnectTimeout {
        endpoint: Endpoint,
        timeout: Duration,
    },
}

impl TransportError {
    /// The underlying OS error, when there is one.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            TransportError::Listen { error, .. }
            | TransportError::Accept { error, .. }
            | TransportError::Connect { error, .. } => Some(error),
            TransportError::ConnectTimeout { .. } => None,
        }
    }
}

/// Connects to `endpoint`, giving up after `timeout`.
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Stream, TransportError> {
    let attempt = async {
        match endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
            Endpoint::Tcp { host, .. } if host.is_empty() => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no host to connect to",
            )),
            Endpoint::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(TransportError::Connect {
            endpoint: endpoint.clone(),
            error,
        }),
        Err(_) => Err(TransportError::ConnectTimeout {
            endpoint: endpoint.clone(),
            timeout,
        }),
    }
}

/// A bound listener. A unix listener removes its socket file when dropped.
#[derive(Debug)]
pub struct Listener {
    kind: ListenerKind,
    endpoint: Endpoint,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we created, so that drop never removes a file
        /// somebody else put at the same path after us.
        identity: Option<(u64, u64)>,
    },
}

impl Listener {
    /// Binds `endpoint`. A unix socket file left behind by a process that died is replaced;
    /// a path where something still answers, or that is not a socket, is `EADDRINUSE`.
    pub async fn bind(endpoint: &Endpoint) -> Result<Listener, TransportError> {
        let listen_error = |error| TransportError::Listen {
            endpoint: endpoint.clone(),
            error,
        };
        match endpoint {
            Endpoint::Unix(path) => {
                let listener = bind_unix(path).map_err(listen_error)?;
                let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
                Ok(Listener {
                    kind: ListenerKind::Unix {
                        listener,
                        path: path.clone(),
                        identity,
                    },
                    endpoint: endpoint.clone(),
                })
            }
            Endpoint::Tcp { host, port } => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                let listener = TcpListener::bind((host, *port))
                    .await
                    .map_err(listen_error)?;
                let local = listener.local_addr().map_err(listen_error)?;
                Ok(Listener {
                    kind: ListenerKind::Tcp(listener),
                    endpoint: Endpoint::Tcp {
                        host: local.ip().to_string(),
                        port: local.port(),
                    },
                })
            }
        }
    }

    /// The bound endpoint; for `tcp:…:0` it carries the port the kernel chose.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Accepts one connection. The label names the connection's far end as precisely as the
    /// transport allows: the peer's address for TCP, the listening path for unix sockets.
    pub async fn accept(&self) -> Result<(Stream, String), TransportError> {
        let accept_error = |error| TransportError::Accept {
            endpoint: self.endpoint.clone(),
            error,
        };
        match &self.kind {
            ListenerKind::Tcp(listener) => {
                let (stream, peer) = listener.accept().await.map_err(accept_error)?;
                stream.set_nodelay(true).map_err(accept_error)?;
                let label = Endpoint::Tcp {
                    host: peer.ip().to_string(),
                    port: peer.port(),
                };
                Ok((Stream::Tcp(stream), label.to_string()))
            }
            ListenerKind::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await.map_err(accept_error)?;
                Ok((Stream::Unix(stream), self.endpoint.to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerKind::Unix {
            path,
            identity: Some(identity),
            ..
        } = &self.kind
        {
            let ours = std::fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()) == *identity)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Binds a unix listener at `path`, replacing a stale socket file (one nobody answers on);
/// a live socket or any other file is `EADDRINUSE`.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(error) if error.kind() == io::ErrorKind::AddrInUse && is_stale_socket(path) => {
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

/// A socket file nobody listens on any more: connecting is refused.
fn is_stale_socket(path: &Path) -> bool {
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    is_socket
        && matches!(
            std::os::unix::net::UnixStream::connect(path),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        )
}

/// A borrowed plain kernel socket: what splice(2) and the zero-copy path work on.
#[derive(Debug, Clone, Copy)]
pub enum Socket<'a> {
    Tcp(&'a TcpStream),
    Unix(&'a UnixStream),
}

/// Makes the socket `handle` ([`Stream::reset_handle`]) close with a reset (`SO_LINGER`
/// 0) when its last descriptor does.
pub fn reset(handle: &socket2::Socket) {
    let _ = handle.set_linger(Some(Duration::ZERO));
}

impl Stream {
    /// The plain socket under this stream, if there is one.
    pub fn socket(&self) -> Option<Socket<'_>> {
        match self {
            Stream::Tcp(s) => Some(Socket::Tcp(s)),
            Stream::Unix(s) => Some(Socket::Unix(s)),
            Stream::Tls(_) | Stream::Other(_) => None,
        }
    }

    /// A second handle on the TCP socket under this stream (its file descriptor duplicated),
    /// to close it with a reset after the stream was split and its halves dropped: the
    /// socket closes when the handle does, with a FIN unless [`reset`] was called on it.
    pub fn reset_handle(&self) -> Option<socket2::Socket> {
        let tcp = match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.tcp(),
            Stream::Unix(_) | Stream::Other(_) => return None,
        };
        SockRef::from(tcp).try_clone().ok()
    }

    /// Ends the stream abruptly so that the peer notices at once, even if it is blocked
    /// writing into full buffers: TCP closes with `SO_LINGER` 0 (the peer sees a reset), a
    /// unix socket is shut down both ways before it is closed.
    pub fn abort(self) {
        match &self {
            Stream::Tcp(s) => {
                let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            Stream::Unix(s) => {
                let _ = SockRef::from(s).shutdown(std::net::Shutdown::Both);
            }
            Stream::Tls(s) => {
                let _ = SockRef::from(s.tcp()).set_linger(Some(Duration::ZERO));
            }
            Stream::Other(_) => {}
        }
        drop(self);
    }
}

impl Socket<'_> {
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.readable().await,
            Socket::Unix(s) => s.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.writable().await,
            Socket::Unix(s) => s.writable().await,
        }
    }

    /// Runs one non-blocking operation; `WouldBlock` clears the readiness so that the next
    /// `readable`/`writable` waits for the kernel.
    pub fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            Socket::Tcp(s) => s.try_io(interest, f),
            Socket::Unix(s) => s.try_io(interest, f),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }

    /// Sends FIN (TCP) or end-of-stream (unix) while the other direction keeps flowing.
    pub fn shutdown_write(&self) -> io::Result<()> {
        SockRef::from(&self.fd()).shutdown(std::net::Shutdown::Write)
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stream::Tcp(s) => f.debug_tuple("Tcp").field(s).finish(),
            Stream::Unix(s) => f.debug_tuple("Unix").field(s).finish(),
            Stream::Tls(s) => f.debug_tuple("Tls").field(s.tcp()).finish(),
            Stream::Other(_) => f.write_str("Other"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
