//! The lifecycle of one migration on one host, as a pure state machine: no tokio, no locks,
//! no I/O, no clock. [`Core::step`] takes the phase and one [`Input`] to the next phase and
//! the [`Effect`]s the wrapper ([`super::Migration`]) must carry out: frames for the peer,
//! epochs to open or end, timers to start. Every guard of the lifecycle lives here.
//!
//! ```text
//!                 attach(0)              open(first channel)
//!   pending ───────────────► attached ───────────────────────► active
//!     │  ttl over              │ first-channel deadline          │ ▲   all channels clean here
//!     ▼                        ▼ failure, cancel                 │ │   (and QEMU completed, when
//!   expired                  failed / cancelled                  │ │    driven here) ─► Done sent
//!                                                                │ │                     │
//!      destination asks the source to cancel   ◄─────────────────┤ │ a new channel     ▼
//!   cancelling ── source ended its side / 2 s ─► cancelled        │ └────────────── completing
//!     │ source's Failed ─► failed                                 │      peer's Done, equal
//!                                                                 │      counts ─► completed
//!                                                                 │        (or transferred)
//!   failure (recoverable) ─► paused ── attach(n): QEMU reconnects ─► attached (new epoch)
//!   failure, cancel (from any live phase) ─► failed / cancelled
//! ```
//!
//! The table [`TRANSITIONS`] lists every edge the code takes; a test drives each one and
//! checks it against the table, and docs/daemon.md carries the same table.
//!
//! Rules that hold whatever the phase:
//! - **One ending, first cause wins.** An ended migration ignores every later input.
//! - **Epochs.** A recoverable migration that pauses ends its *epoch* (control link and
//!   channels); reports about an older epoch are refused as [`Refusal::Stale`].
//! - **Explanations.** A failure that may be the echo of one on the other host (anything seen
//!   on the peer link, QEMU's own verdict) waits for the peer's explanation
//!   ([`Effect::AwaitExplanation`]) before it is concluded.
//! - **`completed` is a claim.** It needs both hosts' `Done` with equal counts *and* evidence
//!   that QEMU finished: QEMU's word over QMP on both hosts, or the destination QEMU's `SHUT`
//!   on the return path. Without either the transport ended cleanly but QEMU's verdict is
//!   unknown: `transferred`.

use migproxy_proto::{Attribution, ChannelEnd, Control, Host, Totals, Verdict};
use serde::{Deserialize, Serialize};

use super::super::attribution;
use super::super::qemu::report::{CancelRefused, Status};

/// Every phase change the lifecycle makes, as (from, input, to): checked against the code
/// by the tests, and rendered into docs/daemon.md by [`transition_table`].
pub const TRANSITIONS: &[(&str, &str, &str)] = &[
    ("pending", "ask cancel", "cancelled"),
    ("pending", "attach", "attached"),
    ("pending", "failure", "failed"),
    ("pending", "ttl over", "expired"),
    ("attached", "ask cancel", "cancelled"),
    ("attached", "ask cancel", "cancelling"),
    ("attached", "failure", "failed"),
    ("attached", "failure", "paused"),
    ("attached", "first-channel deadline", "failed"),
    ("attached", "first-channel deadline", "paused"),
    ("attached", "grace over", "failed"),
    ("attached", "open", "active"),
    ("attached", "peer cancel", "cancelled"),
    ("attached", "peer failed", "failed"),
    ("attached", "peer failed", "paused"),
    ("active", "ask cancel", "cancelled"),
    ("active", "ask cancel", "cancelling"),
    ("active", "attach", "attached"),
    ("active", "cancel", "cancelled"),
    ("active", "channel ended", "completed"),
    ("active", "channel ended", "completing"),
    ("active", "channel ended", "failed"),
    ("active", "channel ended", "paused"),
    ("active", "failure", "failed"),
    ("active", "failure", "paused"),
    ("active", "grace over", "failed"),
    ("active", "peer cancel", "cancelled"),
    ("active", "peer done", "failed"),
    ("active", "peer failed", "failed"),
    ("active", "peer failed", "paused"),
    ("active", "qemu status", "completing"),
    ("active", "setup failed", "failed"),
    ("completing", "failure", "failed"),
    ("completing", "failure", "paused"),
    ("completing", "open", "active"),
    ("completing", "peer cancel", "cancelled"),
    ("completing", "peer done", "completed"),
    ("completing", "peer done", "failed"),
    ("completing", "peer done", "transferred"),
    ("completing", "peer failed", "failed"),
    ("completing", "peer failed", "paused"),
    ("cancelling", "cancel wait over", "cancelled"),
    ("cancelling", "channel ended", "completed"),
    ("cancelling", "link closed", "cancelled"),
    ("cancelling", "peer cancel", "cancelled"),
    ("cancelling", "peer failed", "failed"),
    ("cancelling", "peer failed", "paused"),
    ("paused", "ask cancel", "cancelled"),
    ("paused", "attach", "attached"),
];

