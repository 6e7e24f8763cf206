//! libvirt, the client migproxy was born for: two libvirt 9.0 hosts in namespaces on this
//! machine (see `common/libvirt.rs`), a real guest whose RAM is checked on arrival, and
//! migproxy daemons between them. These run as root with libvirt installed (scripts/test
//! installs it) and fail loudly otherwise.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::libvirt::{Host, Libvirt, text};
use serde_json::{Value, json};

/// The manual recipe (docs/libvirt.md): the migration created on both daemons with the same
/// socket path, then `virsh migrate --migrateuri unix://PATH`. Returns the socket path.
async fn create_by_hand(from: &Host, to: &Host, id: &str) -> String {
    create_by_hand_with(from, to, id, false).await
}

async fn create_by_hand_with(from: &Host, to: &Host, id: &str, recoverable: bool) -> String {
    let path = format!("/run/migproxy/{id}.sock");
    let body = json!({"direction": "incoming", "id": id, "target": format!("unix:{path}"),
                      "recoverable": recoverable});
    let (status, incoming) = to.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                      "peer": incoming["peer"], "recoverable": recoverable});
    let (status, outgoing) = from.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    assert_eq!(
        outgoing["qemu_uri"],
        format!("unix:{path}"),
        "the same path on both"
    );
    path
}

