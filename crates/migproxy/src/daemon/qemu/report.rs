//! What QEMU says about its migration, typed: its status, its figures, and what the daemon
//! asked of it. A leaf: the migration holds these, the orchestration in [`super`] fills them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// QEMU's `MigrationStatus` (`query-migrate`'s `status`, the `MIGRATION` event), QEMU 7.2's
/// names. A name this build does not know is kept as it came.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Status {
    /// No migration has started (also what the daemon shows before asking QEMU).
    #[default]
    None,
    Setup,
    Active,
    PreSwitchover,
    Device,
    WaitUnplug,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Colo,
    Cancelling,
    Completed,
    Failed,
    Cancelled,
    Other(String),
}

impl Status {
    const NAMES: [(&'static str, Status); 14] = [
        ("none", Status::None),
        ("setup", Status::Setup),
        ("active", Status::Active),
        ("pre-switchover", Status::PreSwitchover),
        ("device", Status::Device),
        ("wait-unplug", Status::WaitUnplug),
        ("postcopy-active", Status::PostcopyActive),
        ("postcopy-paused", Status::PostcopyPaused),
        ("postcopy-recover", Status::PostcopyRecover),
        ("colo", Status::Colo),
        ("cancelling", Status::Cancelling),
        ("completed", Status::Completed),
        ("failed", Status::Failed),
        ("cancelled", Status::Cancelled),
    ];

    /// The status QEMU names `name`.
    pub fn parse(name: &str) -> Status {
        Status::NAMES
            .iter()
            .find(|(known, _)| *known == name)
            .map_or_else(|| Status::Other(name.to_owned()), |(_, s)| s.clone())
    }

    /// The status of a `query-migrate` answer (`none` when it names none).
    pub fn of(info: &Value) -> Status {
        Status::parse(info["status"].as_str().unwrap_or("none"))
    }

    /// QEMU's own name for it.
    pub fn name(&self) -> &str {
        match self {
            Status::Other(name) => name,
            known => Status::NAMES
                .iter()
                .find(|(_, s)| s == known)
                .map_or("none", |(name, _)| name),
        }
    }

    /// The migration is over in QEMU: `completed`, `failed` or `cancelled`.
    pub fn is_final(&self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// Past the switch to postcopy: the destination runs the guest.
    pub fn is_postcopy(&self) -> bool {
        matches!(
            self,
            Status::PostcopyActive | Status::PostcopyPaused | Status::PostcopyRecover
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Status::parse(&String::deserialize(deserializer)?))
    }
}

/// What to ask of QEMU, as given at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The local QEMU's QMP socket (one of its own for migproxy).
    pub qmp: PathBuf,
    /// multifd with this many channels; `None`: one stream.
    pub multifd: Option<u32>,
    /// The `postcopy-ram` capability (both hosts must agree).
    pub postcopy: bool,
    /// Source: switch to postcopy this long after `migrate`.
    pub postcopy_after_ms: Option<u64>,
    /// Source: bytes per second (default: unlimited).
    pub max_bandwidth: Option<u64>,
    /// Source: the longest pause of the guest QEMU should aim for.
    pub downtime_limit_ms: Option<u64>,
}

impl Settings {
    /// The connections QEMU opens for one migration with these settings: the main stream,
    /// plus one per multifd channel.
    pub fn channels(&self) -> u32 {
        1 + self.multifd.unwrap_or(0)
    }
}

/// Why a cancel asked on this host was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error(
        "the migration has switched to postcopy: the destination runs the guest now, and a \
         cancel would lose it"
    )]
    Postcopy,
    #[error(
        "QEMU has completed the migration on this host: the guest now belongs to the \
         destination"
    )]
    Completed,
    #[error(
        "postcopy is enabled, and only the source knows whether it has switched (the \
         destination's QEMU learns it later): cancel on the source host"
    )]
    AskTheSource,
    #[error("this host has finished its side and told the peer so: the migration is completing")]
    Completing,
}

/// QEMU's view of the migration, for the API: the last `query-migrate`, digested.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// QEMU's status: `setup`, `active`, `postcopy-active`, `completed`, `failed`,
    /// `cancelled`…; `none` before QEMU has started.
    pub status: Status,
    pub error_desc: Option<String>,
    /// Memory passes so far (QEMU's `dirty-sync-count`).
    pub pass: u64,
    /// Whether the migration switched to postcopy.
    pub postcopy_started: bool,
    /// QEMU's refusal of `migrate-start-postcopy` (the migration goes on in precopy).
    pub postcopy_error: Option<String>,
    /// QEMU's monitor closed before QEMU's verdict: QEMU exited (as a destination QEMU does
    /// when its incoming migration breaks) or crashed.
    pub monitor_closed: bool,
    /// QEMU's own figures (milliseconds), when it gives them.
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    /// From the daemon's start of QEMU's migration to QEMU's verdict, measured here (QEMU's
    /// `total-time` reads 0 for a paused guest).
    pub wall_time_ms: u64,
    pub ram: Option<Ram>,
}

