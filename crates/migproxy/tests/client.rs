//! The library's client reads the API into its typed views, and those views serialise back
//! to exactly what the daemon sent: the CLI's `--json` prints them, so nothing may be lost.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::daemon::{TestDaemon, carry, migration_pair};
use migproxy::client::{Client, ClientError};
use migproxy::daemon::migration::State;
use serde_json::Value;

/// The raw answer to `GET path`, and the typed one serialised again.
async fn both<T: serde::Serialize>(daemon: &TestDaemon, path: &str, typed: T) -> (Value, Value) {
    let (status, raw) = daemon.request("GET", path, None).await;
    assert_eq!(status, 200, "{raw}");
    (raw, serde_json::to_value(typed).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_views_read_back_as_the_daemon_wrote_them() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    carry(&source, &destination, "typed", 256 * 1024).await;
    for daemon in [&source, &destination] {
        let client = Client::new(&daemon.api);
        let snapshot = client.migration("typed").await.unwrap();
        assert_eq!(snapshot.state, State::Transferred);
        let (raw, typed) = both(daemon, "/v1/migrations/typed", &snapshot).await;
        assert_eq!(raw, typed);
        let list = migproxy::api::types::MigrationList {
            migrations: client.list(None).await.unwrap(),
        };
        let (raw, typed) = both(daemon, "/v1/migrations", &list).await;
        assert_eq!(raw, typed);
        // Filtered by a typed state, every state's wire name understood by the daemon.
        for state in State::ALL {
            let only = client.list(Some(state)).await.unwrap();
            let expected = usize::from(state == State::Transferred);
            assert_eq!(only.len(), expected, "{state:?}: {only:?}");
        }
        let info = client.info().await.unwrap();
        let (mut raw, mut typed) = both(daemon, "/v1/info", &info).await;
        // Uptime moves between the two requests.
        raw["uptime_s"] = Value::Null;
        typed["uptime_s"] = Value::Null;
        assert_eq!(raw, typed);
    }
    source.stop().await;
    destination.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_reads_back_with_who_cancelled_it() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let dir = common::short_tempdir();
    let target = format!("unix:{}", dir.path().join("qemu-in.sock").display());
    migration_pair(&source, &destination, "gone", &target).await;
    let client = Client::new(&source.api);
    client.cancel("gone").await.unwrap();
    let view = source.wait_final("gone", Duration::from_secs(5)).await;
    let snapshot = client.migration("gone").await.unwrap();
    assert_eq!(snapshot.state, State::Cancelled, "{view}");
    assert!(snapshot.cancelled_by.is_some(), "{view}");
    let (raw, typed) = both(&source, "/v1/migrations/gone", &snapshot).await;
    assert_eq!(raw, typed);
    client.forget("gone").await.unwrap();
    source.stop().await;
    destination.stop().await;
}

#[tokio::test]
async fn a_refusal_carries_the_status_and_the_daemons_words() {
    let daemon = TestDaemon::start("one").await;
    let client = Client::new(&daemon.api);
    match client.migration("nope").await {
        Err(ClientError::Api { status, error, .. }) => {
            assert_eq!(status.as_u16(), 404);
            assert_eq!(error, "no migration \"nope\"");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    daemon.stop().await;
}

/// The typed event stream: every event of a carried migration in order, each serialising
/// back to what the daemon sent; a filtered stream sees only its migration; the stream ends
/// when the daemon stops; an unreachable daemon is `Unreachable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_reads_typed_events_until_the_daemon_stops() {
    use migproxy::client::Received;
    use migproxy::daemon::migration::view::EventKind;
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let client = Client::new(&source.api);
    let mut all = client.events(None).await.unwrap();
    let mut other = client.events(Some("other")).await.unwrap();
    carry(&source, &destination, "ev", 64 * 1024).await;

    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let Some(Received::Event(event)) = all.next().await.unwrap() else {
                panic!("the stream ended or lagged early: {seen:?}");
            };
            assert_eq!(event.migration.as_deref(), Some("ev"), "{event:?}");
            assert!(event.time.is_some(), "{event:?}");
            // Typed without loss: what the CLI's --json would print is what was sent.
            let again: migproxy::daemon::migration::view::Event =
                serde_json::from_value(serde_json::to_value(&event).unwrap()).unwrap();
            assert_eq!(again, event);
            let last = matches!(
                event.kind,
                EventKind::State {
                    state: State::Transferred,
                    ..
                }
            );
            seen.push(event.name());
            if last {
                return;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "events so far: {seen:?}");
    assert_eq!(
        seen,
        [
            "data_path",
            "state",
            "channel_opened",
            "channel_closed",
            "state"
        ],
        "{seen:?}"
    );

    // The filtered stream saw none of that, and both end when the daemon stops.
    let api = source.api.clone();
    source.stop().await;
    let ends = async |events: &mut migproxy::client::Events| {
        tokio::time::timeout(Duration::from_secs(2), events.next())
            .await
            .expect("the stream outlived the daemon")
    };
    assert!(
        matches!(ends(&mut other).await, Ok(None)),
        "the filtered stream carried another migration's event"
    );
    while ends(&mut all).await.unwrap().is_some() {}
    destination.stop().await;

    let gone = Client::new(api).events(None).await;
    assert!(
        matches!(gone, Err(ClientError::Unreachable { .. })),
        "{gone:?}"
    );
}
