//! The kernel data path's channel: QEMU holds the data connection, and this daemon keeps a
//! duplicate of it only to watch it and to end it.
//!
//! ```text
//!  QEMU ══ its fd ══╗                       ╔══ its fd ══ QEMU
//!                   ╠══ one TCP connection ═╣
//!  daemon ═ dup ════╝  (never read here)    ╚════ dup ═ daemon
//!    every 50 ms: TCP_INFO → bytes each way, progress, the socket's state
//!    epoch ended (cancel, failure anywhere): shutdown(SHUT_RDWR) — QEMU's blocked
//!      read or write fails at once, on both hosts
//!    local QEMU completed: wait until what was sent is acknowledged, close the dup
//!    local QEMU failed: shutdown, so that the peer's QEMU is not left waiting
//!    socket closed under QEMU (reset, user timeout): a failure on the peer link
//! ```
//!
//! Bytes come from `TCP_INFO`: `tcpi_bytes_acked` counts what this end sent and the peer
//! acknowledged, `tcpi_bytes_received` what arrived here. The hello and its reply, which
//! came first on the same connection, are not QEMU's: they are subtracted.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migproxy_proto::{Hello, HelloReply, Kind};

use crate::relay::{ByteCounts, Counters, Direction, End, Failure, Op, Report};
use crate::transport::Stream;

pub use super::migration::Preamble;
use super::migration::state::ReturnPath;
use super::migration::{Admitted, Arrived, Migration, Role};
use super::qemu::report::Status as QemuStatus;

/// How often the socket is sampled: the views' and the stall watch's resolution.
const SAMPLE: Duration = Duration::from_millis(50);

/// How long a completed end waits for what it sent to be acknowledged, so that both hosts
/// count the same bytes.
const SETTLE: Duration = Duration::from_secs(2);

/// Linux's TCP states (`include/net/tcp_states.h`) that this module tells apart.
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
/// The connection is gone: reset, timed out, or closed both ways.
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// What `TCP_INFO` says of a socket, in what this module uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub state: u8,
    /// Retransmissions of the oldest unacknowledged segment, and keepalive or zero-window
    /// probes unanswered: non-zero while the peer host does not answer.
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    /// Segments sent and not acknowledged.
    pub unacked: u32,
    /// Bytes written and not sent yet.
    pub notsent: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

impl Sample {
    /// Whether the peer host has stopped answering (as far as the last sample shows).
    fn unanswered(&self) -> bool {
        self.retransmits > 0 || self.probes > 0 || self.backoff > 0
    }

    /// Whether everything written has been sent and acknowledged.
    fn settled(&self) -> bool {
        self.unacked == 0 && self.notsent == 0
    }

    /// QEMU's bytes each way (sent and acknowledged, received), without the FINs: each FIN
    /// takes one sequence number, which `TCP_INFO` counts as a byte. `ended`: the
    /// connection closed in order (QEMU completed), so a closed socket has both FINs.
    fn payload(&self, ended: bool) -> (u64, u64) {
        let closed = self.state == TCP_CLOSE && ended;
        let fin_acked = matches!(self.state, TCP_FIN_WAIT2 | TCP_TIME_WAIT) || closed;
        let fin_received = matches!(
            self.state,
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT
        ) || closed;
        (
            self.bytes_acked.saturating_sub(fin_acked.into()),
            self.bytes_received.saturating_sub(fin_received.into()),
        )
    }
}

/// Reads `TCP_INFO`, consistently: Linux reads the socket's state before it takes the lock
/// under which it reads the byte counts, so a FIN that arrives in between is counted in
/// the bytes of a sample whose state does not show it yet (one byte more, which the
/// forward-only counters would keep: seen in CI as a completed migration whose hosts
/// disagreed by one byte). A sample is taken only when the next read shows the same state:
/// its counts were read between the two.
pub fn sample(socket: &TcpStream) -> io::Result<Sample> {
    let mut first = read_info(socket)?;
    for _ in 0..8 {
        let next = read_info(socket)?;
        if next.state == first.state {
            return Ok(first);
        }
        first = next;
    }
    // The state changing at every read: the last one, as it is.
    Ok(first)
}

