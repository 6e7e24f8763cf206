//! Real QEMU processes for the tests, driven over QMP (see shared FIELD-NOTES).
//!
//! The source's RAM is a private mapping of a file of random bytes, so real pages move; the
//! destination's RAM is anonymous and starts as zeros, so equal RAM afterwards proves that
//! every byte crossed.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use migproxy::qmp::{Qmp, QmpError};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

pub const QEMU: &str = "qemu-system-x86_64";

/// `kvm` when /dev/kvm can be used, else `tcg`: the tests run either way, never skip.
pub fn accel() -> &'static str {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable { "kvm" } else { "tcg" }
}

/// A running QEMU, killed when dropped.
pub struct Qemu {
    pub qmp: Qmp,
    child: Child,
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
    let mut file = File::create(path).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill_bytes(&mut block);
        file.write_all(&block).unwrap();
    }
}

impl Qemu {
    /// Starts a paused guest with `mib` MiB of RAM; `incoming` adds `-incoming defer`.
    pub async fn start(dir: &Path, name: &str, ram: Ram<'_>, mib: u64, incoming: bool) -> Qemu {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let backend = match ram {
            Ram::File(path) => format!(
                "memory-backend-file,id=mem,size={mib}M,mem-path={},share=off",
                path.display()
            ),
            Ram::Anonymous => format!("memory-backend-ram,id=mem,size={mib}M"),
        };
        let mut command = Command::new(QEMU);
        command
            .args(["-accel", accel(), "-M", "pc", "-m", &format!("{mib}M")])
            .args(["-nodefaults", "-display", "none", "-S"])
            .args(["-machine", "memory-backend=mem", "-object", &backend])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .kill_on_drop(true);
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {QEMU} ({e}): run scripts/test, which installs qemu-system-x86")
        });
        let qmp = connect_qmp(&qmp_path, &mut child, &log).await;
        Qemu { qmp, child, log }
    }

    pub async fn execute(&mut self, command: &str, arguments: Value) -> Value {
        match self.qmp.execute(command, arguments).await {
            Ok(value) => value,
            Err(e) => panic!("{e}\nQEMU log:\n{}", self.log_text()),
        }
    }

    pub async fn try_execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<Value, QmpError> {
        self.qmp.execute(command, arguments).await
    }

    /// Polls `query-migrate` until the status is final; returns the last answer.
    pub async fn wait_migration(&mut self, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let info = self.execute("query-migrate", Value::Null).await;
            match info["status"].as_str() {
                Some("completed" | "failed" | "cancelled") => return info,
                _ if start.elapsed() > limit => {
                    panic!("migration still running after {limit:?}: {info}")
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as when QEMU crashes.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

async fn connect_qmp(path: &Path, child: &mut Child, log: &Path) -> Qmp {
    let start = Instant::now();
    loop {
        match Qmp::connect(path).await {
            Ok(qmp) => return qmp,
            Err(QmpError::Connect { .. }) if start.elapsed() < Duration::from_secs(30) => {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    panic!("{QEMU} exited with {status} before QMP was up:\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}
