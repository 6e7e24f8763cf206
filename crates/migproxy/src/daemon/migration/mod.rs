//! One migration as one daemon sees it: the lifecycle ([`state`], pure), the wrapper that
//! carries out its effects ([`Migration`]: sockets, tasks, the clock), the channel table's
//! live half ([`channels`]) and what the API shows ([`view`]).
//!
//! Every input — a control link attached, a channel opened or ended, a frame from the peer,
//! a timer, QEMU's status, a cancel — goes through [`Migration::step`]: one lock, one call
//! of [`state::Core::step`], then the effects, in order, under the same lock. Timers
//! (explanation grace, cancel wait, first-channel deadline, token TTL, stall watch) are tasks
//! on the daemon's tracker that feed inputs back; none decides anything itself.
//!
//! A *recoverable* migration (postcopy) does not fail when a channel or the link breaks: it
//! pauses, as QEMU does (`postcopy-paused`). Every channel of the broken *epoch* is torn down;
//! the control link, if sound, is kept ([`parked`](Migration::parked)), else a new one is
//! dialled, and the source starts the new epoch on it with a hello naming its first channel.
//! Fresh channels follow QEMU's recovery. Completion counts the last epoch only.
//!
//! Every ending is mirrored to the peer daemon over the control link: a local failure is sent
//! as [`Control::Failed`] with its attribution, so that the peer reports the same cause
//! instead of the symptom it sees (a reset data connection). A failure seen only on the peer
//! link waits briefly for such an explanation before blaming the network.

mod cancel;
mod channel_ends;
pub mod channels;
pub mod early;
pub mod group;
pub mod handoff;
mod late;
mod local_qemu;
mod path;
mod recovery;
mod rejoin;
pub mod resumable;
mod resuming;
pub mod sequence;
mod snapshot;
mod stall;
pub mod state;
pub mod view;

#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod timers;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use migproxy_proto::{Attribution, Control, Host, Leg, Op};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::handoff::Preamble;
pub use self::state::{ChannelState, Epoch, Phase, Role, State};
use self::state::{Core, Effect, Input, Now, Refusal};
pub use self::view::Event;
use self::view::EventKind;
use super::attribution::{self, Rendered};
use super::data_path::{Choice, DataPath};
use super::metrics::Metrics;
use super::qemu::report::{self as qemu, CancelRefused};
use crate::endpoint::Endpoint;
use crate::relay::ByteCounts;

/// What goes to the control writer.
#[derive(Debug)]
pub enum Outbound {
    Frame(Control),
    /// Everything queued has been sent: close the control link.
    Close,
}

/// How long the timers of a migration run.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// How long a failure seen only on the peer link waits for the peer's explanation.
    pub explanation: Duration,
    /// How long a cancel waits for the source (or its QEMU) to end its side.
    pub cancel_wait: Duration,
    /// How long an incoming migration waits for its source daemon.
    pub token_ttl: Duration,
    /// How long a migration whose control link is up waits for its first channel.
    pub first_channel: Duration,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            explanation: Duration::from_millis(1000),
            cancel_wait: Duration::from_secs(2),
            token_ttl: Duration::from_secs(300),
            first_channel: Duration::from_secs(300),
        }
    }
}

/// What a migration shares with its daemon.
#[derive(Debug, Clone)]
pub struct Context {
    pub metrics: Arc<Metrics>,
    pub events: broadcast::Sender<Event>,
    /// The daemon's tracker: every task of the migration runs on it.
    pub tasks: TaskTracker,
    pub timers: Timers,
}

/// Fixed facts about a migration, given at creation.
#[derive(Debug)]
pub struct Spec {
    pub id: String,
    pub role: Role,
    pub token: super::token::Token,
    /// The other daemon's peer address (as given to, or handed out by, this daemon).
    pub peer: String,
    /// Incoming: the destination QEMU's endpoint. Outgoing: the socket handed to QEMU.
    pub local: Endpoint,
    /// Channels per epoch, at most.
    pub max_channels: u32,
    /// Pause instead of failing (postcopy recovery).
    pub recoverable: bool,
    /// How long a pause may last before the migration fails for good (`None`: until a
    /// person cancels it).
    pub recover_timeout: Option<Duration>,
    /// How long a resumable channel may go without a working peer connection; `None`: the
    /// channels are not resumable ([`resumable`]).
    pub resume_timeout: Option<Duration>,
    /// Outgoing: the name the destination daemon's certificate must carry.
    pub server_name: String,
    /// Whether the peer link is encrypted and authenticated (TLS) or plaintext.
    pub tls: bool,
    /// The local QEMU, when the daemon drives it over QMP.
    pub qemu: Option<qemu::Settings>,
    /// Migrations of one group (a guest's RAM and its disks) share one stall watch.
    pub group: Option<String>,
    /// The data path asked for at creation.
    pub data_path_asked: DataPath,
    /// What this host can do of it: the kernel path, or the relay and why.
    pub data_path_here: Choice,
}

