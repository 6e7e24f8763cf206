//! One migration as one daemon sees it: its state machine, its channels, and the one story
//! both hosts tell about how it ended.
//!
//! ```text
//!            control link up           every channel clean on both hosts, counts agree
//!  pending ───────────────────► active ─────────────────────────────────────────► completed
//!     │ token unused for ttl       │ cancel (either host)  ─────────────────────► cancelled
//!     └──────────► expired         │ failure (either host) ─────────────────────► failed
//! ```
//!
//! Every transition to an end state happens once, under the lock, and is mirrored to the peer
//! daemon over the control link: a local failure is sent as [`Control::Failed`] with its
//! attribution, so that the peer reports the same cause instead of the symptom it sees (a
//! reset data connection). A failure seen only on the peer link waits briefly for such an
//! explanation before blaming the network.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use migproxy_proto::{Attribution, ChannelEnd, Control, Host, Leg, Op, Totals};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::attribution::{self, Rendered};
use super::token::Token;
use crate::endpoint::Endpoint;
use crate::human::Elapsed;
use crate::relay::{ByteCounts, Counters, End, Report};

/// Which end of the migration this daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This host receives the VM: the destination.
    Incoming,
    /// This host sends the VM: the source.
    Outgoing,
}

impl Role {
    pub fn host(self) -> Host {
        match self {
            Role::Incoming => Host::Destination,
            Role::Outgoing => Host::Source,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Active,
    /// Postcopy recovery: waiting for QEMU to reconnect (reserved; see the recovery issue).
    Paused,
    Completed,
    Failed,
    Cancelled,
    Expired,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Completed | State::Failed | State::Cancelled | State::Expired
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    Opening,
    Active,
    Completed,
    Failed,
    Cancelled,
}

/// What goes to the control writer.
#[derive(Debug)]
pub enum Outbound {
    Frame(Control),
    /// Everything queued has been sent: close the control link.
    Close,
}

/// How long a failure seen only on the peer link waits for the peer's explanation.
const EXPLANATION_GRACE: Duration = Duration::from_millis(1000);

/// Fixed facts about a migration, given at creation.
#[derive(Debug)]
pub struct Spec {
    pub id: String,
    pub role: Role,
    pub token: Token,
    /// The other daemon's peer address (as given to, or handed out by, this daemon).
    pub peer: String,
    /// Incoming: the destination QEMU's endpoint. Outgoing: the socket handed to QEMU.
    pub local: Endpoint,
    pub max_channels: u32,
}

/// A migration, shared between the API, the control link and the channel tasks.
#[derive(Debug)]
pub struct Migration {
    pub spec: Spec,
    created: SystemTime,
    started: Instant,
    /// Cancelled when the migration ends: stops accepting, aborts every channel still running.
    pub stop: CancellationToken,
    inner: Mutex<Inner>,
    outbound: mpsc::UnboundedSender<Outbound>,
    /// The state, for those who wait on it.
    state_tx: watch::Sender<State>,
    /// Incoming: the next channel index allowed to connect to the destination QEMU.
    pub next_channel: watch::Sender<u32>,
    /// The control writer's queue, until the control link takes it.
    queue: Mutex<Option<mpsc::UnboundedReceiver<Outbound>>>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    channels: Vec<Channel>,
    error: Option<Attribution>,
    /// Who cancelled, when cancelled.
    cancelled_by: Option<Host>,
    local_done: Option<(u32, Totals)>,
    peer_done: Option<(u32, Totals)>,
    control_attached: bool,
    ended: Option<Instant>,
}

#[derive(Debug)]
struct Channel {
    /// A connection has been given this index (a second one is refused).
    claimed: bool,
    state: ChannelState,
    counters: Option<Arc<Counters>>,
    bytes: ByteCounts,
    peer_end: Option<(ChannelEnd, Totals)>,
}

impl Channel {
    fn bytes(&self) -> ByteCounts {
        match &self.counters {
            Some(counters) if !self.is_final() => counters.bytes(),
            _ => self.bytes,
        }
    }

    fn is_final(&self) -> bool {
        matches!(
            self.state,
            ChannelState::Completed | ChannelState::Failed | ChannelState::Cancelled
        )
    }
}

/// Why a channel could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelRefused {
    #[error("migration {0} is {1:?}, not accepting channels")]
    NotActive(String, State),
    #[error("migration {id} already has its maximum of {max} channels")]
    TooMany { id: String, max: u32 },
    #[error("migration {id} already has a channel {index}")]
    Duplicate { id: String, index: u32 },
}

impl Migration {
    /// A new migration in `pending`.
    pub fn new(spec: Spec) -> Arc<Migration> {
        let (outbound, queue) = mpsc::unbounded_channel();
        let migration = Migration {
            spec,
            created: SystemTime::now(),
            started: Instant::now(),
            stop: CancellationToken::new(),
            inner: Mutex::new(Inner {
                state: State::Pending,
                channels: Vec::new(),
                error: None,
                cancelled_by: None,
                local_done: None,
                peer_done: None,
                control_attached: false,
                ended: None,
            }),
            outbound,
            state_tx: watch::channel(State::Pending).0,
            next_channel: watch::channel(0).0,
            queue: Mutex::new(Some(queue)),
        };
        Arc::new(migration)
    }

