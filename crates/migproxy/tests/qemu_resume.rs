//! Resumable channels with real QEMU (issue #18): a precopy migration, one channel and
//! multifd, whose data connections are reset (RST) by a middlebox between the two daemons
//! while the control link lives; and one whose link is blackholed (nftables, two network
//! namespaces) past the peer timeout. QEMU completes and never notices; the guest RAM is
//! equal.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::cut::cutting_proxy;
use common::daemon::TestDaemon;
use common::qemu::{Qemu, Ram, random_ram_file};
use common::scenario::{Options, Scenario, qemu_completed, qemu_status};
use common::short_tempdir;
use serde_json::{Value, json};

const MIB: u64 = 256;

/// Migrates a 256 MiB guest through two in-process daemons with resumable channels, the
/// source dialling through a middlebox that resets the data connections `cuts` names
/// (counted in the order they come, resumed ones too); `multifd` channels beside the main
/// one when given.
async fn migrate_through_resets(cuts: Vec<usize>, multifd: Option<u32>) -> [Value; 2] {
    let dir = short_tempdir();
    let ram = dir.path().join("source.img");
    random_ram_file(&ram, MIB, 7);
    let mut src = Qemu::start(dir.path(), "src", Ram::File(&ram), MIB, false).await;
    let mut dst = Qemu::start(dir.path(), "dst", Ram::Anonymous, MIB, true).await;
    if let Some(channels) = multifd {
        let caps = json!({"capabilities": [{"capability": "multifd", "state": true}]});
        let params = json!({"multifd-channels": channels});
        for vm in [&mut src, &mut dst] {
            vm.execute("migrate-set-capabilities", caps.clone()).await;
            vm.execute("migrate-set-parameters", params.clone()).await;
        }
    }
    let resume = |c: &mut migproxy::daemon::Config| c.resume_timeout = Duration::from_secs(20);
    let source = TestDaemon::start_with("src", resume).await;
    let destination = TestDaemon::start_with("dst", resume).await;
    let cut = Arc::new(AtomicU32::new(0));
    let wanted = cuts.iter().filter(|c| **c != usize::MAX).count() as u32;
    let via = cutting_proxy(destination.peer.parse().unwrap(), cuts, Arc::clone(&cut)).await;
    let target = format!("unix:{}", dir.path().join("incoming.sock").display());
    dst.execute("migrate-incoming", json!({"uri": target}))
        .await;
    let body = json!({"direction": "incoming", "id": "q", "target": target});
    let (status, incoming) = destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": "q", "token": incoming["token"],
                      "peer": via.to_string()});
    let (status, outgoing) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    // Limited, so that the resets land while RAM moves.
    let params = json!({"max-bandwidth": 128u64 << 20});
    src.execute("migrate-set-parameters", params).await;
    let uri = outgoing["qemu_uri"].as_str().unwrap();
    src.execute("migrate", json!({"uri": uri})).await;
    qemu_completed(&mut src).await;
    assert_eq!(
        cut.load(Ordering::SeqCst),
        wanted,
        "the middlebox reset every connection named"
    );
    let (a, _) = src.ram_digest(dir.path(), "src", MIB).await;
    let (b, _) = dst.ram_digest(dir.path(), "dst", MIB).await;
    assert_eq!(a, b, "destination RAM differs from the source's");
    let mut views = Vec::new();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("q", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        views.push(view);
    }
    [views.remove(0), views.remove(0)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_migration_survives_three_resets_of_its_connection() {
    // The main channel's connection, then its replacements, reset at 20, 60 and 120 MiB.
    let [source, _] = migrate_through_resets(vec![20 << 20, 40 << 20, 60 << 20], None).await;
    assert_eq!(source["channels"].as_array().unwrap().len(), 1, "{source}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multifd_migration_survives_resets_of_several_channels() {
    // The five connections in the order they are opened: main, then four multifd channels;
    // the second and the fourth multifd channels are reset, and the first replacement too.
    let cuts = vec![
        usize::MAX,
        usize::MAX,
        8 << 20,
        usize::MAX,
        8 << 20,
        4 << 20,
    ];
    let [source, _] = migrate_through_resets(cuts, Some(4)).await;
    assert_eq!(source["channels"].as_array().unwrap().len(), 5, "{source}");
}

/// Two daemons with resumable channels in two network namespaces, whose link a test can
/// blackhole; a 3 s peer timeout, so that a few seconds' cut finds the control link dead.
async fn blackholable() -> Scenario {
    Scenario::start(Options {
        netns: true,
        daemon_args: ["--resume-timeout", "60", "--peer-timeout", "3"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_tls_migration_survives_a_15_s_blackhole_with_the_shipped_timeouts() {
    // The daemons as shipped (peer timeout 10 s), resuming within a minute; 1 GiB at
    // 100 MiB/s lasts about 10 s unbroken.
    let mut s = Scenario::start(Options {
        mib: Some(1024),
        netns: true,
        tls: true,
        daemon_args: ["--resume-timeout", "60"].map(String::from).to_vec(),
    })
    .await;
    let uri = s.create("tbh", false).await;
    s.migrate(&uri, 100 << 20).await;
    s.sent_at_least(300 << 20).await;
    let hosts = s.hosts.as_ref().unwrap();
    hosts.blackhole_b();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let sent_before = s.ram_sent().await;
    s.hosts.as_ref().unwrap().restore_b();
    let back = std::time::Instant::now();
    // For the record: how long after the network's return RAM moves again.
    let moving = s.ram_sent_beyond(sent_before).await;
    eprintln!(
        "RAM moved again {:?} after the network came back",
        moving - back
    );
    let views = s.completes("tbh", "transferred").await;
    for view in &views {
        let resume = &view["resume"];
        eprintln!("{}: resume {resume}", view["direction"]);
        assert_eq!(view["link"], "tls", "{view}");
        // The control link found dead at the peer timeout, and taken over once: one
        // outage; the data connection broken by the blackhole and resumed.
        assert_eq!(resume["link_outages"], 1, "{view}");
        assert!(resume["link_lost_ms"].as_u64().unwrap() >= 4_000, "{view}");
        assert!(resume["resumptions"].as_u64().unwrap() >= 1, "{view}");
        assert!(view["error"].is_null(), "{view}");
    }
    let dst = s.dst_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(dst["status"], "completed", "{dst}");
    assert!(dst["error-desc"].is_null(), "{dst}");
    s.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_blackholed_mid_migration_costs_seconds_not_the_migration() {
    let mut s = blackholable().await;
    let uri = s.create("bh", false).await;
    s.migrate(&uri, 32 << 20).await;
    s.sent_at_least(8 << 20).await;
    // Every packet to and from the destination's host dropped for 6 s: twice the peer
    // timeout, so that both daemons find the control link dead.
    let hosts = s.hosts.as_ref().unwrap();
    let cut = std::time::Instant::now();
    hosts.blackhole_b();
    tokio::time::sleep(Duration::from_secs(6)).await;
    hosts.restore_b();
    let views = s.completes("bh", "transferred").await;
    for view in &views {
        let resume = &view["resume"];
        // For the record: from the cut, the peer timeout, then the outage until a control
        // link took over.
        eprintln!(
            "{}: link down {} ms of the {:?} since the cut",
            view["direction"],
            resume["link_lost_ms"],
            cut.elapsed()
        );
        assert_eq!(resume["link_outages"], 1, "{view}");
        assert!(resume["link_lost_ms"].as_u64().unwrap() >= 2_000, "{view}");
    }
    s.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multifd_migration_survives_three_blackholes() {
    let mut s = blackholable().await;
    s.capabilities(&["multifd"]).await;
    s.parameters(json!({"multifd-channels": 4})).await;
    let uri = s.create("mbh", false).await;
    s.migrate(&uri, 24 << 20).await;
    s.sent_at_least(4 << 20).await;
    // Three cuts of 5 s (past the 3 s peer timeout), each once the last is over: RAM
    // moving, the control link taken over, every channel connected.
    for cut in 1..=3 {
        let hosts = s.hosts.as_ref().unwrap();
        hosts.blackhole_b();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let sent = s.ram_sent().await;
        s.hosts.as_ref().unwrap().restore_b();
        let back = std::time::Instant::now();
        let moving = s.ram_sent_beyond(sent).await;
        eprintln!(
            "cut {cut}: RAM moved again {:?} after the network came back",
            moving - back
        );
        let limit = Duration::from_secs(20);
        s.source
            .wait_for("mbh", "the link back", limit, |v| {
                v["state"] != "resuming" && v["resume"]["link_outages"] == cut
            })
            .await;
        eprintln!(
            "cut {cut}: the link back {:?} after the network",
            back.elapsed()
        );
    }
    let views = s.completes("mbh", "transferred").await;
    for view in &views {
        eprintln!("{}: resume {}", view["direction"], view["resume"]);
    }
    for view in views {
        assert_eq!(view["channels"].as_array().unwrap().len(), 5, "{view}");
        assert_eq!(view["resume"]["link_outages"], 3, "{view}");
        assert!(view["error"].is_null(), "{view}");
    }
    s.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_blackholed_in_postcopy_costs_seconds_and_the_return_path_still_says_completed() {
    let mut s = blackholable().await;
    s.capabilities(&["postcopy-ram"]).await;
    // Not recoverable: only resuming can save it (a recoverable one would pause instead).
    let uri = s.create("pcb", false).await;
    // Postcopy as slow as precopy: still running when the link goes.
    let slow = json!({"max-postcopy-bandwidth": 32u64 << 20});
    s.src_vm.execute("migrate-set-parameters", slow).await;
    s.migrate(&uri, 32 << 20).await;
    s.sent_at_least(16 << 20).await;
    s.src_vm
        .execute("migrate-start-postcopy", Value::Null)
        .await;
    qemu_status(&mut s.src_vm, &["postcopy-active"], Duration::from_secs(30)).await;
    let hosts = s.hosts.as_ref().unwrap();
    hosts.blackhole_b();
    tokio::time::sleep(Duration::from_secs(6)).await;
    hosts.restore_b();
    let during = s.src_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(during["status"], "postcopy-active", "{during}");
    for view in s.completes("pcb", "completed").await {
        assert_eq!(view["resume"]["link_outages"], 1, "{view}");
        assert!(view["bytes"]["to_source"].as_u64().unwrap() > 0, "{view}");
    }
    s.assert_ram_equal().await;
}
