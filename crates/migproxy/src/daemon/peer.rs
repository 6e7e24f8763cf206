//! Connections between daemons: dialling, the hello exchange, dead-peer socket options, and
//! framed control I/O. The protocol itself lives in `migproxy-proto`; this is its I/O.
//!
//! Dead-peer budget (every peer socket): keepalive probes after 5 s idle, every 2 s, 3 probes;
//! `TCP_USER_TIMEOUT` 10 s so unacknowledged data fails the socket; heartbeats on the control
//! link every second and the link declared dead after [`Timing::peer_timeout`] (default 10 s)
//! of silence. A blackholed network is therefore detected within about 10–11 s.

use std::io;
use std::time::Duration;

use migproxy_proto::{
    Control, DecodeError, HELLO_HEADER, Hello, HelloReply, MAX_HELLO_BODY, Status,
    control_frame_len, hello_body_len, reply_len,
};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::human::Elapsed;
use crate::transport::Stream;

/// The time budgets of the peer link.
#[derive(Debug, Clone)]
pub struct Timing {
    pub connect_timeout: Duration,
    /// A peer must complete its hello within this long.
    pub handshake_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Silence on the control link for this long means the peer or the network is gone.
    pub peer_timeout: Duration,
    /// `TCP_USER_TIMEOUT` on peer sockets.
    pub user_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(10),
            user_timeout: Duration::from_secs(10),
        }
    }
}

/// Failures to reach the peer daemon, each naming the peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connect to peer {peer} failed")]
    Connect {
        peer: String,
        #[source]
        error: io::Error,
    },
    #[error("connect to peer {peer} failed: no answer within {}", Elapsed(*.after))]
    ConnectTimeout { peer: String, after: Duration },
    #[error("handshake with peer {peer} failed")]
    Io {
        peer: String,
        #[source]
        error: io::Error,
    },
    #[error("peer {peer} did not answer the handshake within {}", Elapsed(*.after))]
    HandshakeTimeout { peer: String, after: Duration },
    #[error("peer {peer} answered with something that is not migproxy")]
    Decode {
        peer: String,
        #[source]
        error: DecodeError,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("peer {peer} refused: {message} ({})", .status.name())]
    Refused {
        peer: String,
        status: Status,
        message: String,
    },
}

impl PeerError {
    /// The OS error underneath, when there is one (a TLS handshake's included).
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            PeerError::Connect { error, .. }
            | PeerError::Io { error, .. }
            | PeerError::Tls(crate::tls::TlsError::Handshake { error, .. }) => Some(error),
            _ => None,
        }
    }

    /// The operation that failed, for an attribution.
    pub fn op(&self) -> migproxy_proto::Op {
        match self {
            PeerError::Connect { .. } => migproxy_proto::Op::Connect,
            PeerError::ConnectTimeout { .. } | PeerError::HandshakeTimeout { .. } => {
                migproxy_proto::Op::Timeout
            }
            PeerError::Decode { .. } => migproxy_proto::Op::Protocol,
            _ => migproxy_proto::Op::Handshake,
        }
    }
}

/// Sets the dead-peer options on a peer socket.
pub fn tune(stream: &TcpStream, timing: &Timing) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(timing.user_timeout))
}

/// How to reach the peer daemon.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    /// HOST:PORT.
    pub peer: &'a str,
    /// TLS with this configuration, verifying the server as `server_name`; `None`: plaintext.
    pub tls: Option<(&'a crate::tls::Tls, &'a str)>,
}

/// A connection the destination daemon accepted.
#[derive(Debug)]
pub struct Dialled {
    pub stream: Stream,
    /// The protocol version the destination answered in, which the connection speaks.
    pub version: u16,
    /// What the acceptance carried (a control link's data credential, from version 2 on).
    pub message: String,
}

/// Connects to the peer daemon and introduces the connection.
pub async fn dial(to: Dial<'_>, hello: &Hello, timing: &Timing) -> Result<Dialled, PeerError> {
    let peer = to.peer;
    let tcp = connect(peer, timing).await?;
    tune(&tcp, timing).map_err(|error| io_error(peer, error))?;
    // The handshake as a whole is bounded: a peer that accepts and then says nothing must not
    // hold the dial for ever.
    let (stream, reply) = tokio::time::timeout(timing.handshake_timeout, introduce(to, tcp, hello))
        .await
        .map_err(|_| PeerError::HandshakeTimeout {
            peer: peer.to_owned(),
            after: timing.handshake_timeout,
        })??;
    accepted(peer, stream, reply)
}

/// How long a hello on a parked control link waits for its reply: the destination waits
/// on the link for it, so a link that has not answered within this has died meanwhile, and a
/// new connection is quicker than the handshake timeout.
const PARKED_REPLY: Duration = Duration::from_secs(1);

