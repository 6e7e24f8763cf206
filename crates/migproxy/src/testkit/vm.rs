//! Paused QEMU guests for demonstrations, benchmarks and tests: a guest needs no OS image, and
//! its RAM can be made of real data.
//!
//! The source's RAM is a private mapping of a file of random bytes, so every page moved is
//! real data (QEMU skips zero pages); the destination's is anonymous and starts as zeros, so
//! equal RAM afterwards (`pmemsave` digests) proves that every byte crossed. Never give the
//! destination the source's file: equality would prove nothing, and QEMU punches holes into a
//! file-backed RAM it discards.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::qmp::{Qmp, QmpError};

pub const QEMU: &str = "qemu-system-x86_64";

/// Why a guest could not be started or inspected.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start {QEMU}")]
    Spawn(#[source] io::Error),
    #[error("{QEMU} exited ({status}) before its QMP socket was up{}", log_tail(.log))]
    Exited {
        status: std::process::ExitStatus,
        log: Option<PathBuf>,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("guest RAM dump {}", .path.display())]
    Dump {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
}

fn log_tail(log: &Option<PathBuf>) -> String {
    log.as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|text| format!(":\n{text}"))
        .unwrap_or_default()
}

/// Whether QEMU can be run here.
pub fn available() -> bool {
    std::process::Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `kvm` when /dev/kvm can be used, else `tcg`: guests run either way.
pub fn accel() -> &'static str {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable { "kvm" } else { "tcg" }
}

/// Writes `mib` MiB of pseudo-random bytes to `path`, on disk before it returns (a file still
/// being written back makes QEMU's reads of it slow).
pub fn random_ram_file(path: &Path, mib: u64, seed: u64) -> io::Result<()> {
    let mut file = File::create(path)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill_bytes(&mut block);
        file.write_all(&block)?;
    }
    file.sync_all()
}

/// What a guest's RAM is.
#[derive(Debug, Clone, Copy)]
pub enum Ram<'a> {
    /// A private mapping of this file (a source).
    File(&'a Path),
    /// Anonymous memory, zeros (a destination, started with `-incoming defer`).
    Anonymous,
    /// Anonymous memory faulted in before the guest starts (`prealloc=on`): a destination
    /// whose migration is not slowed by first-touch page faults. On this machine those
    /// faults cost between nothing and 2 s per GiB from one run to the next (the host takes
    /// freed pages back), which is not what a benchmark of the transport should measure.
    Preallocated,
}

/// A paused guest and its QMP session; killed when dropped.
#[derive(Debug)]
pub struct Vm {
    pub qmp: Qmp,
    /// A second QMP socket, left free for a management tool (QEMU serves one client per
    /// monitor, and [`qmp`](Self::qmp) holds the first): migproxy's own.
    pub spare_qmp: PathBuf,
    child: Child,
}

/// Connects to a starting QEMU's monitor at `path`, retrying while the socket is not there
/// yet (up to 30 s); a QEMU that exits meanwhile is an error naming its `log`.
async fn monitor(path: &Path, child: &mut Child, log: Option<&Path>) -> Result<Qmp, VmError> {
    let started = Instant::now();
    loop {
        match Qmp::connect(path).await {
            Ok(qmp) => return Ok(qmp),
            Err(QmpError::Connect { .. }) if started.elapsed() < Duration::from_secs(30) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(VmError::Exited {
                        status,
                        log: log.map(Path::to_owned),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

impl Vm {
    /// Starts a paused guest with `mib` MiB of RAM, its QMP socket in `dir`; QEMU's stderr goes
    /// to `log` when given. A guest with anonymous RAM waits for `migrate-incoming`.
    pub async fn start(
        dir: &Path,
        name: &str,
        ram: Ram<'_>,
        mib: u64,
        log: Option<&Path>,
    ) -> Result<Vm, VmError> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let spare_qmp = dir.join(format!("{name}.tool.qmp"));
        let backend = match ram {
            Ram::File(path) => format!(
                "memory-backend-file,id=mem,size={mib}M,mem-path={},share=off",
                path.display()
            ),
            Ram::Anonymous => format!("memory-backend-ram,id=mem,size={mib}M"),
            Ram::Preallocated => format!("memory-backend-ram,id=mem,size={mib}M,prealloc=on"),
        };
        let stderr = match log {
            Some(path) => Stdio::from(File::create(path).map_err(VmError::Spawn)?),
            None => Stdio::null(),
        };
        let mut command = Command::new(QEMU);
        command
            .args(["-accel", accel(), "-M", "pc", "-m", &format!("{mib}M")])
            .args(["-nodefaults", "-display", "none", "-S"])
            .args(["-machine", "memory-backend=mem", "-object", &backend])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", spare_qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        if let Ram::Anonymous | Ram::Preallocated = ram {
            command.args(["-incoming", "defer"]);
        }
        let mut child = command.spawn().map_err(VmError::Spawn)?;
        let qmp = monitor(&qmp_path, &mut child, log).await?;
        Ok(Vm {
            qmp,
            spare_qmp,
            child,
        })
    }

    /// blake3 of guest memory `0..size`, through `pmemsave` into `dir`.
    pub async fn ram_digest(
        &mut self,
        dir: &Path,
        name: &str,
        size: u64,
    ) -> Result<blake3::Hash, VmError> {
        let path = dir.join(format!("{name}.ram"));
        let dump = |error| VmError::Dump {
            path: path.clone(),
            error,
        };
        self.qmp
            .execute(
                "pmemsave",
                json!({"val": 0, "size": size, "filename": path.display().to_string()}),
            )
            .await?;
        let mut hasher = blake3::Hasher::new();
        let mut file = File::open(&path).map_err(dump)?;
        io::copy(&mut file, &mut hasher).map_err(dump)?;
        std::fs::remove_file(&path).map_err(dump)?;
        Ok(hasher.finalize())
    }

    /// SIGKILL, as when QEMU crashes.
    pub async fn kill(&mut self) -> io::Result<()> {
        self.child.kill().await
    }

    /// The QEMU process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
