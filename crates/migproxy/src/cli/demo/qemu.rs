//! `migproxy demo` with QEMU installed: a real VM migrated through two daemons, which drive
//! both QEMUs over QMP themselves (as `migproxy migrate` has them do).
//!
//! The source guest's RAM is a private mapping of a file of random bytes, so every page is
//! real data; the destination's starts as zeros. Equal RAM afterwards (by `pmemsave` digest)
//! proves that every byte crossed. The guest is paused (`-S`): no OS image is needed.

use std::path::Path;
use std::time::Duration;

use crate::api::types::{IncomingRequest, OutgoingRequest};
use crate::daemon::migration::State;
use crate::daemon::qemu::report::Status;

use super::daemons::{DemoDaemon, DemoError, create_both, reports};
use crate::human::Bytes;
use crate::testkit::vm::{Ram, Vm, accel, random_ram_file};

/// Migrates a paused VM with `size` bytes of random RAM through two daemons.
pub(super) async fn demo(dir: &Path, size: u64) -> Result<bool, DemoError> {
    let mib = (size >> 20).max(16);
    let size = mib << 20;
    say!(
        "migproxy demo: migrating a real QEMU VM ({} of random guest RAM, {}) through two daemons",
        Bytes(size),
        accel().to_uppercase()
    );
    let ram = dir.join("guest-ram.img");
    random_ram_file(&ram, mib, 0x6d69_6770_726f_7879)?;
    let mut source_vm = Vm::start(dir, "source-vm", Ram::File(&ram), mib, None).await?;
    let mut destination_vm = Vm::start(dir, "destination-vm", Ram::Anonymous, mib, None).await?;
    let source_host = DemoDaemon::start(dir, "source").await?;
    let destination_host = DemoDaemon::start(dir, "destination").await?;

    // Each daemon drives its own QEMU through a QMP socket of its own.
    let incoming = IncomingRequest {
        id: Some("demo".to_owned()),
        qmp: Some(destination_vm.spare_qmp.display().to_string()),
        ..IncomingRequest::default()
    };
    let outgoing = OutgoingRequest {
        qmp: Some(source_vm.spare_qmp.display().to_string()),
        ..OutgoingRequest::default()
    };
    create_both(&source_host, &destination_host, incoming, outgoing).await?;
    say!("  both daemons drive their QEMU over QMP: migrate-incoming, migrate, query-migrate");
    follow(&source_host, size).await?;

    let (at_source, at_destination) = reports(&source_host, &destination_host).await?;
    let qemu_completed = at_source
        .qemu
        .as_ref()
        .is_some_and(|q| q.report.status == Status::Completed);
    let equal = if qemu_completed {
        let a = source_vm.ram_digest(dir, "source", size).await?;
        let b = destination_vm.ram_digest(dir, "destination", size).await?;
        say!(
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
    let ok =
        equal && at_source.state == State::Completed && at_destination.state == State::Completed;
    say!("migproxy demo: {}", if ok { "OK" } else { "FAILED" });
    Ok(ok)
}

/// Shows the source daemon's view (migproxy's bytes, QEMU's status) until QEMU is done.
async fn follow(source: &DemoDaemon, size: u64) -> Result<(), DemoError> {
    let bar =
        indicatif::ProgressBar::new(size).with_style(indicatif::ProgressStyle::with_template(
            "  {bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )?);
    loop {
        let carried = source.client.migration("demo").await?;
        bar.set_position(carried.bytes.to_destination);
        let qemu = carried.qemu.as_ref().map(|q| q.report.status.to_string());
        bar.set_message(format!("QEMU {}", qemu.as_deref().unwrap_or("?")));
        if crate::cli::migration::settled(&carried) {
            bar.finish_and_clear();
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