/// Waits until `host` has carried `bytes` of migration `id` to the destination.
async fn moved(host: &Host, id: &str, bytes: u64, limit: Duration) {
    let start = Instant::now();
    while show(host, id).await["bytes"]["to_destination"]
        .as_u64()
        .unwrap_or(0)
        < bytes
    {
        assert!(start.elapsed() < limit, "{id}: nothing moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn show(host: &Host, id: &str) -> Value {
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
    let lv = Libvirt::start("lr", &[]).await;
    let path = create_by_hand(&lv.source, &lv.destination, "there").await;
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
    let path = create_by_hand(&lv.destination, &lv.source, "back").await;
    let migrate = lv
        .destination
        .async_command("virsh")
        .args(["-c", "qemu:///system", "migrate", "--live", "--p2p"])
        .args(["--bandwidth", "8", "g1"])
        .arg(format!("qemu+tcp://{}/system", lv.source.addr))
        .args(["--migrateuri", &format!("unix://{path}")])
        .output();
    let migrate = tokio::spawn(migrate);
    moved(&lv.source, "back", 4 << 20, Duration::from_secs(20)).await;
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

/// A `virsh migrate` that fails before QEMU connects (here: a destination URI nobody serves)
/// leaves the migration `active` at 0 B only until the first-channel deadline: then it fails on
/// both hosts and its socket is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virsh_migrate_that_fails_before_connecting_leaves_nothing_active() {
    let lv = Libvirt::start("lf", &["--first-channel-timeout", "3"]).await;
    let path = create_by_hand(&lv.source, &lv.destination, "nowhere").await;
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
    no_socket_left(&lv.source).await;
    no_socket_left(&lv.destination).await;
    assert_eq!(lv.source.guest_state(), "running");
}

/// Nothing left in the host's runtime directory, within the daemon's sweep of a failed
/// migration's destination socket (10 s).
async fn no_socket_left(host: &Host) {
    let start = Instant::now();
    loop {
        let left = host.command("ls").arg("/run/migproxy").output().unwrap();
        if text(&left).trim().is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(12),
            "left on {}: {}",
            host.name,
            text(&left)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `migproxy migrate --libvirt`, run on the source host.
fn one_command(lv: &Libvirt, to: &str, extra: &[&str]) -> tokio::process::Command {
    let mut command = lv.source.async_command(common::process::BIN);
    command
        .arg("migrate")
        .arg("--api")
        .arg(&lv.source.api)
        .args([
            "--libvirt",
            "g1",
            "--dest-libvirt",
            &lv.dest_uri(),
            "--to",
            to,
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The one command over mutual TLS (daemons and the destination's API) with two multifd
/// channels: libvirt says the guest runs on the destination, its RAM arrived, migproxy says
/// completed on both hosts with three channels, and the report merges libvirt's statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_migrates_a_libvirt_guest_over_tls_with_parallel_channels() {
    let lv = Libvirt::start_tls("lt", &[]).await;
    let to = format!("{}:4701", lv.destination.addr);
    let pki = lv.pki(&lv.source).display().to_string();
    let out = one_command(
        &lv,
        &to,
        &["--parallel", "2", "--tls-dir", &pki, "--id", "one"],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains("libvirt: g1 is running on the destination"),
        "{report}"
    );
    assert!(
        report.contains("Total downtime"),
        "libvirt's statistics: {report}"
    );
    assert!(report.contains("migproxy one: completed"), "{report}");
    assert_eq!(lv.destination.guest_state(), "running");
    assert_eq!(lv.source.guest_state(), "shut off");
    lv.assert_ram_migrated();
    for host in [&lv.source, &lv.destination] {
        let view = show(host, "one").await;
        assert_eq!(view["state"], "completed", "{view}");
        assert_eq!(view["link"], "tls", "{view}");
        assert_eq!(
            view["channels"].as_array().unwrap().len(),
            3,
            "the main stream and two multifd channels: {view}"
        );
    }
}

/// A network that resets the daemons' connections mid-migration costs libvirt nothing:
/// over mutual TLS with two multifd channels (resumable, the daemons' default), every
/// segment to the destination daemon's peer port is answered with a reset for 2 s. Each
/// channel goes on over a new connection from the byte it had reached; libvirt's job never
/// fails, the RAM arrives, and both hosts report the resumptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_migration_survives_its_peer_connections_reset() {
    let lv = Libvirt::start_tls("lr", &[]).await;
    let to = format!("{}:4701", lv.destination.addr);
    let pki = lv.pki(&lv.source).display().to_string();
    let flags = [
        "--parallel",
        "2",
        "--max-bandwidth",
        "16M",
        "--tls-dir",
        &pki,
        "--id",
        "cut",
    ];
    let child = one_command(&lv, &to, &flags).spawn().unwrap();
    moved(&lv.source, "cut", 8 << 20, Duration::from_secs(60)).await;
    lv.reset_peer_port();
    tokio::time::sleep(Duration::from_secs(2)).await;
    lv.heal();
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the migration ends")
        .unwrap();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("migproxy cut: completed"), "{report}");
    assert!(report.contains("resumptions:"), "{report}");
    assert_eq!(lv.destination.guest_state(), "running");
    lv.assert_ram_migrated();
    for host in [&lv.source, &lv.destination] {
        let view = show(host, "cut").await;
        assert_eq!(view["state"], "completed", "{view}");
        assert!(view["error"].is_null(), "{view}");
        let resumptions = view["resume"]["resumptions"].as_u64().unwrap();
        assert!(resumptions >= 1, "{}: {view}", host.name);
    }
    // The control link breaks too when it spoke within those 2 s (a heartbeat, progress).
    let source = show(&lv.source, "cut").await;
    if source["resume"]["link_outages"].as_u64().unwrap() > 0 {
        assert!(report.contains("control link outages:"), "{report}");
    }
}

/// Ctrl-C (SIGINT) during a bandwidth-limited migration: libvirt's job is aborted, both
/// daemons' migrations end cancelled and are forgotten, the command exits 1 and the guest
/// runs on the source; no socket is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_aborts_libvirts_job_and_leaves_the_guest_on_the_source() {
    let lv = Libvirt::start("lc", &[]).await;
    let to = format!("unix:{}", lv.destination.api.display());
    let child = one_command(&lv, &to, &["--max-bandwidth", "8M", "--id", "slow"])
        .spawn()
        .unwrap();
    moved(&lv.source, "slow", 4 << 20, Duration::from_secs(30)).await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    // The nsenter in front passes the signal on to migproxy.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the command ends after Ctrl-C")
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(lv.source.guest_state(), "running", "{}", text(&out));
    assert!(
        text(&out).contains("migproxy slow: cancelled"),
        "both daemons cancelled: {}",
        text(&out)
    );
    for host in [&lv.source, &lv.destination] {
        let (status, _) = host.request("GET", "/v1/migrations/slow", None).await;
        assert_eq!(status, 404, "forgotten on {}", host.name);
        // The destination QEMU's own socket goes once libvirt has stopped that QEMU.
        no_socket_left(host).await;
    }
}

/// `--copy-storage-all`: the disk goes through a second migproxy migration in the same group
/// as the RAM's. RAM is made to take longer than the stall timeout after the disk is in sync
/// (bandwidth-limited): the idle disk connection is no stall, the migration completes, and
/// the destination's disk is the source's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_storage_all_completes_with_identical_disks_past_the_stall_timeout() {
    let lv = Libvirt::start("ld", &["--stall-timeout", "2"]).await;
    let (source_disk, destination_disk) = lv.start_disk_guest();
    let to = format!("unix:{}", lv.destination.api.display());
    let mut command = lv.source.async_command(common::process::BIN);
    command
        .arg("migrate")
        .arg("--api")
        .arg(&lv.source.api)
        .args([
            "--libvirt",
            "g2",
            "--dest-libvirt",
            &lv.dest_uri(),
            "--to",
            &to,
        ])
        // 64 MiB of random RAM at 16 MiB/s: about 4 s of RAM after the 16 MiB disk.
        .args(["--copy-storage-all", "--max-bandwidth", "16M", "--id", "st"]);
    let out = command.output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = text(&out);
    assert!(report.contains("migproxy st: completed"), "{report}");
    assert!(
        report.contains("migproxy st-disks: transferred"),
        "{report}"
    );
    let time = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Time elapsed:"))
        .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        time > 2_000,
        "the RAM phase outlasted the stall timeout: {report}"
    );
    for id in ["st", "st-disks"] {
        let view = show(&lv.destination, id).await;
        assert_eq!(view["group"], "st", "{view}");
    }
    assert_eq!(
        std::fs::read(&source_disk).unwrap(),
        std::fs::read(&destination_disk).unwrap(),
        "the destination's disk is the source's"
    );
}

/// Postcopy through the one command: libvirt switches after a second (`--postcopy-after 1`,
/// 64 MiB of random RAM at 16 MiB/s), the guest runs on the destination with its RAM, and
/// migproxy says completed (the destination's SHUT came back). QEMU runs unprivileged, so the
/// destination needs `vm.unprivileged_userfaultfd=1`, set here as docs/libvirt.md says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_through_the_one_command_completes_with_the_ram() {
    let set = std::process::Command::new("sysctl")
        .args(["-w", "vm.unprivileged_userfaultfd=1"])
        .output()
        .unwrap();
    assert!(set.status.success(), "{}", text(&set));
    let lv = Libvirt::start("lp", &[]).await;
    let to = format!("unix:{}", lv.destination.api.display());
    let flags = [
        "--postcopy-after",
        "1",
        "--max-bandwidth",
        "16M",
        "--id",
        "pc",
    ];
    let out = one_command(&lv, &to, &flags).output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("migproxy pc: completed"),
        "{}",
        text(&out)
    );
    assert_eq!(lv.destination.guest_state(), "running");
    lv.assert_ram_migrated();
    for host in [&lv.source, &lv.destination] {
        let view = show(host, "pc").await;
        assert_eq!(view["recoverable"], true, "{view}");
        assert!(view["pauses"].as_array().unwrap().is_empty(), "{view}");
    }
}

