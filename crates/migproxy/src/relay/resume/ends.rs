//! A stream's two directions, each driven by its own half of the engine, and the kernel's
//! short cuts between them where both ends are plain sockets.
//!
//! A plain socket is shared rather than split: splice(2) and vmsplice(2) need its file
//! descriptor and tokio's readiness for it, which a split half hides. Any other stream (TLS,
//! in memory) is split and carried by copying.
//!
//! - **Down** (peer to local end) needs no retention: what it writes to the local end is
//!   what it acknowledges. Between two sockets it goes peer → pipe → local end with
//!   splice(2), counting what each splice into the local end delivered.
//! - **Up** (local end to peer) keeps every byte until the peer acknowledges it: from a
//!   plain socket in pipes (`pipes`: spliced in, tee(2)'d, then spliced out to a plain
//!   socket, or read through a small buffer into TLS: [`Out`]), otherwise (a tapped
//!   direction) read into the retention's memory and written from it. Not vmsplice(2)
//!   from that memory: it hands the retention's own pages to the kernel, and an
//!   acknowledgement does not mean the kernel let go of them. Spliced on, they can wait in
//!   the peer's QEMU's socket (on one machine, loopback passes pages from socket to socket)
//!   after the peer acknowledged them, while the retention rewrites them with newer bytes;
//!   the test `a_slow_reader_behind_a_direct_link_…` (tests/resume.rs) caught exactly that.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::splice;
use nix::sys::socket::{MsgFlags, send};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

use super::super::fd::{FLAGS, Pipe};
use crate::transport::{Socket, Stream};

/// What reads one direction of a stream.
pub(super) enum Reader {
    Socket(Arc<Plain>),
    Half(ReadHalf<Stream>),
}

/// What writes the other direction of the same stream.
pub(super) enum Writer {
    Socket(Arc<Plain>),
    Half(WriteHalf<Stream>),
}

/// A plain socket, shared by its two directions.
pub(super) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Plain {
    fn socket(&self) -> Socket<'_> {
        match self {
            Plain::Tcp(s) => Socket::Tcp(s),
            Plain::Unix(s) => Socket::Unix(s),
        }
    }
}

/// `stream`'s two directions: the socket shared by both, or the stream's split halves.
pub(super) fn halves(stream: Stream) -> (Reader, Writer) {
    let plain = match stream {
        Stream::Tcp(s) => Plain::Tcp(s),
        Stream::Unix(s) => Plain::Unix(s),
        other => {
            let (read, write) = tokio::io::split(other);
            return (Reader::Half(read), Writer::Half(write));
        }
    };
    let shared = Arc::new(plain);
    (Reader::Socket(Arc::clone(&shared)), Writer::Socket(shared))
}

/// Waits for `interest` on `socket` and runs `f`, until it does not find it would block.
async fn ready<R>(
    socket: Socket<'_>,
    interest: Interest,
    mut f: impl FnMut() -> io::Result<R>,
) -> io::Result<R> {
    loop {
        if interest.is_readable() {
            socket.readable().await?;
        } else {
            socket.writable().await?;
        }
        match socket.try_io(interest, &mut f) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

impl Reader {
    pub(super) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Half(half) => half.read(buf).await,
            Reader::Socket(plain) => {
                let socket = plain.socket();
                let fd = socket.fd().as_raw_fd();
                ready(socket, Interest::READABLE, || {
                    Ok(nix::unistd::read(fd, &mut *buf)?)
                })
                .await
            }
        }
    }

    pub(super) async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read(&mut buf[done..]).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => done += n,
            }
        }
        Ok(())
    }

    /// The socket under this reader, if it is one.
    pub(super) fn socket(&self) -> Option<Socket<'_>> {
        match self {
            Reader::Socket(plain) => Some(plain.socket()),
            Reader::Half(_) => None,
        }
    }
}

impl Writer {
    pub(super) async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Writer::Half(half) => half.write(buf).await,
            Writer::Socket(plain) => {
                let socket = plain.socket();
                let fd = socket.fd().as_raw_fd();
                // MSG_NOSIGNAL: a vanished reader is an EPIPE to report, not a signal.
                let sent = || Ok(send(fd, buf, MsgFlags::MSG_NOSIGNAL)?);
                ready(socket, Interest::WRITABLE, sent).await
            }
        }
    }

    pub(super) async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self) -> io::Result<()> {
        match self {
            Writer::Half(half) => half.flush().await,
            Writer::Socket(_) => Ok(()),
        }
    }

    /// Ends this direction (a FIN), the other one flowing on.
    pub(super) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Writer::Half(half) => half.shutdown().await,
            Writer::Socket(plain) => plain.socket().shutdown_write(),
        }
    }

    /// The socket under this writer, if it is one.
    pub(super) fn socket(&self) -> Option<Socket<'_>> {
        match self {
            Writer::Socket(plain) => Some(plain.socket()),
            Writer::Half(_) => None,
        }
    }
}

