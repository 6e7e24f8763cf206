//! One direction between two plain sockets: splice(2) through a pipe, or read/write through a
//! buffer when splice is refused.
//!
//! Both are the same loop — fill a carrier from the source, drain it into the destination —
//! so that falling back from the pipe to the buffer mid-stream loses nothing: the bytes
//! already in the pipe are read out into the buffer first. Every syscall is non-blocking and
//! driven by tokio readiness; `try_io` clears readiness on `EAGAIN`, so an await waits for
//! the kernel rather than spinning.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{MsgFlags, send};
use tokio::io::Interest;

use super::counters::Counters;
use super::pump::{Direction, Op, Options, PumpError, TapFn, Turn};
use crate::transport::Socket;

/// Moves one direction until end of stream, then shuts the destination's write side.
pub(super) async fn pump(
    src: Socket<'_>,
    dst: Socket<'_>,
    direction: Direction,
    counters: &Counters,
    options: &Options,
    tap: Option<TapFn>,
) -> Result<(), PumpError> {
    // A tapped direction must pass through user space to be seen.
    let mut carrier = match tap {
        Some(_) => Carrier::buffer(options.copy_buffer),
        None => Carrier::new(options),
    };
    let mut turn = Turn::new();
    loop {
        let filled = fill(&src, &mut carrier).await?;
        if filled == 0 {
            counters.mark_end(direction);
            break;
        }
        if let (Some(TapFn(tap)), Carrier::Buffer { buf, .. }) = (&tap, &carrier) {
            tap(&buf[..filled]);
        }
        counters.hold(direction, filled);
        drain(&dst, &mut carrier, filled, direction, counters).await?;
        turn.take().await;
    }
    dst.shutdown_write().map_err(|error| PumpError {
        op: Op::Shutdown,
        error,
        held: 0,
    })
}

/// Reads once from `src` into the (empty) carrier; 0 means end of stream.
async fn fill(src: &Socket<'_>, carrier: &mut Carrier) -> Result<usize, PumpError> {
    loop {
        src.readable().await.map_err(PumpError::read)?;
        match src.try_io(Interest::READABLE, || carrier.fill_from(src.fd())) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if is_splice_refused(&e, carrier) => carrier.fall_back(0, src)?,
            Err(e) => return Err(PumpError::read(e)),
        }
    }
}