    /// What the control link must send, for the one control link there is.
    pub fn take_queue(&self) -> Option<mpsc::UnboundedReceiver<Outbound>> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug elsewhere; the state is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn host(&self) -> Host {
        self.spec.role.host()
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    /// A receiver that sees every state change.
    pub fn watch_state(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    /// Time since the migration ended, if it has.
    pub fn ended_for(&self) -> Option<Duration> {
        self.lock().ended.map(|at| at.elapsed())
    }

    fn send(&self, control: Control) {
        // The control writer may be gone already (link broken): then nobody is left to tell.
        let _ = self.outbound.send(Outbound::Frame(control));
    }

    /// The control link is up: `pending` → `active`. False if the migration cannot take one.
    pub fn attach_control(&self) -> bool {
        let mut inner = self.lock();
        if inner.control_attached || inner.state != State::Pending {
            return false;
        }
        inner.control_attached = true;
        self.set_state(&mut inner, State::Active);
        true
    }

    /// Registers channel `index` (which must be the next one for outgoing migrations).
    pub fn open_channel(&self, index: u32) -> Result<(), ChannelRefused> {
        let mut inner = self.lock();
        if inner.state != State::Active {
            return Err(ChannelRefused::NotActive(self.spec.id.clone(), inner.state));
        }
        if index >= self.spec.max_channels {
            return Err(ChannelRefused::TooMany {
                id: self.spec.id.clone(),
                max: self.spec.max_channels,
            });
        }
        while inner.channels.len() <= index as usize {
            inner.channels.push(Channel {
                claimed: false,
                state: ChannelState::Opening,
                counters: None,
                bytes: ByteCounts::default(),
                peer_end: None,
            });
        }
        let channel = &mut inner.channels[index as usize];
        if channel.claimed {
            return Err(ChannelRefused::Duplicate {
                id: self.spec.id.clone(),
                index,
            });
        }
        channel.claimed = true;
        // A new channel means this host is not done after all.
        inner.local_done = None;
        Ok(())
    }

    /// A channel that was opened but never ran (the migration ended first).
    pub fn channel_abandoned(&self, index: u32) {
        if let Some(channel) = self.lock().channels.get_mut(index as usize) {
            if channel.state == ChannelState::Opening {
                channel.state = ChannelState::Cancelled;
            }
        }
    }

    /// Number of channels registered so far.
    pub fn channel_count(&self) -> u32 {
        self.lock().channels.len() as u32
    }

    /// The channel's local leg is up and its relay is running with these counters.
    pub fn channel_running(&self, index: u32, counters: Arc<Counters>) {
        let mut inner = self.lock();
        if let Some(channel) = inner.channels.get_mut(index as usize) {
            channel.state = ChannelState::Active;
            channel.counters = Some(counters);
        }
        drop(inner);
        self.send(Control::ChannelOpened { channel: index });
    }

    /// Records how a channel's relay ended, and what that means for the migration.
    /// `qemu_leg` is the name of the relay leg that faces the local QEMU.
    pub fn channel_ended(self: &Arc<Self>, index: u32, report: &Report, qemu_leg: &str) {
        let end = match &report.end {
            End::Completed => ChannelEnd::Completed,
            End::Cancelled => ChannelEnd::Cancelled,
            End::Failed(_) => ChannelEnd::Failed,
        };
        let bytes = report.bytes;
        {
            let mut inner = self.lock();
            if let Some(channel) = inner.channels.get_mut(index as usize) {
                channel.state = match end {
                    ChannelEnd::Completed => ChannelState::Completed,
                    ChannelEnd::Cancelled => ChannelState::Cancelled,
                    ChannelEnd::Failed => ChannelState::Failed,
                };
                channel.bytes = bytes;
            }
        }
        self.send(Control::ChannelClosed {
            channel: index,
            end,
            bytes: totals(bytes),
        });
        match &report.end {
            End::Completed => self.check_done(),
            End::Cancelled => {}
            End::Failed(failure) => {
                let blame = attribution::of_relay(self.host(), index, failure, qemu_leg);
                self.fail_or_wait(blame);
            }
        }
    }

    /// A failure on this host's QEMU leg is certain: fail now. One on the peer link may be
    /// the echo of a failure on the other host: give its explanation a moment to arrive.
    pub fn fail_or_wait(self: &Arc<Self>, blame: Attribution) {
        if blame.leg == Leg::Qemu {
            self.fail(blame, true);
            return;
        }
        let migration = Arc::clone(self);
        tokio::spawn(async move {
            let mut state = migration.watch_state();
            let explained = tokio::time::timeout(EXPLANATION_GRACE, async {
                while !state.borrow_and_update().is_final() {
                    if state.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if explained.is_err() {
                migration.fail(blame, true);
            }
        });
    }

    /// Ends the migration as failed (first cause wins) and tears down every channel.
    pub fn fail(&self, blame: Attribution, tell_peer: bool) {
        let mut inner = self.lock();
        if inner.state.is_final() {
            return;
        }
        tracing::warn!(migration = %self.spec.id, "failed: {}", Rendered(&blame));
        if tell_peer {
            self.send(Control::Failed(blame.clone()));
        }
        inner.error = Some(blame);
        self.finish(&mut inner, State::Failed);
    }

    /// Cancels the migration on behalf of `by`; tells the peer if the cancel is ours.
    /// Returns false when the migration had already ended.
    pub fn cancel(&self, by: Host) -> bool {
        let mut inner = self.lock();
        if inner.state.is_final() {
            return false;
        }
        if by == self.host() {
            self.send(Control::Cancel { by });
        }
        inner.cancelled_by = Some(by);
        self.finish(&mut inner, State::Cancelled);
        true
    }

    /// Ends a migration whose control link never came up in time.
    pub fn expire(&self) {
        let mut inner = self.lock();
        if inner.state == State::Pending {
            self.finish(&mut inner, State::Expired);
        }
    }

    /// Applies a control frame from the peer daemon.
    pub fn on_peer(self: &Arc<Self>, control: Control) {
        match control {
            Control::Heartbeat | Control::ChannelOpened { .. } => {}
            Control::ChannelClosed {
                channel,
                end,
                bytes,
            } => {
                if let Some(c) = self.lock().channels.get_mut(channel as usize) {
                    c.peer_end = Some((end, bytes));
                }
            }
            Control::Failed(blame) => self.fail(blame, false),
            Control::Cancel { by } => {
                self.cancel(by);
            }
            Control::Done { channels, bytes } => {
                self.lock().peer_done = Some((channels, bytes));
                self.check_done();
            }
        }
    }

    /// When every channel has completed here, says so to the peer; when the peer has said
    /// the same with equal counts, the migration is completed.
    fn check_done(&self) {
        let mut inner = self.lock();
        if inner.state != State::Active || inner.channels.is_empty() {
            return;
        }
        if inner.local_done.is_none()
            && inner
                .channels
                .iter()
                .all(|c| c.state == ChannelState::Completed)
        {
            let done = (inner.channels.len() as u32, totals(sum(&inner.channels)));
            inner.local_done = Some(done);
            self.send(Control::Done {
                channels: done.0,
                bytes: done.1,
            });
        }
        match (inner.local_done, inner.peer_done) {
            (Some(local), Some(peer)) if local == peer => {
                self.finish(&mut inner, State::Completed);
            }
            (Some(local), Some(peer)) if local.0 == peer.0 => {
                // Same channels, different bytes: something between the daemons lost data.
                let blame = attribution::disagreement(self.host(), local, peer);
                tracing::warn!(migration = %self.spec.id, "failed: {}", Rendered(&blame));
                self.send(Control::Failed(blame.clone()));
                inner.error = Some(blame);
                self.finish(&mut inner, State::Failed);
            }
            // Otherwise one side has seen fewer channels so far: wait for the rest.
            _ => {}
        }
    }

    fn finish(&self, inner: &mut Inner, state: State) {
        inner.ended = Some(Instant::now());
        self.set_state(inner, state);
        let _ = self.outbound.send(Outbound::Close);
        self.stop.cancel();
    }

    fn set_state(&self, inner: &mut Inner, state: State) {
        inner.state = state;
        tracing::info!(migration = %self.spec.id, ?state, "state");
        self.state_tx.send_replace(state);
    }

    /// A consistent view for the API.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let channels: Vec<ChannelSnapshot> = inner
            .channels
            .iter()
            .enumerate()
            .map(|(index, c)| ChannelSnapshot {
                index: index as u32,
                state: c.state,
                bytes: c.bytes(),
            })
            .collect();
        Snapshot {
            id: self.spec.id.clone(),
            direction: self.spec.role,
            state: inner.state,
            peer: self.spec.peer.clone(),
            local: self.spec.local.to_string(),
            bytes: sum(&inner.channels),
            channels,
            error: inner.error.as_ref().map(attribution::Report::from),
            cancelled_by: inner.cancelled_by.map(attribution::host_name),
            created_at: self
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
            elapsed_ms: inner
                .ended
                .unwrap_or_else(Instant::now)
                .duration_since(self.started)
                .as_millis() as u64,
        }
    }

    /// Fails the migration when no byte has moved on any of its channels for `limit` while
    /// it is active with at least one channel (a QEMU that stopped sending or reading, or a
    /// link that stalls without breaking). Returns when the migration ends.
    pub async fn watch_stall(self: Arc<Self>, limit: Duration) {
        let tick = (limit / 4).max(Duration::from_millis(50));
        let mut last = (self.bytes().total(), Instant::now());
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let moved = self.bytes().total();
            if moved != last.0 || self.state() != State::Active || self.channel_count() == 0 {
                last = (moved, Instant::now());
            } else if last.1.elapsed() >= limit {
                let blame = self.peer_link_failure(
                    Op::Timeout,
                    None,
                    format!("no byte moved on any channel for {}", Elapsed(limit)),
                );
                self.fail(blame, true);
                return;
            }
        }
    }

    /// Time since creation, for attributions without a channel.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes moved so far on every channel.
    pub fn bytes(&self) -> ByteCounts {
        sum(&self.lock().channels)
    }

    /// Failure to attribute when the peer link (control) breaks.
    pub fn peer_link_failure(&self, op: Op, errno: Option<String>, message: String) -> Attribution {
        Attribution {
            host: self.host(),
            leg: Leg::Peer,
            channel: None,
            direction: None,
            op,
            errno,
            message,
            bytes: totals(self.bytes()),
            elapsed_ms: self.elapsed().as_millis() as u64,
        }
    }
}

fn sum(channels: &[Channel]) -> ByteCounts {
    channels.iter().fold(ByteCounts::default(), |acc, c| {
        let b = c.bytes();
        ByteCounts {
            to_destination: acc.to_destination + b.to_destination,
            to_source: acc.to_source + b.to_source,
        }
    })
}

pub fn totals(bytes: ByteCounts) -> Totals {
    Totals {
        to_destination: bytes.to_destination,
        to_source: bytes.to_source,
    }
}

/// A migration as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub id: String,
    pub direction: Role,
    pub state: State,
    /// The other daemon's peer address.
    pub peer: String,
    /// Incoming: the destination QEMU's endpoint; outgoing: the URI handed to QEMU.
    pub local: String,
    pub bytes: ByteCounts,
    pub channels: Vec<ChannelSnapshot>,
    pub error: Option<attribution::Report>,
    pub cancelled_by: Option<&'static str>,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelSnapshot {
    pub index: u32,
    pub state: ChannelState,
    pub bytes: ByteCounts,
}
