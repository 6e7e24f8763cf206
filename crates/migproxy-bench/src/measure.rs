//! What a run costs: CPU clocks of processes and of the whole machine, peak memory, and the
//! machine the numbers were measured on.

use std::net::TcpListener;
use std::process::{Command, Stdio};

/// Why a benchmark could not run.
pub type BenchError = Box<dyn std::error::Error>;

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub seconds: f64,
    pub cpu_seconds: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    /// What the whole machine and the source and sink (this process) spent meanwhile.
    pub spent: Spent,
}

/// CPU spent during one run, beyond the proxies' own.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    /// The source and the sink: this process's utime + stime, in seconds.
    pub endpoints: f64,
    /// Every core of the machine, busy (not idle or waiting for I/O), in seconds.
    pub machine: f64,
}

/// Reads the CPU clocks at the start of a run; [`Meter::stop`] says what the run spent.
pub struct Meter {
    pub endpoints: f64,
    pub machine: f64,
}

impl Meter {
    pub fn start() -> Meter {
        Meter {
            endpoints: cpu_seconds(std::process::id()).unwrap_or(0.0),
            machine: machine_busy_seconds(),
        }
    }

    pub fn stop(self) -> Spent {
        Spent {
            endpoints: cpu_seconds(std::process::id()).unwrap_or(0.0) - self.endpoints,
            machine: machine_busy_seconds() - self.machine,
        }
    }
}

/// Seconds all cores have been busy since boot: /proc/stat's first line, every field but
/// idle and iowait (guest time is already inside user).
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / 100.0
}

/// utime + stime of process `pid` (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cores();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, Linux {}, {}",
        kernel.trim(),
        qemu_version()
    )
}

/// "QEMU 7.2.22 (Debian …)", from the first line of `qemu-system-x86_64 --version`.
pub fn qemu_version() -> String {
    Command::new(migproxy::testkit::vm::QEMU)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|text| {
            let line = text.lines().next()?.trim();
            Some(line.replace("QEMU emulator version", "QEMU"))
        })
        .unwrap_or_else(|| format!("no {}", migproxy::testkit::vm::QEMU))
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn free_port() -> Result<u16, BenchError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", gib(bytes))
    } else {
        format!("{} MiB", bytes >> 20)
    }
}
