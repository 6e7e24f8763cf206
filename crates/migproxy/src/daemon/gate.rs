//! Admission before authentication: which connections may hold the daemon's attention while
//! they prove who they are (peer port and TLS API port alike). The reasoning is in
//! `docs/security.md` ("The peer port is hostile").
//!
//! ```text
//!  accept ──► waiting room ──first byte──► handshake slot ──hello / TLS done──► admitted
//!             (≤ max_silent, oldest of the      (≤ per_address from one address,
//!              busiest address dropped when      ≤ max in all; an address with an
//!              full; first-byte deadline)        attached migration may also use
//!                                                the reserve)   beyond: Busy
//! ```
//!
//! A connection that sends nothing costs a socket and a small task, and is dropped at the
//! first-byte deadline (or earlier, to make room): idle connections, however many, never
//! take a handshake slot. A legitimate peer speaks first (its hello, or its TLS ClientHello)
//! at once, so it leaves the waiting room within a round trip.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The limits of one listener's gate.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections in their handshake (past their first byte), at most, for any address.
    pub max: usize,
    /// Of those, from one source address.
    pub per_address: usize,
    /// Further slots only for addresses with an attached migration (its channels).
    pub reserved: usize,
    /// Connections that have not sent their first byte, at most.
    pub max_silent: usize,
    /// How long a connection may stay silent.
    pub first_byte: Duration,
}

/// The admission state of one listener.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    state: Mutex<State>,
    /// Refusals being delivered (the answer written, the peer's bytes drained): bounded,
    /// beyond it a refusal is written once and the connection closed at once.
    lingering: Arc<Semaphore>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Silent connections by address, oldest first.
    waiting: HashMap<IpAddr, VecDeque<(u64, CancellationToken)>>,
    silent: usize,
    /// General slots in use, by address and in all.
    by_address: HashMap<IpAddr, usize>,
    general: usize,
    reserve: usize,
    /// Attached control links by address.
    trusted: HashMap<IpAddr, usize>,
}

/// Why a connection gets no handshake slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{count} connections from {address} are already in their handshake, try again")]
    PerAddress { address: IpAddr, count: usize },
    #[error("{count} connections are already in their handshake, try again")]
    Full { count: usize },
}

/// A connection in the waiting room; leaves it when dropped.
#[derive(Debug)]
pub struct Waiting {
    gate: Arc<Gate>,
    address: IpAddr,
    id: u64,
    /// Cancelled when the connection is dropped to make room.
    pub evicted: CancellationToken,
}

/// How a connection left the waiting room.
#[derive(Debug)]
pub enum FirstByte {
    Heard,
    /// Closed (or failed) before a byte.
    Gone,
    Silent,
    Evicted,
}

/// A handshake slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    address: IpAddr,
    reserve: bool,
}

