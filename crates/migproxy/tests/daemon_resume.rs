//! Resumable channels between two daemons in-process (issue #18): data connections reset
//! (RST) under a live control link are carried on new connections, every byte in order
//! both ways, and both hosts end the migration as if nothing had happened; a connection
//! that claims to resume a channel is refused unless it carries the epoch's credential and
//! names a resumable channel running there.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::cut::{LinkOutage, Switch, cut_control_after, cut_for_good, cutting_proxy};
use common::daemon::{TestDaemon, next_event, stand_in_target, subscribe, unix_path};
use common::resume::{
    OneChannel, hello_answer, link_down, one_channel, pair_via, resumable_daemons,
    resumable_daemons_for,
};
use common::{random_data, receive_all, send_all};
use migproxy::daemon::migration::view::EventKind;
use migproxy_proto::{FLAG_ENDED, FLAG_RESUME, Hello, Kind, Status, VERSION};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_connections_reset_under_a_live_control_link_lose_not_a_byte() {
    let (source, destination) = resumable_daemons().await;
    through_three_resets(&source, &destination).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_each_new_connection_is_a_new_handshake_and_not_a_byte_is_lost() {
    let root = common::short_tempdir();
    let (_ca, src_dir, dst_dir, _) = common::tls::pki(root.path());
    let daemon = |name: &'static str, dir: std::path::PathBuf| async move {
        let tls = Arc::new(migproxy::tls::TlsHandle::load(&dir, Vec::new()).unwrap());
        TestDaemon::start_with(name, move |c| {
            c.tls = Some(tls);
            c.resume_timeout = Duration::from_secs(20);
        })
        .await
    };
    let source = daemon("src", src_dir).await;
    let destination = daemon("dst", dst_dir).await;
    through_three_resets(&source, &destination).await;
    assert_eq!(source.show("r1").await["link"], "tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_another_certificate_is_refused_even_with_the_credential() {
    let root = common::short_tempdir();
    let (mut ca, src_dir, dst_dir, _) = common::tls::pki(root.path());
    let intruder_dir = root.path().join("intruder");
    ca.write_host(&intruder_dir, &["127.0.0.1"], "intruder");
    let daemon = |name: &'static str, dir: std::path::PathBuf| async move {
        let tls = Arc::new(migproxy::tls::TlsHandle::load(&dir, Vec::new()).unwrap());
        TestDaemon::start_with(name, move |c| {
            c.tls = Some(tls);
            c.resume_timeout = Duration::from_secs(20);
        })
        .await
    };
    let source = daemon("src", src_dir).await;
    let destination = daemon("dst", dst_dir).await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = pair_via(&source, &destination, "i1", &target, &destination.peer).await;
    let _qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (_accepted, _) = qemu_in.accept().await.unwrap();
    destination
        .wait_for("i1", "channel 0 active", Duration::from_secs(10), |v| {
            v["channels"][0]["state"] == "active"
        })
        .await;
    // Another host of the same CA, which the allow-list admits, holding the credential
    // (stolen, say): its certificate is not the control link's.
    let intruder = migproxy::tls::Tls::load(&intruder_dir, Vec::new()).unwrap();
    let credential = source.daemon.get("i1").unwrap().data_credential();
    let hello = |kind| Hello {
        version: VERSION,
        kind,
        migration: "i1".into(),
        channel: 0,
        token: *credential.bytes(),
        flags: FLAG_RESUME,
    };
    let intrude = |hello: Hello| refused_as(&intruder, &destination.peer, hello, Status::Refused);
    // A channel's connection, and a control link taking over.
    intrude(hello(Kind::Data)).await;
    intrude(hello(Kind::Control)).await;
    // A control link after the first that would pause the migration (as a source that
    // resumed before the destination noticed): with the credential, not the control link's
    // certificate; with the one-time token, not the credential.
    let recovery = |token: [u8; 32]| Hello {
        channel: 1,
        flags: 0,
        token,
        ..hello(Kind::Control)
    };
    intrude(recovery(*credential.bytes())).await;
    let token = *source.daemon.get("i1").unwrap().spec.token.bytes();
    let stranger = refused_as(
        &intruder,
        &destination.peer,
        recovery(token),
        Status::BadToken,
    );
    stranger.await;
    let view = destination.show("i1").await;
    assert_eq!(view["state"], "active", "{view}");
    assert!(view["pauses"].as_array().unwrap().is_empty(), "{view}");
    // Once the migration has ended the credential tells its holder how; the intruder
    // learns nothing, not even that.
    let (status, _) = source
        .request("POST", "/v1/migrations/i1/cancel", None)
        .await;
    assert_eq!(status, 200);
    destination.wait_final("i1", Duration::from_secs(5)).await;
    intrude(hello(Kind::Data)).await;
    intrude(hello(Kind::Control)).await;
    // Nor does it get in with last frames to tell.
    intrude(Hello {
        flags: FLAG_RESUME | FLAG_ENDED,
        ..hello(Kind::Control)
    })
    .await;
}