/// QEMU's RAM figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ram {
    pub total: u64,
    pub transferred: u64,
    pub remaining: u64,
    /// Bytes dirtied per second by the guest (`dirty-pages-rate` × `page-size`).
    pub dirty_bytes_per_second: u64,
    /// QEMU's throughput, megabits per second.
    pub mbps: f64,
    pub postcopy_requests: u64,
    pub multifd_bytes: u64,
}

impl Report {
    /// Digests a `query-migrate` answer; keeps what an emptier answer (QEMU forgets its
    /// figures on some paths) no longer carries.
    /// `statuses` are those QEMU's `MIGRATION` events announced since the last answer.
    pub fn update(&mut self, info: &Value, pass: Option<u64>, statuses: &[Status], wall: Duration) {
        let number = |key: &str| info[key].as_u64();
        let was_final = self.is_final();
        self.status = Status::of(info);
        if let Some(desc) = info["error-desc"].as_str() {
            self.error_desc = Some(desc.to_owned());
        }
        self.postcopy_started |= std::iter::once(&self.status)
            .chain(statuses)
            .any(Status::is_postcopy);
        self.total_time_ms = number("total-time").or(self.total_time_ms);
        self.downtime_ms = number("downtime").or(self.downtime_ms);
        self.expected_downtime_ms = number("expected-downtime").or(self.expected_downtime_ms);
        self.setup_time_ms = number("setup-time").or(self.setup_time_ms);
        if !was_final {
            self.wall_time_ms = wall.as_millis() as u64;
        }
        if let Some(ram) = info.get("ram") {
            self.pass = self.pass.max(ram["dirty-sync-count"].as_u64().unwrap_or(0));
            self.ram = Some(Ram::of(ram));
        }
        if let Some(pass) = pass {
            self.pass = self.pass.max(pass);
        }
    }

    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    /// Whether QEMU will say no more: its verdict is in, or its monitor is gone.
    pub fn is_settled(&self) -> bool {
        self.is_final() || self.monitor_closed
    }
}

impl Ram {
    fn of(ram: &Value) -> Ram {
        let field = |key: &str| ram[key].as_u64().unwrap_or(0);
        Ram {
            total: field("total"),
            transferred: field("transferred"),
            remaining: field("remaining"),
            dirty_bytes_per_second: field("dirty-pages-rate").saturating_mul(field("page-size")),
            mbps: ram["mbps"].as_f64().unwrap_or(0.0),
            postcopy_requests: field("postcopy-requests"),
            multifd_bytes: field("multifd-bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_round_trip_and_unknown_names_are_kept() {
        for (name, status) in Status::NAMES {
            assert_eq!(Status::parse(name), status);
            assert_eq!(status.name(), name);
        }
        let odd = Status::parse("postcopy-sideways");
        assert_eq!(odd, Status::Other("postcopy-sideways".into()));
        assert_eq!(odd.to_string(), "postcopy-sideways");
        assert!(!odd.is_final() && !odd.is_postcopy());
        assert_eq!(Status::of(&json!({})), Status::None);
        let text = serde_json::to_string(&Status::PostcopyActive).expect("serialise");
        assert_eq!(text, "\"postcopy-active\"");
        let back: Status = serde_json::from_str(&text).expect("deserialise");
        assert!(back.is_postcopy());
    }

    #[test]
    fn report_digests_query_migrate() {
        let mut report = Report::default();
        let active = json!({"status": "active", "total-time": 120, "expected-downtime": 300,
            "setup-time": 2, "ram": {"total": 1024, "transferred": 512, "remaining": 512,
            "dirty-pages-rate": 10, "page-size": 4096, "mbps": 800.5, "dirty-sync-count": 2}});
        report.update(&active, Some(3), &[], Duration::from_millis(130));
        assert_eq!(report.status, Status::Active);
        assert_eq!(
            report.pass, 3,
            "a MIGRATION_PASS event newer than the poll counts"
        );
        let ram = report.ram.clone().expect("ram");
        assert_eq!((ram.remaining, ram.dirty_bytes_per_second), (512, 40960));
        assert!(!report.is_final());

        // A final answer without figures keeps the last ones; the wall time stops.
        report.update(
            &json!({"status": "failed", "error-desc": "boom"}),
            None,
            &[],
            Duration::from_millis(200),
        );
        report.update(
            &json!({"status": "failed"}),
            None,
            &[],
            Duration::from_secs(9),
        );
        assert!(report.is_final());
        assert_eq!(report.error_desc.as_deref(), Some("boom"));
        assert_eq!(report.total_time_ms, Some(120));
        assert_eq!(report.wall_time_ms, 200);
        assert_eq!(report.ram.map(|r| r.transferred), Some(512));
    }

    #[test]
    fn postcopy_is_remembered() {
        let mut report = Report::default();
        report.update(&json!({"status": "active"}), None, &[], Duration::ZERO);
        assert!(!report.postcopy_started);
        // Seen only in an event between two polls.
        let seen = [Status::PostcopyActive, Status::Completed];
        report.update(&json!({"status": "completed"}), None, &seen, Duration::ZERO);
        assert!(report.postcopy_started);
    }
}
