//! Real QEMU migrations through two daemons: multifd, postcopy, cancel, a destination QEMU
//! killed, the network cut, and migrating back. RAM verified equal after every success.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::scenario::{Options, Scenario, qemu_completed, qemu_status};
use serde_json::{Value, json};

const FAST: u64 = 107_374_182_400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_with_four_channels_completes_with_equal_ram() {
    let mut s = Scenario::start(Options::default()).await;
    s.capabilities(&["multifd"]).await;
    s.parameters(json!({"multifd-channels": 4})).await;
    let uri = s.create("mfd", false).await;
    s.migrate(&uri, FAST).await;
    for view in s.completes("mfd", "transferred").await {
        // The main channel and four multifd channels.
        assert_eq!(view["channels"].as_array().unwrap().len(), 5, "{view}");
    }
    s.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_with_the_return_path_completes_with_equal_ram() {
    let mut s = Scenario::start(Options::default()).await;
    s.capabilities(&["postcopy-ram"]).await;
    let uri = s.create("pc", true).await;
    s.migrate(&uri, 64 << 20).await;
    s.sent_at_least(32 << 20).await;
    s.src_vm
        .execute("migrate-start-postcopy", Value::Null)
        .await;
    qemu_status(&mut s.src_vm, &["postcopy-active"], Duration::from_secs(30)).await;
    s.src_vm
        .execute("migrate-set-parameters", json!({"max-bandwidth": FAST}))
        .await;
    for view in s.completes("pc", "completed").await {
        assert!(
            view["bytes"]["to_source"].as_u64().unwrap() > 0,
            "the return path carried: {view}"
        );
    }
    s.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_the_api_fails_the_source_qemu_at_once_and_its_vm_lives_on() {
    let mut s = Scenario::start(Options::default()).await;
    let uri = s.create("cx", false).await;
    s.migrate(&uri, 32 << 20).await; // slow: it is still running when cancelled
    s.sent_at_least(8 << 20).await;
    let asked = Instant::now();
    let (status, view) = s
        .source
        .request("POST", "/v1/migrations/cx/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    let info = qemu_status(
        &mut s.src_vm,
        &["failed", "cancelled"],
        Duration::from_secs(5),
    )
    .await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the source QEMU noticed after {took:?}: {info}"
    );
    let alive = s.src_vm.execute("query-status", Value::Null).await;
    assert!(alive["status"].is_string(), "{alive}");
    assert!(s.src_vm.is_running());
    let at_destination = s.destination.wait_final("cx", Duration::from_secs(1)).await;
    assert_eq!(at_destination["state"], "cancelled", "{at_destination}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_destination_qemu_is_blamed_with_bytes_on_both_hosts() {
    let mut s = Scenario::start(Options::default()).await;
    let uri = s.create("kq", false).await;
    s.migrate(&uri, 32 << 20).await;
    s.sent_at_least(8 << 20).await;
    s.dst_vm.kill().await;
    let info = qemu_status(&mut s.src_vm, &["failed"], Duration::from_secs(10)).await;
    eprintln!("source QEMU says: {}", info["error-desc"]);
    for daemon in [&s.source, &s.destination] {
        let view = daemon.wait_final("kq", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = &view["error"];
        assert_eq!(error["host"], "destination", "{view}");
        assert_eq!(error["leg"], "qemu", "{view}");
        assert_eq!(error["channel"], 0);
        assert!(
            error["bytes"]["to_destination"].as_u64().unwrap() >= 8 << 20,
            "{view}"
        );
        eprintln!("reported: {}", error["message"]);
    }
}

/// A source QEMU killed mid-migration, with nobody driving QEMU over QMP: its sockets close
/// as cleanly as a finished stream's. With the return path on (as libvirt has it) the missing
/// SHUT tells both daemons QEMU did not finish; without it nothing can, and neither claims
/// `completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_source_qemu_is_never_completed() {
    for (return_path, verdict) in [(true, "failed"), (false, "transferred")] {
        let mut s = Scenario::start(Options::default()).await;
        if return_path {
            s.capabilities(&["return-path"]).await;
        }
        let uri = s.create("ks", false).await;
        s.migrate(&uri, 32 << 20).await;
        s.sent_at_least(8 << 20).await;
        s.src_vm.kill().await;
        let mut stories = Vec::new();
        for daemon in [&s.source, &s.destination] {
            let view = daemon.wait_final("ks", Duration::from_secs(10)).await;
            assert_eq!(view["state"], verdict, "return path {return_path}: {view}");
            if return_path {
                let error = &view["error"];
                assert_eq!(error["host"], "source", "{view}");
                assert_eq!(error["leg"], "qemu", "{view}");
                assert!(
                    error["detail"].as_str().unwrap().contains("no SHUT"),
                    "{view}"
                );
            } else {
                assert!(
                    view["verdict"].as_str().unwrap().contains("unknown"),
                    "{view}"
                );
            }
            stories.push(view["error"]["message"].clone());
        }
        assert_eq!(stories[0], stories[1], "one story on both hosts");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_network_is_reported_as_such_on_both_hosts() {
    let mut s = Scenario::start(Options {
        netns: true,
        // Without resumable channels: the failure itself is under test.
        daemon_args: ["--peer-timeout", "3", "--resume-timeout", "0"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await;
    let uri = s.create("cut", false).await;
    s.migrate(&uri, 32 << 20).await;
    s.sent_at_least(8 << 20).await;
    let cut = Instant::now();
    s.hosts.as_ref().unwrap().blackhole_b();
    // Found by the 3 s peer timeout (plus the second of grace for the other host's word),
    // not by TCP's own, which takes minutes; generous for a loaded machine under TCG.
    for daemon in [&s.source, &s.destination] {
        let view = daemon.wait_final("cut", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "failed", "{view}");
        assert_eq!(view["error"]["leg"], "peer", "a network failure: {view}");
        eprintln!("after {:?}: {}", cut.elapsed(), view["error"]["message"]);
    }
    assert!(cut.elapsed() < Duration::from_secs(10));
    let info = qemu_status(&mut s.src_vm, &["failed"], Duration::from_secs(5)).await;
    eprintln!("source QEMU says: {}", info["error-desc"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrates_there_and_back_through_the_same_daemons() {
    let mut s = Scenario::start(Options::default()).await;
    let uri = s.create("there", false).await;
    s.migrate(&uri, FAST).await;
    s.completes("there", "transferred").await;
    s.assert_ram_equal().await;

    // Back: the destination VM becomes the source, a fresh VM on the first host receives it,
    // and the daemons swap roles.
    let back_target = format!("unix:{}", s.path("back.sock").display());
    let mut returning = common::qemu::Qemu::start(
        s.dir.path(),
        "back",
        common::qemu::Ram::Anonymous,
        s.mib,
        true,
    )
    .await;
    returning
        .execute("migrate-incoming", json!({"uri": back_target}))
        .await;
    let body = json!({"direction": "incoming", "id": "back", "target": back_target});
    let (status, incoming) = s.source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": "back", "token": incoming["token"], "peer": incoming["peer"]});
    let (status, outgoing) = s
        .destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{outgoing}");
    s.dst_vm
        .execute("migrate-set-parameters", json!({"max-bandwidth": FAST}))
        .await;
    s.dst_vm
        .execute("migrate", json!({"uri": outgoing["qemu_uri"]}))
        .await;
    qemu_completed(&mut s.dst_vm).await;
    for daemon in [&s.source, &s.destination] {
        assert_eq!(
            daemon.wait_final("back", Duration::from_secs(10)).await["state"],
            "transferred"
        );
    }
    let dir = s.dir.path().to_owned();
    let (original, _) = s.src_vm.ram_digest(&dir, "src", s.mib).await;
    let (back, _) = returning.ram_digest(&dir, "back", s.mib).await;
    assert_eq!(original, back, "the VM came back with different RAM");
}