/// Writes all `filled` bytes held by the carrier to `dst`.
async fn drain(
    dst: &Socket<'_>,
    carrier: &mut Carrier,
    filled: usize,
    direction: Direction,
    counters: &Counters,
) -> Result<(), PumpError> {
    let mut left = filled;
    while left > 0 {
        dst.writable()
            .await
            .map_err(|e| PumpError::write(e).holding(left))?;
        match dst.try_io(Interest::WRITABLE, || carrier.drain_to(dst.fd(), left)) {
            // A socket that takes nothing while writable would make this loop spin.
            Ok(0) => return Err(PumpError::write(io::ErrorKind::WriteZero.into()).holding(left)),
            Ok(n) => {
                left -= n;
                counters.record(direction, n, carrier.is_pipe());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if is_splice_refused(&e, carrier) => carrier.fall_back(left, dst)?,
            Err(e) => return Err(PumpError::write(e).holding(left)),
        }
    }
    Ok(())
}

/// EINVAL from splice means this pair of files cannot be spliced; copying still works.
fn is_splice_refused(error: &io::Error, carrier: &Carrier) -> bool {
    carrier.is_pipe() && error.raw_os_error() == Some(Errno::EINVAL as i32)
}

/// Where bytes rest between the two sockets.
enum Carrier {
    Pipe(Pipe),
    Buffer {
        buf: Box<[u8]>,
        /// Bytes held, from the start of `buf`.
        len: usize,
    },
}

impl Carrier {
    fn new(options: &Options) -> Carrier {
        if options.zero_copy {
            match Pipe::new(options.copy_buffer) {
                Ok(pipe) => return Carrier::Pipe(pipe),
                Err(error) => tracing::warn!(%error, "no pipe for splice, copying instead"),
            }
        }
        Carrier::buffer(options.copy_buffer)
    }

    fn buffer(size: usize) -> Carrier {
        Carrier::Buffer {
            buf: vec![0; size].into_boxed_slice(),
            len: 0,
        }
    }

    fn is_pipe(&self) -> bool {
        matches!(self, Carrier::Pipe(_))
    }

    fn fill_from(&mut self, src: BorrowedFd<'_>) -> io::Result<usize> {
        match self {
            Carrier::Pipe(pipe) => Ok(splice(src, None, &pipe.write, None, pipe.capacity, FLAGS)?),
            Carrier::Buffer { buf, len, .. } => {
                *len = nix::unistd::read(src.as_raw_fd(), buf)?;
                Ok(*len)
            }
        }
    }

    /// Writes some of the last `left` bytes held.
    fn drain_to(&mut self, dst: BorrowedFd<'_>, left: usize) -> io::Result<usize> {
        match self {
            Carrier::Pipe(pipe) => Ok(splice(&pipe.read, None, dst, None, left, FLAGS)?),
            // MSG_NOSIGNAL: a vanished peer is an EPIPE to report, not a signal to die of.
            Carrier::Buffer { buf, len, .. } => Ok(send(
                dst.as_fd().as_raw_fd(),
                &buf[*len - left..*len],
                MsgFlags::MSG_NOSIGNAL,
            )?),
        }
    }

    /// Switches from the pipe to a buffer, keeping the `held` bytes still in the pipe.
    fn fall_back(&mut self, held: usize, on: &Socket<'_>) -> Result<(), PumpError> {
        let Carrier::Pipe(pipe) = self else {
            return Ok(());
        };
        tracing::debug!(fd = ?on.fd(), "splice refused (EINVAL), copying instead");
        let mut next = Carrier::buffer(pipe.copy_size);
        if let Carrier::Buffer { buf, len, .. } = &mut next {
            pipe.read_exact(&mut buf[..held])
                .map_err(|error| PumpError {
                    op: Op::Splice,
                    error,
                    held: held as u64,
                })?;
            *len = held;
        }
        *self = next;
        Ok(())
    }
}

/// Flags for every splice: move pages rather than copy them, never block on the pipe, and
/// never `SPLICE_F_MORE`, which corks the socket like `TCP_CORK` and would hold back the
/// small return-path messages.
pub(super) const FLAGS: SpliceFFlags =
    SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// A non-blocking pipe, grown as large as the system allows.
pub(super) struct Pipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
    pub(super) capacity: usize,
    /// Copy buffer size to fall back to (the relay's `copy_buffer`), never less than what
    /// the pipe may hold.
    copy_size: usize,
}

impl Pipe {
    pub(super) fn new(copy_buffer: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = grow(&write);
        Ok(Pipe {
            read,
            write,
            capacity,
            copy_size: copy_buffer.max(capacity),
        })
    }

    /// Reads exactly `buf.len()` bytes that are known to be in the pipe.
    pub(super) fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match nix::unistd::read(self.read.as_raw_fd(), &mut buf[done..])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => done += n,
            }
        }
        Ok(())
    }
}

/// Sets the pipe to the system maximum, halving on refusal (an unprivileged user over
/// `pipe-user-pages-soft` gets EPERM); returns the size in effect.
fn grow(pipe: &OwnedFd) -> usize {
    let mut size = pipe_max_size();
    while size >= DEFAULT_PIPE {
        if let Ok(actual) = fcntl(pipe.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size as i32)) {
            return actual as usize;
        }
        size /= 2;
    }
    DEFAULT_PIPE
}

const DEFAULT_PIPE: usize = 64 * 1024;

fn pipe_max_size() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024 * 1024)
    })
}