/// [`TRANSITIONS`] as a Markdown table.
pub fn transition_table() -> String {
    let mut out = String::from("| from | input | to |\n| --- | --- | --- |\n");
    for (from, input, to) in TRANSITIONS {
        out += &format!("| {from} | {input} | {to} |\n");
    }
    out
}

/// Identifies one epoch of a migration: the span of one control link and its channels.
pub type Epoch = u64;

/// Which end of the migration this daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// The state the API shows: the phase without its inner detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Active,
    /// Postcopy recovery: waiting for QEMU to reconnect.
    Paused,
    /// Both hosts carried every byte and QEMU finished (its word over QMP, or the
    /// destination's acknowledgement on the return path).
    Completed,
    /// Both hosts carried every byte and agree on the counts, but QEMU's verdict is unknown
    /// (no QMP, and no return path to carry the destination's acknowledgement).
    Transferred,
    Failed,
    Cancelled,
    Expired,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 8] = [
        State::Pending,
        State::Active,
        State::Paused,
        State::Completed,
        State::Transferred,
        State::Failed,
        State::Cancelled,
        State::Expired,
    ];

    /// The state the API names `name`.
    pub fn parse(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Every final state, for those who list them.
    pub const FINAL: [State; 5] = [
        State::Completed,
        State::Transferred,
        State::Failed,
        State::Cancelled,
        State::Expired,
    ];

    pub fn is_final(self) -> bool {
        State::FINAL.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Active => "active",
            State::Paused => "paused",
            State::Completed => "completed",
            State::Transferred => "transferred",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
        }
    }
}

/// The phase: the state with what the lifecycle needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Created; waits for the source daemon's control link (token TTL).
    Pending,
    /// The control link is up and no channel of this epoch has opened yet (first-channel
    /// deadline).
    Attached,
    /// Channels are open.
    Active,
    /// Every channel ended cleanly here and this host said `Done`; waits for the peer's.
    Completing,
    /// Destination: asked the source to cancel; waits until the source has ended its side.
    Cancelling {
        by: HostName,
    },
    /// Recoverable: the epoch broke, waiting for QEMU's recovery.
    Paused,
    Ended {
        state: State,
    },
}

/// A host, as phases and views name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostName {
    Source,
    Destination,
}

impl From<Host> for HostName {
    fn from(host: Host) -> HostName {
        match host {
            Host::Source => HostName::Source,
            Host::Destination => HostName::Destination,
        }
    }
}

impl From<HostName> for Host {
    fn from(host: HostName) -> Host {
        match host {
            HostName::Source => Host::Source,
            HostName::Destination => Host::Destination,
        }
    }
}

impl Phase {
    pub fn state(self) -> State {
        match self {
            Phase::Pending => State::Pending,
            Phase::Attached | Phase::Active | Phase::Completing | Phase::Cancelling { .. } => {
                State::Active
            }
            Phase::Paused => State::Paused,
            Phase::Ended { state } => state,
        }
    }

    /// A control link is attached and the epoch runs.
    fn is_live(self) -> bool {
        matches!(
            self,
            Phase::Attached | Phase::Active | Phase::Completing | Phase::Cancelling { .. }
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Attached => "attached",
            Phase::Active => "active",
            Phase::Completing => "completing",
            Phase::Cancelling { .. } => "cancelling",
            Phase::Paused => "paused",
            Phase::Ended { state } => state.name(),
        }
    }
}

/// One channel's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    Opening,
    Active,
    Completed,
    Failed,
    Cancelled,
}

impl ChannelState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ChannelState::Completed | ChannelState::Failed | ChannelState::Cancelled
        )
    }

    fn of(end: ChannelEnd) -> ChannelState {
        match end {
            ChannelEnd::Completed => ChannelState::Completed,
            ChannelEnd::Cancelled => ChannelState::Cancelled,
            ChannelEnd::Failed => ChannelState::Failed,
        }
    }
}

/// What the lifecycle keeps of one channel.
#[derive(Debug, Clone)]
pub struct Channel {
    /// A connection has been given this index (a second one is refused).
    pub claimed: bool,
    pub state: ChannelState,
    /// The counts at its end (live counts are the wrapper's).
    pub bytes: Totals,
    /// How the peer said it ended there.
    pub peer_end: Option<(ChannelEnd, Totals)>,
}

impl Channel {
    fn new() -> Channel {
        Channel {
            claimed: false,
            state: ChannelState::Opening,
            bytes: Totals::default(),
            peer_end: None,
        }
    }
}

/// What the main channel's return path said when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnPath {
    /// Not the main channel, or the channel did not end cleanly.
    NotWatched,
    /// Nothing came back: QEMU runs without a return path.
    Silent,
    /// The destination QEMU's `SHUT` with this status (0: it finished).
    Shut(u32),
    /// Messages came back but no `SHUT`: the stream ended before QEMU finished.
    Unfinished,
    /// The bytes that came back were no return path this parser knows.
    Unknown,
}