/// A hello on a control link parked at a pause (quiet both ways, already secured), as on a
/// new connection: the next epoch's.
pub async fn dial_parked(
    peer: &str,
    mut stream: Stream,
    hello: &Hello,
) -> Result<Dialled, PeerError> {
    let reply = tokio::time::timeout(PARKED_REPLY, exchange(peer, &mut stream, hello))
        .await
        .map_err(|_| PeerError::HandshakeTimeout {
            peer: peer.to_owned(),
            after: PARKED_REPLY,
        })??;
    accepted(peer, stream, reply)
}

/// The connection, if the reply accepted it; the refusal otherwise.
fn accepted(peer: &str, stream: Stream, reply: HelloReply) -> Result<Dialled, PeerError> {
    if reply.status != Status::Ok {
        return Err(PeerError::Refused {
            peer: peer.to_owned(),
            status: reply.status,
            // The peer's own words, logged and shown: no control characters.
            message: super::attribution::escape_controls(&reply.message).into_owned(),
        });
    }
    Ok(Dialled {
        stream,
        version: reply.version,
        message: reply.message,
    })
}

/// How often a dial that has not connected yet starts another attempt beside it.
pub const CONNECT_STAGGER: Duration = Duration::from_secs(1);

/// The TCP connection to `peer`, within the connect timeout.
///
/// A SYN lost to a network that is down is sent again by the kernel only after 1, 3, 7 s:
/// a connection attempt made during an outage would connect seconds after the network came
/// back, and a resumable channel with it. So while an attempt waits, another starts beside
/// it every [`CONNECT_STAGGER`] (each with a fresh SYN), and the first to connect wins; the
/// others are dropped before any byte. An attempt that fails (refused, unreachable) with
/// none other waiting fails the dial at once, as a single attempt would; at the deadline,
/// the last such failure says more than the timeout.
async fn connect(peer: &str, timing: &Timing) -> Result<TcpStream, PeerError> {
    let deadline = tokio::time::sleep(timing.connect_timeout);
    let stagger = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(deadline, stagger);
    let mut attempts = tokio::task::JoinSet::new();
    let mut failed = None;
    loop {
        tokio::select! {
            () = &mut deadline => return Err(match failed {
                Some(error) => PeerError::Connect { peer: peer.to_owned(), error },
                None => PeerError::ConnectTimeout {
                    peer: peer.to_owned(),
                    after: timing.connect_timeout,
                },
            }),
            () = &mut stagger => {
                attempts.spawn(TcpStream::connect(peer.to_owned()));
                stagger.as_mut().reset(tokio::time::Instant::now() + CONNECT_STAGGER);
            }
            Some(attempt) = attempts.join_next() => match attempt {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(error)) if attempts.is_empty() => return Err(PeerError::Connect {
                    peer: peer.to_owned(),
                    error,
                }),
                // Another attempt still waits.
                Ok(Err(error)) => failed = Some(error),
                // A task that died: the others go on.
                Err(_) => {}
            }
        }
    }
}

/// Secures the connection (unless plaintext), sends the hello and reads the reply, whatever
/// its status.
async fn introduce(
    to: Dial<'_>,
    tcp: TcpStream,
    hello: &Hello,
) -> Result<(Stream, HelloReply), PeerError> {
    let peer = to.peer;
    let mut stream = match to.tls {
        Some((tls, server_name)) => secure(peer, tls, server_name, tcp).await?,
        None => Stream::Tcp(tcp),
    };
    let reply = exchange(peer, &mut stream, hello).await?;
    Ok((stream, reply))
}

/// Sends the hello and reads the reply, whatever its status.
async fn exchange(peer: &str, stream: &mut Stream, hello: &Hello) -> Result<HelloReply, PeerError> {
    let mut buf = Vec::with_capacity(HELLO_HEADER + MAX_HELLO_BODY);
    hello.encode(&mut buf);
    stream
        .write_all(&buf)
        .await
        .map_err(|error| io_error(peer, error))?;
    stream
        .flush()
        .await
        .map_err(|error| io_error(peer, error))?;
    read_reply(stream).await.map_err(|e| match e {
        ReadError::Io(error) => io_error(peer, error),
        ReadError::Decode(error) => PeerError::Decode {
            peer: peer.to_owned(),
            error,
        },
    })
}

/// The TLS handshake as the client. A destination too busy for it ends the handshake at
/// once with `user_canceled`: that is its `Busy`, not a TLS failure.
async fn secure(
    peer: &str,
    tls: &crate::tls::Tls,
    server_name: &str,
    tcp: TcpStream,
) -> Result<Stream, PeerError> {
    match tls.connect_peer(tcp, server_name).await {
        Ok(stream) => Ok(Stream::Tls(Box::new(stream))),
        Err(error) if is_busy_alert(&error) => Err(PeerError::Refused {
            peer: peer.to_owned(),
            status: Status::Busy,
            message: "too many connections in their handshake, or out of file descriptors \
                      (it ended the TLS handshake at once with user_canceled), try again"
                .to_owned(),
        }),
        Err(error) => Err(error.into()),
    }
}

