//! How resumable channels end when a migration ends during an outage (issue #18): a cancel
//! on either host while the control link is down, a cancel or an end lost with a link that
//! breaks. Both hosts tell one story: the same final state, the same host that cancelled.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::cut::{ControlGate, LinkOutage, Swallow};
use common::daemon::{TestDaemon, next_event, stand_in_target, subscribe, unix_path};
use common::resume::{
    flowing, hello_answer, link_down, one_channel, pair_via, resumable_daemons,
    resumable_daemons_for,
};
use common::{random_data, receive_all};
use migproxy_proto::{FLAG_ENDED, FLAG_RESUME, Hello, Kind, Status, VERSION};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_the_control_link_is_down_reaches_the_destination_once_it_is_back() {
    let (source, destination) = resumable_daemons().await;
    let outage = LinkOutage::new(
        destination.peer.parse().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    let mut channel = one_channel(&source, &destination, "x1", &outage.addr.to_string()).await;
    channel.write.write_all(&[3; 1 << 20]).await.unwrap();
    link_down(&source, "x1").await;
    let (status, view) = source
        .request("POST", "/v1/migrations/x1/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(
        source.wait_final("x1", Duration::from_secs(5)).await["state"],
        "cancelled"
    );
    // Down for longer than the 5 s the source once kept dialling for after its end, well
    // short of the destination's resume timeout (20 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    outage.restore();
    // The source's cancel arrived on the link that came back: the destination did not wait
    // for its resume timeout.
    let view = destination.wait_final("x1", Duration::from_secs(5)).await;
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_eq!(view["cancelled_by"], "source", "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_cancelled_while_the_destination_failed_at_its_deadline_each_hears_the_others_end()
{
    // The destination waits less for a link than the source keeps dialling after its end.
    let waits =
        |secs| move |c: &mut migproxy::daemon::Config| c.resume_timeout = Duration::from_secs(secs);
    let source = TestDaemon::start_with("src", waits(20)).await;
    let destination = TestDaemon::start_with("dst", waits(1)).await;
    let outage = LinkOutage::new(
        destination.peer.parse().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    let mut channel = one_channel(&source, &destination, "l1", &outage.addr.to_string()).await;
    channel.write.write_all(&[3; 1 << 20]).await.unwrap();
    link_down(&source, "l1").await;
    let mut events = [
        subscribe(&source, "l1").await,
        subscribe(&destination, "l1").await,
    ];
    let (status, view) = source
        .request("POST", "/v1/migrations/l1/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    // The destination cannot hear it, and fails at its resume timeout.
    let failed = destination.wait_final("l1", Duration::from_secs(10)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["peer_view"]["ended_late"], Value::Null, "{failed}");
    // Someone without the credential, with last frames to tell: refused, and the one link
    // the destination takes for them is still the source's.
    let credential = source.daemon.get("l1").unwrap().data_credential();
    let last_frames = |token| Hello {
        version: VERSION,
        kind: Kind::Control,
        migration: "l1".into(),
        channel: 0,
        token,
        flags: FLAG_RESUME | FLAG_ENDED,
    };
    let (status, message) = hello_answer(&destination.peer, &last_frames([7; 32])).await;
    assert_eq!(status, Status::BadToken, "{message}");
    outage.restore();
    // The link that comes back carries each host's last frames: neither changes its own
    // verdict (each is what it knew), and each shows the other's.
    let heard = |v: &Value| !v["peer_view"]["ended_late"].is_null();
    let here = destination
        .wait_for(
            "l1",
            "the source's end heard",
            Duration::from_secs(10),
            heard,
        )
        .await;
    assert_eq!(here["state"], "failed", "{here}");
    let there = &here["peer_view"]["ended_late"];
    assert_eq!(there["state"], "cancelled", "{here}");
    assert_eq!(there["cancelled_by"], "source", "{here}");
    let here = source
        .wait_for(
            "l1",
            "the destination's end heard",
            Duration::from_secs(10),
            heard,
        )
        .await;
    assert_eq!(here["state"], "cancelled", "{here}");
    let there = &here["peer_view"]["ended_late"];
    assert_eq!(there["state"], "failed", "{here}");
    assert_eq!(
        there["error"]["message"], failed["error"]["message"],
        "the destination's own words: {here}"
    );
    // As the API document says.
    let doc = common::openapi::Doc::load();
    for daemon in [&source, &destination] {
        let view = daemon.show("l1").await;
        let errors = doc.validate(doc.schema("Migration"), &view);
        assert!(errors.is_empty(), "{errors:?} in {view}");
    }
    // And so do both CLIs' reports.
    for (daemon, there) in [
        (&destination, "cancelled by the source host"),
        (&source, "failed: peer link, seen from the destination"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_migproxy"))
            .args(["migration", "--api"])
            .arg(&daemon.api)
            .args(["show", "l1"])
            .output()
            .await
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let line =
            format!("the peer daemon, heard once the link came back after both had ended: {there}");
        assert!(report.contains(&line), "{report}");
    }
    // Once: the credential admits no second link with last frames.
    let again = last_frames(*credential.bytes());
    let (status, message) = hello_answer(&destination.peer, &again).await;
    assert_eq!(status, Status::Expired, "{message}");
    assert!(message.contains("is failed"), "{message}");
    // And each said so as an event.
    for events in &mut events {
        loop {
            let event = next_event(events).await;
            if event.name() == "peer_ended" {
                let event = serde_json::to_value(&event).unwrap();
                let errors = doc.validate(doc.schema("PeerEndedEvent"), &event);
                assert!(errors.is_empty(), "{errors:?} in {event}");
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_lost_with_a_control_link_that_breaks_is_delivered_by_one_that_takes_over() {
    let (source, destination) = resumable_daemons().await;
    let swallow = Swallow::new(destination.peer.parse().unwrap()).await;
    let _channel = flowing(&source, &destination, "f1", &swallow.addr.to_string()).await;
    // The source's cancel goes into a link that swallows it (the link looks alive); the
    // link breaks a moment later, before the source's wait for the destination to close
    // its side is over.
    swallow.arm();
    let (status, view) = source
        .request("POST", "/v1/migrations/f1/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    swallow.cut();
    // A link that takes over carries it again: the destination ends cancelled by the
    // source at once, not failed at its resume timeout (20 s).
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("f1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "cancelled", "{view}");
        assert_eq!(view["cancelled_by"], "source", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_end_went_down_with_the_control_link_ends_once_a_link_takes_over() {
    let (source, destination) = resumable_daemons().await;
    let swallow = Swallow::new(destination.peer.parse().unwrap()).await;
    let (_dir, qemu_in, target) = stand_in_target();
    let uri = pair_via(
        &source,
        &destination,
        "e1",
        &target,
        &swallow.addr.to_string(),
    )
    .await;
    // The destination QEMU stand-in ends its direction at once, and reads all it is given.
    let destination_qemu = tokio::spawn(async move {
        let (stream, _) = qemu_in.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write.shutdown().await.unwrap();
        receive_all(read).await.unwrap()
    });
    let data = random_data(8, 1 << 20);
    let (read, mut write) = UnixStream::connect(unix_path(&uri))
        .await
        .unwrap()
        .into_split();
    write.write_all(&data).await.unwrap();
    destination
        .wait_for("e1", "every byte delivered", Duration::from_secs(5), |v| {
            v["channels"][0]["bytes"]["to_destination"] == 1 << 20
        })
        .await;
    // The source's end of its direction (its last progress, its ChannelClosed and Done)
    // goes into a link that swallows it; the data connection's end of stream alone does not
    // tell the destination it was the end, so, past its grace, it waits for a connection
    // the source (done) will not dial.
    swallow.arm();
    write.shutdown().await.unwrap();
    assert_eq!(
        receive_all(read).await.unwrap().0,
        0,
        "the destination sent nothing"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    swallow.cut();
    // The link that takes over tells the end: the channel ends, QEMU gets its end of
    // stream, and both hosts end the migration, well before the resume timeout (20 s).
    let got = tokio::time::timeout(Duration::from_secs(8), destination_qemu).await;
    assert_eq!(
        got.unwrap().unwrap(),
        (1 << 20, blake3::hash(&data)),
        "source → destination"
    );
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("e1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "transferred", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cancel_told_by_a_channels_refused_return_ends_the_source_cancelled_too() {
    let (source, destination) = resumable_daemons().await;
    let gate = ControlGate::new(destination.peer.parse().unwrap()).await;
    let _channel = flowing(&source, &destination, "g1", &gate.addr.to_string()).await;
    // Every connection reset; the channel's comes back, the control link does not.
    gate.close();
    link_down(&source, "g1").await;
    // The destination's cancel cannot reach the source on the control link. It stops the
    // channel there, so the source dials the channel's return, which is refused: the
    // refusal names the cancel, and it comes before any control link's.
    let (status, view) = destination
        .request("POST", "/v1/migrations/g1/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("g1", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "cancelled", "{view}");
        assert_eq!(view["cancelled_by"], "destination", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_blackholed_as_the_source_ends_is_found_dead_and_the_end_delivered_by_another() {
    blackholed_as_the_source_ends("h1", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_blackholed_one_way_as_the_source_ends_is_reset_by_the_destination_which_gets_the_end()
 {
    blackholed_as_the_source_ends("h2", false).await;
}

/// The control link goes silent (both ways, or only what the source sends), with no error
/// on either side, just as the source cancels: its Cancel goes into the blackhole. Either
/// the source finds the link silent at its peer timeout, or the destination does and
/// closes it with a reset, which the source, still listening after its end, sees as a
/// break: a link that takes over delivers the cancel, and the destination ends cancelled
/// by the source, not failed at its resume timeout (20 s).
async fn blackholed_as_the_source_ends(id: &str, both_ways: bool) {
    // The peer timeout longer than the 2 s a link once listened after its end.
    let daemon = |name: &'static str| {
        TestDaemon::start_with(name, |c| {
            c.resume_timeout = Duration::from_secs(20);
            c.timing.heartbeat_interval = Duration::from_millis(300);
            c.timing.peer_timeout = Duration::from_secs(3);
        })
    };
    let (source, destination) = (daemon("src").await, daemon("dst").await);
    let to = destination.peer.parse().unwrap();
    let blackhole = match both_ways {
        true => Swallow::both_ways(to).await,
        false => Swallow::new(to).await,
    };
    let _channel = flowing(&source, &destination, id, &blackhole.addr.to_string()).await;
    blackhole.arm();
    let (status, view) = source
        .request("POST", &format!("/v1/migrations/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    for daemon in [&source, &destination] {
        let view = daemon.wait_final(id, Duration::from_secs(10)).await;
        assert_eq!(view["state"], "cancelled", "{view}");
        assert_eq!(view["cancelled_by"], "source", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cancel_while_paused_ends_the_source_cancelled_once_the_link_is_back() {
    // Recoverable ("rec…"): past the 2 s resume timeout without a control link, it pauses.
    let (source, destination) = resumable_daemons_for(Duration::from_secs(2)).await;
    let outage = LinkOutage::new(
        destination.peer.parse().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    let mut channel = one_channel(&source, &destination, "rec2", &outage.addr.to_string()).await;
    channel.write.write_all(&[3; 1 << 20]).await.unwrap();
    for daemon in [&source, &destination] {
        daemon
            .wait_for("rec2", "paused", Duration::from_secs(15), |v| {
                v["state"] == "paused"
            })
            .await;
    }
    let (status, view) = destination
        .request("POST", "/v1/migrations/rec2/cancel", None)
        .await;
    assert_eq!(status, 200, "{view}");
    destination.wait_final("rec2", Duration::from_secs(5)).await;
    // The source's next try to bring the link back is refused `cancelled`: it ends so too.
    outage.restore();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("rec2", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "cancelled", "{view}");
        assert_eq!(view["cancelled_by"], "destination", "{view}");
    }
}