/// Dials `peer` with `intruder`'s certificate and `hello`: refused with `status`, the
/// message saying why (the certificate, or the wrong credential).
async fn refused_as(intruder: &migproxy::tls::Tls, peer: &str, hello: Hello, status: Status) {
    use migproxy::daemon::peer::{Dial, PeerError, Timing, dial};
    let to = Dial {
        peer,
        tls: Some((intruder, "127.0.0.1")),
    };
    let refused = dial(to, &hello, &Timing::default()).await;
    let Err(PeerError::Refused {
        status: said,
        message,
        ..
    }) = refused
    else {
        panic!("not refused: {refused:?}");
    };
    assert_eq!(said, status, "{message}");
    match status {
        Status::Refused => {
            assert!(message.contains("control link's certificate"), "{message}");
            assert!(message.contains("intruder"), "{message}");
        }
        _ => assert!(message.contains("wrong credential"), "{message}"),
    }
}

/// One channel carried between `source` and `destination` through a middlebox that resets
/// its connection three times: every byte both ways, and each host reports each outage.
async fn through_three_resets(source: &TestDaemon, destination: &TestDaemon) {
    let cut = Arc::new(AtomicU32::new(0));
    let to = destination.peer.parse().unwrap();
    // Three resets of the one channel, at different depths; the first past what the socket
    // buffers hold, so that both engines have started when it comes (a connection broken
    // before the destination's engine took it is a failed attempt there, not an outage).
    let via = cutting_proxy(to, vec![2 << 20, 2 << 20, 5 << 20], Arc::clone(&cut)).await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = pair_via(source, destination, "r1", &target, &via.to_string()).await;
    let source_events = subscribe(source, "r1").await;
    let destination_events = subscribe(destination, "r1").await;
    const FORWARD: usize = 16 << 20;
    const BACKWARD: usize = 2 << 20;
    let reply = random_data(2, BACKWARD);
    let destination_qemu = tokio::spawn({
        let reply = Arc::clone(&reply);
        async move {
            let (stream, _) = qemu_in.accept().await.unwrap();
            let (read, write) = stream.into_split();
            let sending = tokio::spawn(send_all(write, reply, 5));
            let got = receive_all(read).await.unwrap();
            sending.await.unwrap().unwrap();
            got
        }
    });
    let data = random_data(1, FORWARD);
    let (read, write) = UnixStream::connect(unix_path(&uri))
        .await
        .unwrap()
        .into_split();
    let (sent, got_back) = tokio::join!(send_all(write, Arc::clone(&data), 3), receive_all(read));
    if let Err(error) = sent {
        let views = [source.show("r1").await, destination.show("r1").await];
        panic!("the source QEMU's write failed ({error}): {views:#?}");
    }
    assert_eq!(
        got_back.unwrap(),
        (BACKWARD as u64, blake3::hash(&reply)),
        "destination → source"
    );
    let got = tokio::time::timeout(Duration::from_secs(60), destination_qemu).await;
    assert_eq!(
        got.unwrap().unwrap(),
        (FORWARD as u64, blake3::hash(&data)),
        "source → destination"
    );
    assert_eq!(
        cut.load(Ordering::SeqCst),
        3,
        "the proxy reset three data connections"
    );
    let mut counts = Vec::new();
    for daemon in [source, destination] {
        let view = daemon.wait_final("r1", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        let bytes = &view["channels"][0]["bytes"];
        // Counted once, however often replayed.
        assert_eq!(bytes["to_destination"], FORWARD as u64, "{view}");
        assert_eq!(bytes["to_source"], BACKWARD as u64, "{view}");
        // Each host reports each outage it saw: the source all three; the destination may
        // have missed the first, when it came before its engine took the connection (a
        // failed attempt there, not an outage).
        let resume = &view["resume"];
        let n = resume["resumptions"].as_u64().unwrap();
        let least = if view["direction"] == "outgoing" {
            3
        } else {
            2
        };
        assert!((least..=3).contains(&n), "{view}");
        assert_eq!(resume["resuming"], json!([]), "{view}");
        assert_eq!(resume["timeout_ms"], 20_000, "{view}");
        let (_, metrics) = daemon.request("GET", "/metrics", None).await;
        let metrics = metrics.as_str().unwrap();
        assert!(
            metrics.contains(&format!("migproxy_resumptions_total {n}\n")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("migproxy_outage_seconds_count {n}\n")),
            "{metrics}"
        );
        // And the CLI's report of it.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_migproxy"))
            .args(["migration", "--api"])
            .arg(&daemon.api)
            .args(["show", "r1"])
            .output()
            .await
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains(&format!("resumptions: {n} ")), "{shown}");
        counts.push(n as usize);
    }
    for (mut events, n) in [source_events, destination_events].into_iter().zip(counts) {
        let mut seen = Vec::new();
        while seen.iter().filter(|e| *e == "channel_resumed").count() < n {
            let event = tokio::time::timeout(Duration::from_secs(5), next_event(&mut events));
            seen.push(event.await.unwrap().name().to_owned());
        }
        let interrupted = seen.iter().filter(|e| *e == "channel_interrupted").count();
        assert_eq!(interrupted, n, "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_without_the_credential_or_for_no_running_channel_is_refused() {
    let (source, destination) = resumable_daemons().await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = pair_via(&source, &destination, "r2", &target, &destination.peer).await;
    // A channel running, resumable.
    let _qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (_accepted, _) = qemu_in.accept().await.unwrap();
    destination
        .wait_for("r2", "channel 0 active", Duration::from_secs(10), |v| {
            v["channels"][0]["state"] == "active"
        })
        .await;
    let hello = |channel, token| Hello {
        version: VERSION,
        kind: Kind::Data,
        migration: "r2".into(),
        channel,
        token,
        flags: FLAG_RESUME,
    };
    // Anyone without the epoch's credential (the one-time token is spent, and guessed
    // values are wrong).
    let (status, message) = hello_answer(&destination.peer, &hello(0, [7; 32])).await;
    assert_eq!(status, Status::BadToken, "{message}");
    // The real credential, as the source holds it, for a channel that does not run.
    let credential = source.daemon.get("r2").unwrap().data_credential();
    let (status, message) = hello_answer(&destination.peer, &hello(5, *credential.bytes())).await;
    assert_eq!(status, Status::Refused, "{message}");
    assert!(message.contains("not a resumable channel"), "{message}");
    assert_eq!(
        destination.show("r2").await["state"],
        "active",
        "nothing changed"
    );
    // Replayed once the migration has ended: refused.
    let (status, _) = source
        .request("POST", "/v1/migrations/r2/cancel", None)
        .await;
    assert_eq!(status, 200);
    destination.wait_final("r2", Duration::from_secs(5)).await;
    let (status, message) = hello_answer(&destination.peer, &hello(0, *credential.bytes())).await;
    // The credential resumes nothing once its epoch has ended; it only tells its holder, the
    // source daemon, how the migration ended here.
    assert_eq!(status, Status::Cancelled, "{message}");
    assert!(
        message.contains("is cancelled (cancelled by the source)"),
        "{message}"
    );
    // Anyone else learns nothing.
    let (status, message) = hello_answer(&destination.peer, &hello(0, [7; 32])).await;
    assert_eq!(status, Status::BadToken, "{message}");
    // A control link with the source's last frames: the destination ended with its link up,
    // so the source heard its end and there is nothing to take; without the credential,
    // nothing to learn.
    let last_frames = |token| Hello {
        kind: Kind::Control,
        flags: FLAG_RESUME | FLAG_ENDED,
        ..hello(0, token)
    };
    let (status, message) =
        hello_answer(&destination.peer, &last_frames(*credential.bytes())).await;
    assert_eq!(status, Status::Cancelled, "{message}");
    let (status, message) = hello_answer(&destination.peer, &last_frames([7; 32])).await;
    assert_eq!(status, Status::BadToken, "{message}");
    assert!(destination.show("r2").await["peer_view"]["ended_late"].is_null());
}

/// A migration whose one channel lost its connection for good: the source QEMU stand-in
/// keeps writing (it blocks once the retention is full), the destination's reads.
async fn outage_for_good(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
) -> tokio::task::JoinHandle<OneChannel> {
    let via = cut_for_good(destination.peer.parse().unwrap(), 2 << 20).await;
    let mut channel = one_channel(source, destination, id, &via.to_string()).await;
    let writer = tokio::spawn(async move {
        let _ = channel.write.write_all(&random_data(9, 64 << 20)).await;
        channel
    });
    let view = source
        .wait_for(id, "channel 0 resuming", Duration::from_secs(10), |v| {
            v["resume"]["resuming"] == json!([0])
        })
        .await;
    // The migration and its channel say so, while the control link is up.
    assert_eq!(view["state"], "resuming", "{view}");
    assert_eq!(view["phase"], "active", "{view}");
    assert_eq!(view["channels"][0]["state"], "resuming", "{view}");
    assert!(view["resume"]["down_ms"].is_u64(), "{view}");
    assert!(view["resume"]["link_down_ms"].is_null(), "{view}");
    writer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_the_resume_timeout_fails_both_hosts_naming_the_link_and_the_attempts() {
    let (source, destination) = resumable_daemons_for(Duration::from_secs(2)).await;
    let _qemus = outage_for_good(&source, &destination, "t1").await;
    let mut stories = Vec::new();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("t1", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let error = &view["error"];
        assert_eq!(error["leg"], "peer", "{view}");
        assert_eq!(error["channel"], 0, "{view}");
        let message = error["message"].as_str().unwrap();
        // The reset that started the outage, by name: as the source saw it, or, when the
        // destination's word that it broke came first, as that word (which has no errno).
        assert!(
            error["errno"] == "ECONNRESET"
                || (error["errno"].is_null() && message.contains("the daemon's word")),
            "{view}"
        );
        eprintln!("{}: {message}", view["direction"]);
        assert!(
            message.contains("no working connection to the peer for")
                && message.contains("attempts"),
            "{view}"
        );
        stories.push(error.clone());
    }
    // One story: the source's, which dialled (the destination waits a moment longer).
    assert_eq!(stories[0], stories[1]);
    assert_eq!(stories[0]["host"], "source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recoverable_migration_resumes_first_and_pauses_past_the_resume_timeout() {
    let (source, destination) = resumable_daemons_for(Duration::from_secs(2)).await;
    let _qemus = outage_for_good(&source, &destination, "rec1").await;
    for daemon in [&source, &destination] {
        // Paused (the control link, sound, is kept for the next epoch at once: the state
        // reads `active` again, recovering).
        let view = daemon
            .wait_for("rec1", "a pause", Duration::from_secs(10), |v| {
                v["pauses"].as_array().is_some_and(|p| !p.is_empty())
            })
            .await;
        // The pause's cause (the error moves on to each failed try to bring the link back).
        let message = view["pauses"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("no working connection to the peer for"),
            "{view}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_an_outage_wins_and_nothing_resumes() {
    let (source, destination) = resumable_daemons().await;
    let _qemus = outage_for_good(&source, &destination, "c1").await;
    let (status, view) = source
        .request("POST", "/v1/migrations/c1/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("c1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "cancelled", "{view}");
        assert_eq!(view["resume"]["resumptions"], 0, "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_link_reset_mid_migration_is_taken_over_and_not_a_byte_is_lost() {
    let (source, destination) = resumable_daemons().await;
    let to = destination.peer.parse().unwrap();
    let via = cut_control_after(to, Duration::from_millis(300)).await;
    let mut channel = one_channel(&source, &destination, "k1", &via.to_string()).await;
    const FORWARD: usize = 32 << 20;
    // Paced, so that the reset comes mid-stream: 1 MiB every 30 ms.
    let data = random_data(4, FORWARD);
    for chunk in data.chunks(1 << 20) {
        channel.write.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    channel.write.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), channel.received).await;
    let got = got.unwrap().unwrap().unwrap();
    assert_eq!(got, (FORWARD as u64, blake3::hash(&data)));
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("k1", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        assert_eq!(view["resume"]["link_outages"], 1, "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_destination_daemon_holds_nothing_to_resume_and_the_source_fails_at_once() {
    let (source, destination) = resumable_daemons().await;
    let switch = Switch::new(destination.peer.parse().unwrap()).await;
    let via = switch.addr.to_string();
    let mut channel = one_channel(&source, &destination, "d1", &via).await;
    channel.write.write_all(&[7; 1 << 20]).await.unwrap();
    destination
        .wait_for("d1", "1 MiB delivered", Duration::from_secs(10), |v| {
            v["bytes"]["to_destination"].as_u64() >= Some(1 << 20)
        })
        .await;
    // The destination daemon is gone (its connections reset, as when it crashes), and
    // another, which never heard of the migration, answers at its address: it cannot go
    // on with what the first delivered.
    let restarted = resumable_daemons().await.1;
    switch.to(restarted.peer.parse().unwrap());
    let started = std::time::Instant::now();
    let view = source.wait_final("d1", Duration::from_secs(10)).await;
    assert_eq!(view["state"], "failed", "{view}");
    let message = view["error"]["message"].as_str().unwrap();
    assert!(message.contains("refused"), "{view}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed at once, not at the resume timeout (20 s): {:?}",
        started.elapsed()
    );
    eprintln!("{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_hello_refused_leaves_the_epoch_resumable_and_absurd_timeouts_are_refused()
{
    let (source, destination) = resumable_daemons().await;
    let (_dir, _qemu_in, target) = stand_in_target();
    let body = json!({"direction": "incoming", "id": "s1", "target": target});
    let (status, incoming) = destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let token = incoming["token"].as_str().unwrap().to_owned();
    let body =
        json!({"direction": "outgoing", "id": "s1", "token": token, "peer": destination.peer});
    let (status, outgoing) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    destination
        .wait_for("s1", "resumable", Duration::from_secs(5), |v| {
            !v["resume"].is_null()
        })
        .await;
    // Whoever holds the one-time token tries a control link of their own, without asking
    // for resumable channels: refused (a control link after the first presents the
    // credential the source was handed), and the epoch is as it was.
    let bytes = migproxy::daemon::token::Token::from_hex(&token).unwrap();
    let hello = Hello {
        version: VERSION,
        kind: Kind::Control,
        migration: "s1".into(),
        channel: 0,
        token: *bytes.bytes(),
        flags: 0,
    };
    let (status, message) = hello_answer(&destination.peer, &hello).await;
    assert_eq!(status, Status::BadToken, "{message}");
    assert!(message.contains("wrong credential"), "{message}");
    let view = destination.show("s1").await;
    assert!(!view["resume"].is_null(), "still resumable: {view}");
    // A resume timeout past a day (or not a number of seconds) is the request's fault.
    for timeout in [json!(1e30), json!(-1), json!(86_401)] {
        let body = json!({"direction": "incoming", "resume_timeout": timeout, "target": "unix:/x"});
        let (status, answer) = destination
            .request("POST", "/v1/migrations", Some(body))
            .await;
        assert_eq!(status, 400, "{timeout}: {answer}");
        assert!(answer.to_string().contains("resume_timeout"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_qemu_that_stops_reading_is_blamed_as_with_the_relay() {
    let (source, destination) = stalling_daemons().await;
    let (writer, _qemu_in, _dir) =
        common::daemon::stuck_migration(&source, &destination, "st").await;
    let mut carried = Vec::new();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("st", Duration::from_secs(5)).await;
        carried.push(
            view["channels"][0]["bytes"]["to_destination"]
                .as_u64()
                .unwrap(),
        );
        assert!(!view["resume"].is_null(), "resumable: {view}");
        assert_eq!(view["state"], "failed", "{view}");
        let error = &view["error"];
        assert_eq!(
            (&error["host"], &error["leg"], &error["op"]),
            (&json!("destination"), &json!("qemu"), &json!("timeout")),
            "{view}"
        );
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("QEMU stopped reading"),
            "{view}"
        );
    }
    // Retention bounded: the source read from its QEMU no more than the retention (16 MiB)
    // beyond what the destination delivered (and acknowledged); the rest waited in QEMU.
    let (read, delivered) = (carried[0], carried[1]);
    eprintln!("read from QEMU {read}, delivered {delivered}");
    assert!(
        read > delivered && read - delivered <= 16 << 20,
        "read {read}, delivered {delivered}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_link_down_longer_than_the_stall_timeout_is_no_stall() {
    let (source, destination) = stalling_daemons().await;
    let outage = LinkOutage::new(
        destination.peer.parse().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    let events = [
        subscribe(&source, "n1").await,
        subscribe(&destination, "n1").await,
    ];
    let mut channel = one_channel(&source, &destination, "n1", &outage.addr.to_string()).await;
    let data = random_data(6, 2 << 20);
    channel.write.write_all(&data[..1 << 20]).await.unwrap();
    link_down(&source, "n1").await;
    // Nothing moves for twice the stall timeout: the resume timeout bounds the outage.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for daemon in [&source, &destination] {
        let view = daemon.show("n1").await;
        assert_eq!(view["state"], "resuming", "{view}");
        assert_eq!(view["channels"][0]["state"], "active", "{view}");
        assert!(
            view["resume"]["link_down_ms"].as_u64() >= Some(1600),
            "{view}"
        );
    }
    outage.restore();
    channel.write.write_all(&data[1 << 20..]).await.unwrap();
    channel.write.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), channel.received).await;
    assert_eq!(
        got.unwrap().unwrap().unwrap(),
        (2 << 20, blake3::hash(&data))
    );
    for (daemon, mut events) in [&source, &destination].into_iter().zip(events) {
        let view = daemon.wait_final("n1", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        assert!(view["resume"]["link_down_ms"].is_null(), "{view}");
        // One state event as the link went down, one as it came back.
        let states = states_until_final(&mut events).await;
        assert_eq!(
            states,
            ["active", "resuming", "active", "transferred"],
            "{}",
            view["direction"]
        );
    }
}

/// The states a migration's events announce, up to its final one.
async fn states_until_final(events: &mut migproxy::client::Events) -> Vec<String> {
    let mut states: Vec<String> = Vec::new();
    while !states
        .last()
        .is_some_and(|s| ["transferred", "completed", "failed", "cancelled"].contains(&s.as_str()))
    {
        let event = tokio::time::timeout(Duration::from_secs(5), next_event(events));
        if let EventKind::State { state, .. } = event.await.unwrap().kind {
            states.push(state.to_string());
        }
    }
    states
}

/// A destination that stops acknowledging (its `Progress` frames dropped on the way, its
/// heartbeats not): the source reads from its QEMU no more than the retention, 16 MiB, and
/// waits; the migration stalls and fails on both hosts, blamed on the link, not on QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_acknowledging_gets_no_more_than_the_retention_and_stalls() {
    let (source, destination) = stalling_daemons().await;
    let dropped = Arc::new(AtomicU32::new(0));
    let via =
        common::cut::ack_dropping_proxy(destination.peer.parse().unwrap(), Arc::clone(&dropped))
            .await;
    let mut channel = one_channel(&source, &destination, "na", &via.to_string()).await;
    let writer = tokio::spawn(async move {
        let _ = channel.write.write_all(&random_data(11, 64 << 20)).await;
        channel
    });
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("na", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let read = view["channels"][0]["bytes"]["to_destination"]
            .as_u64()
            .unwrap();
        assert!(read <= 16 << 20, "read {read}: more than the retention");
        let error = &view["error"];
        assert_eq!(
            (&error["host"], &error["leg"], &error["op"]),
            (&json!("source"), &json!("peer"), &json!("timeout")),
            "{view}"
        );
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("took or acknowledged none of"), "{view}");
    }
    assert!(
        dropped.load(Ordering::SeqCst) > 0,
        "no acknowledgement was dropped"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

/// Two daemons resuming for 20 s whose stall watch concludes after 800 ms.
async fn stalling_daemons() -> (TestDaemon, TestDaemon) {
    let daemon = |name: &'static str| {
        TestDaemon::start_with(name, |c| {
            c.resume_timeout = Duration::from_secs(20);
            c.stall_timeout = Duration::from_millis(800);
        })
    };
    (daemon("src").await, daemon("dst").await)
}
