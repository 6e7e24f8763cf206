//! Two `migproxy daemon` processes: a daemon killed, a cable cut between network namespaces,
//! and a real QEMU migration through both.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::netns::TwoHosts;
use common::process::DaemonProcess;
use common::qemu::{Qemu, Ram, random_ram_file};
use common::scenario::{qemu_completed, qemu_status};
use common::{short_tempdir, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Creates the migration on both daemons; returns the socket path for the source QEMU.
async fn pair(
    source: &DaemonProcess,
    destination: &DaemonProcess,
    id: &str,
    target: &str,
) -> String {
    pair_with(source, destination, id, target, false).await
}

/// As [`pair`], optionally recoverable on both hosts.
async fn pair_with(
    source: &DaemonProcess,
    destination: &DaemonProcess,
    id: &str,
    target: &str,
    recoverable: bool,
) -> String {
    let incoming =
        json!({"direction": "incoming", "id": id, "target": target, "recoverable": recoverable});
    let (status, incoming) = destination
        .request("POST", "/v1/migrations", Some(incoming))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                      "peer": incoming["peer"], "recoverable": recoverable});
    let (status, outgoing) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    outgoing["qemu_uri"]
        .as_str()
        .unwrap()
        .trim_start_matches("unix:")
        .to_owned()
}

/// A source QEMU stand-in that writes until its connection breaks; returns the error.
fn endless_writer(stream: UnixStream) -> tokio::task::JoinHandle<std::io::Error> {
    let (read, mut write) = stream.into_split();
    tokio::spawn(async move {
        let _keep = read;
        let block = vec![3u8; 256 * 1024];
        loop {
            if let Err(error) = write.write_all(&block).await {
                return error;
            }
        }
    })
}

/// A destination QEMU stand-in that reads and discards everything.
fn sink(listener: UnixListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    })
}