/// An attached control link's address, trusted (for the reserve) while this lives.
#[derive(Debug)]
pub struct Trust {
    gate: Arc<Gate>,
    address: IpAddr,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        let lingering = Arc::new(Semaphore::new(limits.max.max(1)));
        Arc::new(Gate {
            limits,
            state: Mutex::default(),
            lingering,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a new connection in the waiting room. When the room is full, the oldest silent
    /// connection of the address holding the most is dropped to make room; returns its
    /// address too.
    pub fn wait(self: &Arc<Self>, address: IpAddr) -> (Waiting, Option<IpAddr>) {
        let mut state = self.state();
        let mut evicted = None;
        if state.silent >= self.limits.max_silent.max(1) {
            let busiest = state
                .waiting
                .iter()
                .max_by_key(|(_, queue)| queue.len())
                .map(|(address, _)| *address);
            if let Some(busiest) = busiest
                && let Some((_, token)) = state.pop_oldest(busiest)
            {
                token.cancel();
                evicted = Some(busiest);
            }
        }
        state.next_id += 1;
        let id = state.next_id;
        let token = CancellationToken::new();
        state
            .waiting
            .entry(address)
            .or_default()
            .push_back((id, token.clone()));
        state.silent += 1;
        let waiting = Waiting {
            gate: Arc::clone(self),
            address,
            id,
            evicted: token,
        };
        (waiting, evicted)
    }

    /// A handshake slot for a connection from `address` that has spoken.
    pub fn enter(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Refused> {
        let mut state = self.state();
        let mine = state.by_address.get(&address).copied().unwrap_or(0);
        let refused = if mine >= self.limits.per_address {
            Refused::PerAddress {
                address,
                count: mine,
            }
        } else if state.general >= self.limits.max {
            Refused::Full {
                count: state.general + state.reserve,
            }
        } else {
            *state.by_address.entry(address).or_default() += 1;
            state.general += 1;
            return Ok(self.slot(address, false));
        };
        if state.trusted.contains_key(&address) && state.reserve < self.limits.reserved {
            state.reserve += 1;
            return Ok(self.slot(address, true));
        }
        Err(refused)
    }

    fn slot(self: &Arc<Self>, address: IpAddr, reserve: bool) -> Slot {
        Slot {
            gate: Arc::clone(self),
            address,
            reserve,
        }
    }

    /// Marks `address` as holding an attached migration while the result lives.
    pub fn trust(self: &Arc<Self>, address: IpAddr) -> Trust {
        *self.state().trusted.entry(address).or_default() += 1;
        Trust {
            gate: Arc::clone(self),
            address,
        }
    }

    /// Sends `answer` (a typed refusal, or a TLS alert) and closes: when few refusals are
    /// in flight, the peer's own bytes are read and dropped first (for at most a second),
    /// so that closing does not reset the connection under the answer.
    pub async fn refuse(&self, mut tcp: TcpStream, answer: &[u8]) {
        let Ok(_permit) = Arc::clone(&self.lingering).try_acquire_owned() else {
            let _ = tcp.try_write(answer);
            return;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tcp.write_all(answer).await?;
            close_after_answer(&mut tcp).await
        })
        .await;
    }
}

impl State {
    fn pop_oldest(&mut self, address: IpAddr) -> Option<(u64, CancellationToken)> {
        let queue = self.waiting.get_mut(&address)?;
        let oldest = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&address);
        }
        if oldest.is_some() {
            self.silent -= 1;
        }
        oldest
    }

    fn leave(&mut self, address: IpAddr, id: u64) {
        let Some(queue) = self.waiting.get_mut(&address) else {
            return;
        };
        if let Some(at) = queue.iter().position(|(i, _)| *i == id) {
            queue.remove(at);
            self.silent -= 1;
        }
        if queue.is_empty() {
            self.waiting.remove(&address);
        }
    }
}

impl Waiting {
    /// Waits for the connection's first byte, at most the first-byte deadline.
    pub async fn first_byte(&self, tcp: &TcpStream) -> FirstByte {
        let mut byte = [0u8; 1];
        tokio::select! {
            () = self.evicted.cancelled() => FirstByte::Evicted,
            () = tokio::time::sleep(self.gate.limits.first_byte) => FirstByte::Silent,
            peeked = tcp.peek(&mut byte) => match peeked {
                Ok(1..) => FirstByte::Heard,
                Ok(0) | Err(_) => FirstByte::Gone,
            },
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.gate.state().leave(self.address, self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        if self.reserve {
            state.reserve -= 1;
            return;
        }
        state.general -= 1;
        if let Some(count) = state.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                state.by_address.remove(&self.address);
            }
        }
    }
}

impl Drop for Trust {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        if let Some(count) = state.trusted.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                state.trusted.remove(&self.address);
            }
        }
    }
}

/// A fatal TLS `user_canceled` alert, sent in the clear before any handshake message: the
/// refusal a TLS peer can read without a handshake ("canceling the handshake for some
/// reason unrelated to a protocol failure", RFC 8446 §6.1). The source daemon reports it as
/// busy.
pub const TLS_BUSY_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 90];

