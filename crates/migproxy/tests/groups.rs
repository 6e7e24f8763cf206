//! Migration groups: a guest's RAM and its disks (`--copy-storage-all`) are two migrations,
//! and the disk connection idles by design once the disks are in sync. In one group they share
//! one stall watch; apart, the idle one fails on the stall timeout.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::daemon::TestDaemon;
use common::short_tempdir;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const STALL: Duration = Duration::from_millis(800);

/// A pair in `group` (or none); returns the socket for the source QEMU.
async fn pair(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    group: Option<&str>,
    target: &str,
) -> String {
    let body = json!({"direction": "incoming", "id": id, "target": target, "group": group});
    let (status, incoming) = destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                      "peer": incoming["peer"], "group": group});
    let (status, outgoing) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    outgoing["qemu_uri"]
        .as_str()
        .unwrap()
        .trim_start_matches("unix:")
        .to_owned()
}

/// A destination QEMU stand-in that reads everything on every connection.
fn reader(listener: UnixListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = vec![0u8; 1 << 16];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
}

/// Writes a little every 100 ms for `time`: a RAM stream that keeps moving.
async fn trickle(path: &str, time: Duration) {
    let mut qemu = UnixStream::connect(path).await.unwrap();
    let until = tokio::time::Instant::now() + time;
    while tokio::time::Instant::now() < until {
        qemu.write_all(&[7u8; 4096]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    qemu.shutdown().await.unwrap();
}

async fn state(daemon: &TestDaemon, id: &str) -> Value {
    daemon.show(id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_disk_migration_beside_moving_ram_is_no_stall_in_one_group() {
    let stall = |c: &mut migproxy::daemon::Config| c.stall_timeout = STALL;
    let source = TestDaemon::start_with("src", stall).await;
    let destination = TestDaemon::start_with("dst", stall).await;
    let dir = short_tempdir();
    let mut sockets = Vec::new();
    for (id, group) in [("ram", Some("vm")), ("disks", Some("vm")), ("alone", None)] {
        let path = dir.path().join(format!("{id}-in.sock"));
        reader(UnixListener::bind(&path).unwrap());
        let target = format!("unix:{}", path.display());
        sockets.push(pair(&source, &destination, id, group, &target).await);
    }
    // The disks' and the lone migration's channels open, send a little, and idle.
    let mut idle = Vec::new();
    for path in &sockets[1..] {
        let mut qemu = UnixStream::connect(path).await.unwrap();
        qemu.write_all(&[1u8; 4096]).await.unwrap();
        idle.push(qemu);
    }
    // RAM moves for four stall timeouts.
    trickle(&sockets[0], STALL * 4).await;
    let disks = state(&source, "disks").await;
    assert_eq!(disks["state"], "active", "in the group, no stall: {disks}");
    assert_eq!(disks["group"], "vm");
    let alone = source.wait_final("alone", Duration::from_secs(5)).await;
    assert_eq!(
        alone["state"], "failed",
        "apart, the idle one stalls: {alone}"
    );
    assert!(
        alone["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("sent nothing on any channel"),
        "{alone}"
    );
    // Once the RAM migration has ended, the group moves no more: the disks stall too.
    let disks = source.wait_final("disks", Duration::from_secs(5)).await;
    assert_eq!(disks["state"], "failed", "{disks}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_name_is_checked_like_an_id() {
    let destination = TestDaemon::start("dst").await;
    let body = json!({"direction": "incoming", "id": "g", "target": "unix:/g.sock",
                      "group": "../etc"});
    let (status, error) = destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"].as_str().unwrap().starts_with("group:"),
        "{error}"
    );
}
