//! The retention of a direction whose local end is a plain socket, kept in pipes: in the
//! clear the local end's bytes never enter user space, as with the relay's splice; over TLS
//! they enter it only to be sealed, a piece at a time.
//!
//! ```text
//!  local end ──splice──► inbound ──splice──► peer (a plain socket; read through a buffer
//!                           │                      into TLS, which must seal the bytes)
//!                           │ tee(2): the same pages, referenced again
//!                           ▼
//!                 chain: [pipe][pipe]…[pipe] ◄─ tail takes what is tee'd
//!                    │ ack: splice the head's acknowledged bytes to /dev/null
//!                    └ replay: tee each pipe whole into a spare one, send that to the peer
//! ```
//!
//! The pages are the kernel's (the local end's socket buffers, handed over by splice), and
//! no one writes to them again: unlike the retention's own memory handed over with
//! vmsplice(2), a page still waiting in the peer's QEMU's socket after the peer
//! acknowledged it cannot be rewritten (see `ends`).
//!
//! tee(2) duplicates from the head of a pipe and never skips, so the inbound pipe's tee'd
//! bytes are always sent before more are tee'd, and a whole pipe of the chain is tee'd at
//! once into a spare pipe of the same size for a replay.
//!
//! **Bounds.** At most `limit` bytes are kept, in at most twice as many pipes as `limit`
//! needs at the system's pipe size: a pipe holds fewer bytes than its size when the local
//! end wrote small pieces (a slot per piece), and the chain stops growing there, which reads
//! as a full retention until the peer acknowledges.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice, tee};

use super::ends::{self, Out, PourError, pour};
use super::retention::RetentionError;
use super::types::{ResumeError, retention_failed};
use crate::relay::fd::{FLAGS, Pipe};
use crate::transport::Socket;

/// Kept bytes in a chain of pipes, and the inbound pipe they pass through.
pub(super) struct Pipes {
    /// Oldest first, each with the bytes it holds.
    chain: VecDeque<(Pipe, usize)>,
    /// Where a replay tees each pipe of the chain, whole.
    spare: Pipe,
    /// Emptied pipes of the chain, kept for its next ones (at most [`RECYCLED`]).
    recycled: Vec<Pipe>,
    /// The most pipes the chain may have.
    most: usize,
    limit: usize,
    /// The stream offset of the first kept byte.
    base: u64,
    /// Bytes kept in the chain.
    len: usize,
    null: File,
    /// Bytes from the local end: the first `teed` are kept and still to be sent.
    inbound: Pipe,
    in_len: usize,
    teed: usize,
}

/// How many emptied pipes are kept for the chain's next ones: the chain moves on by a pipe
/// at a time (one emptied at its head, one begun at its tail), so two spare a pipe(2),
/// fcntl(2) and close(2) per pipe's worth of bytes.
const RECYCLED: usize = 2;

fn new_pipe() -> io::Result<Pipe> {
    Pipe::new(0)
}

/// A pipe of the chain: never larger than the spare pipe a replay tees it into whole (a
/// user over its pipe limits gets smaller pipes later than sooner).
fn chain_pipe(spare: &Pipe) -> io::Result<Pipe> {
    let mut pipe = new_pipe()?;
    if pipe.capacity > spare.capacity {
        let size = i32::try_from(spare.capacity).unwrap_or(i32::MAX);
        let set = fcntl(pipe.write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size))?;
        pipe.capacity = set as usize;
    }
    Ok(pipe)
}

fn discard(error: io::Error) -> ResumeError {
    retention_failed("discard acknowledged bytes", error)
}

impl Pipes {
    pub(super) fn new(limit: usize) -> io::Result<Pipes> {
        let spare = new_pipe()?;
        let inbound = new_pipe()?;
        let most = limit.div_ceil(spare.capacity).max(1) * 2;
        Ok(Pipes {
            chain: VecDeque::from([(chain_pipe(&spare)?, 0)]),
            spare,
            recycled: Vec::new(),
            most,
            limit,
            base: 0,
            len: 0,
            null: File::options().write(true).open("/dev/null")?,
            inbound,
            in_len: 0,
            teed: 0,
        })
    }

    pub(super) fn sent(&self) -> u64 {
        self.base + self.len as u64
    }

    pub(super) fn acked(&self) -> u64 {
        self.base
    }

    pub(super) fn kept(&self) -> usize {
        self.len
    }

    /// Room for more from the local end: nothing waits in the inbound pipe, and fewer than
    /// `limit` bytes are kept.
    pub(super) fn room(&self) -> usize {
        if self.in_len > 0 {
            return 0;
        }
        self.limit.saturating_sub(self.len)
    }

    /// Bytes read from the local end and not kept yet (the chain was full).
    pub(super) fn waiting(&self) -> bool {
        self.in_len > self.teed
    }