async fn moving(daemon: &DaemonProcess, id: &str) {
    let moved = |view: &Value| view["bytes"]["to_destination"].as_u64().unwrap_or(0) > (4 << 20);
    daemon
        .wait_for(id, "data moving", Duration::from_secs(10), moved)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_destination_daemon_is_reported_by_the_source_as_a_peer_link_failure() {
    let dir = short_tempdir();
    // Without resumable channels: the failure itself is under test (resumable, the source
    // would dial again until its resume timeout).
    let once = ["--resume-timeout", "0"];
    let mut destination = DaemonProcess::start(dir.path(), "dst", "127.0.0.1:0", None, &once).await;
    let source = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, &once).await;
    let target = dir.path().join("qemu-in.sock");
    let _sink = sink(UnixListener::bind(&target).unwrap());
    let qemu_uri = pair(
        &source,
        &destination,
        "k1",
        &format!("unix:{}", target.display()),
    )
    .await;
    let writer = endless_writer(UnixStream::connect(&qemu_uri).await.unwrap());
    moving(&source, "k1").await;

    kill(
        Pid::from_raw(destination.child.id().unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    destination.child.wait().await.unwrap();
    let view = source.wait_final("k1", Duration::from_secs(5)).await;
    assert_eq!(view["state"], "failed", "{view}");
    let error = &view["error"];
    assert_eq!(error["host"], "source", "{view}");
    assert_eq!(error["leg"], "peer", "{view}");
    assert!(
        error["bytes"]["to_destination"].as_u64().unwrap() > 0,
        "{view}"
    );
    eprintln!("source reports: {}", error["message"]);
    tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .expect("the source QEMU's write must fail once the migration failed")
        .unwrap();
    wait_until(Duration::from_secs(2), "the QEMU socket to go", || {
        !std::path::Path::new(&qemu_uri).exists()
    })
    .await;
}

/// A daemon frozen (SIGSTOP) past the peer timeout is failed by its peer, whose `Failed`
/// waits in the frozen daemon's socket buffer. Woken, the frozen daemon must read it before
/// concluding anything of its own: both hosts tell the peer's story.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_daemon_tells_its_peers_story_when_it_wakes() {
    let dir = short_tempdir();
    // Without resumable channels: the failure itself is under test.
    let quick = ["--peer-timeout", "2", "--resume-timeout", "0"];
    let destination = DaemonProcess::start(dir.path(), "dst", "127.0.0.1:0", None, &quick).await;
    let source = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, &quick).await;
    let target = dir.path().join("qemu-in.sock");
    let _sink = sink(UnixListener::bind(&target).unwrap());
    let target = format!("unix:{}", target.display());
    let qemu_uri = pair(&source, &destination, "fz", &target).await;
    let _writer = endless_writer(UnixStream::connect(&qemu_uri).await.unwrap());
    moving(&source, "fz").await;

    let frozen = Pid::from_raw(destination.child.id().unwrap() as i32);
    kill(frozen, Signal::SIGSTOP).unwrap();
    let at_source = source.wait_final("fz", Duration::from_secs(10)).await;
    assert_eq!(at_source["state"], "failed", "{at_source}");
    assert_eq!(at_source["error"]["host"], "source", "{at_source}");
    assert_eq!(at_source["error"]["leg"], "peer", "{at_source}");
    // Long past the frozen daemon's own peer timeout, so that on waking its timer has run out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill(frozen, Signal::SIGCONT).unwrap();
    let at_destination = destination.wait_final("fz", Duration::from_secs(10)).await;
    assert_eq!(at_destination["state"], "failed", "{at_destination}");
    assert_eq!(
        at_destination["error"]["message"], at_source["error"]["message"],
        "one story on both hosts: {at_destination}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_link_is_detected_within_the_bound_on_both_hosts() {
    let hosts = TwoHosts::new("bh");
    let dir = short_tempdir();
    // Without resumable channels: the failure itself is under test.
    let timeout = ["--peer-timeout", "3", "--resume-timeout", "0"];
    let destination = DaemonProcess::start(
        dir.path(),
        "dst",
        &format!("{}:0", hosts.b_addr),
        Some(&hosts.b),
        &timeout,
    )
    .await;
    let source = DaemonProcess::start(
        dir.path(),
        "src",
        &format!("{}:0", hosts.a_addr),
        Some(&hosts.a),
        &timeout,
    )
    .await;
    let target = dir.path().join("qemu-in.sock");
    let _sink = sink(UnixListener::bind(&target).unwrap());
    let qemu_uri = pair(
        &source,
        &destination,
        "b1",
        &format!("unix:{}", target.display()),
    )
    .await;
    let writer = endless_writer(UnixStream::connect(&qemu_uri).await.unwrap());
    moving(&source, "b1").await;

    let cut = Instant::now();
    hosts.blackhole_b();
    // Bound: the peer timeout (3 s) plus a heartbeat interval, plus the 1 s wait for an
    // explanation from the peer, plus scheduling slack.
    let bound = Duration::from_secs(6);
    let mut views: Vec<Value> = Vec::new();
    for daemon in [&source, &destination] {
        views.push(daemon.wait_final("b1", bound).await);
    }
    let took = cut.elapsed();
    assert!(took < bound, "detected after {took:?}");
    for (view, host) in views.iter().zip(["source", "destination"]) {
        assert_eq!(view["state"], "failed", "{view}");
        let error = &view["error"];
        assert_eq!(error["leg"], "peer", "{host}: {view}");
        assert_eq!(
            error["host"], host,
            "each host blames the network from its side: {view}"
        );
        eprintln!("{host} reports after {took:?}: {}", error["message"]);
    }
    tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_migrates_through_two_daemons() {
    migrate_through_daemons(false, false).await;
}

/// The same over mutual TLS between the daemons, with certificates in QEMU's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_migrates_through_two_daemons_over_tls() {
    migrate_through_daemons(false, true).await;
}

/// A recoverable migration that finishes in precopy: the return path's SHUT says it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_recoverable_migration_that_never_pauses_completes() {
    migrate_through_daemons(true, false).await;
}

