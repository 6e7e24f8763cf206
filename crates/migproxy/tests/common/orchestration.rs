//! Two "hosts" on one machine for `migproxy migrate`: two real daemon processes, a source QEMU
//! with random RAM and a destination QEMU waiting with `-incoming defer`, and the checks the
//! orchestration tests share (tests/qemu_orchestration.rs, tests/kernel_path.rs).

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use super::openapi::Doc;
use super::process::{BIN, DaemonProcess};
use super::qemu::{Qemu, Ram, random_ram_file};
use super::short_tempdir;

pub const RAM_MIB: u64 = 256;

/// Two daemons and two QEMUs: a source with random RAM, a destination waiting with
/// `-incoming defer`.
pub struct Hosts {
    pub dir: tempfile::TempDir,
    pub source: DaemonProcess,
    pub destination: DaemonProcess,
    pub src_vm: Qemu,
    pub dst_vm: Qemu,
    /// blake3 of the source guest's RAM before the migration.
    pub expected: blake3::Hash,
}

impl Hosts {
    pub async fn start(seed: u64) -> Hosts {
        Hosts::start_with(seed, &[], &[]).await
    }

    pub async fn start_with(seed: u64, src_flags: &[&str], dst_flags: &[&str]) -> Hosts {
        let dir = short_tempdir();
        let ram = dir.path().join("source.img");
        random_ram_file(&ram, RAM_MIB, seed);
        let source = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, src_flags).await;
        let destination =
            DaemonProcess::start(dir.path(), "dst", "127.0.0.1:0", None, dst_flags).await;
        let mut src_vm = Qemu::start(dir.path(), "srcvm", Ram::File(&ram), RAM_MIB, false).await;
        let dst_vm = Qemu::start(dir.path(), "dstvm", Ram::Anonymous, RAM_MIB, true).await;
        // Before anything moves: postcopy discards source pages (and punches holes into a
        // file behind them), so the source is digested now.
        let (expected, _) = src_vm.ram_digest(dir.path(), "before", RAM_MIB).await;
        Hosts {
            dir,
            source,
            destination,
            src_vm,
            dst_vm,
            expected,
        }
    }

    /// `migproxy migrate` from the source host to the destination daemon's API socket.
    pub fn migrate(&self, extra: &[&str]) -> Command {
        let to = format!("unix:{}", self.destination.api.display());
        self.migrate_to(&to, extra)
    }

    pub fn migrate_to(&self, to: &str, extra: &[&str]) -> Command {
        self.migrate_with(self.src_vm.spare_qmp(), self.dst_vm.spare_qmp(), to, extra)
    }

    pub fn migrate_with(&self, qmp: &Path, dest_qmp: &Path, to: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("migrate")
            .arg("--api")
            .arg(&self.source.api)
            .args(["--to", to])
            .arg("--qmp")
            .arg(qmp)
            .arg("--dest-qmp")
            .arg(dest_qmp)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs `migproxy migrate … --json`; returns the exit code and both daemons' reports.
    pub async fn run(&self, mut command: Command) -> (i32, Value, Output) {
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("migproxy migrate finished within 60 s")
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        (output.status.code().unwrap_or(-1), report, output)
    }

    /// Starts `migproxy migrate` with migration `id` held to 32 MiB/s (eight seconds for the
    /// guest: time to interrupt it) and `extra` flags, and returns once 8 MiB have reached the
    /// destination daemon.
    pub async fn spawn_moving(&self, id: &str, extra: &[&str]) -> tokio::process::Child {
        let mut flags = vec!["--max-bandwidth", "32M", "--id", id];
        flags.extend_from_slice(extra);
        let child = self.migrate(&flags).spawn().unwrap();
        wait_for(&self.destination, id, "progress", moved_more_than(8 << 20)).await;
        child
    }

    pub async fn assert_ram_equal(&mut self) {
        let (got, _) = self
            .dst_vm
            .ram_digest(self.dir.path(), "after", RAM_MIB)
            .await;
        assert_eq!(
            got, self.expected,
            "destination RAM differs from the source's"
        );
    }

    pub async fn migrations(&self, daemon: &DaemonProcess) -> Vec<Value> {
        let (_, all) = daemon.request("GET", "/v1/migrations", None).await;
        all["migrations"].as_array().cloned().unwrap_or_default()
    }

    /// The destination QEMU never started listening: it can still take a migration.
    pub async fn assert_destination_untouched(&mut self) {
        let info = self.dst_vm.execute("query-migrate", Value::Null).await;
        assert!(info.get("socket-address").is_none(), "{info}");
        let status = self.dst_vm.execute("query-status", Value::Null).await;
        assert_eq!(status["status"], "inmigrate", "{status}");
    }
}

/// Polls `daemon`'s view of migration `id` until `ready` holds (at most 20 s).
pub async fn wait_for(
    daemon: &DaemonProcess,
    id: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) {
    daemon
        .wait_for(id, what, Duration::from_secs(20), ready)
        .await;
}

/// Whether more than `bytes` have crossed.
pub fn moved_more_than(bytes: u64) -> impl Fn(&Value) -> bool {
    move |m| m["bytes"]["to_destination"].as_u64().unwrap_or(0) > bytes
}

pub fn text(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// QEMU's verdict on both hosts and migproxy's on both daemons: completed; and both reports
/// as `docs/api.yaml` documents them.
pub fn assert_completed(report: &Value, output: &Output) {
    for host in ["source", "destination"] {
        let m = &report[host];
        assert_eq!(m["state"], "completed", "{host}: {}", text(output));
        assert_eq!(m["qemu"]["status"], "completed", "{host}: {m}");
        assert!(m["error"].is_null(), "{m}");
    }
    assert_documented(report);
}

/// Both daemons' reports validate against the API document's `Migration` schema.
pub fn assert_documented(report: &Value) {
    let doc = Doc::load();
    for host in ["source", "destination"] {
        let errors = doc.validate(doc.schema("Migration"), &report[host]);
        assert!(
            errors.is_empty(),
            "{host} report vs docs/api.yaml: {errors:?}"
        );
    }
}
