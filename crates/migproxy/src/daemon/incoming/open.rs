//! Opening a peer connection: secured (TLS, unless the port is plaintext or the connection
//! is a kernel path's data connection in clear), its hello read, or refused with a typed
//! answer. A control link that its epoch's pause parked (`Control::Parked`, both ways) is
//! opened again here for the next epoch's hello, read on the same connection, which the
//! caller then vets as on a new one (the credential, and the certificate the connection was
//! opened with): a recovery costs no new connection.
//!
//! ```text
//!  TCP ─► open (TLS, hello) ─► vetted, answered ─► control link ─► paused, parked both ways
//!                                     ▲                                         │
//!                                     └──────────── reopen (the next hello) ◄───┘
//! ```

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::{Hello, Status};
use tokio::net::TcpStream;

use super::super::migration::Migration;
use super::super::peer::{self, ReadError};
use super::super::{Daemon, gate};
use crate::human::Chain;
use crate::tls::Identity;
use crate::transport::Stream;

/// [`open`] within the handshake's deadline. `None`: the connection is done with (answered
/// with a refusal, or not worth answering).
pub(super) async fn open_until(
    daemon: &Daemon,
    tcp: TcpStream,
    from: &str,
    deadline: tokio::time::Instant,
) -> Option<Opened> {
    match tokio::time::timeout_at(deadline, open(daemon, tcp, from)).await {
        Ok(Ok(opened)) => Some(opened),
        Ok(Err(None)) => None,
        Ok(Err(Some((mut stream, status, message)))) => {
            reject(daemon, &mut stream, from, status, &message).await;
            None
        }
        Err(_) => {
            if let Some(suppressed) = daemon.rejections.record("handshake_timeout") {
                tracing::warn!(%from, suppressed, "peer did not complete its handshake within {:?}, dropped", daemon.config.timing.handshake_timeout);
            }
            None
        }
    }
}

/// A refusal to send before closing.
type Refusal = (Stream, Status, String);

/// A connection secured (or not) with its hello read.
pub(super) struct Opened {
    pub stream: Stream,
    pub hello: Hello,
    /// The peer's certificate identity, under TLS.
    pub identity: Option<Identity>,
    /// In clear on a TLS port (`allow_clear_data`): only a kernel-path data connection.
    pub clear: bool,
}

/// Whether the connection starts with a TLS handshake record (content type 22): on a TLS
/// port that allows clear data, anything else is read as a clear hello.
async fn tls_first(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(tcp.peek(&mut byte).await, Ok(1) if byte[0] != 0x16)
}

/// Secures the connection and reads the hello. `Err(None)`: nothing worth answering.
async fn open(daemon: &Daemon, tcp: TcpStream, from: &str) -> Result<Opened, Option<Refusal>> {
    let clear =
        daemon.config.tls.is_some() && daemon.config.allow_clear_data && !tls_first(&tcp).await;
    let (stream, identity) = match &daemon.config.tls {
        Some(_) if clear => (Stream::Tcp(tcp), None),
        Some(tls) => match tls.current().accept_peer(tcp, from).await {
            Ok((stream, identity)) => (Stream::Tls(Box::new(stream)), Some(identity)),
            Err(error) => {
                if let Some(suppressed) = daemon.rejections.record("tls") {
                    tracing::warn!(%from, suppressed, "peer connection rejected: {}", Chain(&error));
                }
                return Err(None);
            }
        },
        None => (Stream::Tcp(tcp), None),
    };
    hello_on(stream, identity, clear, from).await
}

/// Reads the hello on a secured connection. `Err(None)`: nothing worth answering.
async fn hello_on(
    mut stream: Stream,
    identity: Option<Identity>,
    clear: bool,
    from: &str,
) -> Result<Opened, Option<Refusal>> {
    match peer::read_hello(&mut stream).await {
        Ok(hello) => Ok(Opened {
            stream,
            hello,
            identity,
            clear,
        }),
        Err(ReadError::Decode(error)) => {
            Err(Some((stream, hello_refusal(&error), error.to_string())))
        }
        Err(ReadError::Io(error)) => {
            tracing::debug!(%from, %error, "peer hello unreadable");
            Err(None)
        }
    }
}

/// How an unreadable hello is refused.
fn hello_refusal(error: &migproxy_proto::DecodeError) -> Status {
    match error {
        migproxy_proto::DecodeError::UnsupportedVersion(_) => Status::UnsupportedVersion,
        _ => Status::Malformed,
    }
}

/// A control link its epoch's pause parked: what the next hello on it is vetted with.
pub(super) struct Kept {
    pub stream: Stream,
    pub identity: Option<Identity>,
    pub clear: bool,
    pub migration: Arc<Migration>,
}

/// The next hello on a parked control link, read within the handshake timeout (the source
/// sends it as soon as the link is parked). `None`, the link closed: nothing came in time,
/// the migration ended, or the hello was unreadable (then refused as such).
pub(super) async fn reopen(daemon: &Daemon, kept: Kept, from: &str) -> Option<Opened> {
    let Kept {
        stream,
        identity,
        clear,
        migration,
    } = kept;
    let within = daemon.config.timing.handshake_timeout;
    let read = tokio::select! {
        () = migration.stopped() => None,
        read = tokio::time::timeout(within, hello_on(stream, identity, clear, from)) => read.ok(),
    };
    match read {
        Some(Ok(opened)) => Some(opened),
        Some(Err(Some((mut stream, status, message)))) => {
            reject(daemon, &mut stream, from, status, &message).await;
            None
        }
        Some(Err(None)) => None,
        None => {
            // Dropped: closed with a FIN.
            tracing::debug!(%from, "parked control link: no hello for the next epoch, closed");
            None
        }
    }
}

/// Answers with a typed refusal and closes cleanly: the rest of what the peer sent is read
/// and dropped first (briefly, and only so much), so the refusal is not lost to a reset.
pub(super) async fn reject(
    daemon: &Daemon,
    stream: &mut Stream,
    from: &str,
    status: Status,
    message: &str,
) {
    if let Some(suppressed) = daemon.rejections.record(status.name()) {
        tracing::warn!(%from, status = status.name(), suppressed, "peer connection rejected: {message}");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // A refusal ends the connection: the oldest version, which every dialler reads.
        peer::reply(stream, migproxy_proto::MIN_VERSION, status, message).await?;
        gate::close_after_answer(stream).await
    })
    .await;
}