#[allow(unsafe_code)]
fn read_info(socket: &TcpStream) -> io::Result<Sample> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a zeroed buffer of `len` bytes that outlives the call, and the
    // kernel writes at most `len` bytes into it (updating `len`); the descriptor is open
    // for the duration of the borrow of `socket`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, and `tcp_info` is plain integers: every bit pattern is valid,
    // whatever part the kernel filled in.
    let info = unsafe { info.assume_init() };
    Ok(Sample {
        state: info.tcpi_state,
        retransmits: info.tcpi_retransmits,
        probes: info.tcpi_probes,
        backoff: info.tcpi_backoff,
        unacked: info.tcpi_unacked,
        notsent: info.tcpi_notsent_bytes,
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
    })
}

/// The kernel channel of one epoch, as this host holds it.
#[derive(Debug)]
pub struct Channel {
    pub index: u32,
    pub admitted: Admitted,
    /// This daemon's duplicate of QEMU's socket.
    pub socket: TcpStream,
    pub preamble: Preamble,
    /// The names the report gives the two ends: `fd:NAME` (QEMU), `tcp:HOST:PORT` (peer).
    pub qemu: String,
    pub peer: String,
}

/// Watches the channel until QEMU ends its side or the epoch ends, then reports how it ended.
pub async fn watch(migration: Arc<Migration>, channel: Channel) {
    let counters = Arc::new(Counters::new());
    migration.channel_running(channel.index, Arc::clone(&counters));
    let end = follow(&migration, &channel, &counters).await;
    // QEMU has its own descriptor: closing ours sends nothing while QEMU holds it.
    let Channel {
        index,
        admitted,
        socket,
        qemu,
        peer,
        ..
    } = channel;
    drop(socket);
    let report = Report {
        source: source_name(&migration, &qemu, &peer),
        destination: destination_name(&migration, &qemu, &peer),
        end,
        bytes: counters.bytes(),
        spliced: ByteCounts::default(),
        elapsed: counters.elapsed(),
        first_end: None,
    };
    tracing::info!(migration = %migration.spec.id, channel = index, "kernel channel {report}");
    migration.channel_ended(
        index,
        admitted.epoch,
        &report,
        &qemu,
        ReturnPath::NotWatched,
    );
}

fn source_name(migration: &Migration, qemu: &str, peer: &str) -> String {
    match migration.spec.role {
        Role::Outgoing => qemu.to_owned(),
        Role::Incoming => peer.to_owned(),
    }
}

fn destination_name(migration: &Migration, qemu: &str, peer: &str) -> String {
    match migration.spec.role {
        Role::Outgoing => peer.to_owned(),
        Role::Incoming => qemu.to_owned(),
    }
}

/// Samples the socket until an end.
async fn follow(migration: &Migration, channel: &Channel, counters: &Counters) -> End {
    let mut last = Sample::default();
    loop {
        tokio::select! {
            biased;
            () = channel.admitted.stop.cancelled() => {
                // Cancelled or failed anywhere: QEMU's blocked I/O must fail now.
                let _ = channel.socket.shutdown(Shutdown::Both);
                return End::Cancelled;
            }
            () = tokio::time::sleep(SAMPLE) => {}
        }
        let now = match sample(&channel.socket) {
            Ok(now) => now,
            Err(error) => return failed(migration, channel, counters, Op::Read, error),
        };
        match migration.qemu_status() {
            Some(QemuStatus::Completed) => {
                settle(migration, channel, counters).await;
                return End::Completed;
            }
            Some(status) if status.is_final() => return qemu_ended(channel).await,
            _ => {}
        }
        if now.state == TCP_CLOSE {
            // Read the error before QEMU's word is waited for: QEMU may take it meanwhile.
            let error = lost(&channel.socket, &last);
            // Not counted before QEMU's word: closed in order, the FINs are in the counts
            // (QEMU shuts its end down before its status says `completed`, which this host
            // reads up to 100 ms later), and the counters only move forward.
            if migration.qemu_completes(&channel.admitted.stop).await {
                settle(migration, channel, counters).await;
                return End::Completed;
            }
            record(migration, channel, counters, &now, false);
            let _ = channel.socket.shutdown(Shutdown::Both);
            return failed(migration, channel, counters, io_op(migration), error);
        }
        record(migration, channel, counters, &now, false);
        last = now;
    }
}

