//! A peer connection after its handshake, with one of two record layers:
//!
//! ```text
//!  Records::Migproxy  RecordStream: migproxy seals and opens the records (record.rs),
//!                     1 MiB per socket read, up to 64 records per socket write
//!  Records::Stock     tokio-rustls's TlsStream: rustls's own record layer, its send
//!                     buffer raised to 1 MiB, and a read takes every record ready
//! ```
//!
//! The relay copies through both with 1 MiB reads and writes; `--tls-records` chooses.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use super::stream::RecordStream;
use super::validity::OwnCertificate;

/// Which record layer carries the peer connections' data after rustls's handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Records {
    /// migproxy's own ([`RecordStream`]).
    #[default]
    Migproxy,
    /// rustls's, through tokio-rustls.
    Stock,
}

impl std::str::FromStr for Records {
    type Err = String;

    fn from_str(text: &str) -> Result<Records, String> {
        match text {
            "migproxy" => Ok(Records::Migproxy),
            "stock" => Ok(Records::Stock),
            _ => Err(format!("\"{text}\" is neither \"migproxy\" nor \"stock\"")),
        }
    }
}

impl std::fmt::Display for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Records::Migproxy => "migproxy",
            Records::Stock => "stock",
        })
    }
}

/// rustls's send buffer on a stock peer connection: 64 records, as [`RecordStream`] seals
/// per write (rustls's default is 64 KiB).
pub(super) const STOCK_SEND_BUFFER: usize = 1 << 20;

/// A TLS peer connection, with the record layer chosen by [`Records`]. (The variants
/// differ in size; the transport boxes the whole, once per connection.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum PeerStream {
    Migproxy(RecordStream),
    Stock(Stock),
}

/// tokio-rustls's stream, and this side's certificate to explain the peer's refusal of it.
pub struct Stock {
    tls: TlsStream<TcpStream>,
    own: Option<Arc<OwnCertificate>>,
}

impl std::fmt::Debug for Stock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stock")
            .field("tcp", self.tls.get_ref().0)
            .finish_non_exhaustive()
    }
}

impl Stock {
    pub(super) fn new(mut tls: TlsStream<TcpStream>, own: Option<Arc<OwnCertificate>>) -> Stock {
        match &mut tls {
            TlsStream::Client(s) => s.get_mut().1.set_buffer_limit(Some(STOCK_SEND_BUFFER)),
            TlsStream::Server(s) => s.get_mut().1.set_buffer_limit(Some(STOCK_SEND_BUFFER)),
        }
        Stock { tls, own }
    }

    /// Errors worded as [`RecordStream`] words them.
    fn explain(&self, error: io::Error) -> io::Error {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            return super::stream::truncated();
        }
        match &self.own {
            Some(own) => own.explain(error),
            None => error,
        }
    }
}

impl PeerStream {
    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Migproxy(s) => s.tcp(),
            PeerStream::Stock(s) => s.tls.get_ref().0,
        }
    }

    /// Which record layer this connection uses.
    pub fn records(&self) -> Records {
        match self {
            PeerStream::Migproxy(_) => Records::Migproxy,
            PeerStream::Stock(_) => Records::Stock,
        }
    }
}

impl AsyncRead for Stock {
    /// tokio-rustls hands out one record's content per read: this takes every record
    /// already received, up to the caller's buffer, as [`RecordStream`] does.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        loop {
            let at = buf.filled().len();
            match Pin::new(&mut this.tls).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() > at && buf.remaining() > 0 => {}
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                // What was read before the error or the wait goes out now.
                Poll::Ready(Err(_)) | Poll::Pending if buf.filled().len() > before => {
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(this.explain(error))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for Stock {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Migproxy(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Stock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Migproxy(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Stock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Migproxy(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Stock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Migproxy(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Stock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
