//! The daemon's REST API in-process: bad requests named by field, targets confined to their
//! directories, listing, filtering, forgetting, metrics and the event stream.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::daemon::{
    TestDaemon, migration_pair, next_event, stand_in_target, subscribe, unix_path,
};
use common::{random_data, receive_all, send_all, short_tempdir};
use migproxy::daemon::migration::State;
use migproxy::daemon::migration::view::EventKind;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

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
    let mut events = subscribe(&source, "ev").await;

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
        loop {
            let event = next_event(&mut events).await;
            assert_eq!(event.migration.as_deref(), Some("ev"), "{event:?}");
            let detail = match &event.kind {
                EventKind::State { state, .. } => state.to_string(),
                EventKind::ChannelClosed { end, .. } => format!("{end:?}").to_lowercase(),
                _ => String::new(),
            };
            seen.push(format!("{} {detail}", event.name()));
            if matches!(
                event.kind,
                EventKind::State {
                    state: State::Transferred,
                    ..
                }
            ) {
                return;
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "events so far: {seen:?}");
    assert_eq!(
        seen,
        [
            // The source settles the data path from the destination's acceptance, first.
            "data_path ",
            "state active",
            "channel_opened ",
            "channel_closed completed",
            "state transferred"
        ]
    );
    // An open event stream does not hold up the daemon's shutdown, and ends with it.
    source.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = events.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream outlived the daemon");
}
