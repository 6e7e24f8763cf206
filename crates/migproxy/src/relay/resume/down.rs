//! Peer to local end: what the peer sends, written to the local end and counted as
//! delivered write by write; between two plain sockets with splice(2) (see `ends`).

use std::io;

use tokio::sync::watch;

use super::ends::{self, Reader, Writer};
use migproxy_proto::{PROGRESS_LEN, Progress};

use super::retention::RetentionError;
use super::types::{Cut, Observe, Options, ResumeError, local};
use crate::relay::fd::Pipe;

/// Peer to local end.
pub(super) struct Down {
    pub(super) local: Writer,
    /// The peer's direction reached its end and the local end was told (a FIN).
    pub(super) ended: bool,
    pub(super) buf: Vec<u8>,
    pub(super) observe: Observe,
}

/// The peer's hello on a session's connection.
pub(super) enum Hello {
    /// Read before the session began.
    Read(Progress),
    /// The first connection's: it comes first among the peer's bytes.
    Unread,
}

impl Down {
    /// Writes what the peer sends to the local end, counting each write as it completes (a
    /// write cut short by a break counts only what it wrote: the peer sends the rest again).
    pub(super) async fn run(
        &mut self,
        mut peer: Reader,
        hello: Hello,
        announced: &mut watch::Receiver<Progress>,
        mine: &watch::Sender<Progress>,
        options: &Options,
    ) -> Result<(), Cut> {
        let mut end = match hello {
            Hello::Read(hello) => hello.end,
            Hello::Unread => first_hello(&mut peer).await?.end,
        };
        let mut pipe = match self.splices(&peer) {
            true => ends::pipe(self.buf.len()),
            false => None,
        };
        let delivered = || mine.borrow().delivered;
        loop {
            let n = self.take(&mut peer, &mut pipe).await?;
            if n == 0 {
                return self.finish(&mut end, announced, delivered(), options).await;
            }
            // Nothing past the announced end reaches the local end.
            let beyond = delivered() + n as u64;
            if let Some(end) = end.or(announced.borrow().end).filter(|end| beyond > *end) {
                let error = ResumeError::BeyondEnd {
                    end,
                    delivered: beyond,
                };
                return Err(Cut::Fatal(error));
            }
            // Held until the local end takes it: a local end that stops reading is seen.
            self.observe.counters.hold(self.observe.down(), n);
            let mut written = 0;
            if let Some(p) = &pipe {
                let Some(left) = self.deliver_spliced(p, n, mine).await? else {
                    continue;
                };
                // Refused mid-way: what the pipe still holds goes on by copying.
                let unread = p.read_exact(&mut self.buf[n - left..n]);
                unread.map_err(local("read the splice pipe"))?;
                written = n - left;
                pipe = None;
            }
            self.deliver_copied(written, n, mine).await?;
        }
    }

    /// Splices both ways where the peer and the local end are plain sockets, and nothing
    /// watches this direction's bytes (a tap needs them in user space).
    fn splices(&self, peer: &Reader) -> bool {
        let tapped = self.observe.tapped(self.observe.down());
        peer.socket().is_some() && self.local.socket().is_some() && !tapped
    }

    /// The peer's next bytes, in the pipe or the buffer; 0 at its end of stream.
    async fn take(&mut self, peer: &mut Reader, pipe: &mut Option<Pipe>) -> Result<usize, Cut> {
        if let (Some(p), Some(socket)) = (pipe.as_ref(), peer.socket()) {
            match ends::fill(p, socket, self.buf.len()).await {
                Err(e) if ends::refused(&e) => *pipe = None,
                filled => return filled.map_err(Cut::Broken),
            }
        }
        peer.read(&mut self.buf).await.map_err(Cut::Broken)
    }

    /// Splices the `n` bytes in `pipe` to the local end, counting each splice as delivered.
    /// Refused (EINVAL): how many bytes the pipe still holds.
    async fn deliver_spliced(
        &mut self,
        pipe: &Pipe,
        n: usize,
        mine: &watch::Sender<Progress>,
    ) -> Result<Option<usize>, Cut> {
        let Some(socket) = self.local.socket() else {
            return Ok(Some(n));
        };
        let down = self.observe.down();
        let counters = &self.observe.counters;
        let moved = |w: usize| {
            counters.record(down, w, true);
            mine.send_modify(|mine| mine.delivered += w as u64);
        };
        match ends::drain(pipe, socket, n, moved).await {
            Ok(()) => Ok(None),
            Err((left, e)) if ends::refused(&e) => Ok(Some(left)),
            Err((_, e)) => Err(local("write")(e)),
        }
    }

    /// Writes `buf[written..n]` to the local end, counting each write as delivered.
    async fn deliver_copied(
        &mut self,
        mut written: usize,
        n: usize,
        mine: &watch::Sender<Progress>,
    ) -> Result<(), Cut> {
        while written < n {
            let w = self.local.write(&self.buf[written..n]).await;
            let w = w.map_err(local("write"))?;
            if w == 0 {
                return Err(local("write")(io::ErrorKind::WriteZero.into()));
            }
            self.observe
                .moved(self.observe.down(), &self.buf[written..written + w]);
            written += w;
            mine.send_modify(|mine| mine.delivered += w as u64);
        }
        Ok(())
    }

    /// The peer's end of stream: the end, once it is the announced length (shuts the local
    /// end's write side down); a broken connection otherwise.
    async fn finish(
        &mut self,
        end: &mut Option<u64>,
        announced: &mut watch::Receiver<Progress>,
        delivered: u64,
        options: &Options,
    ) -> Result<(), Cut> {
        let known = end.is_some();
        let wait = async {
            let told = announced.wait_for(|peer| known || peer.end.is_some()).await;
            told.map(|peer| peer.end).ok().flatten()
        };
        if let Ok(told) = tokio::time::timeout(options.end_grace, wait).await {
            *end = end.or(told);
        }
        match *end {
            Some(end) if end == delivered => {
                if !self.ended {
                    self.observe.counters.mark_end(self.observe.down());
                    self.local.shutdown().await.map_err(local("shutdown"))?;
                    self.ended = true;
                }
                Ok(())
            }
            Some(end) if end < delivered => {
                Err(Cut::Fatal(ResumeError::BeyondEnd { end, delivered }))
            }
            _ => Err(Cut::Broken(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the peer closed the connection after {delivered} bytes, short of its end"),
            ))),
        }
    }
}

/// Reads the peer's hello at the head of the first connection: it can only say that
/// nothing was delivered (nothing was sent before).
async fn first_hello(peer: &mut Reader) -> Result<Progress, Cut> {
    let mut wire = [0; PROGRESS_LEN];
    peer.read_exact(&mut wire).await.map_err(Cut::Broken)?;
    let hello = Progress::decode(wire);
    if hello.delivered != 0 {
        let claimed = hello.delivered;
        return Err(RetentionError::BeyondSent { claimed, sent: 0 }.into());
    }
    Ok(hello)
}
