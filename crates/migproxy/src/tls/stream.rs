//! A TLS 1.3 connection whose records migproxy seals and opens itself, after rustls has
//! done the handshake (rustls's "kernel connection" API, made for kTLS: rustls keeps the key
//! schedule, for key updates; the record layer is ours).
//!
//! Why: rustls's own record path allocates a buffer per record and copies every byte once
//! more. Here the buffers are allocated once per connection and reused; a write seals up to
//! 64 full records (1 MiB) straight into the send buffer, one copy; a read opens records
//! in place in the receive buffer and copies the content out, one copy.
//!
//! ```text
//!  rustls (unbuffered)        handshake records, one at a time on the server side, so that
//!  ─────────────────────────  it never swallows the first application record behind the
//!  dangerous_into_kernel_…    client's Finished
//!  RecordStream               application data, alerts (close_notify), key updates
//! ```

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ExtractedSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::record::{
    Content, HEADER, KEY_UPDATE, MAX_CONTENT, MAX_RECORD, MAX_SEALED, Opened, Opener, RecordError,
    Sealer,
};
use super::validity::OwnCertificate;

/// Receive buffer: many full records per read.
const RX_BUFFER: usize = 1 << 20;
/// Records sealed per write, at most (64 × 16 KiB = 1 MiB of content). With 16 (and a
/// 256 KiB receive buffer) the daemon pair carried 1.20 GiB/s; with 64 and 1 MiB, 1.54.
const TX_RECORDS: usize = 64;

/// rustls's side of the connection, for key updates.
pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn update_tx(&mut self) -> Result<Sealer, io::Error> {
        let (seq, secrets) = match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
        .map_err(invalid)?;
        Sealer::new(&secrets, seq).map_err(invalid)
    }

    fn update_rx(&mut self) -> Result<Opener, io::Error> {
        let (seq, secrets) = match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
        .map_err(invalid)?;
        Opener::new(&secrets, seq).map_err(invalid)
    }
}

/// The peer's FIN came before its close_notify: the stream may have been cut short.
pub(super) fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection without a TLS close_notify (truncated)",
    )
}

pub(super) fn invalid(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// A TLS 1.3 connection over TCP with migproxy's record layer.
pub struct RecordStream {
    tcp: TcpStream,
    kernel: Kernel,
    sealer: Sealer,
    opener: Opener,
    /// Records sealed with one key before it is updated (the cipher's confidentiality
    /// limit, with a margin).
    key_limit: u64,
    /// Received bytes: `rx[start..end]` not yet opened; `plain` opened content to hand out.
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    plain: std::ops::Range<usize>,
    /// Sealed records not yet written: `tx[tx_start..tx_end]`.
    tx: Box<[u8]>,
    tx_start: usize,
    tx_end: usize,
    /// The peer sent close_notify: its direction has ended cleanly.
    read_closed: bool,
    /// This side sent close_notify.
    write_closed: bool,
    /// The peer asked for a key update of our direction.
    update_requested: bool,
    /// A bad record found after good content was handed out: reported on the next read.
    pending_error: Option<io::Error>,
    /// This side's certificate, to explain the peer's refusal of it.
    own: Option<Arc<OwnCertificate>>,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("tcp", &self.tcp)
            .field("sent_records", &self.sealer.sequence())
            .finish_non_exhaustive()
    }
}