/// A cancel asked of the task following the source QEMU: it runs `migrate_cancel` (unless
/// that would lose the guest), then cancels the migration on behalf of `by`, and answers.
#[derive(Debug)]
pub struct CancelRequest {
    pub by: Host,
    pub reply: oneshot::Sender<Result<bool, CancelRefused>>,
}

/// Why a channel could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("migration {id}: {reason}")]
pub struct ChannelRefused {
    pub id: String,
    #[source]
    pub reason: Refusal,
}

/// A control link just attached: what it must send, and the epoch it belongs to.
#[derive(Debug)]
pub struct Link {
    pub queue: mpsc::UnboundedReceiver<Outbound>,
    pub epoch: Epoch,
    /// Cancelled when the epoch ends.
    pub stop: CancellationToken,
    /// Cancelled when another connection takes over this link (resumable channels).
    pub replaced: CancellationToken,
    /// It takes over a broken link: the epoch's frames the peer missed go again first
    /// ([`sequence`]).
    pub takes_over: bool,
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

/// A data connection admitted for the kernel path, with what its channel needs.
#[derive(Debug)]
pub struct Arrived {
    pub index: u32,
    pub admitted: Admitted,
    pub socket: std::net::TcpStream,
    /// The source daemon's address, `tcp:HOST:PORT`.
    pub from: String,
    /// The hello and reply that came first on the connection.
    pub preamble: Preamble,
}

/// A migration, shared between the API, the control link and the channel tasks.
#[derive(Debug)]
pub struct Migration {
    pub spec: Spec,
    context: Context,
    created: SystemTime,
    started: Instant,
    /// Cancelled when the migration ends: stops accepting, aborts every channel still running.
    stop: CancellationToken,
    inner: Mutex<Inner>,
    /// The state, for those who wait on it.
    state_tx: watch::Sender<State>,
    /// Incoming: the next channel index allowed to connect to the destination QEMU.
    next_channel: watch::Sender<u32>,
    /// Incoming: whether the destination QEMU listens (at once, unless QEMU is driven here
    /// and told to listen only once the source daemon has come).
    qemu_ready: watch::Sender<bool>,
    /// The group it belongs to, once registered in one.
    group: std::sync::OnceLock<Arc<group::Group>>,
    /// The data path both hosts settled on when the control link attached.
    data_path: std::sync::OnceLock<Choice>,
    /// Incoming, kernel path: the data connection, on its way to the destination QEMU.
    pub handoff: handoff::Handoff<Arrived>,
    /// Incoming, recovered by hand: the destination QEMU connected as soon as it listens.
    early: early::EarlyLeg,
    /// The channels carried across peer connections that break.
    pub resumable: resumable::Resumable,
    /// Outgoing, paused: QEMU's recovery came, and waits for the control link (dial now).
    pub recovery_came: tokio::sync::Notify,
    /// Outgoing, paused: the control link kept for the next epoch.
    pub parked: handoff::Handoff<crate::transport::Stream>,
    /// The peer's word on its end, heard after this host's.
    late: Mutex<Option<view::LateEnd>>,
    /// Destination: a link with the source's last frames was taken after the end; a second
    /// one is refused (a credential must not admit links for ever).
    last_frames_taken: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Inner {
    core: Core,
    live: channels::Live,
    /// The control writer's queue, while a control link is up.
    outbound: Option<mpsc::UnboundedSender<Outbound>>,
    /// The queue a new epoch's link takes, between `BeginEpoch` and `attach_control`.
    new_link: Option<mpsc::UnboundedReceiver<Outbound>>,
    /// Cancelled when the epoch ends (pause or end): its channels are torn down.
    epoch_stop: CancellationToken,
    /// When this host was asked to cancel.
    cancel_asked: Option<Instant>,
    /// The time from the cancel until every channel closed has been recorded.
    cancel_timed: bool,
    /// Phase timestamps, for the API.
    activated: Option<SystemTime>,
    paused: Option<SystemTime>,
    ended_at: Option<SystemTime>,
    ended: Option<Instant>,
    /// The two latest (time, bytes to destination) samples, a second or more apart.
    rate_samples: [(Instant, u64); 2],
    /// QEMU's view, when the daemon drives QEMU.
    qemu: Option<qemu::Report>,
    /// The task following QEMU, which cancels QEMU before the sockets (source).
    qemu_cancel: Option<mpsc::Sender<CancelRequest>>,
    /// The last state announced (event, watchers).
    announced: State,
    /// What data connections of the current epoch must carry instead of the one-time token:
    /// a secret the destination handed out on this epoch's control link (protocol 2 on).
    credential: Option<super::token::Token>,
    /// The control link's own stop: a link that takes over from it cancels it.
    link_replaced: CancellationToken,
}

impl Migration {
    /// A new migration in `pending`, whose timers run on `context.tasks`.
    pub fn new(spec: Spec, context: Context) -> Arc<Migration> {
        let stop = CancellationToken::new();
        let core = Core::new(state::Config {
            role: spec.role,
            recoverable: spec.recoverable,
            max_channels: spec.max_channels,
            qemu: spec.qemu.is_some(),
            postcopy: spec.qemu.as_ref().is_some_and(|q| q.postcopy),
            recover_timeout_ms: spec.recover_timeout.map(|t| t.as_millis() as u64),
        });
        let qemu_driven = spec.qemu.is_some();
        let migration = Arc::new(Migration {
            context,
            created: SystemTime::now(),
            started: Instant::now(),
            inner: Mutex::new(Inner {
                core,
                live: channels::Live::default(),
                outbound: None,
                new_link: None,
                epoch_stop: stop.child_token(),
                cancel_asked: None,
                cancel_timed: false,
                activated: None,
                paused: None,
                ended_at: None,
                ended: None,
                rate_samples: [(Instant::now(), 0); 2],
                qemu: qemu_driven.then(qemu::Report::default),
                qemu_cancel: None,
                announced: State::Pending,
                credential: None,
                link_replaced: CancellationToken::new(),
            }),
            stop,
            state_tx: watch::channel(State::Pending).0,
            next_channel: watch::channel(0).0,
            qemu_ready: watch::channel(!qemu_driven).0,
            group: std::sync::OnceLock::new(),
            data_path: std::sync::OnceLock::new(),
            handoff: handoff::Handoff::default(),
            early: early::EarlyLeg::default(),
            recovery_came: tokio::sync::Notify::new(),
            parked: handoff::Handoff::default(),
            late: Mutex::default(),
            last_frames_taken: std::sync::atomic::AtomicBool::new(false),
            resumable: resumable::Resumable::default(),
            spec,
        });
        migration.start_ttl();
        migration
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug elsewhere; the state is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Feeds one input to the lifecycle and carries out its effects, under one lock.
    fn step(self: &Arc<Self>, input: Input) -> Result<(), Refusal> {
        let mut inner = self.lock();
        self.step_locked(&mut inner, input)
    }

    fn step_locked(self: &Arc<Self>, inner: &mut Inner, input: Input) -> Result<(), Refusal> {
        self.step_then(inner, input, |_| {})
    }

    /// As [`step_locked`](Self::step_locked); `first` runs between the lifecycle's step and
    /// its effects (an event that must precede the state change it causes).
    fn step_then(
        self: &Arc<Self>,
        inner: &mut Inner,
        input: Input,
        first: impl FnOnce(&Inner),
    ) -> Result<(), Refusal> {
        let name = input.name();
        let before = (inner.core.phase(), inner.core.paused());
        let now = self.now(inner);
        let effects = inner.core.step(input, now).inspect_err(|refusal| {
            tracing::debug!(migration = %self.spec.id, input = name, %refusal, "not taken");
        })?;
        first(inner);
        self.apply(inner, effects);
        self.observe(inner, before);
        Ok(())
    }

    fn now(&self, inner: &Inner) -> Now {
        Now {
            bytes: channels::totals(inner.live.total(inner.core.channels())),
            elapsed_ms: self.elapsed().as_millis() as u64,
        }
    }

    /// Carries out what the core asked for, in its order, under the same lock as the step.
    fn apply(self: &Arc<Self>, inner: &mut Inner, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(control) => {
                    // Dropped when no link is up: the core's state says what the peer missed.
                    if let Some(outbound) = &inner.outbound {
                        let _ = outbound.send(Outbound::Frame(control));
                    }
                }
                Effect::BeginEpoch { .. } => self.begin_epoch(inner),
                Effect::EndEpoch => {
                    end_epoch(inner);
                    self.resumable.close_outages();
                }
                Effect::Release { index } => {
                    self.next_channel.send_replace(index);
                }
                Effect::AwaitExplanation { epoch, blame } => {
                    let wait = self.context.timers.explanation;
                    self.after(wait, Input::GraceOver { epoch, blame });
                }
                Effect::AwaitSourceCancel => {
                    inner.cancel_asked = Some(Instant::now());
                    self.after(self.context.timers.cancel_wait, Input::CancelWaitOver);
                }
                Effect::AwaitFirstChannel => self.await_first_channel(inner),
                Effect::CancelQemu { by } => self.spawn_qemu_cancel(inner, by),
                Effect::Stop => {
                    inner.ended = Some(Instant::now());
                    inner.ended_at = Some(SystemTime::now());
                    self.stop.cancel();
                }
                Effect::Announce(note) => self.note(note),
                Effect::AwaitRecovery { pause, limit_ms } => {
                    let limit = Duration::from_millis(limit_ms);
                    self.after(limit, Input::RecoverOver { pause, limit_ms });
                }
            }
        }
    }