    /// The peer delivered everything before `upto`: its bytes go to /dev/null.
    pub(super) fn ack(&mut self, upto: u64) -> Result<(), ResumeError> {
        let sent = self.sent();
        if upto > sent {
            let claimed = upto;
            return Err(RetentionError::BeyondSent { claimed, sent }.into());
        }
        let mut left = upto.saturating_sub(self.base) as usize;
        while left > 0 {
            let Some((pipe, held)) = self.chain.front_mut() else {
                break;
            };
            let n = splice(&pipe.read, None, &self.null, None, left.min(*held), FLAGS);
            let n = n.map_err(|e| discard(e.into()))?;
            if n == 0 {
                return Err(discard(io::ErrorKind::UnexpectedEof.into()));
            }
            (*held, left, self.len, self.base) =
                (*held - n, left - n, self.len - n, self.base + n as u64);
            if *held == 0 && self.chain.len() > 1 {
                let emptied = self.chain.pop_front();
                if self.recycled.len() < RECYCLED {
                    self.recycled.extend(emptied.map(|(pipe, _)| pipe));
                }
            }
        }
        Ok(())
    }

    /// A new connection: the inbound pipe's kept bytes will be replayed from the chain, so
    /// they go; those not kept yet stay.
    pub(super) fn restart(&mut self) -> Result<(), ResumeError> {
        while self.teed > 0 {
            let n = splice(&self.inbound.read, None, &self.null, None, self.teed, FLAGS);
            let n = n.map_err(|e| discard(e.into()))?;
            if n == 0 {
                return Err(discard(io::ErrorKind::UnexpectedEof.into()));
            }
            (self.teed, self.in_len) = (self.teed - n, self.in_len - n);
        }
        Ok(())
    }

    /// Sends every kept byte out, oldest first (after [`ack`](Self::ack) of the peer's
    /// offset, that is all of them from it).
    pub(super) async fn replay(&self, out: &mut Out<'_>) -> Result<u64, PourError> {
        let spare = &self.spare;
        // A replay cut short left bytes here; they are in the chain.
        while splice(&spare.read, None, &self.null, None, spare.capacity, FLAGS)
            .is_ok_and(|n| n > 0)
        {}
        let mut sent = 0;
        for (pipe, held) in &self.chain {
            if *held == 0 {
                continue;
            }
            let copied = tee(
                &pipe.read,
                &spare.write,
                *held,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(|errno| PourError::Kept(errno.into()))?;
            if copied != *held {
                return Err(PourError::Kept(io::Error::other(format!(
                    "tee gave {copied} of a kept pipe's {held} bytes"
                ))));
            }
            pour(spare, out, copied, |_| {}).await?;
            sent += copied as u64;
        }
        Ok(sent)
    }

    /// Reads from the local end into the empty inbound pipe, at most the room left; 0 at its
    /// end of stream.
    pub(super) async fn fill(&mut self, local: Socket<'_>) -> io::Result<usize> {
        let n = ends::fill(&self.inbound, local, self.room()).await?;
        self.in_len = n;
        Ok(n)
    }

    /// Keeps the inbound pipe's bytes not kept yet, as many as the chain takes; how many.
    /// Only once the ones kept before were sent: tee starts at the pipe's head.
    pub(super) fn keep(&mut self) -> Result<usize, ResumeError> {
        debug_assert_eq!(self.teed, 0, "kept bytes are sent before more are kept");
        let want = self.in_len - self.teed;
        loop {
            let Some((tail, held)) = self.chain.back_mut() else {
                return Ok(0);
            };
            match tee(
                &self.inbound.read,
                &tail.write,
                want,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(n) if n > 0 => {
                    *held += n;
                    (self.len, self.teed) = (self.len + n, n);
                    return Ok(n);
                }
                Ok(_) | Err(Errno::EAGAIN) if self.chain.len() < self.most => {
                    let pipe = match self.recycled.pop() {
                        Some(pipe) => pipe,
                        None => chain_pipe(&self.spare)
                            .map_err(|error| retention_failed("pipe", error))?,
                    };
                    self.chain.push_back((pipe, 0));
                }
                Ok(_) | Err(Errno::EAGAIN) => return Ok(0),
                Err(e) => return Err(retention_failed("tee", e.into())),
            }
        }
    }

    /// Sends the kept bytes at the inbound pipe's head out; on failure the bytes left are
    /// kept all the same (a replay sends them).
    pub(super) async fn send(&mut self, out: &mut Out<'_>) -> Result<(), PourError> {
        let Pipes {
            inbound,
            in_len,
            teed,
            ..
        } = self;
        let held = *teed;
        // Counted piece by piece: a session cut mid-way leaves the counts true.
        let sent = |n| {
            *teed -= n;
            *in_len -= n;
        };
        pour(inbound, out, held, sent).await
    }
}