/// A host's `Done`: its channel count, totals and the evidence it holds that QEMU finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub channels: u32,
    pub bytes: Totals,
    pub verdict: Verdict,
}

/// What the lifecycle needs to know at each step besides the input: the live byte counts
/// and the time since creation, for the attributions it builds itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Now {
    pub bytes: Totals,
    pub elapsed_ms: u64,
}

/// Something that happened, fed to [`Core::step`].
#[derive(Debug, Clone)]
pub enum Input {
    /// A control link is up whose hello names `first_channel` (0, or the first channel of a
    /// resumed epoch).
    Attach { first_channel: u32 },
    /// A connection asks to be channel `index` of the current epoch.
    Open { index: u32 },
    /// Destination: channel `index` of `epoch` is connected to QEMU; the next may connect.
    Connected { epoch: Epoch, index: u32 },
    /// Channel `index`'s relay runs.
    Running { index: u32 },
    /// Channel `index` never ran: its epoch ended first.
    Abandoned { index: u32 },
    /// Channel `index` of `epoch` could not be set up (its dial or connect failed).
    SetupFailed {
        epoch: Epoch,
        index: u32,
        blame: Attribution,
        wait: bool,
    },
    /// Channel `index`'s relay ended.
    Ended {
        epoch: Epoch,
        index: u32,
        end: ChannelEnd,
        bytes: Totals,
        /// How it failed, when it did, and whether that may be the peer's echo.
        failure: Option<(Attribution, bool)>,
        return_path: ReturnPath,
    },
    /// Something failed in `epoch`. `wait`: it may be the echo of a failure on the other
    /// host, whose explanation is waited for.
    Failure {
        epoch: Epoch,
        blame: Attribution,
        wait: bool,
    },
    /// The wait for an explanation of `blame` is over.
    GraceOver { epoch: Epoch, blame: Attribution },
    /// A cancel asked on this host (`by` is this host) or by the peer: choose its route.
    AskCancel { by: Host },
    /// Carry a cancel out now.
    Cancel { by: Host },
    /// The source did not end its side in time after this host's cancel.
    CancelWaitOver,
    /// The control link of `epoch` closed or broke.
    LinkClosed { epoch: Epoch },
    /// The token was not used in time.
    TtlOver,
    /// No channel opened in time after the control link of `epoch` came up.
    FirstChannelOver { epoch: Epoch, limit_ms: u64 },
    /// A frame from the peer on the control link of `epoch`.
    Peer { epoch: Epoch, control: Control },
    /// The local QEMU's status changed (QEMU driven here).
    Qemu { status: Status },
    /// Source: the task following QEMU can cancel it first from now on.
    QemuFollowing,
    /// A paused migration's resume failed.
    ResumeFailed { blame: Attribution },
}

impl Input {
    /// The name the transition table gives this input.
    pub fn name(&self) -> &'static str {
        match self {
            Input::Attach { .. } => "attach",
            Input::Open { .. } => "open",
            Input::Connected { .. } => "connected",
            Input::Running { .. } => "running",
            Input::Abandoned { .. } => "abandoned",
            Input::SetupFailed { .. } => "setup failed",
            Input::Ended { .. } => "channel ended",
            Input::Failure { .. } => "failure",
            Input::GraceOver { .. } => "grace over",
            Input::AskCancel { .. } => "ask cancel",
            Input::Cancel { .. } => "cancel",
            Input::CancelWaitOver => "cancel wait over",
            Input::LinkClosed { .. } => "link closed",
            Input::TtlOver => "ttl over",
            Input::FirstChannelOver { .. } => "first-channel deadline",
            Input::Peer { control, .. } => match control {
                Control::Failed(_) => "peer failed",
                Control::Cancel { .. } => "peer cancel",
                Control::Done { .. } => "peer done",
                _ => "peer frame",
            },
            Input::Qemu { .. } => "qemu status",
            Input::QemuFollowing => "qemu following",
            Input::ResumeFailed { .. } => "resume failed",
        }
    }
}

/// What the wrapper must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Queue a frame for the peer on the control link (dropped when none is up).
    Send(Control),
    /// A new epoch begins: a fresh control-link queue and channel token.
    BeginEpoch { epoch: Epoch, first_channel: u32 },
    /// The current epoch is over: close the control link after what is queued, tear its
    /// channels down.
    EndEpoch,
    /// Let channel `index` connect to the destination QEMU next.
    Release { index: u32 },
    /// Wait for the peer's explanation of `blame`, then feed [`Input::GraceOver`].
    AwaitExplanation { epoch: Epoch, blame: Attribution },
    /// Give the source a moment to end its side, then feed [`Input::CancelWaitOver`].
    AwaitSourceCancel,
    /// Source: `migrate_cancel` first, then feed [`Input::Cancel`].
    CancelQemu { by: Host },
    /// The first channel must open in time ([`Input::FirstChannelOver`]).
    AwaitFirstChannel,
    /// The migration has ended: stop accepting, abort every channel, stop every timer.
    Stop,
}

