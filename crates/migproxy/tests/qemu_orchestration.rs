//! `migproxy migrate`: one command drives real QEMUs on both "hosts" over QMP, through two
//! real daemon processes (see shared FIELD-NOTES for how QEMU migrates here).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::certs::Ca;
use common::orchestration::{
    Hosts, RAM_MIB, assert_completed, assert_documented, moved_more_than, text, wait_for,
};
use common::process::DaemonProcess;
use common::{short_tempdir, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_migrates_a_vm_with_equal_ram_and_one_report() {
    let mut hosts = Hosts::start(81).await;
    let (code, report, output) = hosts.run(hosts.migrate(&["--json"])).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_completed(&report, &output);
    hosts.assert_ram_equal().await;

    // The merged report: QEMU's figures beside migproxy's channels.
    let source = &report["source"];
    let ram = &source["qemu"]["ram"];
    assert!(ram["total"].as_u64().unwrap() >= RAM_MIB << 20, "{source}");
    assert_eq!(ram["remaining"], 0, "{source}");
    assert!(source["qemu"]["pass"].as_u64().unwrap() >= 1, "{source}");
    assert!(
        source["qemu"]["wall_time_ms"].as_u64().unwrap() > 0,
        "{source}"
    );
    assert!(source["qemu"]["downtime_ms"].is_u64(), "{source}");
    assert_eq!(source["channels"].as_array().unwrap().len(), 1, "{source}");
    let moved = source["bytes"]["to_destination"].as_u64().unwrap();
    assert!(moved >= RAM_MIB << 20, "{source}");
    assert_eq!(
        report["destination"]["bytes"]["to_destination"], moved,
        "both daemons count the same bytes"
    );
    // The socket the destination QEMU listened on is gone with the migration.
    let id = source["id"].as_str().unwrap();
    let incoming = hosts
        .destination
        .runtime
        .join(format!("{id}.incoming.sock"));
    wait_until(
        Duration::from_secs(5),
        "the incoming socket removed",
        || !incoming.exists(),
    )
    .await;

    // Without --json: one readable report.
    let mut again = Hosts::start(82).await;
    let (code, _, output) = again.run(again.migrate(&[])).await;
    assert_eq!(code, 0, "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("completed on the source, completed on the destination"),
        "{stdout}"
    );
    assert!(stdout.contains("source QEMU: completed"), "{stdout}");
    assert!(stdout.contains("downtime"), "{stdout}");
    assert!(stdout.contains("channel 0: completed"), "{stdout}");
    again.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_migration_over_tls_with_the_destination_api_over_tls() {
    let root = short_tempdir();
    let mut ca = Ca::new("migproxy test CA");
    let (src_pki, dst_pki) = (root.path().join("src"), root.path().join("dst"));
    ca.write_host(&src_pki, &["127.0.0.1"], "source-daemon");
    ca.write_host(&dst_pki, &["127.0.0.1"], "destination-daemon");
    let (src_dir, dst_dir) = (src_pki.display().to_string(), dst_pki.display().to_string());
    let mut hosts = Hosts::start_with(
        83,
        &["--tls-dir", &src_dir],
        &["--tls-dir", &dst_dir, "--api-listen", "127.0.0.1:0"],
    )
    .await;
    let (_, info) = hosts.destination.request("GET", "/v1/info", None).await;
    let api = info["api_tls"].as_str().unwrap().to_owned();

    // The destination's QMP path is given as it is on the destination host.
    let command = hosts.migrate_to(&api, &["--multifd", "4", "--tls-dir", &src_dir, "--json"]);
    let (code, report, output) = hosts.run(command).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_completed(&report, &output);
    let source = &report["source"];
    assert_eq!(source["link"], "tls", "{source}");
    assert_eq!(source["qemu"]["settings"]["multifd"], 4, "{source}");
    assert_eq!(
        source["channels"].as_array().unwrap().len(),
        5,
        "the main stream and four multifd channels: {source}"
    );
    assert!(source["qemu"]["ram"]["multifd_bytes"].as_u64().unwrap() > 0);
    hosts.assert_ram_equal().await;

    // Certificates that the destination's CA did not sign: refused before anything is made.
    let stranger = root.path().join("stranger");
    Ca::new("another CA").write_host(&stranger, &["127.0.0.1"], "source-daemon");
    let stranger = stranger.display().to_string();
    let command = hosts.migrate_to(&api, &["--tls-dir", &stranger]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 3, "unreachable: {}", text(&output));
    assert!(
        text(&output).contains("destination daemon"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_switch_completes_with_equal_ram_and_cannot_be_cancelled_once_switched() {
    let mut hosts = Hosts::start(84).await;
    // Slow precopy (64 MiB/s for 256 MiB) so that the switch after 0.3 s lands mid-way, and
    // slow postcopy (set here, on the test's own monitor) so that a cancel can be tried.
    let slow = json!({"max-postcopy-bandwidth": 64u64 << 20});
    hosts.src_vm.execute("migrate-set-parameters", slow).await;
    let flags = [
        "--postcopy-after",
        "0.3",
        "--max-bandwidth",
        "64M",
        "--id",
        "pc",
        "--json",
    ];
    let child = hosts.migrate(&flags).spawn().unwrap();
    let postcopy = |m: &Value| m["qemu"]["status"] == "postcopy-active";
    wait_for(&hosts.source, "pc", "postcopy", postcopy).await;
    // The destination runs the guest now: neither host may cancel.
    for daemon in [&hosts.source, &hosts.destination] {
        let (status, refusal) = daemon
            .request("POST", "/v1/migrations/pc/cancel", None)
            .await;
        assert_eq!(status, 409, "{refusal}");
        assert!(
            refusal["error"].as_str().unwrap().contains("postcopy"),
            "{refusal}"
        );
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_completed(&report, &output);
    for host in ["source", "destination"] {
        let qemu = &report[host]["qemu"];
        assert_eq!(qemu["postcopy_started"], true, "{host}: {qemu}");
        assert_eq!(qemu["settings"]["postcopy"], true, "{host}: {qemu}");
    }
    hosts.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_the_destination_cancels_the_source_qemu_too() {
    let mut hosts = Hosts::start(87).await;
    let child = hosts
        .migrate(&["--max-bandwidth", "32M", "--id", "fromdst", "--json"])
        .spawn()
        .unwrap();
    let progress = moved_more_than(8 << 20);
    wait_for(&hosts.destination, "fromdst", "progress", progress).await;
    let (status, m) = hosts
        .destination
        .request("POST", "/v1/migrations/fromdst/cancel", None)
        .await;
    assert_eq!(status, 200, "{m}");
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_documented(&report);
    assert_eq!(report["source"]["state"], "cancelled", "{report}");
    assert_eq!(report["source"]["cancelled_by"], "destination", "{report}");
    // QEMU was cancelled before its sockets went: `cancelled`, not `failed`.
    let info = hosts.src_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_eq!(report["source"]["qemu"]["status"], "cancelled", "{report}");
    // The destination asked the source to cancel and let it end its side: its channels were
    // not broken (a source QEMU that cancelled closes its stream cleanly: `completed`; one
    // torn down meanwhile: `cancelled`).
    assert_eq!(report["destination"]["state"], "cancelled", "{report}");
    for channel in report["destination"]["channels"].as_array().unwrap() {
        assert_ne!(channel["state"], "failed", "{report}");
    }
}

/// The source QEMU SIGKILLed while the daemons drive both QEMUs: its monitor breaks, and
/// that is the cause on both hosts — not the destination QEMU, which exits because its
/// incoming stream broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_source_qemu_is_blamed_on_both_hosts() {
    let mut hosts = Hosts::start(91).await;
    let child = hosts
        .migrate(&["--max-bandwidth", "32M", "--id", "ksrc", "--json"])
        .spawn()
        .unwrap();
    wait_for(&hosts.source, "ksrc", "progress", moved_more_than(8 << 20)).await;
    hosts.src_vm.kill().await;
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    for host in ["source", "destination"] {
        let view = &report[host];
        assert_eq!(view["state"], "failed", "{host}: {report}");
        assert_eq!(view["error"]["host"], "source", "{host}: {report}");
        assert_eq!(view["error"]["leg"], "qemu", "{host}: {report}");
    }
    assert_eq!(report["source"]["qemu"]["monitor_closed"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_cancels_on_both_hosts_and_the_vm_keeps_running_on_the_source() {
    let mut hosts = Hosts::start(85).await;
    hosts.src_vm.execute("cont", Value::Null).await;
    // 32 MiB/s for 256 MiB: eight seconds, plenty to interrupt.
    let child = hosts
        .migrate(&["--max-bandwidth", "32M", "--id", "interrupted"])
        .spawn()
        .unwrap();
    let progress = moved_more_than(8 << 20);
    wait_for(&hosts.source, "interrupted", "progress", progress).await;
    let pid = Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, Signal::SIGINT).unwrap();
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("migproxy migrate exits after SIGINT")
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("cancelled"), "{}", text(&output));

    // The source QEMU cancelled its migration and runs the guest.
    let status = hosts.src_vm.execute("query-status", Value::Null).await;
    assert_eq!(status["status"], "running", "{status}");
    let info = hosts.src_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(info["status"], "cancelled", "{info}");

    // Both daemons tell the same story; the destination is cleaned up.
    let source = hosts
        .source
        .wait_final("interrupted", Duration::from_secs(5))
        .await;
    let destination = hosts
        .destination
        .wait_final("interrupted", Duration::from_secs(5))
        .await;
    for m in [&source, &destination] {
        assert_eq!(m["state"], "cancelled", "{m}");
        assert_eq!(m["cancelled_by"], "source", "{m}");
    }
    assert_eq!(source["qemu"]["status"], "cancelled", "{source}");
    // QEMU 7.2 ends a destination process whose incoming migration broke.
    let limit = Instant::now() + Duration::from_secs(10);
    while hosts.dst_vm.is_running() {
        assert!(Instant::now() < limit, "destination QEMU still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runtime = hosts.destination.runtime.clone();
    wait_until(Duration::from_secs(5), "an empty runtime dir", || {
        std::fs::read_dir(&runtime).unwrap().next().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_qmp_paths_and_a_destination_without_incoming_defer_fail_before_anything_moves() {
    let mut hosts = Hosts::start(86).await;
    let missing_path = hosts.dir.path().join("missing.qmp");
    let missing = missing_path.display().to_string();
    let to = format!("unix:{}", hosts.destination.api.display());

    // The source's QMP path is wrong.
    let command = hosts.migrate_with(&missing_path, hosts.dst_vm.spare_qmp(), &to, &[]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 1, "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("source daemon") && stderr.contains(&missing) && stderr.contains("ENOENT"),
        "{stderr}"
    );
    assert!(hosts.migrations(&hosts.source).await.is_empty());
    let taken_back = hosts.migrations(&hosts.destination).await;
    assert_eq!(taken_back.len(), 1, "{taken_back:?}");
    assert_eq!(taken_back[0]["state"], "cancelled", "{taken_back:?}");
    hosts.assert_destination_untouched().await;

    // The destination's QMP path is wrong.
    let command = hosts.migrate_with(hosts.src_vm.spare_qmp(), &missing_path, &to, &[]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 1, "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("destination daemon") && stderr.contains(&missing),
        "{stderr}"
    );
    assert!(hosts.migrations(&hosts.source).await.is_empty());

    // The destination's monitor that the test itself holds: QEMU never greets a second
    // client there.
    let held = hosts.dir.path().join("dstvm.qmp");
    let command = hosts.migrate_with(hosts.src_vm.spare_qmp(), &held, &to, &[]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 1, "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another client"), "{stderr}");

    // A "destination" QEMU that was not started with -incoming defer (the source itself).
    let own = hosts.src_vm.spare_qmp();
    let command = hosts.migrate_with(own, own, &to, &[]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 1, "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("-incoming defer"), "{stderr}");
    assert!(hosts.migrations(&hosts.source).await.is_empty());
    let status = hosts.src_vm.execute("query-migrate", Value::Null).await;
    assert!(status.get("status").is_none(), "nothing ran: {status}");

    // After all that, the same QEMUs still migrate.
    let (code, report, output) = hosts.run(hosts.migrate(&["--json"])).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_completed(&report, &output);
    hosts.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_fields_are_checked_by_the_api() {
    let dir = short_tempdir();
    let daemon = DaemonProcess::start(dir.path(), "d", "127.0.0.1:0", None, &[]).await;
    let cases = [
        (
            json!({"direction": "incoming", "id": "a"}),
            "target: needed unless qmp",
        ),
        (
            json!({"direction": "incoming", "target": "unix:/x", "multifd": 2}),
            "multifd: only with qmp",
        ),
        (
            json!({"direction": "incoming", "qmp": "relative.qmp"}),
            "must be an absolute path",
        ),
        (
            json!({"direction": "incoming", "qmp": "/q", "max_bandwidth": 5}),
            "unknown field `max_bandwidth`",
        ),
        (
            json!({"direction": "incoming", "qmp": "/q", "multifd": 0}),
            "multifd: 1 to 255",
        ),
        (
            json!({"direction": "incoming", "qmp": "/q", "recover_timeout": 60}),
            "recover_timeout: only for a recoverable migration",
        ),
        (
            json!({"direction": "incoming", "qmp": "/q", "postcopy": true,
                   "recover_timeout": 0}),
            "recover_timeout: seconds, more than 0",
        ),
        (
            json!({"direction": "outgoing", "id": "b", "token": "00".repeat(32),
                   "peer": "127.0.0.1:1", "qmp": "/q", "postcopy_after": -1.0}),
            "postcopy_after",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = daemon
            .request("POST", "/v1/migrations", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body} → {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(expected), "{body} → {error}");
    }
    // A QMP socket that is not there: the request's fault, named.
    let body = json!({"direction": "incoming", "qmp": "/nonexistent/qemu.qmp"});
    let (status, answer) = daemon.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/qemu.qmp"),
        "{answer}"
    );
    let (_, all) = daemon.request("GET", "/v1/migrations", None).await;
    assert_eq!(all["migrations"], json!([]), "nothing registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_qemu_cancelled_before_any_connection_does_not_wait_for_ever() {
    let mut hosts = Hosts::start(88).await;
    // The destination daemon drives its QEMU; the source QEMU is left to a person, who
    // never runs `migrate`: QEMU listens, and nothing comes.
    let (status, incoming) = hosts
        .destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "early",
                "qmp": hosts.dst_vm.spare_qmp()})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": "early", "token": incoming["token"],
        "peer": incoming["peer"]});
    let (status, outgoing) = hosts
        .source
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{outgoing}");
    let listening = hosts.destination.runtime.join("early.incoming.sock");
    wait_until(
        Duration::from_secs(10),
        "the destination QEMU to listen",
        || listening.exists(),
    )
    .await;
    let (status, m) = hosts
        .source
        .request("POST", "/v1/migrations/early/cancel", None)
        .await;
    assert_eq!(status, 200, "{m}");
    // Its incoming migration ends as a broken one does: QEMU 7.2 exits.
    let limit = Instant::now() + Duration::from_secs(10);
    while hosts.dst_vm.is_running() {
        assert!(Instant::now() < limit, "the destination QEMU still waits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = hosts
        .destination
        .wait_final("early", Duration::from_secs(5))
        .await;
    assert_eq!(m["state"], "cancelled", "{m}");
    // The daemon saw QEMU's end: its monitor gone, or its `failed` just before it exited.
    wait_for(&hosts.destination, "early", "QEMU's end", |m| {
        m["qemu"]["monitor_closed"] == true || m["qemu"]["status"] == "failed"
    })
    .await;
    let runtime = hosts.destination.runtime.clone();
    wait_until(Duration::from_secs(5), "an empty runtime dir", || {
        std::fs::read_dir(&runtime).unwrap().next().is_none()
    })
    .await;
}
