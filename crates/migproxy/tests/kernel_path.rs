//! The kernel data path (`--data-path kernel`): each daemon hands its QEMU its end of the
//! daemons' own TCP connection (`getfd`, `fd:NAME`), keeps a duplicate to watch and to shut
//! down, and still cancels, attributes and counts. Real QEMUs, real daemon processes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::certs::Ca;
use common::orchestration::{Hosts, RAM_MIB, assert_completed, text};
use common::{short_tempdir, wait_until};
use serde_json::{Value, json};

/// Both daemons took the kernel path, and say so.
fn assert_kernel(report: &Value) {
    for host in ["source", "destination"] {
        let m = &report[host];
        assert_eq!(m["data_path"], "kernel", "{host}: {m}");
        assert!(
            m["local"].as_str().unwrap().starts_with("fd:"),
            "{host}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_on_the_kernel_path_completes_with_equal_ram_and_equal_counts() {
    let mut hosts = Hosts::start(181).await;
    let command = hosts.migrate(&["--data-path", "kernel", "--json"]);
    let (code, report, output) = hosts.run(command).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_completed(&report, &output);
    assert_kernel(&report);
    hosts.assert_ram_equal().await;
    // TCP_INFO's counts, without the hello: QEMU's stream, the same on both hosts.
    let source = &report["source"];
    let moved = source["bytes"]["to_destination"].as_u64().unwrap();
    assert!(moved >= RAM_MIB << 20, "{source}");
    assert_eq!(
        report["destination"]["bytes"], source["bytes"],
        "both daemons count the same bytes"
    );
    assert_eq!(source["channels"].as_array().unwrap().len(), 1, "{source}");
    // No socket was handed out for QEMU on either host.
    for runtime in [&hosts.source.runtime, &hosts.destination.runtime] {
        let runtime = runtime.clone();
        wait_until(Duration::from_secs(5), "an empty runtime dir", || {
            std::fs::read_dir(&runtime).unwrap().next().is_none()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_on_the_kernel_path_completes_with_equal_ram() {
    let mut hosts = Hosts::start(182).await;
    let slow = json!({"max-postcopy-bandwidth": 64u64 << 20});
    hosts.src_vm.execute("migrate-set-parameters", slow).await;
    let flags = [
        "--data-path",
        "kernel",
        "--postcopy-after",
        "0.3",
        "--max-bandwidth",
        "64M",
        "--json",
    ];
    let (code, report, output) = hosts.run(hosts.migrate(&flags)).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_completed(&report, &output);
    assert_kernel(&report);
    for host in ["source", "destination"] {
        assert_eq!(report[host]["qemu"]["postcopy_started"], true, "{report}");
    }
    // The return path (page requests, the final SHUT) came back on the same connection.
    assert!(
        report["source"]["bytes"]["to_source"].as_u64().unwrap() > 0,
        "{report}"
    );
    hosts.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_migration_cancels_both_hosts_and_the_source_keeps_the_guest() {
    let mut hosts = Hosts::start(183).await;
    hosts.src_vm.execute("cont", Value::Null).await;
    let child = hosts
        .spawn_moving("kcancel", &["--data-path", "kernel", "--json"])
        .await;
    let asked = Instant::now();
    let (status, answer) = hosts
        .source
        .request("POST", "/v1/migrations/kcancel/cancel", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("migproxy migrate ends after the cancel")
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let source = hosts
        .source
        .wait_final("kcancel", Duration::from_secs(5))
        .await;
    let destination = hosts
        .destination
        .wait_final("kcancel", Duration::from_secs(5))
        .await;
    for m in [&source, &destination] {
        assert_eq!(m["state"], "cancelled", "{m}");
        assert_eq!(m["cancelled_by"], "source", "{m}");
        assert_eq!(m["data_path"], "kernel", "{m}");
    }
    tracing_free_elapsed(asked);
    // The guest runs on the source, whose QEMU cancelled (not `postmigrate`).
    let status = hosts.src_vm.execute("query-status", Value::Null).await;
    assert_eq!(status["status"], "running", "{status}");
    let info = hosts.src_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(info["status"], "cancelled", "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_on_both_hosts_as_with_the_relay() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut hosts = Hosts::start(190).await;
    hosts.src_vm.execute("cont", Value::Null).await;
    let child = hosts.spawn_moving("kint", &["--data-path", "kernel"]).await;
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("migproxy migrate exits after SIGINT")
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("data path: kernel"), "{}", text(&output));
    for daemon in [&hosts.source, &hosts.destination] {
        let m = daemon.wait_final("kint", Duration::from_secs(5)).await;
        assert_eq!(m["state"], "cancelled", "{m}");
        assert_eq!(m["cancelled_by"], "source", "{m}");
    }
    let status = hosts.src_vm.execute("query-status", Value::Null).await;
    assert_eq!(status["status"], "running", "{status}");
    let info = hosts.src_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(info["status"], "cancelled", "{info}");
}

/// Where a test measures time, it reports it and asserts nothing (performance belongs to the
/// benchmark).
fn tracing_free_elapsed(since: Instant) {
    eprintln!("cancel to both hosts final: {:?}", since.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_destination_qemu_is_blamed_on_both_hosts() {
    let mut hosts = Hosts::start(184).await;
    let child = hosts
        .spawn_moving("kdead", &["--data-path", "kernel", "--json"])
        .await;
    hosts.dst_vm.kill().await;
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("migproxy migrate ends after the destination QEMU died")
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    for host in ["source", "destination"] {
        let m = &report[host];
        assert_eq!(m["state"], "failed", "{host}: {report}");
        assert_eq!(m["error"]["host"], "destination", "{host}: {report}");
        assert_eq!(m["error"]["leg"], "qemu", "{host}: {report}");
    }
    // The source QEMU failed at once (its connection was shut down), and keeps the guest.
    let info = hosts.src_vm.wait_migration(Duration::from_secs(10)).await;
    assert_eq!(info["status"], "failed", "{info}");
    let status = hosts.src_vm.execute("query-status", Value::Null).await;
    assert_ne!(status["status"], "postmigrate", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_the_kernel_path_where_it_serves_and_kernel_is_refused_where_it_cannot() {
    let mut hosts = Hosts::start(185).await;
    // multifd: the kernel path cannot serve (QEMU opens each channel by address).
    let command = hosts.migrate(&["--data-path", "kernel", "--multifd", "2", "--json"]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 2, "{}", text(&output));
    assert!(text(&output).contains("multifd"), "{}", text(&output));
    hosts.assert_destination_untouched().await;

    // auto with multifd: the relay, and the report says why.
    let command = hosts.migrate(&["--data-path", "auto", "--multifd", "2", "--json"]);
    let (code, report, output) = hosts.run(command).await;
    assert_eq!(code, 0, "{}", text(&output));
    for host in ["source", "destination"] {
        let m = &report[host];
        assert_eq!(m["data_path"], "relay", "{host}: {m}");
        assert!(
            m["data_path_reason"].as_str().unwrap().contains("multifd"),
            "{host}: {m}"
        );
    }
    hosts.assert_ram_equal().await;

    // auto with one stream and both QEMUs driven: the kernel path.
    let mut hosts = Hosts::start(186).await;
    let command = hosts.migrate(&["--data-path", "auto", "--json"]);
    let (code, report, output) = hosts.run(command).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_kernel(&report);
    assert!(
        report["source"]["data_path_reason"]
            .as_str()
            .unwrap()
            .starts_with("auto"),
        "{report}"
    );
    hosts.assert_ram_equal().await;

    // Without qmp, through the API: 400, naming why.
    let body = json!({"direction": "incoming", "target": "unix:/tmp/x.sock",
        "data_path": "kernel"});
    let (status, answer) = hosts
        .destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("no qmp"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_daemons_take_the_kernel_path_only_when_clear_data_is_allowed() {
    let root = short_tempdir();
    let mut ca = Ca::new("migproxy test CA");
    let (src_pki, dst_pki) = (root.path().join("src"), root.path().join("dst"));
    ca.write_host(&src_pki, &["127.0.0.1"], "source-daemon");
    ca.write_host(&dst_pki, &["127.0.0.1"], "destination-daemon");
    let (src_dir, dst_dir) = (src_pki.display().to_string(), dst_pki.display().to_string());

    // TLS without allow_clear_data: kernel refused, auto keeps the relay (TLS).
    let mut hosts =
        Hosts::start_with(187, &["--tls-dir", &src_dir], &["--tls-dir", &dst_dir]).await;
    let command = hosts.migrate(&["--data-path", "kernel", "--json"]);
    let (code, _, output) = hosts.run(command).await;
    assert_eq!(code, 2, "{}", text(&output));
    assert!(
        text(&output).contains("allow_clear_data"),
        "{}",
        text(&output)
    );
    let command = hosts.migrate(&["--data-path", "auto", "--json"]);
    let (code, report, output) = hosts.run(command).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_eq!(report["source"]["data_path"], "relay", "{report}");
    assert_eq!(report["source"]["link"], "tls", "{report}");
    hosts.assert_ram_equal().await;

    // With allow_clear_data on both: the kernel path, the control link still TLS.
    let clear = ["--allow-clear-data"];
    let mut hosts = Hosts::start_with(
        188,
        &["--tls-dir", &src_dir, clear[0]],
        &["--tls-dir", &dst_dir, clear[0]],
    )
    .await;
    let command = hosts.migrate(&["--data-path", "kernel", "--json"]);
    let (code, report, output) = hosts.run(command).await;
    assert_eq!(code, 0, "{}", text(&output));
    assert_completed(&report, &output);
    assert_kernel(&report);
    assert_eq!(report["source"]["link"], "tls", "{report}");
    hosts.assert_ram_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_port_takes_in_clear_only_a_kernel_paths_data_connection() {
    use common::peer::hello_as;
    use common::tls::pki;
    use migproxy::tls::TlsHandle;
    use migproxy_proto::{Kind, MAGIC, Status, VERSION};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let root = short_tempdir();
    let (_ca, _src_dir, dst_dir, _) = pki(root.path());
    let tls = std::sync::Arc::new(TlsHandle::load(&dst_dir, Vec::new()).unwrap());
    let clear_ok = common::daemon::TestDaemon::start_with("dst", {
        let tls = std::sync::Arc::clone(&tls);
        move |config| {
            config.tls = Some(tls);
            config.allow_clear_data = true;
        }
    })
    .await;
    let body = json!({"direction": "incoming", "id": "r", "target": "unix:/x-r"});
    let (status, incoming) = clear_ok.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{incoming}");
    let token = incoming["token"].as_str().unwrap();
    // A control link in clear, and a data connection of a relay migration: refused, said.
    for kind in [Kind::Control, Kind::Data] {
        let (_, reply) = hello_as(&clear_ok, VERSION, kind, "r", token, (0, 0)).await;
        assert_eq!(reply.status, Status::Refused, "{kind:?}: {reply:?}");
        assert!(reply.message.contains("in clear"), "{kind:?}: {reply:?}");
    }
    let view = clear_ok.show("r").await;
    assert_eq!(view["state"], "pending", "nothing attached: {view}");

    // Without allow_clear_data the port speaks TLS only: a clear hello gets no hello reply.
    let strict = common::daemon::TestDaemon::start_with("strict", move |config| {
        config.tls = Some(tls);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(&strict.peer).await.unwrap();
    let mut hello = Vec::new();
    migproxy_proto::Hello {
        version: VERSION,
        kind: Kind::Data,
        migration: "r".into(),
        channel: 0,
        token: [0; migproxy_proto::TOKEN_LEN],
        flags: 0,
    }
    .encode(&mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    let _ = read.await.expect("the daemon closes the connection");
    assert!(
        !answer.starts_with(&MAGIC),
        "a hello reply in clear: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_source_daemon_fails_the_source_qemu_which_keeps_the_guest() {
    let mut hosts = Hosts::start(189).await;
    hosts.src_vm.execute("cont", Value::Null).await;
    let _child = hosts
        .spawn_moving("korphan", &["--data-path", "kernel"])
        .await;
    hosts.source.child.start_kill().unwrap();
    // The destination daemon loses the control link, fails, and shuts the connection down
    // under both QEMUs: the source QEMU's writes fail.
    let view = hosts
        .destination
        .wait_final("korphan", Duration::from_secs(20))
        .await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(view["error"]["leg"], "peer", "{view}");
    let info = hosts.src_vm.wait_migration(Duration::from_secs(20)).await;
    assert_eq!(info["status"], "failed", "{info}");
    let status = hosts.src_vm.execute("query-status", Value::Null).await;
    assert_eq!(status["status"], "running", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_is_detected_on_both_hosts_which_name_the_peer_link() {
    use common::scenario::{Options, Scenario, qemu_status};
    let mut s = Scenario::start(Options {
        netns: true,
        daemon_args: vec!["--peer-timeout".into(), "3".into()],
        ..Options::default()
    })
    .await;
    let body = json!({"direction": "incoming", "id": "kcut", "data_path": "kernel",
        "qmp": s.dst_vm.spare_qmp()});
    let (status, incoming) = s
        .destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": "kcut", "token": incoming["token"],
        "peer": incoming["peer"], "data_path": "kernel", "qmp": s.src_vm.spare_qmp(),
        "max_bandwidth": 32u64 << 20});
    let (status, outgoing) = s.source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    s.sent_at_least(8 << 20).await;
    let cut = Instant::now();
    s.hosts.as_ref().unwrap().blackhole_b();
    // The peer timeout (3 s) finds it, plus the grace for the other host's word.
    for daemon in [&s.source, &s.destination] {
        let view = daemon.wait_final("kcut", Duration::from_secs(15)).await;
        assert_eq!(view["state"], "failed", "{view}");
        assert_eq!(view["error"]["leg"], "peer", "a network failure: {view}");
        assert_eq!(view["data_path"], "kernel", "{view}");
        eprintln!("after {:?}: {}", cut.elapsed(), view["error"]["message"]);
    }
    // The source QEMU, blocked on a full socket, was let go: failed, the guest still here.
    let info = qemu_status(&mut s.src_vm, &["failed"], Duration::from_secs(10)).await;
    eprintln!("source QEMU says: {}", info["error-desc"]);
    let status = s.src_vm.execute("query-status", Value::Null).await;
    assert_ne!(status["status"], "postmigrate", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kernel_migrations_leave_no_descriptor_in_either_daemon() {
    use common::process::DaemonProcess;
    use common::qemu::{Qemu, Ram, random_ram_file};
    const MIB: u64 = 16;
    let dir = short_tempdir();
    let source = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, &[]).await;
    let destination = DaemonProcess::start(dir.path(), "dst", "127.0.0.1:0", None, &[]).await;
    let fds = |daemon: &DaemonProcess| {
        let pid = daemon.child.id().unwrap();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let mut baseline = None;
    for round in 0..50u64 {
        let ram = dir.path().join("ram.img");
        random_ram_file(&ram, MIB, round);
        let mut src = Qemu::start(dir.path(), "s", Ram::File(&ram), MIB, false).await;
        let mut dst = Qemu::start(dir.path(), "d", Ram::Anonymous, MIB, true).await;
        let to = format!("unix:{}", destination.api.display());
        let output = tokio::process::Command::new(common::process::BIN)
            .args(["migrate", "--data-path", "kernel", "--json", "--to", &to])
            .arg("--api")
            .arg(&source.api)
            .arg("--qmp")
            .arg(src.spare_qmp())
            .arg("--dest-qmp")
            .arg(dst.spare_qmp())
            .output()
            .await
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "round {round}: {}",
            text(&output)
        );
        if round == 0 {
            let (before, _) = src.ram_digest(dir.path(), "s0", MIB).await;
            let (after, _) = dst.ram_digest(dir.path(), "d0", MIB).await;
            assert_eq!(before, after, "round 0: RAM differs");
        }
        src.kill().await;
        dst.kill().await;
        if round == 0 {
            baseline = Some((fds(&source), fds(&destination)));
        }
    }
    let (src_before, dst_before) = baseline.unwrap();
    wait_until(
        Duration::from_secs(10),
        "descriptors back to the first round's",
        || fds(&source) <= src_before && fds(&destination) <= dst_before,
    )
    .await;
}
