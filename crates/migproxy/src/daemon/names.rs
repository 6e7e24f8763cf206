//! The API's names for the peer protocol's vocabulary (hosts, legs, operations, directions,
//! channel ends, verdicts) and the link's security: enums that serialise as the API spells
//! them (`source`, `to_destination`, `return_path`…) and read back, for the views the API
//! shows and the clients that read them. A leaf: it imports only the protocol.

use migproxy_proto::{ChannelEnd, Direction, Host, Leg, Op, Verdict};
use serde::{Deserialize, Serialize};

/// A host, as phases and views name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostName {
    Source,
    Destination,
}

impl HostName {
    pub fn as_str(self) -> &'static str {
        match self {
            HostName::Source => "source",
            HostName::Destination => "destination",
        }
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Which side of a daemon a failure was on: `qemu` (its local QEMU) or `peer` (the link
/// between the daemons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegName {
    Qemu,
    Peer,
}

impl LegName {
    pub fn as_str(self) -> &'static str {
        match self {
            LegName::Qemu => "qemu",
            LegName::Peer => "peer",
        }
    }
}

impl From<Leg> for LegName {
    fn from(leg: Leg) -> LegName {
        match leg {
            Leg::Qemu => LegName::Qemu,
            Leg::Peer => LegName::Peer,
        }
    }
}

/// The direction bytes were moving in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionName {
    ToDestination,
    ToSource,
}

impl From<Direction> for DirectionName {
    fn from(direction: Direction) -> DirectionName {
        match direction {
            Direction::ToDestination => DirectionName::ToDestination,
            Direction::ToSource => DirectionName::ToSource,
        }
    }
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpName {
    Connect,
    Read,
    Write,
    Splice,
    Shutdown,
    Handshake,
    Timeout,
    Protocol,
    Migrate,
}

impl OpName {
    pub fn as_str(self) -> &'static str {
        match self {
            OpName::Connect => "connect",
            OpName::Read => "read",
            OpName::Write => "write",
            OpName::Splice => "splice",
            OpName::Shutdown => "shutdown",
            OpName::Handshake => "handshake",
            OpName::Timeout => "timeout",
            OpName::Protocol => "protocol",
            OpName::Migrate => "migrate",
        }
    }
}

impl From<Op> for OpName {
    fn from(op: Op) -> OpName {
        match op {
            Op::Connect => OpName::Connect,
            Op::Read => OpName::Read,
            Op::Write => OpName::Write,
            Op::Splice => OpName::Splice,
            Op::Shutdown => OpName::Shutdown,
            Op::Handshake => OpName::Handshake,
            Op::Timeout => OpName::Timeout,
            Op::Protocol => OpName::Protocol,
            Op::Migrate => OpName::Migrate,
        }
    }
}

/// How a channel ended on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndName {
    Completed,
    Cancelled,
    Failed,
}

impl From<ChannelEnd> for EndName {
    fn from(end: ChannelEnd) -> EndName {
        match end {
            ChannelEnd::Completed => EndName::Completed,
            ChannelEnd::Cancelled => EndName::Cancelled,
            ChannelEnd::Failed => EndName::Failed,
        }
    }
}

/// A host's evidence that QEMU finished: `qemu` (its word over QMP), `return_path` (the
/// destination's acknowledgement) or `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictName {
    Unknown,
    Qemu,
    ReturnPath,
}

impl From<Verdict> for VerdictName {
    fn from(verdict: Verdict) -> VerdictName {
        match verdict {
            Verdict::Unknown => VerdictName::Unknown,
            Verdict::Qemu => VerdictName::Qemu,
            Verdict::ReturnPath => VerdictName::ReturnPath,
        }
    }
}

/// The link between the daemons: `tls` (mutual TLS) or `plaintext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Tls,
    Plaintext,
}

impl Link {
    pub fn of(tls: bool) -> Link {
        if tls { Link::Tls } else { Link::Plaintext }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Link::Tls => "tls",
            Link::Plaintext => "plaintext",
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