    /// A new epoch: a fresh queue for its control link, and a stop of its own for its
    /// channels (a child of the migration's, so the end stops them too).
    fn begin_epoch(&self, inner: &mut Inner) {
        let (outbound, queue) = mpsc::unbounded_channel();
        inner.outbound = Some(outbound);
        inner.new_link = Some(queue);
        inner.epoch_stop = self.stop.child_token();
        inner.activated.get_or_insert_with(SystemTime::now);
    }

    /// Arms the first-channel deadline of the current epoch.
    fn await_first_channel(self: &Arc<Self>, inner: &Inner) {
        let limit = self.context.timers.first_channel;
        let input = Input::FirstChannelOver {
            epoch: inner.core.epoch(),
            limit_ms: limit.as_millis() as u64,
        };
        self.after(limit, input);
    }

    /// Feeds `input` after `delay` (counted from now, not from when the task first runs),
    /// unless the migration ends first.
    fn after(self: &Arc<Self>, delay: Duration, input: Input) {
        let deadline = tokio::time::Instant::now() + delay;
        let migration = Arc::clone(self);
        self.context.tasks.spawn(async move {
            tokio::select! {
                () = migration.stop.cancelled() => {}
                () = tokio::time::sleep_until(deadline) => {
                    let _ = migration.step(input);
                }
            }
        });
    }