/// `virsh migrate --postcopy-resume` through migproxy (the manual recipe, recoverable): libvirt
/// pauses postcopy (`domjobabort --postcopy`), both daemons pause with it and the source
/// daemon brings the control link back at once; the destination daemon connects QEMU the
/// moment `migrate-recover` listens, so libvirt's destination sees `postcopy-recover` before
/// the source's Finish call arrives (libvirt 9.0 fails the job otherwise, although the
/// migration goes on) and virsh exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virsh_postcopy_resume_recovers_a_paused_migration() {
    let set = std::process::Command::new("sysctl")
        .args(["-w", "vm.unprivileged_userfaultfd=1"])
        .output()
        .unwrap();
    assert!(set.status.success(), "{}", text(&set));
    let lv = Libvirt::start_tls("lq", &[]).await;
    let path = create_by_hand_with(&lv.source, &lv.destination, "pr", true).await;
    let migrate = |resume: bool| {
        let mut command = lv.source.async_command("virsh");
        command
            .args([
                "-c",
                "qemu:///system",
                "migrate",
                "--live",
                "--p2p",
                "--postcopy",
            ])
            .args(["--postcopy-bandwidth", "2"])
            // Precopy limited too: unlimited, it sometimes finished before the switch.
            .args(if resume {
                &["--postcopy-resume"][..]
            } else {
                &["--bandwidth", "8"][..]
            })
            .arg("g1")
            .arg(lv.dest_uri())
            .args(["--migrateuri", &format!("unix://{path}")]);
        command.output()
    };
    let first = tokio::spawn(migrate(false));
    moved(&lv.source, "pr", 1 << 20, Duration::from_secs(20)).await;
    let switch = lv.source.virsh(&["migrate-postcopy", "g1"]);
    assert!(switch.status.success(), "{}", text(&switch));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pause = lv.source.virsh(&["domjobabort", "--postcopy", "g1"]);
    assert!(pause.status.success(), "{}", text(&pause));
    let out = first.await.unwrap().unwrap();
    assert!(!out.status.success(), "paused: {}", text(&out));
    // libvirt's own word that postcopy is paused, on both hosts.
    for host in [&lv.source, &lv.destination] {
        let start = Instant::now();
        loop {
            let state = text(&host.virsh(&["domstate", "--reason", "g1"]));
            if state.contains("post-copy failed") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{}: {state}\n{}",
                host.name,
                host.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Both daemons pause, and the source's link is back before anyone resumes.
    let start = Instant::now();
    loop {
        let (a, b) = (
            show(&lv.source, "pr").await,
            show(&lv.destination, "pr").await,
        );
        let recovering =
            |v: &Value| v["phase"] == "attached" && v["recoveries"][0]["frozen_ms"].is_null();
        if recovering(&a) && recovering(&b) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not recovering:\n{a}\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("link back {:?} after the pause was seen", start.elapsed());
    let resumed = Instant::now();
    let out = migrate(true).await.unwrap();
    eprintln!(
        "virsh migrate --postcopy-resume took {:?}",
        resumed.elapsed()
    );
    // libvirt 9.0's destination fails the resumed job if its QEMU is still `postcopy-paused`
    // when the source's Finish call reaches it, a few milliseconds after `migrate resume=true`;
    // the destination daemon connects QEMU as soon as `migrate-recover` listens, so it is not.
    assert!(
        out.status.success(),
        "virsh migrate --postcopy-resume: {}\n{}",
        text(&out),
        lv.destination.log()
    );
    let (a, b) = ended(&lv, "pr", Duration::from_secs(60)).await;
    for view in [&a, &b] {
        assert_eq!(view["state"], "completed", "{view}");
        assert_eq!(view["recovered"], 1, "{view}");
    }
    assert_eq!(lv.destination.guest_state(), "running");
    lv.assert_ram_migrated();
}