/// QEMU failed or was cancelled on this host: it has let go of its end (or will), and the
/// peer's QEMU must not wait on a connection only this daemon keeps open. The migration's
/// end (QEMU's verdict, the peer's word) comes through the lifecycle.
async fn qemu_ended(channel: &Channel) -> End {
    let _ = channel.socket.shutdown(Shutdown::Both);
    channel.admitted.stop.cancelled().await;
    End::Cancelled
}

/// QEMU completed here: what this end sent is waited for until acknowledged, so that both
/// hosts count the same bytes.
async fn settle(migration: &Migration, channel: &Channel, counters: &Counters) {
    let deadline = Instant::now() + SETTLE;
    while let Ok(now) = sample(&channel.socket) {
        record(migration, channel, counters, &now, true);
        if now.settled() || now.state == TCP_CLOSE || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Feeds a sample to the counters, without the preamble and the FINs.
fn record(
    migration: &Migration,
    channel: &Channel,
    counters: &Counters,
    now: &Sample,
    ended: bool,
) {
    let (sent, received) = now.payload(ended);
    let (to_destination, to_source) = match migration.spec.role {
        Role::Outgoing => (sent, received),
        Role::Incoming => (received, sent),
    };
    let preamble = channel.preamble;
    counters.observe(
        Direction::ToDestination,
        to_destination.saturating_sub(preamble.to_destination),
    );
    counters.observe(
        Direction::ToSource,
        to_source.saturating_sub(preamble.to_source),
    );
}

/// The operation a broken connection failed on this host: the source writes QEMU's stream,
/// the destination reads it.
fn io_op(migration: &Migration) -> Op {
    match migration.spec.role {
        Role::Outgoing => Op::Write,
        Role::Incoming => Op::Read,
    }
}

/// Why a connection closed under QEMU: the socket's pending error when QEMU has not taken
/// it yet, else what the last sample shows — a peer that stopped answering timed out, one
/// that answered reset the connection.
fn lost(socket: &TcpStream, last: &Sample) -> io::Error {
    match socket.take_error() {
        Ok(Some(error)) => error,
        _ if last.unanswered() => io::Error::from_raw_os_error(libc::ETIMEDOUT),
        _ => io::Error::from_raw_os_error(libc::ECONNRESET),
    }
}

fn failed(
    migration: &Migration,
    channel: &Channel,
    counters: &Counters,
    op: Op,
    error: io::Error,
) -> End {
    tracing::debug!(migration = %migration.spec.id, %error, "kernel channel lost");
    End::Failed(Failure {
        leg: channel.peer.clone(),
        direction: Some(Direction::ToDestination),
        op,
        error: Arc::new(error),
        bytes: counters.bytes(),
        undelivered: 0,
        elapsed: counters.elapsed(),
    })
}

/// Refuses what the data path does not allow: a clear connection on a TLS port is only a
/// kernel-path data connection, and a kernel-path data connection is only clear TCP (it is
/// handed to QEMU as it is).
pub fn fit(migration: &Migration, hello: &Hello, clear: bool, tls: bool) -> Result<(), String> {
    let kernel_data = hello.kind == Kind::Data && migration.on_kernel_path();
    if clear && !kernel_data {
        return Err(format!(
            "migration {}: only the kernel data path's data connection may come in clear on              this TLS port",
            hello.migration
        ));
    }
    if kernel_data && tls && !clear {
        return Err(format!(
            "migration {} takes the kernel data path: its data connection must come in clear              (TLS cannot be handed to QEMU)",
            hello.migration
        ));
    }
    Ok(())
}

/// Kernel path: leaves the admitted data connection for the task that drives the
/// destination QEMU (`qemu::follow_kernel_incoming`).
pub fn hand_off(
    migration: Arc<Migration>,
    index: u32,
    admitted: Admitted,
    stream: Stream,
    from: String,
    preamble: Preamble,
) {
    let Stream::Tcp(tcp) = stream else {
        // `kernel_fit` let only clear TCP through.
        migration.channel_abandoned(index);
        return;
    };
    let socket = match tcp.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(migration = %migration.spec.id, %error, "kernel path socket");
            migration.channel_abandoned(index);
            return;
        }
    };
    let arrived = Arrived {
        index,
        admitted,
        socket,
        from: format!("tcp:{from}"),
        preamble,
    };
    if let Some(older) = migration.handoff.put(arrived) {
        let _ = older.socket.shutdown(Shutdown::Both);
        migration.channel_abandoned(older.index);
    }
}

