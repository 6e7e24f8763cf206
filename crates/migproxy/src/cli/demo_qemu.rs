//! `migproxy demo` with QEMU installed: a real VM migrated through two daemons.
//!
//! The source guest's RAM is a private mapping of a file of random bytes, so every page is
//! real data; the destination's starts as zeros. Equal RAM afterwards (by `pmemsave` digest)
//! proves that every byte crossed. The guest is paused (`-S`): no OS image is needed.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use super::demo::{DemoDaemon, DemoError, wait_final};
use crate::human::{Bytes, Elapsed};
use crate::qmp::Qmp;

const QEMU: &str = "qemu-system-x86_64";

/// Whether QEMU can be run here.
pub fn available() -> bool {
    std::process::Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// KVM when /dev/kvm can be used, else TCG.
fn accel() -> &'static str {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable { "kvm" } else { "tcg" }
}

/// A paused QEMU and its QMP session; killed when dropped.
struct Vm {
    qmp: Qmp,
    _child: Child,
}

impl Vm {
    async fn start(
        dir: &Path,
        name: &str,
        mib: u64,
        ram_file: Option<&Path>,
    ) -> Result<Vm, DemoError> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let backend = match ram_file {
            Some(file) => format!(
                "memory-backend-file,id=mem,size={mib}M,mem-path={},share=off",
                file.display()
            ),
            None => format!("memory-backend-ram,id=mem,size={mib}M"),
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
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if ram_file.is_none() {
            command.args(["-incoming", "defer"]);
        }
        let child = command.spawn()?;
        let started = Instant::now();
        loop {
            match Qmp::connect(&qmp_path).await {
                Ok(qmp) => return Ok(Vm { qmp, _child: child }),
                Err(_) if started.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// blake3 of guest memory 0..size, through `pmemsave`.
    async fn ram_digest(
        &mut self,
        dir: &Path,
        name: &str,
        size: u64,
    ) -> Result<blake3::Hash, DemoError> {
        let path = dir.join(format!("{name}.ram"));
        let args = json!({"val": 0, "size": size, "filename": path.display().to_string()});
        self.qmp.execute("pmemsave", args).await?;
        let mut hasher = blake3::Hasher::new();
        let mut file = std::fs::File::open(&path)?;
        std::io::copy(&mut file, &mut hasher)?;
        std::fs::remove_file(&path)?;
        Ok(hasher.finalize())
    }
}

async fn random_file(path: &Path, size: u64) -> Result<(), DemoError> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut rng = SmallRng::seed_from_u64(0x6d69_6770_726f_7879);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        rng.fill_bytes(&mut block);
        file.write_all(&block).await?;
    }
    file.flush().await?;
    Ok(())
}

/// Migrates a paused VM with `size` bytes of random RAM through two daemons.
pub async fn demo(dir: &Path, size: u64) -> Result<bool, DemoError> {
    let mib = (size >> 20).max(16);
    let size = mib << 20;
    println!(
        "migproxy demo: migrating a real QEMU VM ({} of random guest RAM, {}) through two daemons",
        Bytes(size),
        accel().to_uppercase()
    );
    let ram = dir.join("guest-ram.img");
    random_file(&ram, size).await?;
    let mut source_vm = Vm::start(dir, "source-vm", mib, Some(&ram)).await?;
    let mut destination_vm = Vm::start(dir, "destination-vm", mib, None).await?;
    let source_host = DemoDaemon::start(dir, "source").await?;
    let destination_host = DemoDaemon::start(dir, "destination").await?;

    let target = format!("unix:{}", dir.join("qemu-incoming.sock").display());
    destination_vm
        .qmp
        .execute("migrate-incoming", json!({"uri": target}))
        .await?;
    let body = json!({"direction": "incoming", "id": "demo", "target": target});
    let incoming = destination_host
        .client
        .post("/v1/migrations", Some(body))
        .await?;
    let body = json!({"direction": "outgoing", "id": "demo", "token": incoming["token"],
                      "peer": incoming["peer"]});
    let outgoing = source_host
        .client
        .post("/v1/migrations", Some(body))
        .await?;
    let uri = outgoing["qemu_uri"].as_str().unwrap_or_default().to_owned();
    println!("  source QEMU: migrate {uri}\n  destination QEMU: migrate-incoming {target}");

    let qemu = &mut source_vm.qmp;
    qemu.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 107_374_182_400u64}),
    )
    .await?;
    let started = Instant::now();
    qemu.execute("migrate", json!({"uri": uri})).await?;
    let info = follow(qemu, &source_host, size).await?;
    let took = started.elapsed();

    let at_source = wait_final(&source_host.client).await?;
    let at_destination = wait_final(&destination_host.client).await?;
    println!("\nthe source daemon reports:");
    super::migration::print_report(&at_source, false);
    println!("the destination daemon reports:");
    super::migration::print_report(&at_destination, false);
    println!(
        "QEMU reports: {} in {} (measured here), {} of RAM transferred, downtime {} ms",
        info["status"].as_str().unwrap_or("?"),
        Elapsed(took),
        Bytes(info["ram"]["transferred"].as_u64().unwrap_or(0)),
        info["downtime"].as_u64().unwrap_or(0),
    );
    let equal = if info["status"] == "completed" {
        let a = source_vm.ram_digest(dir, "source", size).await?;
        let b = destination_vm.ram_digest(dir, "destination", size).await?;
        println!(
            "guest RAM: source {}…, destination {}…: {}",
            &a.to_hex()[..16],
            &b.to_hex()[..16],
            if a == b { "identical" } else { "DIFFERENT" }
        );
        a == b
    } else {
        false
    };
    source_host.stop().await;
    destination_host.stop().await;
    let ok = equal && at_source["state"] == "completed" && at_destination["state"] == "completed";
    println!("migproxy demo: {}", if ok { "OK" } else { "FAILED" });
    Ok(ok)
}

/// Follows QEMU's migration with a progress bar until QEMU says it is done.
async fn follow(qemu: &mut Qmp, source: &DemoDaemon, size: u64) -> Result<Value, DemoError> {
    let bar =
        indicatif::ProgressBar::new(size).with_style(indicatif::ProgressStyle::with_template(
            "  {bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )?);
    loop {
        let info = qemu.execute("query-migrate", Value::Null).await?;
        let carried = source.client.get("/v1/migrations/demo").await?;
        bar.set_position(carried["bytes"]["to_destination"].as_u64().unwrap_or(0));
        bar.set_message(info["status"].as_str().unwrap_or("?").to_owned());
        if ["completed", "failed", "cancelled"].contains(&info["status"].as_str().unwrap_or("")) {
            bar.finish_and_clear();
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
