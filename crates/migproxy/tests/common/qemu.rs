//! Real QEMU processes for the tests, driven over QMP (see shared FIELD-NOTES).
//!
//! The source's RAM is a private mapping of a file of random bytes, so real pages move; the
//! destination's RAM is anonymous and starts as zeros, so equal RAM afterwards proves that
//! every byte crossed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use migproxy::qmp::QmpError;
use migproxy::testkit::vm::{self, Vm};
use serde_json::{Value, json};

#[allow(unused_imports)]
pub use migproxy::testkit::vm::accel;

/// A running QEMU, killed when dropped; every failure panics with QEMU's own log.
pub struct Qemu {
    vm: Vm,
    log: PathBuf,
}

pub enum Ram<'a> {
    /// Private mapping of this file (the source).
    File(&'a Path),
    /// Anonymous memory (the destination).
    Anonymous,
}

/// Writes `mib` MiB of pseudo-random bytes to `path`.
pub fn random_ram_file(path: &Path, mib: u64, seed: u64) {
    vm::random_ram_file(path, mib, seed).unwrap();
}

impl Qemu {
    /// Starts a paused guest with `mib` MiB of RAM; `incoming` (anonymous RAM) adds
    /// `-incoming defer`.
    pub async fn start(dir: &Path, name: &str, ram: Ram<'_>, mib: u64, incoming: bool) -> Qemu {
        let log = dir.join(format!("{name}.log"));
        let ram = match ram {
            Ram::File(path) => vm::Ram::File(path),
            Ram::Anonymous => vm::Ram::Anonymous,
        };
        assert_eq!(
            incoming,
            matches!(ram, vm::Ram::Anonymous),
            "destinations have anonymous RAM"
        );
        match Vm::start(dir, name, ram, mib, Some(&log)).await {
            Ok(vm) => Qemu { vm, log },
            Err(e) => panic!("{e} (run scripts/test, which installs qemu-system-x86)"),
        }
    }

    pub async fn execute(&mut self, command: &str, arguments: Value) -> Value {
        match self.vm.qmp.execute(command, arguments).await {
            Ok(value) => value,
            Err(e) => panic!("{e}\nQEMU log:\n{}", self.log_text()),
        }
    }

    pub async fn try_execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<Value, QmpError> {
        self.vm.qmp.execute(command, arguments).await
    }

    /// Polls `query-migrate` until the status is final; returns the last answer.
    pub async fn wait_migration(&mut self, limit: Duration) -> Value {
        super::poll("the migration to end", limit, async || {
            let info = self.execute("query-migrate", Value::Null).await;
            match info["status"].as_str() {
                Some("completed" | "failed" | "cancelled") => Ok(info),
                _ => Err(info),
            }
        })
        .await
    }

    /// blake3 of guest physical memory 0..mib MiB, through `pmemsave`.
    pub async fn ram_digest(
        &mut self,
        dir: &Path,
        name: &str,
        mib: u64,
    ) -> (blake3::Hash, Vec<u8>) {
        let path = dir.join(format!("{name}.ram"));
        let args = json!({"val": 0, "size": mib << 20, "filename": path.to_str().unwrap()});
        self.execute("pmemsave", args).await;
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(bytes.len() as u64, mib << 20);
        // Keep a sample for sanity checks; the dump itself is large.
        (blake3::hash(&bytes), bytes[(2 << 20)..(3 << 20)].to_vec())
    }

    /// A QMP socket of its own for migproxy (the test holds the first).
    pub fn spare_qmp(&self) -> &Path {
        &self.vm.spare_qmp
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as when QEMU crashes.
    pub async fn kill(&mut self) {
        self.vm.kill().await.unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        self.vm.is_running()
    }
}
