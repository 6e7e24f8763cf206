//! The API's bodies, typed: what the server sends and reads, what [`crate::client`] reads and
//! sends. The migration's own view (`GET /v1/migrations/ID`, the events) is
//! [`crate::daemon::migration::view`]; `docs/api.yaml` describes both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::daemon::data_path::DataPath;
use crate::daemon::migration::State;
use crate::daemon::migration::view::Snapshot;
use crate::daemon::names::Link;

/// `POST /v1/migrations`: an incoming (destination) or outgoing (source) migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "direction", rename_all = "snake_case")]
pub enum CreateRequest {
    Incoming(IncomingRequest),
    Outgoing(OutgoingRequest),
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// On the destination host: accept a migration into a QEMU listening here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// Where the destination QEMU listens: `unix:PATH` or `tcp:HOST:PORT`. Optional with
    /// `qmp`: the daemon then chooses a socket and runs `migrate-incoming` on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Default: generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_channels: Option<u32>,
    /// Pause instead of failing when the link or a channel breaks in postcopy, and (with
    /// `qmp`) recover by itself, on either data path. Default: true with `qmp` and postcopy,
    /// false otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recoverable: Option<bool>,
    /// Seconds a pause may last before the migration fails for good. Default: the daemon's
    /// (`timeouts.recover`, 600) with `qmp`; without, none (a person recovers by hand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recover_timeout: Option<f64>,
    /// Seconds a resumable channel may go without a working peer connection before the
    /// migration fails (relay path; both daemons must have it); 0: not resumable. Default:
    /// the daemon's (`timeouts.resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_timeout: Option<f64>,
    /// The local QEMU's QMP socket (absolute path): the daemon drives that QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
    /// multifd channels (1 to 255); needs `qmp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd: Option<u32>,
    /// The postcopy-ram capability; needs `qmp`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub postcopy: bool,
    /// Migrations of one group (a guest's RAM and its disks) share one stall watch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `relay`, `kernel` or `auto`; default the daemon's (`data_path` in its config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_path: Option<DataPath>,
}

/// On the source host: carry a migration to the destination daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutgoingRequest {
    pub id: String,
    /// The token the destination handed out.
    pub token: String,
    /// The destination daemon's peer address, `HOST:PORT`.
    pub peer: String,
    /// Pause instead of failing when the link or a channel breaks in postcopy, and (with
    /// `qmp`) recover by itself, on either data path. Default: true with `qmp` and postcopy,
    /// false otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recoverable: Option<bool>,
    /// Seconds a pause may last before the migration fails for good. Default: the daemon's
    /// (`timeouts.recover`, 600) with `qmp`; without, none (a person recovers by hand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recover_timeout: Option<f64>,
    /// Seconds a resumable channel may go without a working peer connection before the
    /// migration fails (relay path; both daemons must have it); 0: not resumable. Default:
    /// the daemon's (`timeouts.resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_timeout: Option<f64>,
    /// The name the destination daemon's certificate must carry; default the peer's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Migrations of one group (a guest's RAM and its disks) share one stall watch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The local QEMU's QMP socket (absolute path): the daemon drives that QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
    /// multifd channels (1 to 255); needs `qmp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd: Option<u32>,
    /// The postcopy-ram capability; needs `qmp`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub postcopy: bool,
    /// Seconds after `migrate` to switch to postcopy (implies `postcopy`); needs `qmp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_after: Option<f64>,
    /// Bytes per second, default unlimited; needs `qmp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Milliseconds; needs `qmp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// `relay`, `kernel` or `auto`; default the daemon's (`data_path` in its config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_path: Option<DataPath>,
}

/// The answer to an incoming creation: what the source host needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedIncoming {
    pub id: String,
    /// The one-time token, 64 hex digits.
    pub token: String,
    /// This daemon's peer address, for the source daemon.
    pub peer: String,
    /// Where the destination QEMU listens.
    pub target: String,
    pub state: State,
}

/// The answer to an outgoing creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedOutgoing {
    pub id: String,
    /// The URI to hand to the source QEMU's `migrate`.
    pub qemu_uri: String,
    pub state: State,
}

/// `GET /v1/migrations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationList {
    pub migrations: Vec<Snapshot>,
}

/// An error answer: the error, then its causes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub causes: Vec<String>,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    pub protocol_version: u16,
    pub link: Link,
    pub tls_dir: Option<String>,
    /// The peer address handed to source daemons, `HOST:PORT`.
    pub advertise: String,
    /// Where the API is also served behind mutual TLS, `HOST:PORT`.
    pub api_tls: Option<String>,
    pub runtime_dir: String,
    pub limits: Limits,
    pub timeouts_ms: TimeoutsMs,
    pub uptime_s: u64,
    /// Peer connections turned away so far, by reason, and accepts that failed.
    pub peer_rejections: BTreeMap<String, u64>,
}

/// The daemon's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_migrations: usize,
    pub max_channels: u32,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub reserved_handshakes: usize,
    pub max_silent_connections: usize,
}

/// The daemon's timeouts, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeoutsMs {
    pub connect: u64,
    pub handshake: u64,
    pub heartbeat: u64,
    pub peer: u64,
    pub stall: u64,
    pub token_ttl: u64,
    pub first_channel: u64,
    pub recover: u64,
    pub resume: u64,
    pub first_byte: u64,
}

/// The `lagged` event: how many events a slow reader missed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lagged {
    pub missed: u64,
}