async fn migrate_through_daemons(recoverable: bool, tls: bool) {
    const MIB: u64 = 256;
    let dir = short_tempdir();
    let ram = dir.path().join("source.img");
    random_ram_file(&ram, MIB, 7);
    let mut src_vm = Qemu::start(dir.path(), "src", Ram::File(&ram), MIB, false).await;
    let mut dst_vm = Qemu::start(dir.path(), "dst", Ram::Anonymous, MIB, true).await;
    let (src_tls, dst_tls) = (dir.path().join("pki-src"), dir.path().join("pki-dst"));
    if tls {
        let mut ca = common::certs::Ca::new("migproxy test CA");
        ca.write_host(&src_tls, &["source.test", "127.0.0.1"], "source-daemon");
        ca.write_host(
            &dst_tls,
            &["destination.test", "127.0.0.1"],
            "destination-daemon",
        );
    }
    let (src_dir, dst_dir) = (src_tls.display().to_string(), dst_tls.display().to_string());
    let src_args: &[&str] = if tls { &["--tls-dir", &src_dir] } else { &[] };
    let dst_args: &[&str] = if tls {
        &["--tls-dir", &dst_dir, "--tls-allow", "CN=source-*"]
    } else {
        &[]
    };
    let source = DaemonProcess::start(dir.path(), "srcd", "127.0.0.1:0", None, src_args).await;
    let destination = DaemonProcess::start(dir.path(), "dstd", "127.0.0.1:0", None, dst_args).await;

    if recoverable {
        let postcopy = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
        src_vm
            .execute("migrate-set-capabilities", postcopy.clone())
            .await;
        dst_vm.execute("migrate-set-capabilities", postcopy).await;
    }
    let incoming = dir.path().join("incoming.sock");
    let target = format!("unix:{}", incoming.display());
    dst_vm
        .execute("migrate-incoming", json!({"uri": target}))
        .await;
    let qemu_uri = pair_with(&source, &destination, "vm1", &target, recoverable).await;
    src_vm
        .execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 107_374_182_400u64}),
        )
        .await;
    let started = Instant::now();
    src_vm
        .execute("migrate", json!({"uri": format!("unix:{qemu_uri}")}))
        .await;
    let info = src_vm.wait_migration(Duration::from_secs(120)).await;
    assert_eq!(info["status"], "completed", "{info}\n{}", src_vm.log_text());
    // For information only (a debug build, polled every 20 ms): the benchmarks measure.
    eprintln!("migration took {:?} (tls: {tls})", started.elapsed());

    let at_source = source.wait_final("vm1", Duration::from_secs(10)).await;
    let at_destination = destination.wait_final("vm1", Duration::from_secs(10)).await;
    // With postcopy on, QEMU's return path carries the destination's SHUT: QEMU finished.
    // Without it, nothing tells QEMU's verdict to the daemons.
    let verdict = if recoverable {
        "completed"
    } else {
        "transferred"
    };
    for view in [&at_source, &at_destination] {
        assert_eq!(view["state"], verdict, "{view}");
        assert_eq!(view["link"], if tls { "tls" } else { "plaintext" });
    }
    assert_eq!(at_source["bytes"], at_destination["bytes"]);
    let carried = at_source["bytes"]["to_destination"].as_u64().unwrap();
    let transferred = info["ram"]["transferred"].as_u64().unwrap();
    eprintln!(
        "migproxy carried {carried} B to the destination; QEMU ram.transferred {transferred} B"
    );
    assert!(carried >= transferred, "{carried} < {transferred}");
    let (src_digest, _) = src_vm.ram_digest(dir.path(), "src", MIB).await;
    let (dst_digest, _) = dst_vm.ram_digest(dir.path(), "dst", MIB).await;
    assert_eq!(
        src_digest, dst_digest,
        "destination RAM differs from the source's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_pause_and_recovery_through_two_daemons() {
    const MIB: u64 = 256;
    let dir = short_tempdir();
    let ram = dir.path().join("source.img");
    random_ram_file(&ram, MIB, 11);
    let mut src_vm = Qemu::start(dir.path(), "src", Ram::File(&ram), MIB, false).await;
    let mut dst_vm = Qemu::start(dir.path(), "dst", Ram::Anonymous, MIB, true).await;
    let source = DaemonProcess::start(dir.path(), "srcd", "127.0.0.1:0", None, &[]).await;
    let destination = DaemonProcess::start(dir.path(), "dstd", "127.0.0.1:0", None, &[]).await;
    let postcopy = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
    src_vm
        .execute("migrate-set-capabilities", postcopy.clone())
        .await;
    dst_vm.execute("migrate-set-capabilities", postcopy).await;

    let incoming = dir.path().join("incoming.sock");
    let target = format!("unix:{}", incoming.display());
    dst_vm
        .execute("migrate-incoming", json!({"uri": target}))
        .await;
    let (status, created) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(
                json!({"direction": "incoming", "id": "pc", "target": target, "recoverable": true}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let body = json!({"direction": "outgoing", "id": "pc", "token": created["token"], "peer": created["peer"], "recoverable": true});
    let (status, outgoing) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    let qemu_uri = outgoing["qemu_uri"].as_str().unwrap().to_owned();

    // Slow enough to switch to postcopy and pause half-way.
    src_vm
        .execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 64u64 << 20}),
        )
        .await;
    src_vm.execute("migrate", json!({"uri": qemu_uri})).await;
    transferred_past(&mut src_vm, 32 << 20, false).await;
    src_vm.execute("migrate-start-postcopy", Value::Null).await;
    let active = qemu_status(&mut src_vm, &["postcopy-active"], Duration::from_secs(30)).await;
    // `postcopy-active` is reported before the switch is complete: pausing inside it makes
    // QEMU 7.2 fail instead of pause. Let postcopy carry some pages first.
    let switched = active["ram"]["transferred"].as_u64().unwrap_or(0) + (16 << 20);
    transferred_past(&mut src_vm, switched, true).await;

    src_vm.execute("migrate-pause", Value::Null).await;
    qemu_status(&mut src_vm, &["postcopy-paused"], Duration::from_secs(30)).await;
    qemu_status(&mut dst_vm, &["postcopy-paused"], Duration::from_secs(30)).await;
    // Both daemons paused: the pause is recorded, open (not yet recovered). The source
    // redials its control link at once, so the state may already read `active` again (a new
    // epoch, waiting for QEMU's recovery) by the time it is looked at.
    for daemon in [&source, &destination] {
        let view = daemon
            .wait_for("pc", "a pause recorded", Duration::from_secs(10), |view| {
                view["recoveries"]
                    .as_array()
                    .is_some_and(|r| r.len() == 1 && r[0]["frozen_ms"].is_null())
            })
            .await;
        eprintln!("paused: {}", view["recoveries"][0]["cause"]["message"]);
    }

    dst_vm
        .execute("migrate-recover", json!({"uri": target}))
        .await;
    src_vm
        .execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 107_374_182_400u64}),
        )
        .await;
    src_vm
        .execute("migrate", json!({"uri": qemu_uri, "resume": true}))
        .await;
    qemu_completed(&mut src_vm).await;
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("pc", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "completed", "{view}");
        assert_eq!(view["pauses"].as_array().unwrap().len(), 1, "{view}");
    }
    let (src_digest, _) = src_vm.ram_digest(dir.path(), "src", MIB).await;
    let (dst_digest, _) = dst_vm.ram_digest(dir.path(), "dst", MIB).await;
    assert_eq!(
        src_digest, dst_digest,
        "destination RAM differs from the source's"
    );
}

/// Polls the source QEMU until it has sent more than `bytes` of RAM; `in_postcopy`: it must
/// stay in postcopy meanwhile.
async fn transferred_past(vm: &mut Qemu, bytes: u64, in_postcopy: bool) {
    common::poll("RAM sent", Duration::from_secs(30), async || {
        let info = vm.execute("query-migrate", Value::Null).await;
        if in_postcopy {
            assert_eq!(info["status"], "postcopy-active", "{info}");
        }
        let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
        if sent > bytes { Ok(()) } else { Err(info) }
    })
    .await
}