    /// What follows a step: the state for watchers, the event, the log, the metrics — once
    /// per change of state (a pause hidden inside one step counts too).
    fn observe(self: &Arc<Self>, inner: &mut Inner, before: (Phase, u32)) {
        self.observe_cancel(inner);
        if inner.core.paused() != before.1 {
            inner.paused = Some(SystemTime::now());
            self.paused_again();
            self.announce(inner, Phase::Paused);
        }
        let phase = inner.core.phase();
        if phase.state() != inner.announced {
            self.announce(inner, phase);
        } else if phase != before.0 {
            tracing::debug!(migration = %self.spec.id, phase = phase.name(), "phase");
        }
    }

    fn announce(&self, inner: &mut Inner, phase: Phase) {
        let state = phase.state();
        inner.announced = state;
        // A new state: whether it is `resuming` is told anew (`resuming_changed`).
        *self.resumable.shown() = false;
        self.state_tx.send_replace(inner.core.state());
        let cause = inner
            .core
            .error()
            .filter(|_| matches!(state, State::Failed | State::Paused));
        match cause {
            Some(cause) => {
                tracing::warn!(migration = %self.spec.id, "{}: {}", state.name(), Rendered(cause))
            }
            None => tracing::info!(migration = %self.spec.id, phase = phase.name(), "state"),
        }
        if state.is_final() || state == State::Paused {
            self.context
                .metrics
                .migration_ended(state.name(), cause.map(attribution::labels));
        }
        self.publish(EventKind::State {
            state,
            phase: phase.name().to_owned(),
            error: cause.map(attribution::Report::from),
        });
    }