/// Why an input was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the migration is {0}, not accepting this")]
    Phase(&'static str),
    #[error("a report about an older epoch or a channel that has ended")]
    Stale,
    #[error("channel {index} is beyond the migration's {max} channels")]
    TooMany { index: u32, max: u32 },
    #[error("channel {index} is already connected")]
    Duplicate { index: u32 },
    #[error("a control link is already attached")]
    Attached,
    #[error(transparent)]
    Cancel(#[from] CancelRefused),
}

/// How a cancel asked here is carried out ([`Input::AskCancel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRoute {
    /// Done: the migration is cancelled.
    Now,
    /// The destination asked the source; it ends when the source has ended its side.
    AskedTheSource,
    /// Through the source QEMU first ([`Effect::CancelQemu`]).
    ThroughQemu,
}

/// The fixed facts the lifecycle needs.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub role: Role,
    pub recoverable: bool,
    /// Channels per epoch, at most.
    pub max_channels: u32,
    /// The daemon drives this host's QEMU over QMP.
    pub qemu: bool,
    /// The `postcopy-ram` capability is on (QEMU driven here).
    pub postcopy: bool,
}

/// The lifecycle of one migration on one host.
#[derive(Debug, Clone)]
pub struct Core {
    config: Config,
    phase: Phase,
    epoch: Epoch,
    /// First channel index of the current epoch.
    epoch_start: u32,
    /// A control link is attached to the current epoch.
    link: bool,
    channels: Vec<Channel>,
    local_done: Option<Done>,
    peer_done: Option<Done>,
    /// What the current epoch's main channel's return path said.
    return_path: ReturnPath,
    error: Option<Attribution>,
    /// Every cause of a pause or of a failed resume, oldest first.
    pauses: Vec<Attribution>,
    /// How many times the migration paused.
    paused: u32,
    cancelled_by: Option<Host>,
    qemu: Status,
    /// Source: the task following QEMU takes cancels.
    qemu_following: bool,
}

type Steps = Result<Vec<Effect>, Refusal>;

