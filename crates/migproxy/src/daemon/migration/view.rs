//! What the API shows of a migration: the snapshot (`GET /v1/migrations/ID`) and the events
//! (`GET /v1/events`), typed. Built from the lifecycle and the live counters; nothing here
//! decides anything.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::super::attribution;
use super::super::data_path::DataPath;
use super::super::names::{EndName, HostName, Link, VerdictName};
use super::super::qemu::report::{Report as QemuReport, Settings as QemuSettings, Status};
use super::state::{ChannelState, Role, State};
use crate::relay::ByteCounts;

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Incoming => "incoming",
            Role::Outgoing => "outgoing",
        })
    }
}

impl std::fmt::Display for ChannelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelState::Opening => "opening",
            ChannelState::Active => "active",
            ChannelState::Resuming => "resuming",
            ChannelState::Completed => "completed",
            ChannelState::Failed => "failed",
            ChannelState::Cancelled => "cancelled",
        })
    }
}

/// Bytes per second towards the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Over the last second or so (0 unless active).
    pub current_bytes_per_second: u64,
    /// Since the migration was created.
    pub average_bytes_per_second: u64,
}

/// When each phase began, in seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timestamps {
    pub created: Option<f64>,
    pub active: Option<f64>,
    /// The last pause.
    pub paused: Option<f64>,
    pub ended: Option<f64>,
}

/// What the other daemon has reported over the control link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// Channels the peer has reported ended, with its counts.
    pub channels: Vec<PeerChannel>,
    /// The peer's totals once every channel ended cleanly there.
    pub done: Option<PeerDone>,
    /// How the peer said the migration ended there, heard only after it had ended here
    /// too; `null` unless so.
    pub ended_late: Option<LateEnd>,
}

/// The peer's word on how the migration ended there, heard after it had ended on this host
/// too: the control link was down across both ends, and came back only to carry the last
/// frames (a source cancelled during an outage, a destination that failed meanwhile at its
/// resume timeout). The two hosts' states may then differ; each shows the other's word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LateEnd {
    /// `cancelled`, `failed`, or `completed` / `transferred` when every channel had ended
    /// cleanly there (with or without QEMU's word).
    pub state: State,
    pub cancelled_by: Option<HostName>,
    /// Its failure, as it attributed it.
    pub error: Option<attribution::Report>,
    /// When this host heard it, in seconds since the Unix epoch.
    pub heard_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerChannel {
    pub index: u32,
    pub end: EndName,
    pub bytes: ByteCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerDone {
    pub channels: u32,
    pub bytes: ByteCounts,
    /// The peer's evidence that QEMU finished: `qemu`, `return_path` or `unknown`.
    pub verdict: VerdictName,
}

/// A migration as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub direction: Role,
    pub state: State,
    /// The state in more detail: `attached` (no channel yet), `completing` (this host is
    /// done, the peer not yet), `cancelling` (waiting for the source to end its side).
    pub phase: String,
    /// The other daemon's peer address.
    pub peer: String,
    /// Incoming: the destination QEMU's endpoint; outgoing: the URI handed to QEMU.
    pub local: String,
    /// Pauses instead of failing (postcopy recovery).
    pub recoverable: bool,
    /// The path the bytes take: `relay` (through both daemons) or `kernel` (QEMU to QEMU
    /// over the daemons' own connection). Until the control link settles it, what this host
    /// can do.
    pub data_path: DataPath,
    /// Why that path.
    pub data_path_reason: String,
    /// The group whose migrations share one stall watch, if any.
    pub group: Option<String>,
    /// `tls` (mutual TLS between the daemons) or `plaintext`.
    pub link: Link,
    pub bytes: ByteCounts,
    pub channels: Vec<ChannelSnapshot>,
    /// The failure that ended the migration, or paused it (while paused).
    pub error: Option<attribution::Report>,
    /// Every failure that paused it, oldest first (failed resumes too; a cause repeated at
    /// once is listed once, at most 64).
    pub pauses: Vec<attribution::Report>,
    /// Every pause of postcopy and how it recovered, oldest first; the last one may still be
    /// open (paused, or recovering).
    pub recoveries: Vec<RecoveryView>,
    /// How many pauses recovered.
    pub recovered: u32,
    /// Time the guest spent frozen in pauses, the open one counted until now.
    pub frozen_ms: u64,
    /// How long a pause may last before the migration fails for good (`null`: until a
    /// person cancels it).
    pub recover_timeout_ms: Option<u64>,
    /// Resumable channels: `null` unless both daemons agreed on them.
    pub resume: Option<ResumeView>,
    pub cancelled_by: Option<HostName>,
    /// What is known of QEMU's own verdict, in a sentence (`completed`, `transferred`).
    pub verdict: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QemuView {
    pub settings: QemuSettings,
    #[serde(flatten)]
    pub report: QemuReport,
}

/// One pause of postcopy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryView {
    /// What broke.
    pub cause: attribution::Report,
    /// When it paused, in milliseconds since the migration was created.
    pub paused_at_ms: u64,
    /// How long the guest stayed frozen, until QEMU ran postcopy again; `null` while not
    /// recovered.
    pub frozen_ms: Option<u64>,
    /// Tries to bring the control link back that failed.
    pub failed_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    pub index: u32,
    pub state: ChannelState,
    pub bytes: ByteCounts,
}