impl RecordStream {
    /// Takes over from rustls after the handshake; `received` holds the bytes read past it.
    pub(super) fn new(
        tcp: TcpStream,
        secrets: ExtractedSecrets,
        kernel: Kernel,
        received: &[u8],
    ) -> io::Result<RecordStream> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let key_limit = match kernel.suite() {
            SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
            _ => return Err(invalid(RecordError::Cipher)),
        };
        let mut stream = RecordStream {
            tcp,
            kernel,
            sealer: Sealer::new(&tx, tx_seq).map_err(invalid)?,
            opener: Opener::new(&rx, rx_seq).map_err(invalid)?,
            key_limit: key_limit.saturating_sub(1 << 10).max(1),
            rx: vec![0; RX_BUFFER + MAX_RECORD].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            plain: 0..0,
            tx: vec![0; TX_RECORDS * MAX_SEALED + 2 * MAX_SEALED].into_boxed_slice(),
            tx_start: 0,
            tx_end: 0,
            read_closed: false,
            write_closed: false,
            update_requested: false,
            pending_error: None,
            own: None,
        };
        if received.len() > stream.rx.len() {
            return Err(invalid(RecordError::TooLong(received.len())));
        }
        stream.rx[..received.len()].copy_from_slice(received);
        stream.rx_end = received.len();
        Ok(stream)
    }

    /// The certificate this side sent: a peer's `CertificateExpired` alert is explained
    /// with it. (TLS 1.3 lets the client finish first: the server's verdict on the client's
    /// certificate arrives here, as the first record.)
    pub(super) fn explain_refusals_with(&mut self, own: Option<Arc<OwnCertificate>>) {
        self.own = own;
    }

    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// For tests: update the sending key after this many records.
    #[doc(hidden)]
    pub fn set_key_limit(&mut self, records: u64) {
        self.key_limit = records.max(1);
    }

    /// Opens the next whole record in the receive buffer, if there is one, and acts on it.
    /// Returns whether a record was opened.
    fn open_next(&mut self) -> io::Result<bool> {
        let start = self.rx_start;
        let opened = self.opener.open_next(&mut self.rx[start..self.rx_end]);
        let Some((len, opened)) = opened.map_err(|error| self.record_error(error))? else {
            return Ok(false);
        };
        self.rx_start += len;
        match opened {
            Opened::Data(range) => self.plain = start + range.start..start + range.end,
            Opened::CloseNotify => self.read_closed = true,
            Opened::KeyUpdate { requested } => {
                self.opener = self.kernel.update_rx()?;
                self.update_requested |= requested;
            }
            Opened::Nothing => {}
        }
        Ok(true)
    }

    /// A record that could not be opened or read; the peer's alert as rustls names it (and
    /// explained, when it refused this side's certificate).
    fn record_error(&self, error: RecordError) -> io::Error {
        let RecordError::Alert(description) = error else {
            return invalid(error);
        };
        let error = invalid(rustls::Error::AlertReceived(AlertDescription::from(
            description,
        )));
        match &self.own {
            Some(own) => own.explain(error),
            None => error,
        }
    }

    /// Reads more from TCP into the receive buffer. `Ok(0)` is the peer's FIN.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Nothing opened is waiting to be handed out: what is left (at most one partial
        // record) moves to the front, so that every read has the whole buffer.
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let mut buf = ReadBuf::new(&mut self.rx[self.rx_end..]);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.rx_end += n;
        Poll::Ready(Ok(n))
    }

    /// Seals `content` as one record of type `typ` at the end of the send buffer (which has
    /// room), updating the key first when its limit is reached or the peer asked.
    fn seal(&mut self, content: &[u8], typ: Content) -> io::Result<()> {
        if self.sealer.sequence() >= self.key_limit || self.update_requested {
            self.update_requested = false;
            // KeyUpdate, update_not_requested, under the old key; the new key from here on.
            self.seal_with_current(&[KEY_UPDATE, 0, 0, 1, 0], Content::Handshake)?;
            self.sealer = self.kernel.update_tx()?;
        }
        self.seal_with_current(content, typ)
    }

    fn seal_with_current(&mut self, content: &[u8], typ: Content) -> io::Result<()> {
        let at = self.tx_end;
        self.tx[at + HEADER..at + HEADER + content.len()].copy_from_slice(content);
        let len = self
            .sealer
            .seal(&mut self.tx[at..], content.len(), typ)
            .map_err(invalid)?;
        self.tx_end += len;
        Ok(())
    }

    /// Writes out what is sealed; ready when the send buffer is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_start < self.tx_end {
            let n = ready!(
                Pin::new(&mut self.tcp).poll_write(cx, &self.tx[self.tx_start..self.tx_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_start += n;
        }
        self.tx_start = 0;
        self.tx_end = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for RecordStream {
    /// Hands out as much opened content as fits, opening every whole record already
    /// received before reading again.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.pending_error.take() {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.rx[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                // What was opened before is authentic: it goes out now, the error next time.
                Err(error) if buf.filled().len() > before => {
                    this.pending_error = Some(error);
                    return Poll::Ready(Ok(()));
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(truncated()));
            }
        }
    }
}

impl AsyncWrite for RecordStream {
    /// Seals up to 64 records of `buf` into the send buffer once the previous ones are out.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx))?;
        let mut taken = 0;
        for chunk in buf.chunks(MAX_CONTENT).take(TX_RECORDS) {
            this.seal(chunk, Content::ApplicationData)?;
            taken += chunk.len();
        }
        // Start sending now; what does not go yet goes on the next write or flush.
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// close_notify, then FIN: this direction ended cleanly; the other may go on.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            ready!(this.poll_drain(cx))?;
            this.seal(&[1, 0], Content::Alert)?;
            this.write_closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