/// What came first on a kernel-path data connection: its hello, and the acceptance (in
/// `version`). Counted from the messages, not sampled: the source's QEMU may already be
/// sending by the time this daemon looks.
pub fn preamble(hello: &Hello, version: u16) -> Preamble {
    let mut buf = Vec::new();
    hello.encode(&mut buf);
    Preamble {
        to_destination: buf.len() as u64,
        to_source: data_reply_len(version),
    }
}

/// The length of a data connection's acceptance.
fn data_reply_len(version: u16) -> u64 {
    let mut buf = Vec::new();
    HelloReply {
        version,
        status: migproxy_proto::Status::Ok,
        message: String::new(),
    }
    .encode(&mut buf);
    buf.len() as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::daemon::migration::{Timers, testing};
    use crate::daemon::qemu::report::Settings;

    /// Both QEMUs shut their ends down in order, and this host sees the connection closed
    /// before its QEMU's status reads `completed` (polled): the count is QEMU's bytes, not
    /// the FINs, which `TCP_INFO` counts too (the other host, whose QEMU said `completed`
    /// first, would count one byte less, and the byte counts would disagree).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_seen_before_qemu_completed_counts_no_fin() {
        let qemu = Settings {
            qmp: "/nowhere.qmp".into(),
            multifd: None,
            postcopy: false,
            postcopy_after_ms: None,
            max_bandwidth: None,
            downtime_limit_ms: None,
        };
        let migration = testing::migration(Role::Incoming, Some(qemu), Timers::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut source = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let mut destination_qemu = socket.try_clone().unwrap();
        source.write_all(&[7; 1000]).unwrap();
        source.shutdown(Shutdown::Both).unwrap();
        let mut got = Vec::new();
        destination_qemu.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 1000);
        destination_qemu.shutdown(Shutdown::Both).unwrap();
        let _link = migration.attach_control(0, None).expect("attached");
        let channel = Channel {
            index: 0,
            admitted: migration.open_channel(0).expect("admitted"),
            socket,
            preamble: Preamble::default(),
            qemu: "fd:q".into(),
            peer: "tcp:p".into(),
        };
        let counters = Arc::new(Counters::new());
        let following = {
            let (migration, counters) = (Arc::clone(&migration), Arc::clone(&counters));
            tokio::spawn(async move { follow(&migration, &channel, &counters).await })
        };
        // Several samples of the closed socket before QEMU's word.
        tokio::time::sleep(SAMPLE * 4).await;
        let completed = serde_json::json!({"status": "completed"});
        migration.qemu_observed(completed, None, &[], Duration::ZERO);
        let end = following.await.unwrap();
        assert!(matches!(end, End::Completed), "{end:?}");
        assert_eq!(counters.bytes().to_destination, 1000);
        assert_eq!(counters.bytes().to_source, 0);
    }
}