impl Core {
    pub fn new(config: Config) -> Core {
        Core {
            config,
            phase: Phase::Pending,
            epoch: 0,
            epoch_start: 0,
            link: false,
            channels: Vec::new(),
            local_done: None,
            peer_done: None,
            return_path: ReturnPath::NotWatched,
            error: None,
            pauses: Vec::new(),
            paused: 0,
            cancelled_by: None,
            qemu: Status::None,
            qemu_following: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn state(&self) -> State {
        self.phase.state()
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn epoch_start(&self) -> u32 {
        self.epoch_start
    }

    pub fn channels(&self) -> &[Channel] {
        &self.channels
    }

    pub fn error(&self) -> Option<&Attribution> {
        self.error.as_ref()
    }

    pub fn pauses(&self) -> &[Attribution] {
        &self.pauses
    }

    /// How many times the migration paused.
    pub fn paused(&self) -> u32 {
        self.paused
    }

    pub fn cancelled_by(&self) -> Option<Host> {
        self.cancelled_by
    }

    pub fn peer_done(&self) -> Option<Done> {
        self.peer_done
    }

    fn host(&self) -> Host {
        self.config.role.host()
    }

    /// Whether a report about `epoch` is about the running epoch.
    pub fn is_current(&self, epoch: Epoch) -> bool {
        epoch == self.epoch && self.phase.is_live()
    }

    /// Takes one input; returns what to do, or why it was not taken (the phase is then
    /// unchanged).
    pub fn step(&mut self, input: Input, now: Now) -> Steps {
        if let Phase::Ended { state } = self.phase
            && !matches!(
                input,
                Input::Running { .. }
                    | Input::Abandoned { .. }
                    | Input::SetupFailed { .. }
                    | Input::Ended { .. }
            )
        {
            return Err(Refusal::Phase(state.name()));
        }
        match input {
            Input::Attach { first_channel } => self.attach(first_channel, now),
            Input::Open { index } => self.open(index),
            Input::Connected { epoch, index } => self.connected(epoch, index),
            Input::Running { index } => self.running(index),
            Input::Abandoned { index } => self.abandoned(index),
            Input::SetupFailed {
                epoch,
                index,
                blame,
                wait,
            } => self.setup_failed(epoch, index, blame, wait),
            Input::Ended {
                epoch,
                index,
                end,
                bytes,
                failure,
                return_path,
            } => self.ended(epoch, index, end, bytes, failure, return_path, now),
            Input::Failure { epoch, blame, wait } => self.failure(epoch, blame, wait),
            Input::GraceOver { epoch, blame } => self.grace_over(epoch, blame),
            Input::AskCancel { by } => self.ask_cancel(by).map(|(effects, _)| effects),
            Input::Cancel { by } => self.cancel(by),
            Input::CancelWaitOver => self.cancel_wait_over(),
            Input::LinkClosed { epoch } => self.link_closed(epoch),
            Input::TtlOver => self.ttl_over(),
            Input::FirstChannelOver { epoch, limit_ms } => {
                self.first_channel_over(epoch, limit_ms, now)
            }
            Input::Peer { epoch, control } => self.peer(epoch, control),
            Input::Qemu { status } => self.qemu(status),
            Input::QemuFollowing => {
                self.qemu_following = true;
                Ok(Vec::new())
            }
            Input::ResumeFailed { blame } => self.resume_failed(blame),
        }
    }

    /// As [`Input::AskCancel`], also saying which route the cancel takes.
    pub fn ask(&mut self, by: Host) -> Result<(Vec<Effect>, CancelRoute), Refusal> {
        if let Phase::Ended { state } = self.phase {
            return Err(Refusal::Phase(state.name()));
        }
        self.ask_cancel(by)
    }

    fn attach(&mut self, first: u32, now: Now) -> Steps {
        let known = self.channels.len() as u32;
        // A resume names the first channel after every one this host has seen, and not
        // absurdly far beyond (each index up to it gets a slot).
        let plausible = first >= known && first - known <= self.config.max_channels;
        let recoverable = self.config.recoverable && plausible;
        let mut effects = Vec::new();
        match self.phase {
            Phase::Pending if first == 0 => {}
            Phase::Paused if recoverable => {}
            // The source paused and came back before this host noticed the break (a
            // blackholed link is only detected by silence): the old epoch is over.
            Phase::Attached | Phase::Active | Phase::Completing
                if recoverable && first > self.epoch_start =>
            {
                let blame = attribution::peer_link(
                    self.host(),
                    migproxy_proto::Op::Read,
                    None,
                    "the source daemon resumed on a new control link".to_owned(),
                    now.bytes,
                    now.elapsed_ms,
                );
                effects.extend(self.pause(blame));
            }
            Phase::Attached | Phase::Active | Phase::Completing => {
                return Err(Refusal::Attached);
            }
            phase => return Err(Refusal::Phase(phase.name())),
        }
        let resuming = self.phase == Phase::Paused;
        self.link = true;
        self.epoch += 1;
        self.epoch_start = first;
        self.local_done = None;
        self.peer_done = None;
        self.return_path = ReturnPath::NotWatched;
        if resuming {
            self.error = None;
        }
        self.phase = Phase::Attached;
        effects.push(Effect::BeginEpoch {
            epoch: self.epoch,
            first_channel: first,
        });
        effects.push(Effect::Release { index: first });
        effects.push(Effect::AwaitFirstChannel);
        Ok(effects)
    }

    fn open(&mut self, index: u32) -> Steps {
        if !self.phase.is_live() {
            return Err(Refusal::Phase(self.phase.name()));
        }
        let max = self.config.max_channels;
        if index < self.epoch_start || index - self.epoch_start >= max {
            return Err(Refusal::TooMany { index, max });
        }
        while self.channels.len() <= index as usize {
            self.channels.push(Channel::new());
        }
        let channel = &mut self.channels[index as usize];
        if channel.claimed {
            return Err(Refusal::Duplicate { index });
        }
        channel.claimed = true;
        // A new channel means this host is not done after all.
        self.local_done = None;
        if matches!(self.phase, Phase::Attached | Phase::Completing) {
            self.phase = Phase::Active;
        }
        Ok(Vec::new())
    }

    fn connected(&mut self, epoch: Epoch, index: u32) -> Steps {
        if !self.is_current(epoch) {
            return Err(Refusal::Stale);
        }
        Ok(vec![Effect::Release {
            index: index.saturating_add(1),
        }])
    }

    fn running(&mut self, index: u32) -> Steps {
        let channel = self.channel_opening(index)?;
        channel.state = ChannelState::Active;
        Ok(vec![Effect::Send(Control::ChannelOpened {
            channel: index,
        })])
    }

    fn channel_opening(&mut self, index: u32) -> Result<&mut Channel, Refusal> {
        self.channels
            .get_mut(index as usize)
            .filter(|c| c.state == ChannelState::Opening)
            .ok_or(Refusal::Stale)
    }

    fn abandoned(&mut self, index: u32) -> Steps {
        self.channel_opening(index)?.state = ChannelState::Cancelled;
        Ok(Vec::new())
    }

    /// A channel that could not be set up failed, and with it the epoch; if the epoch has
    /// ended meanwhile (cancel, pause, another failure), it was only abandoned.
    fn setup_failed(&mut self, epoch: Epoch, index: u32, blame: Attribution, wait: bool) -> Steps {
        let current = self.is_current(epoch) && !self.is_cancelling();
        self.channel_opening(index)?.state = match current {
            true => ChannelState::Failed,
            false => ChannelState::Cancelled,
        };
        if !current {
            return Ok(Vec::new());
        }
        self.failure(epoch, blame, wait)
    }

    fn is_cancelling(&self) -> bool {
        matches!(self.phase, Phase::Cancelling { .. })
    }

    #[allow(clippy::too_many_arguments)]
    fn ended(
        &mut self,
        epoch: Epoch,
        index: u32,
        mut end: ChannelEnd,
        bytes: Totals,
        failure: Option<(Attribution, bool)>,
        return_path: ReturnPath,
        now: Now,
    ) -> Steps {
        // Torn down by the source while it carries out this host's cancel.
        if end == ChannelEnd::Failed && self.is_cancelling() {
            end = ChannelEnd::Cancelled;
        }
        let Some(channel) = self.channels.get_mut(index as usize) else {
            return Err(Refusal::Stale);
        };
        channel.state = ChannelState::of(end);
        channel.bytes = bytes;
        let mut effects = vec![Effect::Send(Control::ChannelClosed {
            channel: index,
            end,
            bytes,
        })];
        if self.phase.state().is_final() || epoch != self.epoch {
            return Ok(effects);
        }
        if index == self.epoch_start && end == ChannelEnd::Completed {
            self.return_path = return_path;
        }
        let step = match (end, failure) {
            (ChannelEnd::Completed, _) => match self.unfinished(index, bytes, now) {
                Some((blame, wait)) => self.failure(epoch, blame, wait),
                None => self.check_done(),
            },
            (ChannelEnd::Failed, Some((blame, wait))) => self.failure(epoch, blame, wait),
            _ => Ok(Vec::new()),
        };
        effects.extend(step.unwrap_or_default());
        Ok(effects)
    }

    /// A main channel that closed cleanly without the destination QEMU's `SHUT`, where one
    /// was to come: QEMU did not finish. A recoverable migration pauses at once (postcopy
    /// paused). Otherwise the host whose QEMU it is about concludes, and the other waits for
    /// its word, so that both tell one story.
    fn unfinished(&self, index: u32, bytes: Totals, now: Now) -> Option<(Attribution, bool)> {
        if index != self.epoch_start || self.config.qemu {
            return None;
        }
        let status = match (self.return_path, self.config.recoverable) {
            (ReturnPath::Shut(0) | ReturnPath::Unknown | ReturnPath::NotWatched, _) => {
                return None;
            }
            (ReturnPath::Silent, false) => return None,
            (ReturnPath::Shut(status), _) => Some(status),
            (ReturnPath::Silent | ReturnPath::Unfinished, _) => None,
        };
        let recoverable = self.config.recoverable;
        let blame = attribution::unfinished(index, bytes, status, recoverable, now.elapsed_ms);
        let wait = !recoverable && blame.host != self.host();
        Some((blame, wait))
    }

    fn failure(&mut self, epoch: Epoch, blame: Attribution, wait: bool) -> Steps {
        let pending = self.phase == Phase::Pending;
        if !pending && !self.is_current(epoch) {
            return Err(Refusal::Stale);
        }
        if self.is_cancelling() {
            // The cancel's echo: the source tears its side down.
            return Err(Refusal::Phase("cancelling"));
        }
        if wait && !pending {
            return Ok(vec![Effect::AwaitExplanation { epoch, blame }]);
        }
        Ok(self.fail(blame, true))
    }

    fn grace_over(&mut self, epoch: Epoch, blame: Attribution) -> Steps {
        if !self.is_current(epoch) {
            return Err(Refusal::Stale);
        }
        if self.is_cancelling() {
            return Err(Refusal::Phase("cancelling"));
        }
        Ok(self.fail(blame, true))
    }

    /// Ends the current epoch with a failure: a recoverable migration pauses, any other
    /// fails.
    fn fail(&mut self, blame: Attribution, tell_peer: bool) -> Vec<Effect> {
        let mut effects = Vec::new();
        if tell_peer {
            effects.push(Effect::Send(Control::Failed(blame.clone())));
        }
        if self.config.recoverable && self.phase != Phase::Pending {
            effects.extend(self.pause(blame));
        } else {
            self.error = Some(blame);
            effects.extend(self.finish(State::Failed));
        }
        effects
    }

    fn pause(&mut self, blame: Attribution) -> Vec<Effect> {
        self.error = Some(blame.clone());
        self.pauses.push(blame);
        self.paused += 1;
        self.link = false;
        self.phase = Phase::Paused;
        vec![Effect::EndEpoch]
    }

    fn finish(&mut self, state: State) -> Vec<Effect> {
        self.link = false;
        self.phase = Phase::Ended { state };
        vec![Effect::EndEpoch, Effect::Stop]
    }

    fn resume_failed(&mut self, blame: Attribution) -> Steps {
        if self.phase != Phase::Paused {
            return Err(Refusal::Phase(self.phase.name()));
        }
        self.error = Some(blame.clone());
        self.pauses.push(blame);
        Ok(Vec::new())
    }

    /// Chooses how a cancel is carried out. A cancel asked on this host is refused once the
    /// guest may already be the destination's.
    fn ask_cancel(&mut self, by: Host) -> Result<(Vec<Effect>, CancelRoute), Refusal> {
        let here = by == self.host();
        if here {
            if self.qemu.is_postcopy() {
                return Err(CancelRefused::Postcopy.into());
            }
            if self.qemu == Status::Completed {
                return Err(CancelRefused::Completed.into());
            }
            if self.config.role == Role::Incoming && self.config.qemu && self.config.postcopy {
                return Err(CancelRefused::AskTheSource.into());
            }
        }
        let ask_source = here
            && self.config.role == Role::Incoming
            && self.phase.is_live()
            && self.link
            && self.local_done.is_none();
        if ask_source {
            let mut effects = Vec::new();
            if !self.is_cancelling() {
                effects.push(Effect::Send(Control::Cancel { by }));
                effects.push(Effect::AwaitSourceCancel);
                self.phase = Phase::Cancelling { by: by.into() };
            }
            return Ok((effects, CancelRoute::AskedTheSource));
        }
        if self.qemu_following {
            return Ok((vec![Effect::CancelQemu { by }], CancelRoute::ThroughQemu));
        }
        self.cancel(by).map(|effects| (effects, CancelRoute::Now))
    }

    /// Cancels on behalf of `by`; tells the peer when the cancel is this host's.
    fn cancel(&mut self, by: Host) -> Steps {
        let here = by == self.host();
        // Once this host has told the peer it is done, the peer may already have completed:
        // a cancel now would leave the hosts with different stories. Once QEMU has completed
        // here, the guest is the destination's.
        if here && self.local_done.is_some() {
            return Err(CancelRefused::Completing.into());
        }
        if here && self.qemu == Status::Completed {
            return Err(CancelRefused::Completed.into());
        }
        let mut effects = Vec::new();
        if here && !self.is_cancelling() {
            effects.push(Effect::Send(Control::Cancel { by }));
        }
        effects.extend(self.finish_cancel(by));
        Ok(effects)
    }

    fn finish_cancel(&mut self, by: Host) -> Vec<Effect> {
        self.cancelled_by = Some(by);
        self.finish(State::Cancelled)
    }

    fn cancel_wait_over(&mut self) -> Steps {
        match self.phase {
            Phase::Cancelling { by } => Ok(self.finish_cancel(by.into())),
            phase => Err(Refusal::Phase(phase.name())),
        }
    }

    /// The control link of `epoch` ended. It ends a cancel this host asked the source for:
    /// the source has ended its side.
    fn link_closed(&mut self, epoch: Epoch) -> Steps {
        match self.phase {
            Phase::Cancelling { by } if epoch == self.epoch => Ok(self.finish_cancel(by.into())),
            _ => Err(Refusal::Phase(self.phase.name())),
        }
    }

    fn ttl_over(&mut self) -> Steps {
        if self.phase != Phase::Pending {
            return Err(Refusal::Phase(self.phase.name()));
        }
        Ok(self.finish(State::Expired))
    }

    /// An attached migration that never saw a channel would hold its slot for ever.
    fn first_channel_over(&mut self, epoch: Epoch, limit_ms: u64, now: Now) -> Steps {
        if epoch != self.epoch {
            return Err(Refusal::Stale);
        }
        if self.phase != Phase::Attached {
            return Err(Refusal::Phase(self.phase.name()));
        }
        let blame = attribution::no_first_channel(limit_ms, now.elapsed_ms);
        Ok(self.fail(blame, true))
    }

    /// Fails without pausing: nothing was ever carried in this epoch to recover.
    fn fail_for_good(&mut self, blame: Attribution) -> Vec<Effect> {
        let mut effects = vec![Effect::Send(Control::Failed(blame.clone()))];
        self.error = Some(blame);
        effects.extend(self.finish(State::Failed));
        effects
    }

    fn peer(&mut self, epoch: Epoch, control: Control) -> Steps {
        if epoch != self.epoch {
            return Err(Refusal::Stale);
        }
        match control {
            Control::Heartbeat | Control::ChannelOpened { .. } => Ok(Vec::new()),
            Control::ChannelClosed {
                channel,
                end,
                bytes,
            } => {
                if let Some(c) = self.channels.get_mut(channel as usize) {
                    c.peer_end = Some((end, bytes));
                }
                Ok(Vec::new())
            }
            Control::Failed(blame) => {
                if !self.is_current(epoch) && self.phase != Phase::Pending {
                    return Err(Refusal::Stale);
                }
                // The source failed before it saw this host's cancel: its story is the one
                // both hosts tell.
                Ok(self.fail(blame, false))
            }
            Control::Cancel { by } if self.qemu_following => Ok(vec![Effect::CancelQemu { by }]),
            Control::Cancel { by } => self.cancel(by),
            Control::Done {
                channels,
                bytes,
                verdict,
            } => {
                self.peer_done = Some(Done {
                    channels,
                    bytes,
                    verdict,
                });
                self.check_done()
            }
        }
    }

    fn qemu(&mut self, status: Status) -> Steps {
        let completed = status == Status::Completed && self.qemu != Status::Completed;
        self.qemu = status;
        if completed {
            return self.check_done();
        }
        Ok(Vec::new())
    }

    /// What this host holds as evidence that QEMU finished.
    fn verdict(&self) -> Verdict {
        if self.config.qemu {
            Verdict::Qemu
        } else if self.return_path == ReturnPath::Shut(0) {
            Verdict::ReturnPath
        } else {
            Verdict::Unknown
        }
    }

    /// When every channel of the epoch has completed here, says so to the peer; when the
    /// peer has said the same with equal counts, the migration has ended.
    fn check_done(&mut self) -> Steps {
        let start = (self.epoch_start as usize).min(self.channels.len());
        let epoch = &self.channels[start..];
        if !self.phase.is_live() || epoch.is_empty() {
            return Ok(Vec::new());
        }
        let mut effects = Vec::new();
        // With QEMU driven here, QEMU's word is needed too.
        let qemu_done = !self.config.qemu || self.qemu == Status::Completed;
        let all_clean = epoch.iter().all(|c| c.state == ChannelState::Completed);
        if self.local_done.is_none() && qemu_done && all_clean {
            let done = Done {
                channels: epoch.len() as u32,
                bytes: sum(epoch),
                verdict: self.verdict(),
            };
            self.local_done = Some(done);
            effects.push(Effect::Send(Control::Done {
                channels: done.channels,
                bytes: done.bytes,
                verdict: done.verdict,
            }));
            if self.phase == Phase::Active {
                self.phase = Phase::Completing;
            }
        }
        if let Some(blame) = self.channel_count_disagreement() {
            effects.extend(self.fail_for_good(blame));
            return Ok(effects);
        }
        match (self.local_done, self.peer_done) {
            (Some(local), Some(peer))
                if (local.channels, local.bytes) == (peer.channels, peer.bytes) =>
            {
                let state = match (local.verdict, peer.verdict) {
                    (Verdict::Unknown, _) | (_, Verdict::Unknown) => State::Transferred,
                    _ => State::Completed,
                };
                effects.extend(self.finish(state));
            }
            (Some(local), Some(peer)) if local.channels == peer.channels => {
                // Same channels, different bytes: something between the daemons lost data.
                let (source, destination) = self.as_source_destination(local.bytes, peer.bytes);
                let first = self.first_disagreement();
                let blame = attribution::disagreement(source, destination, first);
                effects.extend(self.fail_for_good(blame));
            }
            // Otherwise one side has seen fewer channels so far: wait for the rest.
            _ => {}
        }
        Ok(effects)
    }

    /// The source's count is the truth (it accepts every connection QEMU opens): a
    /// destination that carried more channels than the source opened admitted a connection
    /// the source never made.
    fn channel_count_disagreement(&self) -> Option<Attribution> {
        let here = self
            .channels
            .len()
            .saturating_sub(self.epoch_start as usize) as u32;
        let (source, destination) = match (self.config.role, self.local_done, self.peer_done) {
            (Role::Incoming, _, Some(peer)) if peer.channels < here => (peer.channels, here),
            (Role::Outgoing, Some(local), Some(peer)) if peer.channels > local.channels => {
                (local.channels, peer.channels)
            }
            _ => return None,
        };
        Some(attribution::channel_count(source, destination))
    }

    /// This host's and the peer's figures, as (source's, destination's).
    fn as_source_destination(&self, local: Totals, peer: Totals) -> (Totals, Totals) {
        match self.config.role {
            Role::Outgoing => (local, peer),
            Role::Incoming => (peer, local),
        }
    }

    /// The first channel and direction (to destination first) whose count differs between
    /// this host and the peer's `ChannelClosed`, which the peer sent before its `Done`: both
    /// hosts find the same one.
    fn first_disagreement(&self) -> Option<attribution::Disagreement> {
        let start = self.epoch_start as usize;
        self.channels
            .iter()
            .enumerate()
            .skip(start)
            .find_map(|(i, channel)| {
                let (_, peer) = channel.peer_end?;
                let (source, destination) = self.as_source_destination(channel.bytes, peer);
                attribution::Disagreement::between(i as u32, source, destination)
            })
    }
}

fn sum(channels: &[Channel]) -> Totals {
    channels.iter().fold(Totals::default(), |acc, c| Totals {
        to_destination: acc.to_destination.saturating_add(c.bytes.to_destination),
        to_source: acc.to_source.saturating_add(c.bytes.to_source),
    })
}

#[cfg(test)]
mod tests;