fn io_error(peer: &str, error: io::Error) -> PeerError {
    PeerError::Io {
        peer: peer.to_owned(),
        error,
    }
}

/// The destination daemon's refusal of a TLS connection before the handshake (a
/// `user_canceled` alert, see `daemon::gate::TLS_BUSY_ALERT`).
fn is_busy_alert(error: &crate::tls::TlsError) -> bool {
    let crate::tls::TlsError::Handshake { error, .. } = error else {
        return false;
    };
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|inner| {
            matches!(
                inner,
                rustls::Error::AlertReceived(rustls::AlertDescription::UserCanceled)
            )
        })
}

/// A failure reading a hello or a frame.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Decode(DecodeError),
}

impl From<io::Error> for ReadError {
    fn from(error: io::Error) -> Self {
        ReadError::Io(error)
    }
}

impl From<DecodeError> for ReadError {
    fn from(error: DecodeError) -> Self {
        ReadError::Decode(error)
    }
}

async fn read_reply(stream: &mut (impl AsyncRead + Unpin)) -> Result<HelloReply, ReadError> {
    let mut buf = vec![0u8; HelloReply::HEADER];
    stream.read_exact(&mut buf).await?;
    let len = reply_len(&buf)?;
    buf.resize(HelloReply::HEADER + len, 0);
    stream.read_exact(&mut buf[HelloReply::HEADER..]).await?;
    Ok(HelloReply::decode(&buf)?)
}

/// Reads a hello, never more than its declared (and limited) size.
pub async fn read_hello(stream: &mut (impl AsyncRead + Unpin)) -> Result<Hello, ReadError> {
    let mut header = [0u8; HELLO_HEADER];
    stream.read_exact(&mut header).await?;
    let len = hello_body_len(&header)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let version = u16::from_be_bytes([header[4], header[5]]);
    Ok(Hello::decode_body(version, &body)?)
}

/// Answers a hello in protocol `version` (see [`migproxy_proto::negotiate`]).
pub async fn reply(
    stream: &mut (impl AsyncWrite + Unpin),
    version: u16,
    status: Status,
    message: &str,
) -> io::Result<()> {
    let mut buf = Vec::new();
    HelloReply {
        version,
        status,
        message: message.to_owned(),
    }
    .encode(&mut buf);
    stream.write_all(&buf).await?;
    stream.flush().await
}

/// Reads one control frame; `None` at a clean end of stream between frames.
pub async fn read_control(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Option<Control>, ReadError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = control_frame_len(prefix)?;
    buf.resize(len, 0);
    reader.read_exact(buf).await?;
    Ok(Some(Control::decode(buf)?))
}

/// Writes one control frame as protocol `version` has it.
pub async fn write_control(
    writer: &mut (impl AsyncWrite + Unpin),
    version: u16,
    control: &Control,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    buf.clear();
    control.encode_for(version, buf);
    writer.write_all(buf).await?;
    // TLS buffers: a control frame must leave now, not with the next one.
    writer.flush().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A listener whose accept queue is full drops SYNs, as a network that is down does.
    /// The kernel sends a lost SYN again after 1, 2, 3, 4 s (`tcp_syn_linear_timeouts`;
    /// older kernels 1, 3, 7 s), then backs off: about 7 s, then 11 s into a lone attempt.
    /// Freed 7.3 s into the dial, a lone attempt would connect at 11 s, past the connect
    /// timeout (10 s); with an attempt started every second beside it, the next fresh SYN
    /// connects it within about a second of the freeing.
    #[tokio::test]
    async fn a_dial_whose_syns_were_lost_connects_soon_after_the_way_is_free() {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(0).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
        let peer = listener.local_addr().unwrap().to_string();
        // Fill the accept queue (a backlog of 0 holds one connection).
        let mut queued = Vec::new();
        for _ in 0..2 {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(&peer)).await
            else {
                break;
            };
            queued.push(stream);
        }
        assert!(!queued.is_empty(), "the accept queue took nothing");
        let started = Instant::now();
        let dial = tokio::spawn({
            let peer = peer.clone();
            async move { connect(&peer, &Timing::default()).await }
        });
        tokio::time::sleep(Duration::from_millis(7300)).await;
        assert!(!dial.is_finished(), "connected through a full accept queue");
        // Free the way: take the queued connections.
        for _ in &queued {
            let _ = listener.accept().await.unwrap();
        }
        let freed = started.elapsed();
        let dialled = dial.await.unwrap();
        assert!(
            dialled.is_ok(),
            "{dialled:?} (the way was freed at {freed:?})"
        );
        let connected = started.elapsed();
        assert!(
            connected < Duration::from_millis(9700),
            "connected {:?} after the way was freed at {freed:?}: waited for the kernel's \
             SYN retransmission",
            connected - freed
        );
    }
}
