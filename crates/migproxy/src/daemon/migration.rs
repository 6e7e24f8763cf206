//! One migration as one daemon sees it: its state machine, its channels, and the one story
//! both hosts tell about how it ended.
//!
//! ```text
//!            control link up           every channel clean on both hosts, counts agree
//!  pending ───────────────────► active ─────────────────────────────────────────► completed
//!     │ token unused for ttl     │  ▲   cancel (either host)  ─────────────────────► cancelled
//!     └──────────► expired       │  │   failure (either host) ─────────────────────► failed
//!                     failure,   ▼  │ QEMU reconnects: control link dialled again
//!                   recoverable  paused   (postcopy recovery)
//! ```
//!
//! A *recoverable* migration (postcopy) does not fail when a channel or the link breaks: it
//! pauses, as QEMU does (`postcopy-paused`). Every channel of the broken *epoch* is torn down
//! and the control link is closed; when the source QEMU reconnects (`migrate … resume=true`),
//! the source daemon dials a new control link whose hello names the first channel of the new
//! epoch, and fresh channels follow. Completion then counts the last epoch only: bytes lost in
//! flight when the old one broke are QEMU's to resend.
//!
//! Every transition to an end state happens once, under the lock, and is mirrored to the peer
//! daemon over the control link: a local failure is sent as [`Control::Failed`] with its
//! attribution, so that the peer reports the same cause instead of the symptom it sees (a
//! reset data connection). A failure seen only on the peer link waits briefly for such an
//! explanation before blaming the network.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use migproxy_proto::{Attribution, ChannelEnd, Control, Direction, Host, Leg, Op, Totals};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::attribution::{self, Rendered};
use super::metrics::Metrics;
use super::qemu;
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

/// How long a cancel waits for QEMU's `migrate_cancel` before tearing the sockets down
/// regardless.
const QEMU_CANCEL: Duration = Duration::from_secs(2);

pub use super::qemu::CancelRefused;

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
    /// Channels per epoch, at most.
    pub max_channels: u32,
    /// Pause instead of failing (postcopy recovery).
    pub recoverable: bool,
    /// Outgoing: the name the destination daemon's certificate must carry.
    pub server_name: String,
    /// Whether the peer link is encrypted and authenticated (TLS) or plaintext.
    pub tls: bool,
    /// The local QEMU, when the daemon drives it over QMP.
    pub qemu: Option<qemu::Settings>,
}

/// Identifies one epoch of a migration: the span of one control link and its channels.
/// Reports from an older epoch (a link or channel torn down by a pause) are ignored.
pub type Epoch = u64;

/// A migration, shared between the API, the control link and the channel tasks.
#[derive(Debug)]
pub struct Migration {
    pub spec: Spec,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<Event>,
    created: SystemTime,
    started: Instant,
    /// Cancelled when the migration ends: stops accepting, aborts every channel still running.
    pub stop: CancellationToken,
    inner: Mutex<Inner>,
    /// The state, for those who wait on it.
    state_tx: watch::Sender<State>,
    /// Incoming: the next channel index allowed to connect to the destination QEMU.
    pub next_channel: watch::Sender<u32>,
    /// Incoming: whether the destination QEMU listens (at once, unless QEMU is driven here
    /// and told to listen only once the source daemon has come).
    pub qemu_ready: watch::Sender<bool>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    channels: Vec<Channel>,
    /// The failure that ended the migration, or paused it last.
    error: Option<Attribution>,
    /// Every failure that paused the migration, oldest first.
    pauses: Vec<Attribution>,
    /// Who cancelled, when cancelled.
    cancelled_by: Option<Host>,
    local_done: Option<(u32, Totals)>,
    peer_done: Option<(u32, Totals)>,
    ended: Option<Instant>,
    /// The control writer's queue, while a control link is up.
    outbound: Option<mpsc::UnboundedSender<Outbound>>,
    epoch: Epoch,
    /// Cancelled when the epoch ends (pause or end): its channels are torn down.
    epoch_stop: CancellationToken,
    /// First channel index of the current epoch.
    epoch_start: u32,
    /// When this host was asked to cancel, until every channel has closed.
    cancel_asked: Option<Instant>,
    /// The destination asked the source to cancel and waits for it to end its side (see
    /// [`Migration::cancel_through_qemu`]); failures meanwhile are the cancel's echoes.
    cancelling: Option<Host>,
    /// Phase timestamps, for the API.
    activated: Option<SystemTime>,
    paused: Option<SystemTime>,
    ended_at: Option<SystemTime>,
    /// The two latest (time, bytes to destination) samples, a second or more apart.
    rate_samples: [(Instant, u64); 2],
    /// QEMU's view, when the daemon drives QEMU.
    qemu: Option<qemu::Report>,
    /// The task following QEMU, which cancels QEMU before the sockets (source).
    qemu_cancel: Option<mpsc::Sender<qemu::CancelRequest>>,
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
    fn new() -> Channel {
        Channel {
            claimed: false,
            state: ChannelState::Opening,
            counters: None,
            bytes: ByteCounts::default(),
            peer_end: None,
        }
    }

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

/// A control link just attached: what it must send, and the epoch it belongs to.
#[derive(Debug)]
pub struct Link {
    pub queue: mpsc::UnboundedReceiver<Outbound>,
    pub epoch: Epoch,
    /// Cancelled when the epoch ends.
    pub stop: CancellationToken,
}

/// A channel admitted into the current epoch.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub epoch: Epoch,
    /// Cancelled when the epoch ends.
    pub stop: CancellationToken,
    /// The first channel of its epoch: QEMU's main stream, which carries the return path.
    pub main: bool,
}

