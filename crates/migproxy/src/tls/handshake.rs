//! The TLS handshake with rustls's unbuffered API, ending in a [`RecordStream`].
//!
//! rustls is handed records one at a time on the server side: the client may send its first
//! application record right behind its Finished, and rustls must not open it (the record
//! layer of [`RecordStream`] does, with the sequence numbers rustls hands over). On a
//! failure, rustls's alert is still sent, so the peer learns why.

use std::io;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::record::{HEADER, MAX_RECORD};
use super::stream::{Kernel, RecordStream, invalid};

/// The longest handshake flight buffered (certificate chains are a few KiB).
const MAX_HANDSHAKE: usize = 256 << 10;

/// The client and server connections, for one driver.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// Runs the client's handshake on `tcp`.
pub(super) async fn client(
    mut tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<RecordStream> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    let received = drive(&mut tcp, &mut conn, false).await?;
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(invalid)?;
    RecordStream::new(tcp, secrets, Kernel::Client(kernel), &received)
}

/// Runs the server's handshake on `tcp`; returns the stream and the client's certificate.
pub(super) async fn server(
    mut tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<(RecordStream, Option<CertificateDer<'static>>)> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let received = drive(&mut tcp, &mut conn, true).await?;
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.clone().into_owned());
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(invalid)?;
    let stream = RecordStream::new(tcp, secrets, Kernel::Server(kernel), &received)?;
    Ok((stream, leaf))
}

/// What the driver does after one call into rustls.
enum Step {
    Again,
    Transmit,
    Read,
    Done,
    Failed(rustls::Error),
    Unexpected(String),
}

/// Drives `conn` until it may send application data. Returns the bytes received past the
/// last handshake record. `one_by_one` hands rustls one whole record at a time.
async fn drive<C: Unbuffered>(
    tcp: &mut TcpStream,
    conn: &mut C,
    one_by_one: bool,
) -> io::Result<Vec<u8>> {
    let mut incoming = vec![0u8; MAX_RECORD];
    let mut filled = 0;
    let mut outgoing = Vec::new();
    // Records handed to rustls at once (grows while a message spans records).
    let mut records = 1;
    loop {
        let limit = if one_by_one { records } else { usize::MAX };
        let offered = whole_records(&incoming[..filled], limit);
        let (step, discard) = advance(conn, &mut incoming[..offered], &mut outgoing)?;
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        if discard > 0 {
            records = 1;
        }
        match step {
            Step::Again => {}
            Step::Transmit => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
            }
            Step::Read => {
                let available = whole_records(&incoming[..filled], usize::MAX);
                if discard > 0 && available > 0 {
                    continue;
                }
                if discard == 0 && available > offered {
                    records += 1;
                    continue;
                }
                filled += read_more(tcp, &mut incoming, filled).await?;
            }
            Step::Done => {
                if !outgoing.is_empty() {
                    tcp.write_all(&outgoing).await?;
                }
                incoming.truncate(filled);
                return Ok(incoming);
            }
            Step::Failed(error) => {
                send_alert(tcp, conn, &mut incoming[..filled], &mut outgoing).await;
                return Err(invalid(error));
            }
            Step::Unexpected(state) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS state during the handshake: {state}"),
                ));
            }
        }
    }
}

/// Hands rustls `incoming` (whole records) and queues what it wants sent in `outgoing`.
/// Returns what to do next, and how many bytes of `incoming` rustls is done with. (Apart
/// from [`drive`] because rustls's state borrows both the connection and `incoming`: they
/// are free again once the step is decided.)
fn advance<C: Unbuffered>(
    conn: &mut C,
    incoming: &mut [u8],
    outgoing: &mut Vec<u8>,
) -> io::Result<(Step, usize)> {
    let status = conn.process(incoming);
    let discard = status.discard;
    let step = match status.state {
        Err(error) => Step::Failed(error),
        Ok(ConnectionState::EncodeTlsData(mut data)) => {
            encode(outgoing, |buf| data.encode(buf))?;
            Step::Again
        }
        Ok(ConnectionState::TransmitTlsData(data)) => {
            data.done();
            Step::Transmit
        }
        Ok(ConnectionState::BlockedHandshake) => Step::Read,
        Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
        Ok(other) => Step::Unexpected(format!("{other:?}")),
    };
    Ok((step, discard))
}

/// Appends what `encode` writes to `outgoing`, growing it as rustls asks.
fn encode(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let at = outgoing.len();
    outgoing.resize(at + MAX_RECORD, 0);
    let written = match encode(&mut outgoing[at..]) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(needed)) => {
            outgoing.resize(at + needed.required_size, 0);
            encode(&mut outgoing[at..]).map_err(invalid)?
        }
        Err(error) => return Err(invalid(error)),
    };
    outgoing.truncate(at + written);
    Ok(())
}

/// Reads more of the handshake; the peer closing now is an error.
async fn read_more(
    tcp: &mut TcpStream,
    incoming: &mut Vec<u8>,
    filled: usize,
) -> io::Result<usize> {
    if incoming.len() - filled < MAX_RECORD {
        if incoming.len() >= MAX_HANDSHAKE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS handshake messages larger than 256 KiB",
            ));
        }
        incoming.resize(incoming.len() * 2, 0);
    }
    match tcp.read(&mut incoming[filled..]).await? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection during the TLS handshake",
        )),
        n => Ok(n),
    }
}

/// After a failure, sends the alert rustls queued (best effort: the peer may be gone).
/// rustls hands the alert out before it looks at `incoming` again, which must still be the
/// buffer it was given (less what it said to discard).
async fn send_alert<C: Unbuffered>(
    tcp: &mut TcpStream,
    conn: &mut C,
    incoming: &mut [u8],
    outgoing: &mut Vec<u8>,
) {
    outgoing.clear();
    let status = conn.process(incoming);
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state
        && encode(outgoing, |buf| data.encode(buf)).is_ok()
    {
        let _ = tcp.write_all(outgoing).await;
    }
}

/// The length of the first `limit` whole records at the start of `buf`. Bytes that are
/// not TLS at all are all offered, so that rustls refuses them at once.
fn whole_records(buf: &[u8], limit: usize) -> usize {
    let mut at = 0;
    for _ in 0..limit {
        let Some(header) = buf.get(at..at + HEADER) else {
            break;
        };
        if !(20..=24).contains(&header[0]) || header[1] != 3 {
            return buf.len();
        }
        let len = HEADER + usize::from(u16::from_be_bytes([header[3], header[4]]));
        if buf.len() < at + len {
            break;
        }
        at += len;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::whole_records;

    #[test]
    fn whole_records_stop_at_a_partial_one() {
        let buf = [22, 3, 3, 0, 2, 9, 9, 23, 3, 3, 0, 1, 7, 23, 3, 3, 0, 5, 1];
        assert_eq!(whole_records(&buf, 1), 7);
        assert_eq!(whole_records(&buf, 2), 13);
        assert_eq!(whole_records(&buf, usize::MAX), 13);
        assert_eq!(whole_records(&buf[..3], 9), 0);
        // Not TLS: everything goes to rustls, which says so.
        assert_eq!(whole_records(b"MPRX hello", 1), 10);
    }
}