/// Counts an accept that failed and logs it, rate-limited. Out of file descriptors
/// (`EMFILE`, `ENFILE`) is said so: every connection then waits in the listen backlog.
pub fn accept_failed(
    rejections: &super::rejections::Rejections,
    listener: &str,
    error: &io::Error,
) {
    let out_of_fds = error.raw_os_error().is_some_and(is_out_of_fds);
    let reason = if out_of_fds {
        "out_of_fds"
    } else {
        "accept_failed"
    };
    if let Some(suppressed) = rejections.record(reason) {
        let error = crate::human::OsError(error);
        if out_of_fds {
            tracing::warn!(
                suppressed,
                "{listener}: accept failed: {error}: the daemon is out of file descriptors \
                 (raise its RLIMIT_NOFILE, LimitNOFILE= under systemd)"
            );
        } else {
            tracing::warn!(suppressed, "{listener}: accept failed: {error}");
        }
    }
}

/// `EMFILE` (this process) or `ENFILE` (the whole system).
pub fn is_out_of_fds(errno: i32) -> bool {
    errno == nix::errno::Errno::EMFILE as i32 || errno == nix::errno::Errno::ENFILE as i32
}

/// A spare file descriptor, given up when the process runs out so that one pending
/// connection can be accepted, told why it is refused, and closed (instead of being left in
/// the backlog, where its peer sees nothing until it times out).
#[derive(Debug)]
pub struct Spare(Option<std::fs::File>);

impl Spare {
    pub fn new() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// After an accept failed with `error`: when it is out of fds and the spare is held,
    /// accepts one connection with the spare's slot and returns it; takes the spare back.
    pub async fn answer_one(
        &mut self,
        listener: &tokio::net::TcpListener,
        error: &io::Error,
    ) -> Option<TcpStream> {
        if !error.raw_os_error().is_some_and(is_out_of_fds) || self.0.is_none() {
            return None;
        }
        self.0 = None;
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        match accepted {
            Ok(Ok((stream, _))) => Some(stream),
            _ => None,
        }
    }

    /// Takes the spare back (once the refused connection is closed).
    pub fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

impl Default for Spare {
    fn default() -> Spare {
        Spare::new()
    }
}

/// Closes a connection that was just answered (a refusal): the writing side is shut down,
/// then what the peer still sends is read and dropped (64 KiB at most), so that closing
/// does not reset the connection under the answer. The caller bounds it in time.
pub async fn close_after_answer(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
) -> io::Result<()> {
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink).await? {
            0 => break,
            n => left -= n.min(left),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max: 3,
            per_address: 2,
            reserved: 1,
            max_silent: 3,
            first_byte: Duration::from_secs(2),
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_the_reserve_only_when_trusted() {
        let gate = Gate::new(limits());
        let a = [gate.enter(ip(2)).unwrap(), gate.enter(ip(2)).unwrap()];
        assert_eq!(
            gate.enter(ip(2)).unwrap_err(),
            Refused::PerAddress {
                address: ip(2),
                count: 2
            }
        );
        let b = gate.enter(ip(3)).unwrap();
        assert_eq!(gate.enter(ip(4)).unwrap_err(), Refused::Full { count: 3 });
        let trust = gate.trust(ip(4));
        let reserved = gate.enter(ip(4)).unwrap();
        assert!(gate.enter(ip(4)).is_err(), "the reserve is used up");
        drop((a, b, reserved, trust));
        let state = gate.state();
        assert_eq!(
            (state.general, state.reserve, state.by_address.len()),
            (0, 0, 0)
        );
        assert!(state.trusted.is_empty());
    }

    #[test]
    fn a_full_waiting_room_drops_the_oldest_of_the_busiest_address() {
        let gate = Gate::new(limits());
        let (first, _) = gate.wait(ip(2));
        let (second, _) = gate.wait(ip(2));
        let (other, _) = gate.wait(ip(1));
        let (newcomer, evicted) = gate.wait(ip(1));
        assert_eq!(evicted, Some(ip(2)));
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled() && !other.evicted.is_cancelled());
        drop((first, second, other, newcomer));
        let state = gate.state();
        assert_eq!((state.silent, state.waiting.len()), (0, 0));
    }
}
