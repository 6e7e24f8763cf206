//! The destination daemon's peer port: unknown ids, wrong and reused tokens, garbage, floods
//! and limits are refused clearly and leave running migrations alone; byte counts that
//! disagree fail the migration.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::{TestDaemon, carry, error_of, stand_in_target, stuck_migration, unix_path};
use common::peer::{hello_as, peer_hello};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

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

/// A destination daemon of version 1 (a stand-in over real TCP): it refuses any hello newer
/// than its own as a v1 daemon does (`refusal`, in version 1), and accepts a version 1 hello
/// with no credential. Returns its address and the version of every hello it read, in order.
async fn v1_destination(
    refusal: migproxy_proto::Status,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
    tokio::task::JoinHandle<()>,
) {
    use migproxy_proto::{HELLO_HEADER, Hello, HelloReply, Kind, Status};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let versions = std::sync::Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let mut accepted = Vec::new();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut header = [0u8; HELLO_HEADER];
            stream.read_exact(&mut header).await.unwrap();
            let version = u16::from_be_bytes([header[4], header[5]]);
            let len = u16::from_be_bytes([header[6], header[7]]) as usize;
            let mut body = vec![0; len];
            stream.read_exact(&mut body).await.unwrap();
            versions.lock().unwrap().push(version);
            let reply = if version > 1 {
                HelloReply {
                    version: 1,
                    status: refusal,
                    message: format!("unsupported protocol version {version}"),
                }
            } else {
                let hello = Hello::decode_body(1, &body).unwrap();
                assert_eq!(hello.kind, Kind::Control, "{hello:?}");
                HelloReply {
                    version: 1,
                    status: Status::Ok,
                    message: String::new(),
                }
            };
            let mut buf = Vec::new();
            reply.encode(&mut buf);
            stream.write_all(&buf).await.unwrap();
            // The accepted control link stays up for as long as the test runs.
            accepted.push(stream);
        }
    });
    (address, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_retries_in_version_1_when_an_older_destination_refuses_its_version() {
    use migproxy_proto::{MIN_VERSION, Status, VERSION};
    assert_eq!(
        MIN_VERSION, 1,
        "update this test for the next protocol version"
    );
    let source = TestDaemon::start("src").await;
    let create = |id: &'static str, peer: String| {
        let source = &source;
        async move {
            let body = json!({"direction": "outgoing", "id": id, "token": "11".repeat(32),
                              "peer": peer});
            source.request("POST", "/v1/migrations", Some(body)).await
        }
    };

    // Refused for its version: asked again in version 1, and accepted.
    let (peer, seen, old) = v1_destination(Status::UnsupportedVersion).await;
    let (status, body) = create("old", peer).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(*seen.lock().unwrap(), [VERSION, 1]);
    let view = source.show("old").await;
    assert!(
        !view["state"].as_str().unwrap().starts_with("fail"),
        "{view}"
    );

    // Refused for another reason: no second try in an older version.
    let (peer, seen, busy) = v1_destination(Status::Busy).await;
    let (status, body) = create("busy", peer).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(*seen.lock().unwrap(), [VERSION]);

    old.abort();
    busy.abort();
    source.stop().await;
}
