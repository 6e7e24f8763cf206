//! Two daemons in-process on loopback: multi-channel exactness, agreeing reports, cancel from
//! either side, failures attributed alike on both hosts, handshake rejections.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, carry, migration_pair};
use common::{random_data, receive_all, send_all, short_tempdir, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// A unix listener standing in for the destination QEMU, and its endpoint (`unix:…`); the
/// directory lives as long as the returned guard.
fn stand_in_target() -> (tempfile::TempDir, UnixListener, String) {
    let dir = short_tempdir();
    let path = dir.path().join("qemu-in.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, listener, format!("unix:{}", path.display()))
}

fn unix_path(uri: &str) -> &str {
    uri.strip_prefix("unix:").unwrap()
}

fn error_of(view: &Value) -> &Value {
    assert!(!view["error"].is_null(), "no error in {view}");
    &view["error"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_channels_cross_exactly_in_order_and_both_hosts_agree() {
    let source = TestDaemon::start("src").await;
    // Established connections do not count against the handshake limit: one is enough for a
    // control link and three channels.
    let destination = TestDaemon::start_with("dst", |c| c.max_handshakes = 1).await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = migration_pair(&source, &destination, "m1", &target).await;
    assert_eq!(source.show("m1").await["state"], "active");
    assert_eq!(destination.show("m1").await["state"], "active");

    const FORWARD: usize = 8 << 20;
    const BACKWARD: usize = 1 << 20;
    // The destination QEMU stand-in: channels must arrive in the order the source opened them.
    let receiver = tokio::spawn(async move {
        let mut results = Vec::new();
        for channel in 0..3u64 {
            let (stream, _) = qemu_in.accept().await.unwrap();
            let (read, write) = stream.into_split();
            let reply = random_data(100 + channel, BACKWARD);
            let sending = tokio::spawn(send_all(write, Arc::clone(&reply), channel));
            let mut read = read;
            let mut first = [0u8; 8];
            read.read_exact(&mut first).await.unwrap();
            let (n, digest) = receive_all(read).await.unwrap();
            sending.await.unwrap().unwrap();
            results.push((u64::from_be_bytes(first), n + 8, digest));
        }
        results
    });
    // The source QEMU stand-in opens three channels one after the other.
    let mut senders = Vec::new();
    let mut expected = Vec::new();
    for channel in 0..3u64 {
        let stream = UnixStream::connect(unix_path(&uri)).await.unwrap();
        let mut data = random_data(channel, FORWARD).as_ref().clone();
        data[..8].copy_from_slice(&channel.to_be_bytes());
        expected.push(blake3::hash(&data[8..]));
        let (read, write) = stream.into_split();
        senders.push(tokio::spawn(async move {
            send_all(write, Arc::new(data), channel).await.unwrap();
            receive_all(read).await.unwrap()
        }));
    }
    for (channel, sender) in senders.into_iter().enumerate() {
        let back = sender.await.unwrap();
        assert_eq!(
            back,
            (
                BACKWARD as u64,
                blake3::hash(&random_data(100 + channel as u64, BACKWARD))
            )
        );
    }
    for (channel, (tag, n, digest)) in receiver.await.unwrap().into_iter().enumerate() {
        assert_eq!(
            tag, channel as u64,
            "channel {channel} arrived out of order"
        );
        assert_eq!(n, FORWARD as u64);
        assert_eq!(digest, expected[channel]);
    }

    let at_source = source.wait_final("m1", Duration::from_secs(10)).await;
    let at_destination = destination.wait_final("m1", Duration::from_secs(10)).await;
    for view in [&at_source, &at_destination] {
        assert_eq!(view["state"], "transferred", "{view}");
        assert_eq!(
            view["bytes"]["to_destination"],
            3 * FORWARD as u64,
            "{view}"
        );
        assert_eq!(view["bytes"]["to_source"], 3 * BACKWARD as u64, "{view}");
        assert_eq!(view["channels"].as_array().unwrap().len(), 3);
        assert!(view["error"].is_null());
    }
    assert_eq!(
        at_source["channels"], at_destination["channels"],
        "per-channel views differ"
    );
    assert!(
        !std::path::Path::new(unix_path(&uri)).exists(),
        "QEMU socket left behind"
    );
    source.stop().await;
    destination.stop().await;
}

/// A migration whose destination QEMU stand-in accepts but never reads; returns the source
/// stand-in's writer task (which ends with the error its blocked write got).
async fn stuck_migration(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
) -> (
    tokio::task::JoinHandle<std::io::Error>,
    UnixListener,
    tempfile::TempDir,
) {
    let (dir, qemu_in, target) = stand_in_target();
    let uri = migration_pair(source, destination, id, &target).await;
    let stream = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (_read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _keep = _read;
        let block = vec![7u8; 1 << 20];
        loop {
            if let Err(error) = write.write_all(&block).await {
                return error;
            }
        }
    });
    // Wait until bytes are piling up at the destination.
    let mut last = (0, Instant::now());
    let mut view = Value::Null;
    let start = Instant::now();
    while last.1.elapsed() < Duration::from_millis(300) {
        view = destination.show(id).await;
        let now = view["bytes"]["to_destination"].as_u64().unwrap();
        if now != last.0 || now == 0 {
            last = (now, Instant::now());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never stalled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(view["state"], "active");
    (writer, qemu_in, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_the_source_ends_both_hosts_quickly() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (writer, _qemu_in, _dir) = stuck_migration(&source, &destination, "c1").await;

    let asked = Instant::now();
    let (status, view) = source
        .request("POST", "/v1/migrations/c1/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["state"], "cancelled");
    assert_eq!(view["cancelled_by"], "source");
    // At once, not after a timeout (every timeout here is seconds): the benchmark measures
    // how fast (p99 < 100 ms); a test on a loaded machine only checks that it is prompt.
    let error = tokio::time::timeout(
        Duration::from_secs(1)
            .saturating_sub(asked.elapsed())
            .max(Duration::from_millis(1)),
        writer,
    )
    .await
    .expect("the source QEMU's blocked write must fail within 1 s")
    .unwrap();
    eprintln!(
        "source write failed with {error} after {:?}",
        asked.elapsed()
    );
    let at_destination = destination.wait_final("c1", Duration::from_secs(1)).await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(at_destination["state"], "cancelled");
    assert_eq!(at_destination["cancelled_by"], "source");
    let (status, again) = source
        .request("POST", "/v1/migrations/c1/cancel", None)
        .await;
    assert_eq!(status, 409, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_the_destination_ends_both_hosts_quickly() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (writer, _qemu_in, _dir) = stuck_migration(&source, &destination, "c2").await;

    let asked = Instant::now();
    let (status, view) = destination
        .request("POST", "/v1/migrations/c2/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    let at_source = source.wait_final("c2", Duration::from_secs(1)).await;
    assert_eq!(at_source["state"], "cancelled", "{at_source}");
    assert_eq!(at_source["cancelled_by"], "destination");
    tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .expect("the source QEMU's blocked write must fail within 1 s")
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_qemu_missing_is_blamed_on_both_hosts() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let uri = migration_pair(&source, &destination, "r1", "unix:/nonexistent/qemu.sock").await;
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    // The failure may already have closed this connection: the write is allowed to fail.
    let _ = qemu.write_all(b"QEVM").await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), qemu.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the source QEMU's connection must end");

    for daemon in [&source, &destination] {
        let view = daemon.wait_final("r1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = error_of(&view);
        assert_eq!(error["host"], "destination", "{view}");
        assert_eq!(error["leg"], "qemu");
        assert_eq!(error["channel"], 0);
        assert_eq!(error["op"], "connect");
        assert_eq!(error["errno"], "ENOENT");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.starts_with("destination QEMU: connect failed on channel 0"),
            "{message}"
        );
        assert!(message.contains("unix:/nonexistent/qemu.sock"), "{message}");
    }
    // The channel that could not connect failed; it was not cancelled.
    let view = destination.show("r1").await;
    assert_eq!(view["channels"][0]["state"], "failed", "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_closing_mid_stream_is_blamed_on_the_destination_qemu() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = migration_pair(&source, &destination, "d1", &target).await;
    let stream = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (_read, write) = stream.into_split();
    let sender = tokio::spawn(send_all(write, random_data(9, 64 << 20), 9));
    let (mut accepted, _) = qemu_in.accept().await.unwrap();
    let mut first = vec![0u8; 1 << 20];
    accepted.read_exact(&mut first).await.unwrap();
    drop(accepted); // the destination QEMU goes away with data unread

    for daemon in [&source, &destination] {
        let view = daemon.wait_final("d1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = error_of(&view);
        assert_eq!(error["host"], "destination", "{view}");
        assert_eq!(error["leg"], "qemu", "{view}");
        assert_eq!(error["channel"], 0);
        assert!(
            ["EPIPE", "ECONNRESET"].contains(&error["errno"].as_str().unwrap()),
            "{view}"
        );
        assert!(error["bytes"]["to_destination"].as_u64().unwrap() >= 1 << 20);
    }
    let sent = tokio::time::timeout(Duration::from_secs(5), sender).await;
    assert!(matches!(sent, Ok(Ok(Err(_)))), "source writer: {sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_reset_mid_stream_is_blamed_on_the_source_qemu() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = migration_pair(&source, &destination, "s1", &target).await;
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    qemu.write_all(&[1u8; 100_000]).await.unwrap();
    let (mut accepted, _) = qemu_in.accept().await.unwrap();
    let mut got = vec![0u8; 100_000];
    accepted.read_exact(&mut got).await.unwrap();
    // The source QEMU dies with a reply unread: its socket is reset.
    accepted.write_all(b"reply").await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "the reply to reach the source host",
        || {
            let view = futures_lite_show(&source, "s1");
            view["bytes"]["to_source"] == 5
        },
    )
    .await;
    drop(qemu);

    for daemon in [&source, &destination] {
        let view = daemon.wait_final("s1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = error_of(&view);
        assert_eq!(error["host"], "source", "{view}");
        assert_eq!(error["leg"], "qemu", "{view}");
        assert_eq!(error["channel"], 0);
        assert_eq!(error["bytes"]["to_destination"], 100_000, "{view}");
    }
}

/// A synchronous look at a migration, for `wait_until` predicates.
fn futures_lite_show(daemon: &TestDaemon, id: &str) -> Value {
    let migration = daemon.daemon.get(id).unwrap();
    serde_json::to_value(migration.snapshot()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_id_wrong_token_and_expired_are_refused_clearly() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start_with("dst", |c| c.token_ttl = Duration::from_secs(1)).await;
    let (_, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "e1", "target": "unix:/x"})),
        )
        .await;
    let outgoing = |id: &str, token: &Value| json!({"direction": "outgoing", "id": id, "token": token, "peer": destination.peer});

    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(outgoing("nope", &incoming["token"])),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no incoming migration \"nope\" (unknown_migration)"),
        "{body}"
    );

    let wrong = "00".repeat(32);
    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(outgoing("e1", &json!(wrong))),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("wrong token for migration \"e1\" (bad_token)"),
        "{body}"
    );
    assert_eq!(
        destination.show("e1").await["state"],
        "pending",
        "a bad token must not touch it"
    );

    let expired = destination.wait_final("e1", Duration::from_secs(5)).await;
    assert_eq!(expired["state"], "expired");
    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(outgoing("e1", &incoming["token"])),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("(expired)"),
        "{body}"
    );
    // Nothing was left on the source host by the refused attempts.
    assert!(source.daemon.list().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(&source.daemon.config.runtime_dir)
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silence_on_the_peer_port_leave_running_migrations_alone() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start_with("dst", |c| {
        c.timing.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let (_writer, _qemu_in, _dir) = stuck_migration(&source, &destination, "g1").await;

    let mut garbage = TcpStream::connect(&destination.peer).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    garbage.read_to_end(&mut reply).await.unwrap();
    assert_eq!(&reply[..4], b"MGPX", "a typed rejection is sent back");
    assert_eq!(reply[6], 5, "status malformed");

    drop(garbage);
    let mut silent = TcpStream::connect(&destination.peer).await.unwrap();
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut [0u8; 16])).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "a silent peer is dropped: {n:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));

    assert_eq!(destination.show("g1").await["state"], "active");
    assert_eq!(source.show("g1").await["state"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rejects_bad_requests_naming_the_field() {
    let daemon = TestDaemon::start("api").await;
    let cases = [
        (
            json!({"direction": "incoming"}),
            "target: needed unless qmp",
        ),
        (
            json!({"direction": "incoming", "target": "tcp:foo"}),
            "target: invalid endpoint \"tcp:foo\": missing port",
        ),
        (
            json!({"direction": "incoming", "target": "unix:/x", "colour": 1}),
            "unknown field `colour`",
        ),
        (
            json!({"direction": "incoming", "target": "unix:/x", "id": "../etc"}),
            "id: \"../etc\"",
        ),
        (
            json!({"direction": "incoming", "target": "unix:/x", "max_channels": 0}),
            "max_channels",
        ),
        (
            json!({"direction": "sideways"}),
            "unknown variant `sideways`",
        ),
        (
            json!({"direction": "outgoing", "id": "a", "token": "x", "peer": "h:1"}),
            "token: expected the 64 hex digits",
        ),
        (
            json!({"direction": "outgoing", "id": "a", "token": "0".repeat(64), "peer": "nohost"}),
            "peer: missing port",
        ),
        (
            json!({"direction": "outgoing", "id": "a", "token": "0".repeat(64), "peer": "h:1",
                   "tls_hostname": "h"}),
            "tls_hostname: this daemon's peer link is plaintext",
        ),
    ];
    for (body, expected) in cases {
        let (status, reply) = daemon
            .request("POST", "/v1/migrations", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(expected),
            "{body}: {reply}"
        );
    }
    let (status, reply) = daemon.request("GET", "/v1/migrations/ghost", None).await;
    assert_eq!(status, 404, "{reply}");
    assert_eq!(reply["error"], "no migration \"ghost\"");
    let (status, _) = daemon
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "dup", "target": "unix:/x"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, reply) = daemon
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "dup", "target": "unix:/x"})),
        )
        .await;
    assert_eq!(status, 409, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_migration_fails_on_both_hosts_with_a_timeout() {
    let stall = |c: &mut migproxy::daemon::Config| c.stall_timeout = Duration::from_millis(800);
    let source = TestDaemon::start_with("src", stall).await;
    let destination = TestDaemon::start_with("dst", stall).await;
    // The destination QEMU (a socket nobody reads) stops taking the stream: its host sees
    // its write held, and both hosts blame it, not the link whose heartbeats still flow.
    let (writer, _qemu_in, _dir) = stuck_migration(&source, &destination, "st1").await;
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("st1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = error_of(&view);
        assert_eq!(
            (&error["host"], &error["leg"], &error["op"]),
            (&json!("destination"), &json!("qemu"), &json!("timeout")),
            "{view}"
        );
        assert_eq!(error["direction"], "to_destination", "{view}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("QEMU stopped reading") && message.contains("waited 800 ms"),
            "{view}"
        );
    }
    tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_qemu_that_stops_sending_is_blamed_on_both_hosts() {
    let stall = |c: &mut migproxy::daemon::Config| c.stall_timeout = Duration::from_millis(800);
    let source = TestDaemon::start_with("src", stall).await;
    let destination = TestDaemon::start_with("dst", stall).await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = migration_pair(&source, &destination, "quiet", &target).await;
    // The destination reads everything; the source sends a little and then nothing.
    let reader = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        sink.len()
    });
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    qemu.write_all(&[1u8; 64 << 10]).await.unwrap();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("quiet", Duration::from_secs(5)).await;
        let error = error_of(&view);
        assert_eq!(
            (&error["host"], &error["leg"], &error["op"]),
            (&json!("source"), &json!("qemu"), &json!("timeout")),
            "{view}"
        );
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("the source QEMU sent nothing on any channel for 800 ms"),
            "{view}"
        );
    }
    drop(qemu);
    assert_eq!(reader.await.unwrap(), 64 << 10);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_migrations_leave_no_fd_task_or_socket_behind() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    // The destination QEMU stand-in: reads a channel to its end, answers, closes.
    let stand_in = tokio::spawn(async move {
        loop {
            let (mut stream, _) = qemu_in.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                stream
                    .write_all(&(got.len() as u64).to_be_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    let migrate = |n: usize| {
        let (source, destination, target) = (&source, &destination, &target);
        async move {
            let id = format!("leak-{n}");
            let uri = migration_pair(source, destination, &id, target).await;
            let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
            qemu.write_all(&vec![n as u8; 4096]).await.unwrap();
            qemu.shutdown().await.unwrap();
            let mut reply = Vec::new();
            qemu.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, 4096u64.to_be_bytes());
            for daemon in [source, destination] {
                let view = daemon.wait_final(&id, Duration::from_secs(5)).await;
                assert_eq!(view["state"], "transferred", "{view}");
            }
        }
    };
    let settled =
        |daemons: [&TestDaemon; 2]| daemons.iter().map(|d| d.daemon.tasks.len()).sum::<usize>();
    migrate(0).await; // warm up lazily created state (runtime threads, pools)
    wait_until(Duration::from_secs(5), "tasks to settle", || {
        settled([&source, &destination]) == 0
    })
    .await;
    let fds = open_fds();

    for n in 1..=200 {
        migrate(n).await;
    }
    wait_until(
        Duration::from_secs(10),
        "every migration task to end",
        || settled([&source, &destination]) == 0,
    )
    .await;
    wait_until(
        Duration::from_secs(5),
        "fds to return to their count",
        || open_fds() <= fds,
    )
    .await;
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    let leftovers: Vec<_> = std::fs::read_dir(&source.daemon.config.runtime_dir)
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    stand_in.abort();
}

/// QEMU's return-path message MIG_RP_MSG_SHUT (type 1, length 4) with status 0.
const SHUT_OK: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recoverable_migration_pauses_and_completes_on_fresh_channels() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = common::daemon::migration_pair_with(&source, &destination, "p1", &target, true).await;

    // Epoch 1: the destination QEMU's connection breaks mid-stream.
    let first = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (mut first_read, first_write) = first.into_split();
    let first_sender = tokio::spawn(send_all(first_write, random_data(20, 32 << 20), 20));
    let (mut broken, _) = qemu_in.accept().await.unwrap();
    let mut some = vec![0u8; 1 << 20];
    broken.read_exact(&mut some).await.unwrap();
    drop(broken);
    for daemon in [&source, &destination] {
        let view = daemon
            .wait_state("p1", "paused", Duration::from_secs(5))
            .await;
        let error = error_of(&view);
        assert_eq!(error["host"], "destination", "{view}");
        assert_eq!(error["leg"], "qemu", "{view}");
        assert_eq!(view["pauses"].as_array().unwrap().len(), 1, "{view}");
    }
    // The source QEMU sees its channel end, as it would before `postcopy-paused`.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), first_read.read_to_end(&mut rest))
        .await
        .expect("the paused channel must be closed on the source QEMU");
    let _ = first_sender.await;

    // Epoch 2: QEMU reconnects (`migrate … resume=true`) with two fresh channels.
    let receiver = tokio::spawn(async move {
        let mut tags = Vec::new();
        for channel in 0..2 {
            let (mut stream, _) = qemu_in.accept().await.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            tags.push(got[0]);
            // Like QEMU, the destination ends the main channel with a SHUT(0) message on its
            // return path: without it, the source would take the close for another pause.
            let reply: &[u8] = if channel == 0 { &SHUT_OK } else { b"ok" };
            stream.write_all(reply).await.unwrap();
        }
        tags
    });
    // Both channels are open before either ends, as QEMU's are.
    let mut channels = Vec::new();
    for tag in [b'a', b'b'] {
        channels.push((tag, UnixStream::connect(unix_path(&uri)).await.unwrap()));
    }
    for (tag, mut qemu) in channels {
        let mut data = random_data(tag.into(), 2 << 20).as_ref().clone();
        data[0] = tag;
        qemu.write_all(&data).await.unwrap();
        qemu.shutdown().await.unwrap();
        let mut reply = Vec::new();
        qemu.read_to_end(&mut reply).await.unwrap();
        let expected: &[u8] = if tag == b'a' { &SHUT_OK } else { b"ok" };
        assert_eq!(reply, expected);
    }
    assert_eq!(
        receiver.await.unwrap(),
        b"ab",
        "recovery channels out of order"
    );
    let mut views = Vec::new();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("p1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "completed", "{view}");
        assert!(view["error"].is_null(), "{view}");
        assert_eq!(view["pauses"].as_array().unwrap().len(), 1);
        let states: Vec<_> = view["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].clone())
            .collect();
        assert_eq!(
            states[1..],
            [json!("completed"), json!("completed")],
            "{view}"
        );
        views.push(view);
    }
    let recovered = |v: &Value| v["channels"].as_array().unwrap()[1..].to_vec();
    assert_eq!(
        recovered(&views[0]),
        recovered(&views[1]),
        "the hosts disagree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_channel_index_in_a_hello_is_refused() {
    use migproxy_proto::{Hello, HelloReply, Kind, Status, VERSION};
    let destination = TestDaemon::start("dst").await;
    let (_, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "big", "target": "unix:/x"})),
        )
        .await;
    let token =
        migproxy::daemon::token::Token::from_hex(incoming["token"].as_str().unwrap()).unwrap();
    for (kind, channel) in [
        (Kind::Control, u32::MAX),
        (Kind::Control, 5),
        (Kind::Data, u32::MAX),
    ] {
        let mut stream = TcpStream::connect(&destination.peer).await.unwrap();
        let mut hello = Vec::new();
        Hello {
            version: VERSION,
            kind,
            migration: "big".into(),
            channel,
            token: *token.bytes(),
            flags: 0,
        }
        .encode(&mut hello);
        stream.write_all(&hello).await.unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.unwrap();
        let reply = HelloReply::decode(&reply).unwrap();
        assert_eq!(
            reply.status,
            Status::Refused,
            "{kind:?} {channel}: {reply:?}"
        );
    }
    assert_eq!(destination.show("big").await["state"], "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_handshake_limit_are_told_busy() {
    let destination = TestDaemon::start_with("dst", |c| {
        c.max_handshakes = 1;
        c.timing.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    // Two connections that have spoken (silent ones wait apart, see tests/flood.rs), one
    // slot: exactly one is turned away at once, with a reason; the other is dropped when its
    // handshake deadline passes.
    let mut a = TcpStream::connect(&destination.peer).await.unwrap();
    let mut b = TcpStream::connect(&destination.peer).await.unwrap();
    a.write_all(b"M").await.unwrap();
    b.write_all(b"M").await.unwrap();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let (ra, rb) = tokio::join!(a.read_to_end(&mut got_a), b.read_to_end(&mut got_b));
    let _ = (ra, rb);
    let busy: Vec<_> = [&got_a, &got_b]
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect();
    assert_eq!(busy.len(), 1, "{got_a:?} {got_b:?}");
    let reply = migproxy_proto::HelloReply::decode(busy[0]).unwrap();
    assert_eq!(reply.status, migproxy_proto::Status::Busy);
    assert_eq!(
        reply.message,
        "1 connections are already in their handshake, try again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_disagree_on_recoverability_are_refused() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "mix", "target": "unix:/x", "recoverable": true})),
        )
        .await;
    let body = json!({"direction": "outgoing", "id": "mix", "token": incoming["token"], "peer": incoming["peer"]});
    let (status, reply) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 502, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("is recoverable here but not recoverable on the source"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recoverable_main_channel_closed_without_shut_pauses() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = common::daemon::migration_pair_with(&source, &destination, "ns", &target, true).await;
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        stream.write_all(&[0, 2, 0, 4, 0, 0, 0, 9]).await.unwrap(); // a PONG, no SHUT
        got.len()
    });
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    qemu.write_all(&[5u8; 4096]).await.unwrap();
    qemu.shutdown().await.unwrap();
    let mut reply = Vec::new();
    qemu.read_to_end(&mut reply).await.unwrap();
    assert_eq!(accepting.await.unwrap(), 4096);
    for daemon in [&source, &destination] {
        let view = daemon
            .wait_state("ns", "paused", Duration::from_secs(5))
            .await;
        let error = error_of(&view);
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("no SHUT on the return path"),
            "{view}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_outside_the_allowed_directories_or_through_symlinks_are_refused() {
    let allowed = short_tempdir();
    let allowed_path = allowed.path().to_owned();
    let destination =
        TestDaemon::start_with("dst", move |c| c.target_dirs = vec![allowed_path]).await;
    let create = |target: String| {
        let destination = &destination;
        async move {
            destination
                .request(
                    "POST",
                    "/v1/migrations",
                    Some(json!({"direction": "incoming", "target": target})),
                )
                .await
        }
    };
    let (status, body) = create("unix:/tmp/elsewhere.sock".into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("outside the allowed directories"),
        "{body}"
    );
    let (status, body) = create(format!("unix:{}/../x.sock", allowed.path().display())).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("without . or .."),
        "{body}"
    );

    // A symbolic link where the socket should be is not followed when the channel connects.
    let source = TestDaemon::start("src").await;
    let real = short_tempdir();
    let _real_listener = UnixListener::bind(real.path().join("real.sock")).unwrap();
    let link = allowed.path().join("vm.sock");
    std::os::unix::fs::symlink(real.path().join("real.sock"), &link).unwrap();
    let uri = migration_pair(
        &source,
        &destination,
        "sl",
        &format!("unix:{}", link.display()),
    )
    .await;
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let _ = qemu.write_all(b"QEVM").await;
    let view = destination.wait_final("sl", Duration::from_secs(5)).await;
    assert_eq!(view["state"], "failed", "{view}");
    assert!(
        view["error"]["message"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_by_reason() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "c", "target": "unix:/x"})),
        )
        .await;
    for _ in 0..3 {
        let body = json!({"direction": "outgoing", "id": "c", "token": "11".repeat(32), "peer": incoming["peer"]});
        let (status, _) = source.request("POST", "/v1/migrations", Some(body)).await;
        assert_eq!(status, 502);
    }
    let (_, info) = destination.request("GET", "/v1/info", None).await;
    assert_eq!(info["peer_rejections"]["bad_token"], 3, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_bound_to_their_migration() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let create = |id: &str| {
        let (destination, target) = (&destination, &target);
        let id = id.to_owned();
        async move {
            let (_, incoming) = destination
                .request(
                    "POST",
                    "/v1/migrations",
                    // Each its own target: two live migrations cannot share one.
                    Some(json!({"direction": "incoming", "id": id,
                                "target": if id == "one" { target.clone() } else { format!("{target}-{id}") }})),
                )
                .await;
            incoming
        }
    };
    let outgoing = |id: &str, token: &Value| json!({"direction": "outgoing", "id": id, "token": token, "peer": destination.peer});
    let first = create("one").await;
    let second = create("two").await;
    // Another migration's token opens nothing.
    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(outgoing("two", &first["token"])),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("bad_token"),
        "{body}"
    );
    let _ = second;

    // Used once, to completion...
    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(outgoing("one", &first["token"])),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
    });
    let mut qemu = UnixStream::connect(unix_path(body["qemu_uri"].as_str().unwrap()))
        .await
        .unwrap();
    qemu.write_all(b"all of it").await.unwrap();
    qemu.shutdown().await.unwrap();
    let mut rest = Vec::new();
    qemu.read_to_end(&mut rest).await.unwrap();
    accepting.await.unwrap();
    assert_eq!(
        destination.wait_final("one", Duration::from_secs(5)).await["state"],
        "transferred"
    );
    source.daemon.unregister("one"); // the source host forgets it; the token must still not work
    // ...and never again.
    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(outgoing("one", &first["token"])),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("(expired)"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_connections_leaves_the_daemon_able_to_migrate() {
    use rand::{Rng, SeedableRng};
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start_with("dst", |c| {
        c.timing.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
    // 300 connections in waves of 50, each sending up to 4 KiB of random bytes.
    for _ in 0..6 {
        let mut wave = Vec::new();
        for _ in 0..50 {
            let len = rng.gen_range(0..4096);
            let garbage: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let peer = destination.peer.clone();
            wave.push(tokio::spawn(async move {
                if let Ok(mut stream) = TcpStream::connect(peer).await {
                    let _ = stream.write_all(&garbage).await;
                    let mut sink = Vec::new();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut sink))
                            .await;
                }
            }));
        }
        for connection in wave {
            connection.await.unwrap();
        }
    }
    let counted: u64 = destination.daemon.rejections.counts().values().sum();
    assert!(counted >= 250, "refusals counted: {counted}");

    // A real (synthetic) migration still goes through.
    carry(&source, &destination, "after", 8 << 20).await;
}

/// Parses Prometheus text into (series with labels, value).
fn scrape(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

async fn metrics_text(daemon: &TestDaemon) -> String {
    let mut stream = UnixStream::connect(&daemon.api).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_lists_filters_forgets_and_exports_metrics() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = migration_pair(&source, &destination, "m", &target).await;
    let (status, running) = source.request("DELETE", "/v1/migrations/m", None).await;
    assert_eq!(
        status, 409,
        "a running migration cannot be forgotten: {running}"
    );

    let accepting = tokio::spawn(async move {
        let (stream, _) = qemu_in.accept().await.unwrap();
        receive_all(stream).await.unwrap()
    });
    let qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (_read, write) = qemu.into_split();
    send_all(write, random_data(1, 3 << 20), 1).await.unwrap();
    accepting.await.unwrap();
    drop(_read);
    let done = source.wait_final("m", Duration::from_secs(5)).await;
    assert_eq!(done["state"], "transferred");
    assert!(
        done["throughput"]["average_bytes_per_second"]
            .as_u64()
            .unwrap()
            > 0,
        "{done}"
    );
    assert!(
        done["timestamps"]["active"].as_f64().unwrap()
            >= done["timestamps"]["created"].as_f64().unwrap()
    );
    assert!(done["timestamps"]["ended"].is_f64(), "{done}");
    assert_eq!(
        done["peer_view"]["done"]["bytes"]["to_destination"],
        3 << 20,
        "{done}"
    );

    // A second migration, cancelled, for the other counters.
    let _ = migration_pair(&source, &destination, "c", "unix:/nowhere").await;
    let (status, _) = source
        .request("POST", "/v1/migrations/c/cancel", None)
        .await;
    assert_eq!(status, 200);
    destination.wait_final("c", Duration::from_secs(2)).await;

    let (_, all) = source.request("GET", "/v1/migrations", None).await;
    assert_eq!(all["migrations"].as_array().unwrap().len(), 2);
    let (_, completed) = source
        .request("GET", "/v1/migrations?state=transferred", None)
        .await;
    let ids: Vec<_> = completed["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("m")]);
    let (status, bad) = source
        .request("GET", "/v1/migrations?state=done", None)
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .starts_with("state: \"done\" is not one of"),
        "{bad}"
    );

    let metrics = scrape(&metrics_text(&source).await);
    assert_eq!(
        metrics["migproxy_bytes_total{direction=\"to_destination\"}"],
        (3u64 << 20) as f64
    );
    assert_eq!(
        metrics["migproxy_migrations_total{state=\"transferred\"}"],
        1.0
    );
    assert_eq!(
        metrics["migproxy_migrations_total{state=\"cancelled\"}"],
        1.0
    );
    assert_eq!(metrics["migproxy_migrations_active"], 0.0);
    assert_eq!(metrics["migproxy_cancel_seconds_count"], 1.0);
    assert_eq!(metrics["migproxy_tls_enabled"], 0.0);
    let at_destination = scrape(&metrics_text(&destination).await);
    assert_eq!(
        at_destination["migproxy_bytes_total{direction=\"to_destination\"}"],
        (3u64 << 20) as f64
    );

    let (status, _) = source.request("DELETE", "/v1/migrations/m", None).await;
    assert_eq!(status, 204);
    let (status, _) = source.request("GET", "/v1/migrations/m", None).await;
    assert_eq!(status, 404);
    let metrics = scrape(&metrics_text(&source).await);
    assert_eq!(
        metrics["migproxy_bytes_total{direction=\"to_destination\"}"],
        (3u64 << 20) as f64,
        "counters survive forgetting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_state_changes_and_channels() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let mut lines = subscribe(&source, "ev").await;

    let (_dir, qemu_in, target) = stand_in_target();
    let _ = migration_pair(&source, &destination, "other", "unix:/x").await; // filtered out
    let uri = migration_pair(&source, &destination, "ev", &target).await;
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
    });
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    qemu.write_all(b"stream").await.unwrap();
    qemu.shutdown().await.unwrap();
    let mut rest = Vec::new();
    qemu.read_to_end(&mut rest).await.unwrap();
    accepting.await.unwrap();

    let mut seen = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(data) = line.strip_prefix("data: ") {
                let event: Value = serde_json::from_str(data).unwrap();
                assert_eq!(event["migration"], "ev", "{event}");
                seen.push(format!(
                    "{} {}",
                    event["type"].as_str().unwrap(),
                    event["state"]
                        .as_str()
                        .or(event["end"].as_str())
                        .unwrap_or("")
                ));
                if event["state"] == "transferred" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "events so far: {seen:?}");
    assert_eq!(
        seen,
        [
            "state active",
            "channel_opened ",
            "channel_closed completed",
            "state transferred"
        ]
    );
    // An open event stream does not hold up the daemon's shutdown, and ends with it.
    source.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = lines.next_line().await {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream outlived the daemon");
}

/// Speaks the peer protocol as a source daemon would, up to the hello's reply.
/// A stand-in source daemon's hello, in protocol `version`, presenting `token` (hex); the
/// connection and the destination's answer.
async fn hello_as(
    destination: &TestDaemon,
    version: u16,
    kind: migproxy_proto::Kind,
    id: &str,
    token: &str,
    (channel, flags): (u32, u8),
) -> (TcpStream, migproxy_proto::HelloReply) {
    use migproxy_proto::{Hello, HelloReply};
    let token = migproxy::daemon::token::Token::from_hex(token).unwrap();
    let mut stream = TcpStream::connect(&destination.peer).await.unwrap();
    let mut hello = Vec::new();
    Hello {
        version,
        kind,
        migration: id.into(),
        channel,
        token: *token.bytes(),
        flags,
    }
    .encode(&mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut reply = vec![0; HelloReply::HEADER];
    stream.read_exact(&mut reply).await.unwrap();
    let len = migproxy_proto::reply_len(&reply).unwrap();
    reply.resize(HelloReply::HEADER + len, 0);
    stream
        .read_exact(&mut reply[HelloReply::HEADER..])
        .await
        .unwrap();
    (stream, HelloReply::decode(&reply).unwrap())
}

/// A stand-in source daemon's accepted hello in this build's protocol version; for a control
/// link, also the credential its data connections must present.
async fn peer_hello(
    destination: &TestDaemon,
    kind: migproxy_proto::Kind,
    id: &str,
    token: &str,
    channel_and_flags: (u32, u8),
) -> (TcpStream, String) {
    use migproxy_proto::{Status, VERSION};
    let (stream, reply) = hello_as(destination, VERSION, kind, id, token, channel_and_flags).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    (stream, reply.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counts_that_disagree_fail_the_migration_naming_channel_and_direction() {
    use migproxy_proto::{ChannelEnd, Control, Kind, Totals};
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let (_, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "lie", "target": target})),
        )
        .await;
    let token = incoming["token"].as_str().unwrap();
    // A source that claims one byte more than it sent on channel 0.
    let (mut control, credential) =
        peer_hello(&destination, Kind::Control, "lie", token, (0, 0)).await;
    let (mut data, _) = peer_hello(&destination, Kind::Data, "lie", &credential, (0, 0)).await;
    let (mut qemu, _) = qemu_in.accept().await.unwrap();
    data.write_all(&[7u8; 4096]).await.unwrap();
    data.shutdown().await.unwrap();
    let mut got = Vec::new();
    qemu.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), 4096);
    drop(qemu);
    let claimed = Totals {
        to_destination: 4097,
        to_source: 0,
    };
    let mut frames = Vec::new();
    Control::ChannelClosed {
        channel: 0,
        end: ChannelEnd::Completed,
        bytes: claimed,
    }
    .encode(&mut frames);
    Control::Done {
        channels: 1,
        bytes: claimed,
        verdict: migproxy_proto::Verdict::Unknown,
    }
    .encode(&mut frames);
    control.write_all(&frames).await.unwrap();
    let view = destination
        .wait_state("lie", "failed", Duration::from_secs(5))
        .await;
    let error = error_of(&view);
    assert_eq!(error["op"], "protocol", "{view}");
    assert_eq!(error["channel"], 0, "{view}");
    assert_eq!(error["direction"], "to_destination", "{view}");
    assert!(
        error["message"].as_str().unwrap().contains(
            "first on channel 0 to destination: 4097 at the source, 4096 at the destination"
        ),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_resumes_before_the_destination_noticed_records_the_pause() {
    use migproxy_proto::{FLAG_RECOVERABLE, Kind};
    let destination = TestDaemon::start("dst").await;
    let mut events = subscribe(&destination, "quick").await;
    let (_, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(
                json!({"direction": "incoming", "id": "quick", "target": "unix:/x",
                "recoverable": true}),
            ),
        )
        .await;
    let token = incoming["token"].as_str().unwrap();
    let hello = |first| {
        peer_hello(
            &destination,
            Kind::Control,
            "quick",
            token,
            (first, FLAG_RECOVERABLE),
        )
    };
    let _old = hello(0).await;
    // The old link still looks alive here (a blackholed link is noticed only by its
    // silence) when the source comes back with a new epoch.
    let _new = hello(1).await;
    let view = destination.show("quick").await;
    assert_eq!(view["state"], "active", "{view}");
    let pauses = view["pauses"].as_array().unwrap();
    assert_eq!(pauses.len(), 1, "{view}");
    assert!(
        pauses[0]["message"]
            .as_str()
            .unwrap()
            .contains("resumed on a new control link"),
        "{view}"
    );
    assert!(!view["timestamps"]["paused"].is_null(), "{view}");
    let mut states = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(5), async {
        while states.len() < 3 {
            let line = events.next_line().await.unwrap().unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                let event: Value = serde_json::from_str(data).unwrap();
                if event["type"] == "state" {
                    states.push(event["state"].as_str().unwrap().to_owned());
                }
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "states so far: {states:?}");
    assert_eq!(states, ["active", "paused", "active"]);
}

/// The event stream of one migration, subscribed before anything happens to it.
async fn subscribe(
    daemon: &TestDaemon,
    id: &str,
) -> tokio::io::Lines<tokio::io::BufReader<UnixStream>> {
    use tokio::io::AsyncBufReadExt;
    let mut subscription = UnixStream::connect(&daemon.api).await.unwrap();
    let request = format!("GET /v1/events?migration={id} HTTP/1.1\r\nHost: x\r\n\r\n");
    subscription.write_all(request.as_bytes()).await.unwrap();
    let mut lines = tokio::io::BufReader::new(subscription).lines();
    // The response head arrives before any event: the subscription is in place.
    while lines.next_line().await.unwrap().unwrap() != "" {}
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_cannot_reach_the_destination_stays_paused_and_says_why() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri =
        common::daemon::migration_pair_with(&source, &destination, "gone", &target, true).await;
    // The main channel closes without QEMU's SHUT: paused.
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
    });
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    qemu.write_all(&[5u8; 4096]).await.unwrap();
    qemu.shutdown().await.unwrap();
    let mut rest = Vec::new();
    qemu.read_to_end(&mut rest).await.unwrap();
    accepting.await.unwrap();
    source
        .wait_state("gone", "paused", Duration::from_secs(5))
        .await;
    // The destination host is gone; QEMU's recovery connects to the source daemon.
    destination.stop().await;
    let mut recovery = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), recovery.read_to_end(&mut rest));
    assert!(
        closed.await.is_ok(),
        "QEMU's recovery connection must be closed"
    );
    let second_pause = |view: &Value| view["pauses"].as_array().unwrap().len() == 2;
    let view = source
        .wait_for("gone", "paused twice", Duration::from_secs(5), second_pause)
        .await;
    assert_eq!(view["state"], "paused", "{view}");
    let error = error_of(&view);
    assert_eq!(error["leg"], "peer", "{view}");
    assert_eq!(error["host"], "source", "{view}");
    assert_eq!(error["errno"], "ECONNREFUSED", "{view}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("resume: control link"),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holder_cannot_add_a_channel_and_a_stray_one_fails_the_migration() {
    use migproxy_proto::{Control, Kind, Status, Totals, Verdict};
    let destination = TestDaemon::start("dst").await;
    let (_dir, qemu_in, target) = stand_in_target();
    let create = |id: &'static str, target: String| {
        let destination = &destination;
        async move {
            let body = json!({"direction": "incoming", "id": id, "target": target});
            let (status, incoming) = destination
                .request("POST", "/v1/migrations", Some(body))
                .await;
            assert_eq!(status, 201, "{incoming}");
            incoming["token"].as_str().unwrap().to_owned()
        }
    };
    // Version 2: the control link is handed a credential; the token no longer opens a data
    // connection, so whoever else holds it cannot add a channel.
    let token = create("v2", target.clone()).await;
    let (_control, credential) =
        peer_hello(&destination, Kind::Control, "v2", &token, (0, 0)).await;
    assert_eq!(credential.len(), 64, "a credential in hex: {credential:?}");
    let (_, refused) = hello_as(&destination, 2, Kind::Data, "v2", &token, (0, 0)).await;
    assert_eq!(refused.status, Status::BadToken, "{refused:?}");
    assert!(refused.message.contains("credential"), "{refused:?}");
    let (_data, _) = peer_hello(&destination, Kind::Data, "v2", &credential, (0, 0)).await;
    let _accepted = qemu_in.accept().await.unwrap();

    // Version 1 (an older source): answered in version 1, data connections present the token.
    // A stray second channel is admitted, but the migration fails at once when the source's
    // count disagrees.
    let (_dir1, qemu_in1, target1) = stand_in_target();
    let token = create("v1", target1).await;
    let (mut control, reply) = hello_as(&destination, 1, Kind::Control, "v1", &token, (0, 0)).await;
    assert_eq!((reply.status, reply.version), (Status::Ok, 1), "{reply:?}");
    assert_eq!(reply.message, "", "no credential for a version 1 source");
    let (mut data, reply) = hello_as(&destination, 1, Kind::Data, "v1", &token, (0, 0)).await;
    assert_eq!(reply.status, Status::Ok);
    let (mut qemu, _) = qemu_in1.accept().await.unwrap();
    let (_stray, reply) = hello_as(&destination, 1, Kind::Data, "v1", &token, (1, 0)).await;
    assert_eq!(
        reply.status,
        Status::Ok,
        "version 1 cannot tell the stray apart"
    );
    data.write_all(b"stream").await.unwrap();
    data.shutdown().await.unwrap();
    let mut got = Vec::new();
    qemu.read_to_end(&mut got).await.unwrap();
    drop(qemu);
    let mut done = Vec::new();
    Control::Done {
        channels: 1,
        bytes: Totals {
            to_destination: 6,
            to_source: 0,
        },
        verdict: Verdict::Unknown,
    }
    .encode_for(1, &mut done);
    control.write_all(&done).await.unwrap();
    let view = destination
        .wait_state("v1", "failed", Duration::from_secs(5))
        .await;
    let error = error_of(&view);
    assert!(
        error["detail"]
            .as_str()
            .unwrap()
            .contains("the source daemon opened 1 channel(s), the destination daemon carried 2"),
        "{view}"
    );
    // A newer source is answered in this build's version, with a credential.
    let (_dir3, _qemu_in3, target3) = stand_in_target();
    let token = create("v3", target3).await;
    let (_control, reply) = hello_as(&destination, 3, Kind::Control, "v3", &token, (0, 0)).await;
    assert_eq!((reply.status, reply.version), (Status::Ok, 2), "{reply:?}");
    assert_eq!(reply.message.len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_qemu_that_never_connects_ends_the_migration_at_the_deadline() {
    let deadline = |c: &mut migproxy::daemon::Config| {
        c.first_channel_timeout = Duration::from_millis(500);
    };
    let source = TestDaemon::start_with("src", deadline).await;
    let destination = TestDaemon::start_with("dst", deadline).await;
    let (_dir, _qemu_in, target) = stand_in_target();
    let uri = migration_pair(&source, &destination, "never", &target).await;
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("never", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = error_of(&view);
        assert_eq!(
            (&error["host"], &error["leg"], &error["op"]),
            (&json!("source"), &json!("qemu"), &json!("timeout")),
            "{view}"
        );
        assert!(
            error["detail"]
                .as_str()
                .unwrap()
                .contains("the source QEMU did not connect within 500 ms"),
            "{view}"
        );
    }
    assert!(
        !std::path::Path::new(unix_path(&uri)).exists(),
        "the socket handed to QEMU is gone"
    );
}
