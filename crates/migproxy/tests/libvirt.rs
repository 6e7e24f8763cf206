//! libvirt, the client migproxy was born for: two libvirt 9.0 hosts in namespaces on this
//! machine (see `common/libvirt.rs`), a real guest whose RAM is checked on arrival, and
//! migproxy daemons between them. These run as root with libvirt installed (scripts/test
//! installs it) and fail loudly otherwise.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::libvirt::{Libvirt, text};
use serde_json::{Value, json};

/// The manual recipe (docs/libvirt.md): the migration created on both daemons with the same
/// socket path, then `virsh migrate --migrateuri unix://PATH`. Returns the socket path.
async fn create_by_hand(lv: &Libvirt, id: &str) -> String {
    let path = format!("/run/migproxy/{id}.sock");
    let body = json!({"direction": "incoming", "id": id, "target": format!("unix:{path}")});
    let (status, incoming) = lv
        .destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                      "peer": incoming["peer"]});
    let (status, outgoing) = lv
        .source
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{outgoing}");
    assert_eq!(
        outgoing["qemu_uri"],
        format!("unix:{path}"),
        "the same path on both"
    );
    path
}

async fn show(host: &common::libvirt::Host, id: &str) -> Value {
    host.request("GET", &format!("/v1/migrations/{id}"), None)
        .await
        .1
}

/// Polls both daemons until the migration has ended on both; returns (source, destination).
async fn ended(lv: &Libvirt, id: &str, limit: Duration) -> (Value, Value) {
    let start = Instant::now();
    loop {
        let (a, b) = (show(&lv.source, id).await, show(&lv.destination, id).await);
        let done = |v: &Value| {
            v["state"]
                .as_str()
                .and_then(migproxy::daemon::migration::State::parse)
                .is_some_and(|s| s.is_final())
        };
        if done(&a) && done(&b) {
            return (a, b);
        }
        assert!(
            start.elapsed() < limit,
            "not ended after {limit:?}:\n{a}\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The doc's manual recipe completes with the guest's RAM on the destination, and
/// `virsh domjobabort` on a second migration back is reported as not completed on both
/// hosts: the destination QEMU's SHUT never came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_recipe_migrates_and_an_abort_is_never_completed() {
    let lv = Libvirt::start("lr", &["--insecure-plaintext"]).await;
    let path = create_by_hand(&lv, "there").await;
    let out = lv
        .source
        .async_command("virsh")
        .args(["-c", "qemu:///system", "migrate", "--live", "--p2p", "g1"])
        .arg(lv.dest_uri())
        .args(["--migrateuri", &format!("unix://{path}")])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "virsh migrate: {}", text(&out));
    let (at_source, at_destination) = ended(&lv, "there", Duration::from_secs(10)).await;
    for view in [&at_source, &at_destination] {
        // libvirt turns QEMU's return path on: the destination's SHUT came back.
        assert_eq!(view["state"], "completed", "{view}");
    }
    assert_eq!(lv.destination.guest_state(), "running");
    lv.assert_ram_migrated();

    // Back again, slowly, and aborted by libvirt half-way.
    let path = create_by_hand_reverse(&lv, "back").await;
    let migrate = lv
        .destination
        .async_command("virsh")
        .args(["-c", "qemu:///system", "migrate", "--live", "--p2p"])
        .args(["--bandwidth", "8", "g1"])
        .arg(format!("qemu+tcp://{}/system", lv.source.addr))
        .args(["--migrateuri", &format!("unix://{path}")])
        .output();
    let migrate = tokio::spawn(migrate);
    let start = Instant::now();
    while show(&lv.source, "back").await["bytes"]["to_destination"]
        .as_u64()
        .unwrap_or(0)
        < 4 << 20
    {
        assert!(start.elapsed() < Duration::from_secs(20), "nothing moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let abort = lv.destination.virsh(&["domjobabort", "g1"]);
    assert!(abort.status.success(), "{}", text(&abort));
    let out = migrate.await.unwrap().unwrap();
    assert!(
        !out.status.success(),
        "virsh migrate was aborted: {}",
        text(&out)
    );
    assert!(text(&out).contains("operation aborted"), "{}", text(&out));
    let (a, b) = ended(&lv, "back", Duration::from_secs(10)).await;
    for view in [&a, &b] {
        assert_eq!(view["state"], "failed", "never completed: {view}");
        // This migration's source is the machine that received the first one.
        assert_eq!(
            view["error"]["host"], "source",
            "the aborting source: {view}"
        );
        assert!(
            view["error"]["detail"]
                .as_str()
                .unwrap()
                .contains("no SHUT"),
            "{view}"
        );
    }
    assert_eq!(a["error"]["message"], b["error"]["message"], "one story");
    assert_eq!(
        lv.destination.guest_state(),
        "running",
        "the guest stays where it was"
    );
}

/// The same recipe from the destination back to the source (the second migration's source
/// is the first's destination).
async fn create_by_hand_reverse(lv: &Libvirt, id: &str) -> String {
    let path = format!("/run/migproxy/{id}.sock");
    let body = json!({"direction": "incoming", "id": id, "target": format!("unix:{path}")});
    let (status, incoming) = lv
        .source
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                      "peer": incoming["peer"]});
    let (status, outgoing) = lv
        .destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{outgoing}");
    path
}

/// A `virsh migrate` that fails before QEMU connects (here: a destination URI nobody serves)
/// leaves the migration `active` at 0 B only until the first-channel deadline: then it fails on
/// both hosts and its socket is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virsh_migrate_that_fails_before_connecting_leaves_nothing_active() {
    let lv = Libvirt::start(
        "lf",
        &["--insecure-plaintext", "--first-channel-timeout", "3"],
    )
    .await;
    let path = create_by_hand(&lv, "nowhere").await;
    let out = lv
        .source
        .async_command("virsh")
        .args(["-c", "qemu:///system", "migrate", "--live", "--p2p", "g1"])
        .arg(format!("qemu+tcp://{}:1/system", lv.destination.addr))
        .args(["--migrateuri", &format!("unix://{path}")])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let (a, b) = ended(&lv, "nowhere", Duration::from_secs(10)).await;
    for view in [&a, &b] {
        assert_eq!(view["state"], "failed", "{view}");
        assert!(
            view["error"]["detail"]
                .as_str()
                .unwrap()
                .contains("the source QEMU did not connect within 3.0 s"),
            "{view}"
        );
    }
    let left = lv
        .source
        .command("ls")
        .arg("/run/migproxy")
        .output()
        .unwrap();
    assert_eq!(text(&left).trim(), "", "no socket left behind");
    assert_eq!(lv.source.guest_state(), "running");
}
