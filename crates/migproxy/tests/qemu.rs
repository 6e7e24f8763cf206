//! `migproxy relay` between a real source and destination QEMU on one host.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::qemu::{Qemu, Ram, accel, random_ram_file};
use common::{short_tempdir, wait_until};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const RAM_MIB: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_migration_through_migproxy_relay_completes_with_equal_ram() {
    let dir = short_tempdir();
    let ram_file = dir.path().join("source.img");
    random_ram_file(&ram_file, RAM_MIB, 42);
    eprintln!("QEMU accelerator: {}", accel());

    let mut source = Qemu::start(dir.path(), "src", Ram::File(&ram_file), RAM_MIB, false).await;
    let mut destination = Qemu::start(dir.path(), "dst", Ram::Anonymous, RAM_MIB, true).await;

    let incoming = dir.path().join("incoming.sock");
    let relay_sock = dir.path().join("relay.sock");
    destination
        .execute(
            "migrate-incoming",
            json!({"uri": format!("unix:{}", incoming.display())}),
        )
        .await;
    let mut relay = Command::new(env!("CARGO_BIN_EXE_migproxy"))
        .arg("relay")
        .arg("--listen")
        .arg(format!("unix:{}", relay_sock.display()))
        .arg("--connect")
        .arg(format!("unix:{}", incoming.display()))
        .args(["--max-connections", "1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the relay socket", || {
        relay_sock.exists()
    })
    .await;

    source
        .execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 107_374_182_400u64}),
        )
        .await;
    source
        .execute(
            "migrate",
            json!({"uri": format!("unix:{}", relay_sock.display())}),
        )
        .await;
    let info = source.wait_migration(Duration::from_secs(120)).await;
    assert_eq!(
        info["status"],
        "completed",
        "source says: {info}\n{}",
        source.log_text()
    );

    // The relay ends once QEMU has closed both directions, and reports the bytes it carried.
    let status = tokio::time::timeout(Duration::from_secs(10), relay.wait())
        .await
        .expect("relay did not exit after the migration")
        .unwrap();
    let mut out = String::new();
    relay
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert!(status.success(), "relay exited {status}: {out}");
    assert!(
        out.contains("#1 unix:") && out.contains(": completed: "),
        "{out}"
    );
    // Every byte spliced, not "partly zero-copy".
    assert!(out.contains("/s, zero-copy)"), "{out}");
    eprintln!(
        "relay: {out}QEMU ram.transferred: {}",
        info["ram"]["transferred"]
    );

    let dest_info = destination.execute("query-migrate", Value::Null).await;
    eprintln!("destination query-migrate: {dest_info}");
    let (src_digest, src_sample) = source.ram_digest(dir.path(), "src", RAM_MIB).await;
    let (dst_digest, _) = destination.ram_digest(dir.path(), "dst", RAM_MIB).await;
    let file = std::fs::read(&ram_file).unwrap();
    assert_eq!(
        src_sample,
        file[(2 << 20)..(3 << 20)],
        "source RAM is not the random file"
    );
    assert_eq!(
        src_digest, dst_digest,
        "destination RAM differs from the source's"
    );
    assert!(!relay_sock.exists(), "relay left its socket file behind");
}