    /// Once every channel has closed after a cancel, records how long that took.
    fn observe_cancel(&self, inner: &mut Inner) {
        if inner.cancel_timed || inner.core.state() != State::Cancelled {
            return;
        }
        let asked = *inner.cancel_asked.get_or_insert_with(Instant::now);
        if inner.core.channels().iter().all(|c| c.state.is_final()) {
            self.context.metrics.cancelled_in(asked.elapsed());
            inner.cancel_timed = true;
        }
    }

    /// Publishes an event about this migration (nobody listening is fine).
    fn publish(&self, kind: EventKind) {
        let _ = self.context.events.send(Event::about(&self.spec.id, kind));
    }

    pub fn host(&self) -> Host {
        self.spec.role.host()
    }

    pub fn state(&self) -> State {
        self.lock().core.state()
    }

    pub fn phase(&self) -> Phase {
        self.lock().core.phase()
    }

    /// A receiver that sees every state change.
    pub fn watch_state(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    /// Time since the migration ended, if it has.
    pub fn ended_for(&self) -> Option<Duration> {
        self.lock().ended.map(|at| at.elapsed())
    }

    /// Resolves once the migration has ended (or was withdrawn).
    pub fn stopped(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Creation failed before anyone saw the migration: its timers end, nothing is reported.
    pub fn withdraw(&self) {
        self.stop.cancel();
    }

    /// Incoming: the index of the next channel allowed to connect to the destination QEMU.
    pub fn next_channel(&self) -> watch::Receiver<u32> {
        self.next_channel.subscribe()
    }

    /// Incoming: whether the destination QEMU listens yet.
    pub fn qemu_ready(&self) -> watch::Receiver<bool> {
        self.qemu_ready.subscribe()
    }

    /// Incoming: the destination QEMU listens now; channels may connect to it.
    pub fn qemu_listening(&self) {
        self.qemu_ready.send_replace(true);
    }

    /// Starts the token's clock: a migration still pending when it runs out expires.
    fn start_ttl(self: &Arc<Self>) {
        if self.spec.role == Role::Incoming {
            self.after(self.context.timers.token_ttl, Input::TtlOver);
        }
    }

    /// A control link is up: `pending` → `attached`, or `paused` → `attached` with a new
    /// epoch whose channels start at `first_channel`. `None` if the migration cannot take a
    /// link now (one is attached, or it has ended). `credential` is what the epoch's data
    /// connections must carry instead of the token (`None`: a version 1 link, the token).
    pub fn attach_control(
        self: &Arc<Self>,
        first_channel: u32,
        credential: Option<super::token::Token>,
    ) -> Option<Link> {
        let mut inner = self.lock();
        self.step_locked(&mut inner, Input::Attach { first_channel })
            .ok()?;
        inner.credential = credential;
        tracing::info!(migration = %self.spec.id, first_channel, epoch = inner.core.epoch(), "control link attached");
        inner.link_replaced = CancellationToken::new();
        Some(Link {
            queue: inner.new_link.take()?,
            epoch: inner.core.epoch(),
            stop: inner.epoch_stop.clone(),
            replaced: inner.link_replaced.clone(),
            takes_over: false,
        })
    }

    /// Channel `index` of `epoch` is connected to the destination QEMU: the next one may go.
    /// False if the epoch has ended meanwhile (the connection must then be dropped).
    pub fn channel_connected(self: &Arc<Self>, epoch: Epoch, index: u32) -> bool {
        self.step(Input::Connected { epoch, index }).is_ok()
    }

    /// Destination: admits a data connection as channel `index` if it presents the current
    /// epoch's credential (the token on a version 1 link), checked under the same lock as the
    /// admission, so that no epoch can change in between.
    pub fn open_data(
        self: &Arc<Self>,
        index: u32,
        presented: &[u8; migproxy_proto::TOKEN_LEN],
    ) -> Result<Admitted, ChannelRefused> {
        let mut inner = self.lock();
        let admitted = match &inner.credential {
            Some(credential) => credential.matches(presented),
            None => self.spec.token.matches(presented),
        };
        if !admitted {
            return Err(ChannelRefused {
                id: self.spec.id.clone(),
                reason: Refusal::Credential,
            });
        }
        self.open_locked(&mut inner, index)
    }

    /// Admits channel `index` into the current epoch.
    pub fn open_channel(self: &Arc<Self>, index: u32) -> Result<Admitted, ChannelRefused> {
        let mut inner = self.lock();
        self.open_locked(&mut inner, index)
    }

    fn open_locked(
        self: &Arc<Self>,
        inner: &mut Inner,
        index: u32,
    ) -> Result<Admitted, ChannelRefused> {
        self.step_locked(inner, Input::Open { index })
            .map_err(|reason| ChannelRefused {
                id: self.spec.id.clone(),
                reason,
            })?;
        Ok(Admitted {
            epoch: inner.core.epoch(),
            stop: inner.epoch_stop.clone(),
            main: index == inner.core.epoch_start(),
        })
    }

    /// A channel that was opened but never ran (its epoch ended first).
    pub fn channel_abandoned(self: &Arc<Self>, index: u32) {
        let _ = self.step(Input::Abandoned { index });
    }

    /// A failure on this host's QEMU leg is certain: fail now. One on the peer link may be
    /// the echo of a failure on the other host: give its explanation a moment to arrive.
    pub fn fail_or_wait(self: &Arc<Self>, epoch: Epoch, blame: Attribution) {
        let wait = blame.leg == Leg::Peer;
        let _ = self.step(Input::Failure { epoch, blame, wait });
    }

    /// Fails with `blame` unless, within a grace period, the peer's explanation arrives. A
    /// migration still pending fails at once.
    pub fn fail_later(self: &Arc<Self>, epoch: Epoch, blame: Attribution) {
        let _ = self.step(Input::Failure {
            epoch,
            blame,
            wait: true,
        });
    }

    /// Ends the current epoch with a failure now: a recoverable migration pauses, any other
    /// fails (first cause wins). The peer is told.
    pub fn fail(self: &Arc<Self>, epoch: Epoch, blame: Attribution) {
        let _ = self.step(Input::Failure {
            epoch,
            blame,
            wait: false,
        });
    }

    /// A paused migration's resume failed (QEMU's recovery came, the peer could not be
    /// reached): it stays paused, and the failure is its latest cause.
    pub fn resume_failed(self: &Arc<Self>, blame: Attribution) {
        let mut inner = self.lock();
        tracing::warn!(migration = %self.spec.id, "resume failed: {}", Rendered(&blame));
        if self
            .step_locked(&mut inner, Input::ResumeFailed { blame })
            .is_ok()
        {
            let error = inner.core.error().map(attribution::Report::from);
            self.publish(EventKind::State {
                state: State::Paused,
                phase: "paused".to_owned(),
                error,
            });
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.lock().core.epoch()
    }

    /// How long a failure that may be the peer's echo waits for the peer's explanation.
    pub fn explanation_grace(&self) -> Duration {
        self.context.timers.explanation
    }

    /// Time since creation, for attributions without a channel.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes moved so far on every channel.
    pub fn bytes(&self) -> ByteCounts {
        let inner = self.lock();
        inner.live.total(inner.core.channels())
    }

    /// Failure to attribute when the peer link (control) breaks.
    pub fn peer_link_failure(&self, op: Op, errno: Option<String>, message: String) -> Attribution {
        let now = self.now(&self.lock());
        attribution::peer_link(self.host(), op, errno, message, now.bytes, now.elapsed_ms)
    }

    /// Bytes of channels still being relayed (the finished ones are in the metrics).
    pub fn live_bytes(&self) -> (ByteCounts, u64) {
        let inner = self.lock();
        inner.live.running_bytes(inner.core.channels())
    }
}

/// The epoch is over: its control link closes (or, paused, is parked) after what is queued,
/// its channels are torn down, and its credential ends with it.
fn end_epoch(inner: &mut Inner) {
    if let Some(outbound) = inner.outbound.take() {
        let _ = outbound.send(Outbound::Close);
    }
    inner.epoch_stop.cancel();
    inner.credential = None;
}
