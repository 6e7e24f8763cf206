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
//!   failure (recoverable) ─► paused ── attach(n): the link is back ─► attached (new epoch)
//!     │ recover timeout, resume refused ─► failed     (pauses and recoveries: recovery.rs)
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
    ("attached", "attach", "attached"),
    ("attached", "failure", "failed"),
    ("attached", "failure", "paused"),
    ("attached", "first-channel deadline", "failed"),
    ("attached", "grace over", "failed"),
    ("attached", "open", "active"),
    ("attached", "recover timeout", "failed"),
    ("attached", "peer cancel", "cancelled"),
    ("attached", "peer failed", "failed"),
    ("attached", "peer failed", "paused"),
    ("attached", "peer gave up", "failed"),
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
    ("active", "peer gave up", "failed"),
    ("active", "qemu status", "completing"),
    ("active", "recover timeout", "failed"),
    ("active", "setup failed", "failed"),
    ("completing", "failure", "failed"),
    ("completing", "failure", "paused"),
    ("completing", "open", "active"),
    ("completing", "peer done", "completed"),
    ("completing", "peer done", "failed"),
    ("completing", "peer done", "transferred"),
    ("completing", "peer failed", "failed"),
    ("completing", "peer failed", "paused"),
    ("completing", "peer gave up", "failed"),
    ("cancelling", "cancel wait over", "cancelled"),
    ("cancelling", "channel ended", "completed"),
    ("cancelling", "link closed", "cancelled"),
    ("cancelling", "peer cancel", "cancelled"),
    ("cancelling", "peer done", "completed"),
    ("cancelling", "peer failed", "cancelled"),
    ("cancelling", "peer failed", "failed"),
    ("cancelling", "peer gave up", "cancelled"),
    ("cancelling", "peer gave up", "failed"),
    ("paused", "ask cancel", "cancelled"),
    ("paused", "attach", "attached"),
    ("paused", "cancel", "cancelled"),
    ("paused", "peer cancel", "cancelled"),
    ("paused", "recover timeout", "failed"),
    ("paused", "resume refused", "failed"),
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
    /// Resumable channels: `active` while a channel or the control link has no connection
    /// and the source dials again (until `resume_timeout`). Shown by the API only: the
    /// lifecycle goes on as `active` (see [`super::Migration::shown_state`]).
    Resuming,
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
    pub const ALL: [State; 9] = [
        State::Pending,
        State::Active,
        State::Resuming,
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
            State::Resuming => "resuming",
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

pub use crate::daemon::names::HostName;

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
    /// A resumable channel without a connection now (shown by the API only).
    Resuming,
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
    /// A paused migration's resume failed (it may be tried again).
    ResumeFailed { blame: Attribution },
    /// A paused migration cannot be resumed: the peer refused it, or QEMU did.
    ResumeRefused { blame: Attribution },
    /// Pause number `pause` has lasted `limit_ms` (the recover timeout).
    RecoverOver { pause: u32, limit_ms: u64 },
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
                Control::GaveUp(_) => "peer gave up",
                Control::Cancel { .. } => "peer cancel",
                Control::Done { .. } => "peer done",
                _ => "peer frame",
            },
            Input::Qemu { .. } => "qemu status",
            Input::QemuFollowing => "qemu following",
            Input::ResumeFailed { .. } => "resume failed",
            Input::ResumeRefused { .. } => "resume refused",
            Input::RecoverOver { .. } => "recover timeout",
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
    /// Tell the world about a pause or a recovery (event, log, metrics).
    Announce(Note),
    /// Pause number `pause` must recover within `limit_ms` ([`Input::RecoverOver`]).
    AwaitRecovery { pause: u32, limit_ms: u64 },
}

/// A step of postcopy recovery worth an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// The migration paused, for `cause` (pause number `pause`).
    Paused { pause: u32, cause: Attribution },
    /// The control link is back: QEMU's recovery starts.
    Recovering { pause: u32 },
    /// QEMU runs postcopy again; the guest was frozen `frozen_ms`.
    Resumed { pause: u32, frozen_ms: u64 },
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
    #[error("the data connection does not carry its control link's credential")]
    Credential,
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
    /// How long a pause may last before the migration fails for good; `None`: for ever
    /// (a person recovers by hand).
    pub recover_timeout_ms: Option<u64>,
}

/// What a step yields: the effects to carry out, or why the input was not taken.
pub type Steps = Result<Vec<Effect>, Refusal>;

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
    /// Every pause, and how it recovered.
    recoveries: Recoveries,
    /// Milliseconds since creation at the current step.
    now: Now,
}

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
            recoveries: Recoveries::default(),
            now: Now::default(),
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

    pub fn recoveries(&self) -> &Recoveries {
        &self.recoveries
    }

    /// Cancelled while paused in postcopy (the guest is split between the hosts).
    pub fn cancelled_paused(&self) -> bool {
        // An ended migration takes no QEMU status and closes no pause any more: what held at
        // the cancel still holds.
        self.state() == State::Cancelled
            && self.recoveries.open().is_some()
            && self.qemu.is_postcopy()
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
}

pub mod recovery;
mod transitions;

pub use self::recovery::{Recoveries, Recovery};

#[cfg(test)]
mod tests;