impl Migration {
    /// A new migration in `pending`, reporting to `metrics` and publishing to `events`.
    pub fn new(
        spec: Spec,
        metrics: Arc<Metrics>,
        events: broadcast::Sender<Event>,
    ) -> Arc<Migration> {
        let stop = CancellationToken::new();
        let spec_has_no_qemu = spec.qemu.is_none();
        let qemu = spec.qemu.as_ref().map(|_| qemu::Report {
            status: "none".to_owned(),
            ..qemu::Report::default()
        });
        let migration = Migration {
            spec,
            metrics,
            events,
            created: SystemTime::now(),
            started: Instant::now(),
            inner: Mutex::new(Inner {
                state: State::Pending,
                channels: Vec::new(),
                error: None,
                pauses: Vec::new(),
                cancelled_by: None,
                local_done: None,
                peer_done: None,
                ended: None,
                outbound: None,
                epoch: 0,
                epoch_stop: stop.child_token(),
                epoch_start: 0,
                cancel_asked: None,
                cancelling: None,
                activated: None,
                paused: None,
                ended_at: None,
                rate_samples: [(Instant::now(), 0); 2],
                qemu,
                qemu_cancel: None,
            }),
            stop,
            state_tx: watch::channel(State::Pending).0,
            next_channel: watch::channel(0).0,
            qemu_ready: watch::channel(spec_has_no_qemu).0,
        };
        Arc::new(migration)
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

    /// Queues a frame for the peer. Without a control link (broken, or paused) nobody is
    /// left to tell, and the frame is dropped.
    fn send(inner: &Inner, control: Control) {
        if let Some(outbound) = &inner.outbound {
            let _ = outbound.send(Outbound::Frame(control));
        }
    }

    /// A control link is up: `pending` → `active`, or `paused` → `active` with a new epoch
    /// whose channels start at `first_channel`. `None` if the migration cannot take a link
    /// now (one is attached, or it has ended).
    pub fn attach_control(&self, first_channel: u32) -> Option<Link> {
        let mut inner = self.lock();
        let known = inner.channels.len() as u32;
        // A resume names the first channel after every one this host has seen, and not
        // absurdly far beyond (each index up to it gets a slot).
        let plausible = first_channel >= known && first_channel - known <= self.spec.max_channels;
        let resuming = match inner.state {
            State::Pending if first_channel == 0 => false,
            State::Paused if self.spec.recoverable && plausible => true,
            // The source paused and came back before this host noticed the break (a
            // blackholed link is only detected by silence): the old epoch is over.
            State::Active
                if self.spec.recoverable && plausible && first_channel > inner.epoch_start =>
            {
                let blame = self.peer_link_failure_locked(
                    &inner,
                    Op::Read,
                    None,
                    "the source daemon resumed on a new control link".to_owned(),
                );
                tracing::warn!(migration = %self.spec.id, "paused: {}", Rendered(&blame));
                self.pause_locked(&mut inner, blame);
                true
            }
            _ => return None,
        };
        if inner.outbound.is_some() {
            return None;
        }
        let (outbound, queue) = mpsc::unbounded_channel();
        inner.outbound = Some(outbound);
        inner.epoch += 1;
        inner.epoch_stop = self.stop.child_token();
        inner.epoch_start = first_channel;
        inner.local_done = None;
        inner.peer_done = None;
        if resuming {
            inner.error = None;
            tracing::info!(migration = %self.spec.id, first_channel, "resuming");
        }
        self.next_channel.send_replace(first_channel);
        inner.activated.get_or_insert_with(SystemTime::now);
        self.set_state(&mut inner, State::Active);
        Some(Link {
            queue,
            epoch: inner.epoch,
            stop: inner.epoch_stop.clone(),
        })
    }

    /// Channel `index` of `epoch` is connected to the destination QEMU: the next one may go.
    /// False if the epoch has ended meanwhile (the connection must then be dropped).
    pub fn channel_connected(&self, epoch: Epoch, index: u32) -> bool {
        let inner = self.lock();
        if inner.epoch != epoch || inner.epoch_stop.is_cancelled() {
            return false;
        }
        self.next_channel.send_replace(index.saturating_add(1));
        true
    }

    /// Admits channel `index` into the current epoch.
    pub fn open_channel(&self, index: u32) -> Result<Admitted, ChannelRefused> {
        let mut inner = self.lock();
        if inner.state != State::Active {
            return Err(ChannelRefused::NotActive(self.spec.id.clone(), inner.state));
        }
        if index < inner.epoch_start || index - inner.epoch_start >= self.spec.max_channels {
            return Err(ChannelRefused::TooMany {
                id: self.spec.id.clone(),
                max: self.spec.max_channels,
            });
        }
        while inner.channels.len() <= index as usize {
            inner.channels.push(Channel::new());
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
        Ok(Admitted {
            epoch: inner.epoch,
            stop: inner.epoch_stop.clone(),
            main: index == inner.epoch_start,
        })
    }

    /// A channel that was opened but never ran (its epoch ended first).
    pub fn channel_abandoned(&self, index: u32) {
        let mut inner = self.lock();
        if let Some(channel) = inner.channels.get_mut(index as usize)
            && channel.state == ChannelState::Opening
        {
            channel.state = ChannelState::Cancelled;
        }
        self.observe_cancel(&mut inner);
    }

    /// A channel that could not be set up (its dial or its connect failed): it failed, and
    /// with it the epoch.
    /// If the epoch ended meanwhile (cancel, pause, another failure), the channel was only
    /// abandoned: the migration's verdict is that other cause. A failure on the peer link
    /// waits for the peer's explanation, as every peer-leg failure does.
    pub fn channel_failed(self: &Arc<Self>, epoch: Epoch, index: u32, blame: Attribution) {
        {
            let mut inner = self.lock();
            let current = inner.epoch == epoch
                && !inner.epoch_stop.is_cancelled()
                && inner.cancelling.is_none()
                && inner.state == State::Active;
            if let Some(channel) = inner.channels.get_mut(index as usize)
                && channel.state == ChannelState::Opening
            {
                channel.state = if current {
                    ChannelState::Failed
                } else {
                    ChannelState::Cancelled
                };
                if current {
                    self.publish(json!({"type": "channel_closed", "channel": index,
                        "end": "failed", "bytes": ByteCounts::default()}));
                }
            }
            self.observe_cancel(&mut inner);
            if !current {
                return;
            }
        }
        self.fail_or_wait(epoch, blame);
    }

    /// Once every channel has closed after a cancel, records how long that took.
    fn observe_cancel(&self, inner: &mut Inner) {
        if let Some(asked) = inner.cancel_asked
            && inner.channels.iter().all(Channel::is_final)
        {
            self.metrics.cancelled_in(asked.elapsed());
            inner.cancel_asked = None;
        }
    }

    /// The channel's local leg is up and its relay is running with these counters.
    pub fn channel_running(&self, index: u32, counters: Arc<Counters>) {
        let mut inner = self.lock();
        if let Some(channel) = inner.channels.get_mut(index as usize) {
            channel.state = ChannelState::Active;
            channel.counters = Some(counters);
        }
        Self::send(&inner, Control::ChannelOpened { channel: index });
        self.publish(json!({"type": "channel_opened", "channel": index}));
    }

    /// Publishes an event about this migration (nobody listening is fine).
    fn publish(&self, mut event: serde_json::Value) {
        event["migration"] = json!(self.spec.id);
        event["time"] = json!(unix_seconds(Some(SystemTime::now())));
        let _ = self.events.send(Event(event));
    }

    /// Records how a channel's relay ended, and what that means for the migration.
    /// `qemu_leg` is the name of the relay leg that faces the local QEMU. `shut` is what the
    /// return path said at its end, when it was watched (recoverable migrations, main
    /// channel, source host): `Some(None)` means it closed without a word.
    pub fn channel_ended(
        self: &Arc<Self>,
        index: u32,
        epoch: Epoch,
        report: &Report,
        qemu_leg: &str,
        shut: Option<Option<u32>>,
    ) {
        let mut end = match &report.end {
            End::Completed => ChannelEnd::Completed,
            End::Cancelled => ChannelEnd::Cancelled,
            End::Failed(_) => ChannelEnd::Failed,
        };
        {
            let mut inner = self.lock();
            // Torn down by the source while it carries out this host's cancel.
            if end == ChannelEnd::Failed && inner.cancelling.is_some() {
                end = ChannelEnd::Cancelled;
            }
            if let Some(channel) = inner.channels.get_mut(index as usize) {
                channel.state = match end {
                    ChannelEnd::Completed => ChannelState::Completed,
                    ChannelEnd::Cancelled => ChannelState::Cancelled,
                    ChannelEnd::Failed => ChannelState::Failed,
                };
                channel.bytes = report.bytes;
            }
            self.metrics.channel_ended(report.bytes);
            self.observe_cancel(&mut inner);
            let end_name = match end {
                ChannelEnd::Completed => "completed",
                ChannelEnd::Cancelled => "cancelled",
                ChannelEnd::Failed => "failed",
            };
            self.publish(
                json!({"type": "channel_closed", "channel": index, "end": end_name,
                                "bytes": report.bytes}),
            );
            let bytes = totals(report.bytes);
            Self::send(
                &inner,
                Control::ChannelClosed {
                    channel: index,
                    end,
                    bytes,
                },
            );
        }
        match &report.end {
            End::Completed if shut.is_some_and(|status| status != Some(0)) => {
                let blame = unfinished(index, report, shut.flatten());
                self.fail(epoch, blame, true);
            }
            End::Completed => self.check_done(),
            End::Cancelled => {}
            End::Failed(failure) => {
                let blame = attribution::of_relay(self.host(), index, failure, qemu_leg);
                self.fail_or_wait(epoch, blame);
            }
        }
    }

    /// A failure on this host's QEMU leg is certain: fail now. One on the peer link may be
    /// the echo of a failure on the other host: give its explanation a moment to arrive.
    pub fn fail_or_wait(self: &Arc<Self>, epoch: Epoch, blame: Attribution) {
        if blame.leg == Leg::Qemu {
            self.fail(epoch, blame, true);
            return;
        }
        self.fail_later(epoch, blame);
    }

    /// Fails with `blame` unless, within a grace period, the migration ends otherwise (the
    /// peer's explanation arrives). A migration still pending fails at once.
    pub fn fail_later(self: &Arc<Self>, epoch: Epoch, blame: Attribution) {
        if self.state() == State::Pending {
            self.fail(epoch, blame, true);
            return;
        }
        let migration = Arc::clone(self);
        tokio::spawn(async move {
            let mut state = migration.watch_state();
            let explained = tokio::time::timeout(EXPLANATION_GRACE, async {
                while *state.borrow_and_update() == State::Active {
                    if state.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if explained.is_err() {
                migration.fail(epoch, blame, true);
            }
        });
    }

    /// Ends the current epoch with a failure: a recoverable migration pauses, any other
    /// fails (first cause wins). Reports about an older epoch are ignored.
    pub fn fail(&self, epoch: Epoch, blame: Attribution, tell_peer: bool) {
        let mut inner = self.lock();
        if inner.epoch != epoch || inner.state != State::Active && inner.state != State::Pending {
            return;
        }
        if inner.cancelling.is_some() {
            tracing::debug!(migration = %self.spec.id, "while cancelling: {}", Rendered(&blame));
            return;
        }
        tracing::warn!(migration = %self.spec.id, "{}: {}",
            if self.spec.recoverable { "paused" } else { "failed" }, Rendered(&blame));
        if tell_peer {
            Self::send(&inner, Control::Failed(blame.clone()));
        }
        if self.spec.recoverable && inner.state == State::Active {
            self.pause_locked(&mut inner, blame);
        } else {
            inner.error = Some(blame);
            self.finish(&mut inner, State::Failed);
        }
    }

    /// Ends the current epoch of a recoverable migration, which waits for QEMU's recovery.
    fn pause_locked(&self, inner: &mut Inner, blame: Attribution) {
        self.metrics.migration_ended(State::Paused, Some(&blame));
        inner.error = Some(blame.clone());
        inner.pauses.push(blame);
        inner.paused = Some(SystemTime::now());
        self.end_epoch(inner);
        self.set_state(inner, State::Paused);
    }

    /// A paused migration's resume failed (QEMU's recovery came, the peer could not be
    /// reached): it stays paused, and the failure is its latest cause.
    pub fn resume_failed(&self, blame: Attribution) {
        let mut inner = self.lock();
        if inner.state != State::Paused {
            return;
        }
        tracing::warn!(migration = %self.spec.id, "resume failed: {}", Rendered(&blame));
        inner.error = Some(blame.clone());
        inner.pauses.push(blame);
        let error = inner.error.as_ref().map(attribution::Report::from);
        self.publish(json!({"type": "state", "state": State::Paused, "error": error}));
    }

    /// Cancels the migration on behalf of `by`; tells the peer if the cancel is ours.
    /// Returns false when the migration had already ended.
    pub fn cancel(&self, by: Host) -> bool {
        let mut inner = self.lock();
        // Once this host has told the peer it is done, the peer may already have completed:
        // a cancel now would leave the hosts with different stories. Once QEMU has completed
        // here, the guest is the destination's.
        let qemu_completed = inner.qemu.as_ref().is_some_and(|q| q.status == "completed");
        let completing = by == self.host() && (inner.local_done.is_some() || qemu_completed);
        if inner.state.is_final() || completing {
            return false;
        }
        if by == self.host() && inner.cancelling.is_none() {
            Self::send(&inner, Control::Cancel { by });
        }
        self.finish_cancel_locked(&mut inner, by);
        true
    }

    fn finish_cancel_locked(&self, inner: &mut Inner, by: Host) {
        inner.cancelled_by = Some(by);
        inner.cancel_asked.get_or_insert_with(Instant::now);
        self.finish(inner, State::Cancelled);
        self.observe_cancel(inner);
    }

    /// The peer closed the control link of `epoch`. True when that ends a cancel this host
    /// asked for: the source has ended its side, the migration is cancelled here too.
    pub fn link_closed(&self, epoch: Epoch) -> bool {
        let mut inner = self.lock();
        let Some(by) = inner.cancelling else {
            return false;
        };
        if inner.epoch == epoch && !inner.state.is_final() {
            self.finish_cancel_locked(&mut inner, by);
        }
        true
    }

    /// Destination: asks the source to cancel first, when a control link is up. Its QEMU,
    /// when the source daemon drives one, must be cancelled before the sockets under it go:
    /// tearing this host's channels down at once would reset them under the source QEMU,
    /// which then fails ("Connection reset by peer") instead of cancelling. False when there
    /// is nobody to ask.
    fn ask_source_to_cancel(&self, by: Host) -> bool {
        let mut inner = self.lock();
        let qemu_completed = inner.qemu.as_ref().is_some_and(|q| q.status == "completed");
        if self.spec.role != Role::Incoming
            || inner.state != State::Active
            || inner.outbound.is_none()
            // Done here: the cancel is refused (see `cancel`).
            || inner.local_done.is_some()
            || qemu_completed
        {
            return false;
        }
        if inner.cancelling.is_none() {
            Self::send(&inner, Control::Cancel { by });
            inner.cancelling = Some(by);
            inner.cancel_asked = Some(Instant::now());
        }
        true
    }

    /// Ends a migration whose control link never came up in time.
    pub fn expire(&self) {
        let mut inner = self.lock();
        if inner.state == State::Pending {
            self.finish(&mut inner, State::Expired);
        }
    }

    /// Applies a control frame from the peer daemon, received on the link of `epoch`.
    pub fn on_peer(self: &Arc<Self>, epoch: Epoch, control: Control) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        match control {
            Control::Heartbeat | Control::ChannelOpened { .. } => {}
            Control::ChannelClosed {
                channel,
                end,
                bytes,
            } => {
                if let Some(c) = inner.channels.get_mut(channel as usize) {
                    c.peer_end = Some((end, bytes));
                }
            }
            Control::Failed(blame) => {
                // The source failed before it saw this host's cancel: its story is the one
                // both hosts tell.
                inner.cancelling = None;
                drop(inner);
                self.fail(epoch, blame, false);
            }
            Control::Cancel { by } if inner.qemu_cancel.is_some() => {
                drop(inner);
                let migration = Arc::clone(self);
                tokio::spawn(async move { migration.cancel_through_qemu(by).await });
            }
            Control::Cancel { by } => {
                drop(inner);
                self.cancel(by);
            }
            Control::Done { channels, bytes } => {
                inner.peer_done = Some((channels, bytes));
                self.check_done_locked(&mut inner);
            }
        }
    }

    /// When every channel of the epoch has completed here, says so to the peer; when the
    /// peer has said the same with equal counts, the migration is completed.
    fn check_done(&self) {
        let mut inner = self.lock();
        self.check_done_locked(&mut inner);
    }

    fn check_done_locked(&self, inner: &mut Inner) {
        let epoch = &inner.channels[(inner.epoch_start as usize).min(inner.channels.len())..];
        if inner.state != State::Active || epoch.is_empty() {
            return;
        }
        // With QEMU driven here, QEMU's word is needed too: `completed` on both hosts.
        let qemu_done = inner.qemu.as_ref().is_none_or(|q| q.status == "completed");
        if inner.local_done.is_none()
            && qemu_done
            && epoch.iter().all(|c| c.state == ChannelState::Completed)
        {
            let done = (epoch.len() as u32, totals(sum(epoch)));
            inner.local_done = Some(done);
            Self::send(
                inner,
                Control::Done {
                    channels: done.0,
                    bytes: done.1,
                },
            );
        }
        match (inner.local_done, inner.peer_done) {
            (Some(local), Some(peer)) if local == peer => {
                self.finish(inner, State::Completed);
            }
            (Some(local), Some(peer)) if local.0 == peer.0 => {
                // Same channels, different bytes: something between the daemons lost data.
                let (source, destination) = self.as_source_destination(local.1, peer.1);
                let start = inner.epoch_start;
                let first = self.first_disagreement(start, &inner.channels[start as usize..]);
                let blame = attribution::disagreement(source, destination, first);
                tracing::warn!(migration = %self.spec.id, "failed: {}", Rendered(&blame));
                Self::send(inner, Control::Failed(blame.clone()));
                inner.error = Some(blame);
                self.finish(inner, State::Failed);
            }
            // Otherwise one side has seen fewer channels so far: wait for the rest.
            _ => {}
        }
    }

    /// This host's and the peer's figures, as (source's, destination's).
    fn as_source_destination(&self, local: Totals, peer: Totals) -> (Totals, Totals) {
        match self.spec.role {
            Role::Outgoing => (local, peer),
            Role::Incoming => (peer, local),
        }
    }

    /// The first channel and direction (to destination first) whose count differs between
    /// this host and the peer's `ChannelClosed`, which the peer sent before its `Done`: both
    /// hosts find the same one.
    fn first_disagreement(
        &self,
        start: u32,
        epoch: &[Channel],
    ) -> Option<attribution::Disagreement> {
        epoch.iter().enumerate().find_map(|(i, channel)| {
            let (_, peer) = channel.peer_end?;
            let (source, destination) = self.as_source_destination(totals(channel.bytes), peer);
            let direction = if source.to_destination != destination.to_destination {
                Direction::ToDestination
            } else if source.to_source != destination.to_source {
                Direction::ToSource
            } else {
                return None;
            };
            Some(attribution::Disagreement {
                channel: start + i as u32,
                direction,
                source,
                destination,
            })
        })
    }

    /// Closes the control link after what is queued, and tears down the epoch's channels.
    fn end_epoch(&self, inner: &mut Inner) {
        if let Some(outbound) = inner.outbound.take() {
            let _ = outbound.send(Outbound::Close);
        }
        inner.epoch_stop.cancel();
    }

    fn finish(&self, inner: &mut Inner, state: State) {
        inner.ended = Some(Instant::now());
        inner.ended_at = Some(SystemTime::now());
        let cause = if state == State::Failed {
            inner.error.as_ref()
        } else {
            None
        };
        self.metrics.migration_ended(state, cause);
        self.end_epoch(inner);
        self.set_state(inner, state);
        self.stop.cancel();
    }

    fn set_state(&self, inner: &mut Inner, state: State) {
        inner.state = state;
        tracing::info!(migration = %self.spec.id, ?state, "state");
        self.state_tx.send_replace(state);
        let error = match state {
            State::Failed | State::Paused => inner.error.as_ref().map(attribution::Report::from),
            _ => None,
        };
        self.publish(json!({"type": "state", "state": state, "error": error}));
    }

    /// Bytes of channels still being relayed (the finished ones are in the metrics).
    pub fn live_bytes(&self) -> (ByteCounts, u64) {
        let inner = self.lock();
        let running: Vec<&Channel> = inner.channels.iter().filter(|c| !c.is_final()).collect();
        let bytes = running
            .iter()
            .fold(ByteCounts::default(), |acc, c| add(acc, c.bytes()));
        let active = running
            .iter()
            .filter(|c| c.state == ChannelState::Active)
            .count();
        (bytes, active as u64)
    }

    /// A consistent view for the API.
    pub fn snapshot(&self) -> Snapshot {
        let mut inner = self.lock();
        // Live counters move while they are read: read each once, and add those up.
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
        let total = channels
            .iter()
            .fold(ByteCounts::default(), |acc, c| add(acc, c.bytes));
        let now = Instant::now();
        // Samples move on at most once a second, whoever reads: readers polling at least
        // once a second (the CLI's live line) see the rate over the last one to two seconds,
        // and no reader shortens another's window; a rarer reader sees the rate since the
        // read before.
        if now.duration_since(inner.rate_samples[1].0) >= Duration::from_secs(1) {
            inner.rate_samples = [inner.rate_samples[1], (now, total.to_destination)];
        }
        let (since, then) = inner.rate_samples[0];
        let window = now.duration_since(since).as_secs_f64();
        let current = if inner.state == State::Active && window > 0.0 {
            (total.to_destination.saturating_sub(then) as f64 / window) as u64
        } else {
            0
        };
        let elapsed = inner.ended.unwrap_or(now).duration_since(self.started);
        let average = match elapsed.as_secs_f64() {
            secs if secs > 0.0 => (total.to_destination as f64 / secs) as u64,
            _ => 0,
        };
        let peer_channels: Vec<PeerChannel> = inner
            .channels
            .iter()
            .enumerate()
            .filter_map(|(index, c)| {
                c.peer_end.map(|(end, bytes)| PeerChannel {
                    index: index as u32,
                    end: match end {
                        ChannelEnd::Completed => "completed",
                        ChannelEnd::Cancelled => "cancelled",
                        ChannelEnd::Failed => "failed",
                    },
                    bytes: ByteCounts {
                        to_destination: bytes.to_destination,
                        to_source: bytes.to_source,
                    },
                })
            })
            .collect();
        Snapshot {
            id: self.spec.id.clone(),
            direction: self.spec.role,
            state: inner.state,
            peer: self.spec.peer.clone(),
            local: self.spec.local.to_string(),
            recoverable: self.spec.recoverable,
            link: if self.spec.tls { "tls" } else { "plaintext" },
            bytes: total,
            channels,
            error: inner.error.as_ref().map(attribution::Report::from),
            pauses: inner.pauses.iter().map(attribution::Report::from).collect(),
            cancelled_by: inner.cancelled_by.map(attribution::host_name),
            created_at: self
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
            elapsed_ms: elapsed.as_millis() as u64,
            throughput: Throughput {
                current_bytes_per_second: current,
                average_bytes_per_second: average,
            },
            timestamps: Timestamps {
                created: unix_seconds(Some(self.created)),
                active: unix_seconds(inner.activated),
                paused: unix_seconds(inner.paused),
                ended: unix_seconds(inner.ended_at),
            },
            qemu: self
                .spec
                .qemu
                .as_ref()
                .zip(inner.qemu.clone())
                .map(|(settings, report)| QemuView {
                    settings: settings.clone(),
                    report,
                }),
            peer_view: PeerView {
                channels: peer_channels,
                done: inner.peer_done.map(|(channels, bytes)| PeerDone {
                    channels,
                    bytes: ByteCounts {
                        to_destination: bytes.to_destination,
                        to_source: bytes.to_source,
                    },
                }),
            },
        }
    }

    /// Fails the current epoch when no byte has moved on any channel for `limit` while the
    /// migration is active with at least one channel (a QEMU that stopped sending or reading,
    /// or a link that stalls without breaking). Returns when the migration ends.
    pub async fn watch_stall(self: Arc<Self>, limit: Duration) {
        let tick = (limit / 4).max(Duration::from_millis(50));
        let progress = || {
            let inner = self.lock();
            let idle = inner.state != State::Active || inner.channels.is_empty();
            (sum(&inner.channels).total(), inner.epoch, idle)
        };
        let mut last = {
            let (moved, epoch, _) = progress();
            (moved, Instant::now(), epoch)
        };
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let (moved, epoch, idle) = progress();
            if moved != last.0 || epoch != last.2 || idle {
                last = (moved, Instant::now(), epoch);
            } else if last.1.elapsed() >= limit {
                let blame = self.peer_link_failure(
                    Op::Timeout,
                    None,
                    format!("no byte moved on any channel for {}", Elapsed(limit)),
                );
                self.fail(epoch, blame, true);
            }
        }
    }

    /// Records a `query-migrate` answer from the local QEMU; publishes a `qemu` event when
    /// QEMU's status or pass changes.
    pub fn qemu_observed(
        &self,
        info: serde_json::Value,
        pass: Option<u64>,
        statuses: &[&str],
        wall: Duration,
    ) {
        let mut inner = self.lock();
        let Some(report) = inner.qemu.as_mut() else {
            return;
        };
        let before = (report.status.clone(), report.pass);
        report.update(&info, pass, statuses, wall);
        if before != (report.status.clone(), report.pass) {
            let event = qemu_event(report);
            drop(inner);
            self.publish(event);
        }
    }

    /// QEMU refused to switch to postcopy: the migration goes on in precopy, and the
    /// report and a `qemu` event say why.
    pub fn qemu_postcopy_refused(&self, error: String) {
        tracing::warn!(migration = %self.spec.id, "QEMU did not switch to postcopy: {error}");
        let mut inner = self.lock();
        let Some(report) = inner.qemu.as_mut() else {
            return;
        };
        report.postcopy_error = Some(error);
        let event = qemu_event(report);
        drop(inner);
        self.publish(event);
    }

    /// The local QEMU's monitor closed: QEMU exited or crashed.
    pub fn qemu_monitor_closed(&self) {
        let mut inner = self.lock();
        let Some(report) = inner.qemu.as_mut() else {
            return;
        };
        report.monitor_closed = true;
        let event = qemu_event(report);
        drop(inner);
        self.publish(event);
    }

    /// The local QEMU says `completed`: this host may say `Done` once its channels are.
    pub fn qemu_completed(&self) {
        self.check_done();
    }

    /// Whether the local QEMU has given its verdict (`completed`, `failed`, `cancelled`).
    pub fn qemu_final(&self) -> bool {
        self.lock()
            .qemu
            .as_ref()
            .is_some_and(qemu::Report::is_final)
    }

    /// QEMU's `error-desc`, if it gave one.
    pub fn qemu_error(&self) -> Option<String> {
        self.lock().qemu.as_ref().and_then(|q| q.error_desc.clone())
    }

    /// A failure of this host's QEMU, as QEMU told it.
    pub fn qemu_failure(&self, message: String) -> Attribution {
        qemu::attribution(self, message)
    }

    /// Registers the task that cancels the source QEMU first.
    pub fn set_qemu_canceller(&self, canceller: mpsc::Sender<qemu::CancelRequest>) {
        self.lock().qemu_cancel = Some(canceller);
    }

    /// Cancels on behalf of `by`, through the source QEMU first when the daemon drives it
    /// (so that QEMU reports `cancelled` and resumes the guest rather than failing on the
    /// sockets torn down under it). A cancel asked on this host is refused once QEMU has
    /// switched to postcopy or completed here: the guest would be lost.
    pub async fn cancel_through_qemu(self: &Arc<Self>, by: Host) -> Result<bool, CancelRefused> {
        let canceller = {
            let inner = self.lock();
            if inner.state.is_final() {
                return Ok(false);
            }
            let status = inner.qemu.as_ref().map_or("", |q| q.status.as_str());
            if by == self.host() && status.starts_with("postcopy") {
                return Err(CancelRefused::Postcopy);
            }
            if by == self.host() && status == "completed" {
                return Err(CancelRefused::Completed);
            }
            let postcopy = self.spec.qemu.as_ref().is_some_and(|q| q.postcopy);
            if by == self.host() && self.spec.role == Role::Incoming && postcopy {
                return Err(CancelRefused::AskTheSource);
            }
            inner.qemu_cancel.clone()
        };
        if by == self.host() && self.ask_source_to_cancel(by) {
            // The source ends its side (QEMU first), then closes the link: `link_closed`
            // finishes the cancel here. A source that does not is not waited for long — by
            // a task of its own, so that a caller who leaves (an API client hanging up) does
            // not leave the migration waiting.
            let migration = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(QEMU_CANCEL).await;
                migration.cancel(by);
            });
            let mut state = self.watch_state();
            let _ = state.wait_for(|s| s.is_final()).await;
            return Ok(self.cancelled_by() == Some(by));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = qemu::CancelRequest { by, reply };
        if let Some(canceller) = canceller
            && canceller.try_send(request).is_ok()
            && let Ok(Ok(outcome)) = tokio::time::timeout(QEMU_CANCEL, answer).await
        {
            return outcome.map(|cancelled| cancelled || self.state() == State::Cancelled);
        }
        Ok(self.cancel(by))
    }

    /// Who cancelled the migration, once cancelled.
    fn cancelled_by(&self) -> Option<Host> {
        self.lock().cancelled_by
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.lock().epoch
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
        let inner = self.lock();
        self.peer_link_failure_locked(&inner, op, errno, message)
    }

    fn peer_link_failure_locked(
        &self,
        inner: &Inner,
        op: Op,
        errno: Option<String>,
        message: String,
    ) -> Attribution {
        Attribution {
            host: self.host(),
            leg: Leg::Peer,
            channel: None,
            direction: None,
            op,
            errno,
            message,
            bytes: totals(sum(&inner.channels)),
            elapsed_ms: self.elapsed().as_millis() as u64,
        }
    }
}

/// A main channel that closed cleanly without QEMU's end-of-migration message: postcopy
/// paused (or, with a status, the destination failed).
fn unfinished(index: u32, report: &Report, status: Option<u32>) -> Attribution {
    let (host, message) = match status {
        None => (
            Host::Source,
            "QEMU closed the migration stream without finishing it (no SHUT on the return \
             path): paused"
                .to_owned(),
        ),
        Some(status) => (
            Host::Destination,
            format!("the destination QEMU ended the migration with error status {status}"),
        ),
    };
    Attribution {
        host,
        leg: Leg::Qemu,
        channel: Some(index),
        // What was missing would have come back on the return path.
        direction: Some(Direction::ToSource),
        op: Op::Shutdown,
        errno: None,
        message,
        bytes: totals(report.bytes),
        elapsed_ms: report.elapsed.as_millis() as u64,
    }
}

/// A `qemu` event: QEMU's status, pass and RAM left, or its monitor gone.
fn qemu_event(report: &qemu::Report) -> serde_json::Value {
    json!({"type": "qemu", "status": report.status, "pass": report.pass,
        "ram_remaining": report.ram.as_ref().map(|r| r.remaining),
        "error_desc": report.error_desc, "monitor_closed": report.monitor_closed,
        "postcopy_error": report.postcopy_error})
}

fn sum(channels: &[Channel]) -> ByteCounts {
    channels
        .iter()
        .fold(ByteCounts::default(), |acc, c| add(acc, c.bytes()))
}

fn add(a: ByteCounts, b: ByteCounts) -> ByteCounts {
    ByteCounts {
        to_destination: a.to_destination.saturating_add(b.to_destination),
        to_source: a.to_source.saturating_add(b.to_source),
    }
}

pub fn totals(bytes: ByteCounts) -> Totals {
    Totals {
        to_destination: bytes.to_destination,
        to_source: bytes.to_source,
    }
}

fn unix_seconds(at: Option<SystemTime>) -> Option<f64> {
    at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// Something that happened to a migration, as `GET /v1/events` sends it: a JSON object with
/// `type` (`state`, `channel_opened`, `channel_closed`), `migration` and `time`.
#[derive(Debug, Clone)]
pub struct Event(pub serde_json::Value);

/// Bytes per second towards the destination.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Over the last second or so (0 unless active).
    pub current_bytes_per_second: u64,
    /// Since the migration was created.
    pub average_bytes_per_second: u64,
}

/// When each phase began, in seconds since the Unix epoch.
#[derive(Debug, Clone, Serialize)]
pub struct Timestamps {
    pub created: Option<f64>,
    pub active: Option<f64>,
    /// The last pause.
    pub paused: Option<f64>,
    pub ended: Option<f64>,
}

/// What the other daemon has reported over the control link.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// Channels the peer has reported ended, with its counts.
    pub channels: Vec<PeerChannel>,
    /// The peer's totals once every channel ended cleanly there.
    pub done: Option<PeerDone>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerChannel {
    pub index: u32,
    pub end: &'static str,
    pub bytes: ByteCounts,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerDone {
    pub channels: u32,
    pub bytes: ByteCounts,
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
    /// Pauses instead of failing (postcopy recovery).
    pub recoverable: bool,
    /// `tls` (mutual TLS between the daemons) or `plaintext`.
    pub link: &'static str,
    pub bytes: ByteCounts,
    pub channels: Vec<ChannelSnapshot>,
    /// The failure that ended the migration, or paused it (while paused).
    pub error: Option<attribution::Report>,
    /// Every failure that paused it, oldest first.
    pub pauses: Vec<attribution::Report>,
    pub cancelled_by: Option<&'static str>,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
    pub elapsed_ms: u64,
    pub throughput: Throughput,
    pub timestamps: Timestamps,
    /// The local QEMU's view, when the daemon drives it (the migration's `qmp`).
    pub qemu: Option<QemuView>,
    /// The other daemon's reports.
    pub peer_view: PeerView,
}

/// What the daemon asked of its QEMU, and what QEMU says.
#[derive(Debug, Clone, Serialize)]
pub struct QemuView {
    pub settings: qemu::Settings,
    #[serde(flatten)]
    pub report: qemu::Report,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelSnapshot {
    pub index: u32,
    pub state: ChannelState,
    pub bytes: ByteCounts,
}