/// The sentence a final state carries about QEMU's own verdict. `split`: cancelled while
/// postcopy was paused, the guest between the hosts.
pub fn verdict(state: State, split: bool) -> Option<String> {
    if state == State::Cancelled && split {
        return Some(format!(
            "cancelled while postcopy was paused: {}",
            attribution::BY_HAND
        ));
    }
    let sentence = match state {
        State::Completed => Some(
            "QEMU finished the migration (its word over QMP, or the destination's acknowledgement on the return path)",
        ),
        State::Transferred => Some(
            "every byte was carried and both hosts agree on the counts; QEMU's verdict unknown \
             (no QMP, no return path): ask QEMU",
        ),
        _ => None,
    };
    sentence.map(str::to_owned)
}

/// Something that happened to a migration, as `GET /v1/events` sends it: a JSON object with
/// `type`, `migration` and `time`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The migration it is about (none for the daemon's own `shutdown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// Seconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What an [`Event`] says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The state changed (or a paused migration's resume failed: same state, new error).
    State {
        state: State,
        phase: String,
        error: Option<attribution::Report>,
    },
    ChannelOpened {
        channel: u32,
    },
    ChannelClosed {
        channel: u32,
        end: EndName,
        bytes: ByteCounts,
    },
    /// QEMU's status or pass changed, its monitor closed, or it refused to switch to postcopy.
    Qemu {
        status: Status,
        pass: u64,
        ram_remaining: Option<u64>,
        error_desc: Option<String>,
        monitor_closed: bool,
        postcopy_error: Option<String>,
    },
    /// The daemons settled the data path when the control link came up.
    DataPath {
        data_path: DataPath,
        reason: String,
    },
    /// Postcopy paused (pause number `pause`): the link or a channel broke.
    Paused {
        pause: u32,
        cause: attribution::Report,
    },
    /// The control link is back after pause `pause`: QEMU is told to recover.
    Recovering {
        pause: u32,
    },
    /// QEMU runs postcopy again after pause `pause`; the guest was frozen `frozen_ms`.
    Resumed {
        pause: u32,
        frozen_ms: u64,
    },
    /// A resumable channel lost its peer connection: it waits for a new one.
    ChannelInterrupted {
        channel: u32,
        cause: String,
    },
    /// A resumable channel goes on, on a new connection, after `lost_ms`.
    ChannelResumed {
        channel: u32,
        lost_ms: u64,
        /// Bytes sent again.
        replayed: u64,
        /// Connections tried.
        attempts: u32,
    },
    /// The peer's word on how the migration ended there, heard after it had ended here
    /// (see [`LateEnd`]).
    PeerEnded(LateEnd),
    /// The daemon stops: event streams end here.
    Shutdown,
}

/// A migration's resumable channels, as this host saw them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeView {
    /// How long a channel may go without a working connection before the migration fails.
    pub timeout_ms: u64,
    /// Outages ended by a new connection.
    pub resumptions: u32,
    /// Their time, the open ones counted until now.
    pub lost_ms: u64,
    /// Bytes sent again after them.
    pub replayed: u64,
    /// The channels without a connection now (resuming).
    pub resuming: Vec<u32>,
    /// How long the oldest of those has been down; `null` when none is.
    pub down_ms: Option<u64>,
    /// Outages of the control link (taken over by a new connection, or not yet).
    pub link_outages: u64,
    /// Their time, the open one counted until now.
    pub link_lost_ms: u64,
    /// How long the control link has been down; `null` while it is up.
    pub link_down_ms: Option<u64>,
}

impl Event {
    pub fn about(migration: &str, kind: EventKind) -> Event {
        Event {
            migration: Some(migration.to_owned()),
            time: unix_seconds(Some(SystemTime::now())),
            kind,
        }
    }

    pub fn shutdown() -> Event {
        Event {
            migration: None,
            time: None,
            kind: EventKind::Shutdown,
        }
    }

    /// The SSE event name: its `type`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            EventKind::State { .. } => "state",
            EventKind::ChannelOpened { .. } => "channel_opened",
            EventKind::ChannelClosed { .. } => "channel_closed",
            EventKind::Qemu { .. } => "qemu",
            EventKind::DataPath { .. } => "data_path",
            EventKind::Paused { .. } => "paused",
            EventKind::Recovering { .. } => "recovering",
            EventKind::Resumed { .. } => "resumed",
            EventKind::ChannelInterrupted { .. } => "channel_interrupted",
            EventKind::ChannelResumed { .. } => "channel_resumed",
            EventKind::PeerEnded(_) => "peer_ended",
            EventKind::Shutdown => "shutdown",
        }
    }
}

/// A `qemu` event: QEMU's status, pass and RAM left, or its monitor gone.
pub fn qemu_event(report: &QemuReport) -> EventKind {
    EventKind::Qemu {
        status: report.status.clone(),
        pass: report.pass,
        ram_remaining: report.ram.as_ref().map(|r| r.remaining),
        error_desc: report.error_desc.clone(),
        monitor_closed: report.monitor_closed,
        postcopy_error: report.postcopy_error.clone(),
    }
}

pub fn unix_seconds(at: Option<SystemTime>) -> Option<f64> {
    at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}