/// EINVAL from splice: this pair of files cannot be spliced; copying still works.
pub(super) fn refused(error: &io::Error) -> bool {
    error.raw_os_error() == Some(Errno::EINVAL as i32)
}

/// A pipe for one session's splices, or none (copying instead) when the system has none to
/// give. A new one each session: bytes a broken session left in one are not the peer's next.
pub(super) fn pipe(size: usize) -> Option<Pipe> {
    match Pipe::new(size) {
        Ok(pipe) => Some(pipe),
        Err(error) => {
            tracing::warn!(%error, "no pipe for splice: a resumable channel copies instead");
            None
        }
    }
}

/// Splices the `held` bytes in `pipe` into `to`, telling `moved` each splice's bytes; on
/// failure, how many were left with it.
pub(super) async fn drain(
    pipe: &Pipe,
    to: Socket<'_>,
    held: usize,
    mut moved: impl FnMut(usize),
) -> Result<(), (usize, io::Error)> {
    let mut left = held;
    while left > 0 {
        let spliced = ready(to, Interest::WRITABLE, || {
            Ok(splice(&pipe.read, None, to.fd(), None, left, FLAGS)?)
        });
        match spliced.await {
            Ok(0) => return Err((left, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                left -= n;
                moved(n);
            }
            Err(e) => return Err((left, e)),
        }
    }
    Ok(())
}

/// Where bytes waiting in a pipe go out to the peer: spliced into a plain socket, or read
/// through a buffer into any other stream (TLS, which must see them to seal them).
pub(super) enum Out<'a> {
    Spliced(Socket<'a>),
    Copied(&'a mut Writer, &'a mut [u8]),
}

impl Writer {
    /// How bytes in a pipe reach this writer: `buf` is the copy's buffer where it is no
    /// plain socket.
    pub(super) fn out<'a>(&'a mut self, buf: &'a mut [u8]) -> Out<'a> {
        match self {
            Writer::Socket(plain) => Out::Spliced(plain.socket()),
            other => Out::Copied(other, buf),
        }
    }
}

/// Why kept bytes did not all go out: this host's pipes failed (its retention: the channel
/// cannot go on), or the peer's connection did (resume on another).
#[derive(Debug)]
pub(super) enum PourError {
    Kept(io::Error),
    Peer(io::Error),
}

/// Sends the `held` bytes in `pipe` out, telling `moved` each piece taken from the pipe
/// (read from it, when copied, even if the write then fails: the pipe no longer has it).
pub(super) async fn pour(
    pipe: &Pipe,
    out: &mut Out<'_>,
    held: usize,
    mut moved: impl FnMut(usize),
) -> Result<(), PourError> {
    let (writer, buf) = match out {
        Out::Spliced(socket) => {
            let drained = drain(pipe, *socket, held, moved).await;
            return drained.map_err(|(_, e)| spliced_blame(e));
        }
        Out::Copied(_, []) => {
            let error = io::Error::other("no buffer to copy the kept bytes through");
            return Err(PourError::Kept(error));
        }
        Out::Copied(writer, buf) => (writer, buf),
    };
    let mut left = held;
    while left > 0 {
        let want = left.min(buf.len());
        // The bytes are in the pipe: the read does not wait. Empty (EAGAIN, its write end
        // being open) means this host counted bytes it does not hold.
        let short = || {
            let short = format!("a kept pipe ran out {left} bytes short of what was counted");
            PourError::Kept(io::Error::new(io::ErrorKind::UnexpectedEof, short))
        };
        let got = match nix::unistd::read(pipe.read.as_raw_fd(), &mut buf[..want]) {
            Ok(0) | Err(Errno::EAGAIN) => return Err(short()),
            Ok(got) => got,
            Err(errno) => return Err(PourError::Kept(errno.into())),
        };
        moved(got);
        left -= got;
        writer
            .write_all(&buf[..got])
            .await
            .map_err(PourError::Peer)?;
    }
    writer.flush().await.map_err(PourError::Peer)
}

/// Whose a failed splice from this host's pipe into the peer's socket was: a file that is no
/// pipe or cannot be spliced, a bad descriptor or address, no memory — this host's; anything
/// else (reset, broken pipe, timed out, unreachable) the connection's, to resume from.
fn spliced_blame(error: io::Error) -> PourError {
    const HERE: [Errno; 5] = [
        Errno::EBADF,
        Errno::EINVAL,
        Errno::EFAULT,
        Errno::ENOMEM,
        Errno::ESPIPE,
    ];
    match error.raw_os_error() {
        Some(errno) if HERE.contains(&Errno::from_raw(errno)) => PourError::Kept(error),
        _ => PourError::Peer(error),
    }
}

/// Splices what `from` has, at most `most` bytes, into the empty `pipe`; 0 at end of stream.
pub(super) async fn fill(pipe: &Pipe, from: Socket<'_>, most: usize) -> io::Result<usize> {
    let most = most.min(pipe.capacity);
    ready(from, Interest::READABLE, || {
        Ok(splice(from.fd(), None, &pipe.write, None, most, FLAGS)?)
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A real pipe holding `bytes`, and the writer of a stream with no socket under it (as
    /// TLS), whose other end is returned.
    fn pipe_and_copier(bytes: &[u8]) -> (Pipe, Writer, tokio::io::DuplexStream) {
        let pipe = Pipe::new(0).unwrap();
        std::fs::File::from(pipe.write.try_clone().unwrap())
            .write_all(bytes)
            .unwrap();
        let (near, far) = tokio::io::duplex(64);
        let (_, writer) = halves(Stream::Other(Box::new(near)));
        (pipe, writer, far)
    }

    #[tokio::test]
    async fn kept_bytes_copied_out_blame_the_pipe_or_the_peer_as_it_was() {
        // Copied through a buffer, in order.
        let (pipe, mut writer, mut far) = pipe_and_copier(b"0123456789");
        let mut buf = [0u8; 4];
        let mut moved = 0;
        pour(&pipe, &mut writer.out(&mut buf), 10, |n| moved += n)
            .await
            .unwrap();
        let mut got = [0u8; 10];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!((&got, moved), (b"0123456789", 10));
        // The pipe holds fewer bytes than counted: this host's retention is at fault.
        let (pipe, mut writer, _far) = pipe_and_copier(b"01234");
        let short = pour(&pipe, &mut writer.out(&mut buf), 10, |_| {}).await;
        assert!(
            matches!(&short, Err(PourError::Kept(e)) if e.to_string().contains("5 bytes short")),
            "{short:?}"
        );
        // The peer's stream is gone: its failure, to resume from.
        let (pipe, mut writer, far) = pipe_and_copier(b"01234");
        drop(far);
        let gone = pour(&pipe, &mut writer.out(&mut buf), 5, |_| {}).await;
        assert!(matches!(gone, Err(PourError::Peer(_))), "{gone:?}");
        // No buffer to copy through is a defect of this host's, not the peer's.
        let (pipe, mut writer, _far) = pipe_and_copier(b"01234");
        let none = pour(&pipe, &mut writer.out(&mut []), 5, |_| {}).await;
        assert!(matches!(none, Err(PourError::Kept(_))), "{none:?}");
    }

    /// A real pipe holding `bytes`, and the writer of a unix socket, whose other end is
    /// returned.
    fn pipe_and_socket(bytes: &[u8]) -> (Pipe, Writer, UnixStream) {
        let pipe = Pipe::new(0).unwrap();
        std::fs::File::from(pipe.write.try_clone().unwrap())
            .write_all(bytes)
            .unwrap();
        let (near, far) = UnixStream::pair().unwrap();
        let (_, writer) = halves(Stream::Unix(near));
        (pipe, writer, far)
    }

    #[tokio::test]
    async fn kept_bytes_spliced_out_blame_the_pipe_or_the_peer_as_it_was() {
        // Spliced, in order.
        let (pipe, mut writer, mut far) = pipe_and_socket(b"0123456789");
        let mut moved = 0;
        pour(&pipe, &mut writer.out(&mut []), 10, |n| moved += n)
            .await
            .unwrap();
        let mut got = [0u8; 10];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!((&got, moved), (b"0123456789", 10));
        // What should be the pipe is a file that cannot be spliced (EINVAL): this host's.
        let (mut pipe, mut writer, _far) = pipe_and_socket(b"01234");
        pipe.read = std::fs::File::open("/dev/zero").unwrap().into();
        let here = pour(&pipe, &mut writer.out(&mut []), 5, |_| {}).await;
        assert!(matches!(here, Err(PourError::Kept(_))), "{here:?}");
        // The peer's socket is gone (EPIPE): the connection's, to resume from.
        let (pipe, mut writer, far) = pipe_and_socket(b"01234");
        drop(far);
        let gone = pour(&pipe, &mut writer.out(&mut []), 5, |_| {}).await;
        assert!(matches!(gone, Err(PourError::Peer(_))), "{gone:?}");
    }
}
