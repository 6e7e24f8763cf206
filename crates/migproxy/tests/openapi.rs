//! Keeps `docs/api.yaml` (OpenAPI 3.0) true to the daemon: the routes it lists are the routes
//! the router serves, and the real responses of real daemons, after a completed, a failed and
//! a cancelled migration, validate against its schemas: no documented field missing, no
//! undocumented field, no wrong type, no undocumented status or content type.
//!
//! The validator is hand-written and small: `$ref` (`#/...`), `type`, `required`,
//! `properties`, `additionalProperties` (false or a schema), `nullable`, `enum`, `items`,
//! `allOf`, `oneOf`, `minimum`, `maximum`, `minLength`, `maxLength`. The document may use no
//! other validation keyword (checked), so that it claims nothing this test does not check.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::certs::Ca;
use common::daemon::{TestDaemon, migration_pair};
use common::openapi::Doc;
use common::openapi_call::{Api, Events, must_reject, raw};
use common::short_tempdir;
use migproxy::tls::TlsHandle;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Every route `migproxy::api::router` serves. axum cannot list its routes, so this list is
/// kept by hand, and checked both ways: against the document, and against a running daemon
/// (each one served; no other method served on these paths; made-up paths not served).
const ROUTES: [(&str, &str); 8] = [
    ("GET", "/v1/info"),
    ("GET", "/metrics"),
    ("GET", "/v1/events"),
    ("POST", "/v1/migrations"),
    ("GET", "/v1/migrations"),
    ("GET", "/v1/migrations/{id}"),
    ("DELETE", "/v1/migrations/{id}"),
    ("POST", "/v1/migrations/{id}/cancel"),
];

fn unix_path(uri: &str) -> &str {
    uri.strip_prefix("unix:").unwrap()
}

#[test]
fn the_document_is_well_formed_and_lists_exactly_the_routes_served() {
    let doc = Doc::load();
    let problems = doc.lint();
    assert!(
        problems.is_empty(),
        "docs/api.yaml:\n  {}",
        problems.join("\n  ")
    );
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(doc.routes(), served, "documented routes != routes served");
}

#[test]
fn the_validator_rejects_missing_undocumented_and_mistyped_fields() {
    let doc = Doc::load();
    let error = doc.schema("Error");
    let good = json!({"error": "no migration \"x\"", "causes": []});
    assert_eq!(doc.validate(error, &good), Vec::<String>::new());
    must_reject(&doc, error, &good, "a missing field", |v| {
        v.as_object_mut().unwrap().remove("causes");
    });
    must_reject(&doc, error, &good, "an undocumented field", |v| {
        v["status"] = json!(404);
    });
    must_reject(&doc, error, &good, "a number for a string", |v| {
        v["error"] = json!(404)
    });
    must_reject(&doc, error, &good, "a string for an array", |v| {
        v["causes"] = json!("x")
    });
    must_reject(&doc, error, &good, "a mistyped item", |v| {
        v["causes"] = json!([1])
    });
    must_reject(&doc, error, &good, "a null that is not nullable", |v| {
        v["error"] = json!(null)
    });
    must_reject(&doc, error, &good, "an array for an object", |v| {
        *v = json!([v.clone()])
    });

    let counts = doc.schema("ByteCounts");
    let good = json!({"to_destination": 1, "to_source": 0});
    assert_eq!(doc.validate(counts, &good), Vec::<String>::new());
    must_reject(&doc, counts, &good, "a float for an integer", |v| {
        v["to_source"] = json!(0.5);
    });
    must_reject(&doc, counts, &good, "a negative count", |v| {
        v["to_source"] = json!(-1)
    });
    let state = doc.schema("State");
    assert!(doc.validate(state, &json!("active")).is_empty());
    assert!(!doc.validate(state, &json!("running")).is_empty());
    let created =
        &doc.response("POST", "/v1/migrations", 201)["content"]["application/json"]["schema"];
    let incoming = json!({"id": "a", "token": "0".repeat(64), "peer": "h:1", "target": "unix:/q", "state": "pending"});
    assert!(doc.validate(created, &incoming).is_empty());
    must_reject(
        &doc,
        created,
        &incoming,
        "a mix of both creation answers",
        |v| {
            v["qemu_uri"] = json!("unix:/x");
        },
    );
}

/// The document, loaded once: every [`Api`] borrows it.
static DOC: LazyLock<Doc> = LazyLock::new(Doc::load);

const CREATE: &str = "/v1/migrations";
const ONE: &str = "/v1/migrations/{id}";
const CANCEL: &str = "/v1/migrations/{id}/cancel";

/// What every test here starts from: a source and a destination daemon, and an [`Api`]
/// that checks every exchange against the document and records it.
struct Fixture {
    api: Api<'static>,
    source: TestDaemon,
    destination: TestDaemon,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture {
            api: Api {
                doc: &DOC,
                seen: BTreeSet::new(),
            },
            source: TestDaemon::start("src").await,
            destination: TestDaemon::start("dst").await,
        }
    }

    /// Stops both daemons (and `others`). An open event stream holds up a daemon's graceful
    /// shutdown: the caller drops its streams first.
    async fn stop(self, others: impl IntoIterator<Item = TestDaemon>) {
        for daemon in [self.source, self.destination].into_iter().chain(others) {
            daemon.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_migration_matches_the_document() {
    let mut f = Fixture::start().await;
    let mut ok_events = f
        .api
        .subscribe(&f.destination, "/v1/events?migration=ok")
        .await;
    complete(&mut f).await;
    events_of_one(&f.api, &mut ok_events).await;
    forget(&mut f).await;
    drop(ok_events);
    f.stop([]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_and_a_cancelled_migration_match_the_document() {
    let mut f = Fixture::start().await;
    fail(&mut f).await;
    cancel(&mut f).await;
    f.stop([]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_match_the_document() {
    let mut f = Fixture::start().await;
    refuse_outgoing(&mut f).await;
    refuse_bad_requests(&mut f).await;
    let secure = tls_at_its_limit(&mut f.api).await;
    f.stop([secure]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_events_of_every_ending_match_the_document() {
    let mut f = Fixture::start().await;
    let mut source_events = f.api.subscribe(&f.source, "/v1/events").await;
    complete(&mut f).await;
    fail(&mut f).await;
    cancel(&mut f).await;
    lists(&mut f).await;
    events_of_all(&f.api, &mut source_events).await;
    drop(source_events);
    f.stop([]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_metrics_match_the_document() {
    let mut f = Fixture::start().await;
    // A wrong token first, so that the rejections counted are there to check.
    refuse_outgoing(&mut f).await;
    let secure = tls_at_its_limit(&mut f.api).await;
    info_and_metrics(&mut f, &secure).await;
    f.stop([secure]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validator_catches_mutations_of_real_responses() {
    let mut f = Fixture::start().await;
    let completed = complete(&mut f).await;
    let failed = fail(&mut f).await;
    refuse_outgoing(&mut f).await;
    let secure = tls_at_its_limit(&mut f.api).await;
    let infos = info_and_metrics(&mut f, &secure).await;
    mutations_are_caught(&completed[0], &failed[0], &infos[1]);
    f.stop([secure]).await;
}

/// Every step above in one run: then every documented route has been served, and every
/// documented success seen and checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_and_success_is_checked() {
    let mut f = Fixture::start().await;
    let mut source_events = f.api.subscribe(&f.source, "/v1/events").await;
    let mut ok_events = f
        .api
        .subscribe(&f.destination, "/v1/events?migration=ok")
        .await;
    complete(&mut f).await;
    fail(&mut f).await;
    cancel(&mut f).await;
    refuse_outgoing(&mut f).await;
    lists(&mut f).await;
    refuse_bad_requests(&mut f).await;
    let secure = tls_at_its_limit(&mut f.api).await;
    info_and_metrics(&mut f, &secure).await;
    events_of_all(&f.api, &mut source_events).await;
    events_of_one(&f.api, &mut ok_events).await;
    forget(&mut f).await;
    every_route_and_success_was_checked(&f.api);
    drop((source_events, ok_events));
    f.stop([secure]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_undocumented_route_is_served() {
    let f = Fixture::start().await;
    // No other method is served on the documented paths, and no other path at all.
    let paths: BTreeSet<String> = DOC.routes().into_iter().map(|(_, path)| path).collect();
    for path in &paths {
        let concrete = path.replace("{id}", "c");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if DOC.routes().contains(&(method.to_owned(), path.clone())) {
                continue;
            }
            let reply = raw(&f.source.api, method, &concrete, None).await;
            assert_eq!(reply.status, 405, "{method} {concrete}: {}", reply.body);
        }
    }
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/nothing"),
        ("GET", "/v1/migrations/"),
        ("GET", "/v1/migrations/c/nothing"),
        ("POST", "/v1/migrations/c/pause"),
        ("GET", "/v2/info"),
        ("GET", "/info"),
    ] {
        let reply = raw(&f.source.api, method, path, None).await;
        assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
        assert!(reply.body.is_empty(), "{method} {path}: {}", reply.body);
    }
    f.stop([]).await;
}

/// Migration `ok`, created with every documented request field, seen mid-migration with a
/// channel running, and at its end on both hosts (`transferred`, with the optional parts of
/// the view present so that their schemas are exercised). Returns both hosts' views.
async fn complete(f: &mut Fixture) -> Vec<Value> {
    let dir = short_tempdir();
    let target = dir.path().join("qemu-in.sock");
    let qemu_in = UnixListener::bind(&target).unwrap();
    let qemu_uri = create_ok(f, &target).await;
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        got.len()
    });
    let mut qemu = UnixStream::connect(unix_path(&qemu_uri)).await.unwrap();
    qemu.write_all(b"a migration stream").await.unwrap();
    let running = channel_running(f).await;
    assert_eq!(running["state"], "active", "{running}");
    qemu.shutdown().await.unwrap();
    let mut rest = Vec::new();
    qemu.read_to_end(&mut rest).await.unwrap();
    assert_eq!(accepting.await.unwrap(), 18);
    let mut completed = Vec::new();
    for daemon in [&f.source, &f.destination] {
        let view = daemon.wait_final("ok", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        let (status, view) = f
            .api
            .call(daemon, "GET", ONE, "/v1/migrations/ok", None)
            .await;
        assert_eq!(status, 200, "{view}");
        assert!(!view["peer_view"]["done"].is_null(), "{view}");
        assert!(!view["channels"].as_array().unwrap().is_empty(), "{view}");
        assert!(
            !view["peer_view"]["channels"].as_array().unwrap().is_empty(),
            "{view}"
        );
        completed.push(view);
    }
    completed
}

/// Creates migration `ok` into `target` on both hosts with every documented request field;
/// returns where the source QEMU connects.
async fn create_ok(f: &mut Fixture, target: &std::path::Path) -> String {
    let incoming = json!({
        "direction": "incoming",
        "id": "ok",
        "target": format!("unix:{}", target.display()),
        "max_channels": 4,
        "recoverable": false,
    });
    let (status, created) = f
        .api
        .call(&f.destination, "POST", CREATE, CREATE, Some(incoming))
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(
        DOC.validate(DOC.schema("CreatedIncoming"), &created)
            .is_empty()
    );
    assert_eq!(created["state"], "pending");
    let outgoing = json!({
        "direction": "outgoing",
        "id": "ok",
        "token": created["token"],
        "peer": created["peer"],
        "recoverable": false,
    });
    let (status, started) = f
        .api
        .call(&f.source, "POST", CREATE, CREATE, Some(outgoing))
        .await;
    assert_eq!(status, 201, "{started}");
    assert!(
        DOC.validate(DOC.schema("CreatedOutgoing"), &started)
            .is_empty()
    );
    started["qemu_uri"].as_str().unwrap().to_owned()
}

/// The source's view of `ok` once its channel 0 runs.
async fn channel_running(f: &mut Fixture) -> Value {
    let Fixture { api, source, .. } = f;
    common::poll("channel 0 active", Duration::from_secs(5), async || {
        let (status, view) = api
            .call(source, "GET", ONE, "/v1/migrations/ok", None)
            .await;
        assert_eq!(status, 200, "{view}");
        if view["channels"][0]["state"] == "active" {
            Ok(view)
        } else {
            Err(view)
        }
    })
    .await
}

/// Migration `bad`, failed because the destination QEMU is missing; returns both hosts'
/// views.
async fn fail(f: &mut Fixture) -> Vec<Value> {
    let uri = migration_pair(&f.source, &f.destination, "bad", "unix:/nowhere").await;
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let _ = qemu.write_all(b"QEVM").await; // the failure may have closed it already
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), qemu.read_to_end(&mut rest)).await;
    let mut failed = Vec::new();
    for daemon in [&f.source, &f.destination] {
        let view = daemon.wait_final("bad", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let (status, view) = f
            .api
            .call(daemon, "GET", ONE, "/v1/migrations/bad", None)
            .await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["error"]["channel"], 0, "{view}");
        assert_eq!(view["error"]["errno"], "ENOENT", "{view}");
        failed.push(view);
    }
    failed
}

/// Migration `c`, cancelled twice: the second time is a conflict.
async fn cancel(f: &mut Fixture) {
    let _ = migration_pair(&f.source, &f.destination, "c", "unix:/nowhere").await;
    let (status, cancelled) = f
        .api
        .call(&f.source, "POST", CANCEL, "/v1/migrations/c/cancel", None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["cancelled_by"], "source", "{cancelled}");
    f.destination.wait_final("c", Duration::from_secs(5)).await;
    let (status, again) = f
        .api
        .call(&f.source, "POST", CANCEL, "/v1/migrations/c/cancel", None)
        .await;
    assert_eq!(status, 409, "{again}");
}

/// A pending migration with a generated id, which cannot be forgotten yet; an outgoing one
/// with a wrong token; one to a peer that is not there.
async fn refuse_outgoing(f: &mut Fixture) {
    let Fixture {
        api,
        source,
        destination,
    } = f;
    let body = json!({"direction": "incoming", "target": "unix:/x"});
    let (status, pending) = api
        .call(destination, "POST", CREATE, CREATE, Some(body))
        .await;
    assert_eq!(status, 201, "{pending}");
    let id = pending["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/migrations/{id}");
    let (status, body) = api.call(destination, "DELETE", ONE, &path, None).await;
    assert_eq!(status, 409, "{body}");
    let wrong = json!({"direction": "outgoing", "id": id, "token": "11".repeat(32),
                       "peer": destination.peer});
    let (status, body) = api.call(source, "POST", CREATE, CREATE, Some(wrong)).await;
    assert_eq!(status, 502, "{body}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap().to_string();
    drop(closed);
    let gone = json!({"direction": "outgoing", "id": "gone", "token": "11".repeat(32),
                      "peer": nobody});
    let (status, body) = api.call(source, "POST", CREATE, CREATE, Some(gone)).await;
    assert_eq!(status, 502, "{body}");
}

/// Lists, whole and filtered, and bad queries. Needs `ok`, `bad` and `c` to have ended.
async fn lists(f: &mut Fixture) {
    for daemon in [&f.source, &f.destination] {
        let (status, all) = f
            .api
            .call(daemon, "GET", CREATE, "/v1/migrations", None)
            .await;
        assert_eq!(status, 200, "{all}");
        assert!(all["migrations"].as_array().unwrap().len() >= 3, "{all}");
    }
    let filtered = "/v1/migrations?state=transferred";
    let (status, only) = f.api.call(&f.source, "GET", CREATE, filtered, None).await;
    assert_eq!(status, 200, "{only}");
    assert_eq!(only["migrations"][0]["id"], "ok", "{only}");
    for path in ["/v1/migrations?state=done", "/v1/migrations?colour=red"] {
        let (status, body) = f.api.call(&f.source, "GET", CREATE, path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    let (status, body) = f
        .api
        .call(
            &f.source,
            "GET",
            "/v1/events",
            "/v1/events?colour=red",
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

/// Unknown ids, bad bodies, a duplicate id.
async fn refuse_bad_requests(f: &mut Fixture) {
    let Fixture {
        api,
        source,
        destination,
    } = f;
    for (method, template, path) in [
        ("GET", ONE, "/v1/migrations/nope"),
        ("DELETE", ONE, "/v1/migrations/nope"),
        ("POST", CANCEL, "/v1/migrations/nope/cancel"),
    ] {
        let (status, _) = api.call(source, method, template, path, None).await;
        assert_eq!(status, 404, "{method} {path}");
    }
    for bad in [
        json!("not a request"),
        json!({"direction": "sideways"}),
        json!({"direction": "incoming", "target": "unix:/x", "colour": "red"}),
        json!({"direction": "incoming", "target": "unix:/x", "max_channels": 0}),
        json!({"direction": "incoming", "target": "unix:/x", "id": "../x"}),
        json!({"direction": "outgoing", "id": "o", "token": "11", "peer": destination.peer}),
    ] {
        let (status, body) = api
            .call(destination, "POST", CREATE, CREATE, Some(bad.clone()))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // The same id twice (each with a target of its own, so that only the id collides).
    for (expected, target) in [(201, "unix:/twice-1"), (409, "unix:/twice-2")] {
        let twice = json!({"direction": "incoming", "id": "twice", "target": target});
        let (status, body) = api
            .call(destination, "POST", CREATE, CREATE, Some(twice))
            .await;
        assert_eq!(status, expected, "{body}");
    }
}

/// A TLS daemon at its limit of migrations (one); returned for the caller to stop.
async fn tls_at_its_limit(api: &mut Api<'static>) -> TestDaemon {
    let pki = short_tempdir();
    let mut ca = Ca::new("openapi test CA");
    ca.write_host(pki.path(), &["localhost", "127.0.0.1"], "openapi-daemon");
    let tls = Arc::new(TlsHandle::load(pki.path(), Vec::new()).unwrap());
    let secure = TestDaemon::start_with("tls", move |config| {
        config.tls = Some(tls);
        config.max_migrations = 1;
    })
    .await;
    for (id, expected) in [("t1", 201), ("t2", 503)] {
        let body = json!({"direction": "incoming", "id": id, "target": "unix:/x"});
        let (status, body) = api.call(&secure, "POST", CREATE, CREATE, Some(body)).await;
        assert_eq!(status, expected, "{body}");
    }
    secure
}

/// Info of the source, the destination (with the rejections counted) and `secure`, then the
/// source's metrics. Returns the three infos.
async fn info_and_metrics(f: &mut Fixture, secure: &TestDaemon) -> Vec<Value> {
    let mut infos = Vec::new();
    for daemon in [&f.source, &f.destination, secure] {
        let (status, info) = f
            .api
            .call(daemon, "GET", "/v1/info", "/v1/info", None)
            .await;
        assert_eq!(status, 200, "{info}");
        infos.push(info);
    }
    assert!(
        infos[1]["peer_rejections"]["bad_token"].is_u64(),
        "{}",
        infos[1]
    );
    assert!(infos[2]["tls_dir"].is_string(), "{}", infos[2]);
    let (status, metrics) = f
        .api
        .call(&f.source, "GET", "/metrics", "/metrics", None)
        .await;
    assert_eq!(status, 200);
    assert!(metrics.as_str().unwrap().contains("migproxy_"), "{metrics}");
    infos
}

/// The events of `ok`, `bad` and `c` as the source saw them, each checked by the document.
async fn events_of_all(api: &Api<'static>, events: &mut Events) {
    let mut ends = BTreeMap::new();
    let events = api
        .events_until(events, |name, data| {
            if name == "state"
                && ["transferred", "failed", "cancelled"].contains(&data["state"].as_str().unwrap())
            {
                ends.insert(
                    data["migration"].as_str().unwrap().to_owned(),
                    data["state"].clone(),
                );
            }
            ends.len() == 3
        })
        .await;
    assert_eq!(
        ends,
        BTreeMap::from([
            ("bad".to_owned(), json!("failed")),
            ("c".to_owned(), json!("cancelled")),
            ("ok".to_owned(), json!("transferred")),
        ])
    );
    let names: BTreeSet<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    for name in ["state", "channel_opened", "channel_closed"] {
        assert!(names.contains(name), "no {name} event in {events:?}");
    }
    assert!(
        events
            .iter()
            .any(|(name, data)| name == "state" && data["error"].is_object()),
        "no state event with an error in {events:?}"
    );
}

/// The events of `ok` only (the stream filtered by `?migration=ok`), up to its end.
async fn events_of_one(api: &Api<'static>, events: &mut Events) {
    let filtered = api
        .events_until(events, |name, data| {
            name == "state" && data["state"] == "transferred"
        })
        .await;
    for (_, data) in &filtered {
        assert_eq!(data["migration"], "ok", "{filtered:?}");
    }
}

/// Forgetting `ok`: the migration is then unknown.
async fn forget(f: &mut Fixture) {
    let (status, _) = f
        .api
        .call(&f.source, "DELETE", ONE, "/v1/migrations/ok", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = f
        .api
        .call(&f.source, "GET", ONE, "/v1/migrations/ok", None)
        .await;
    assert_eq!(status, 404);
}

/// A named change to a real response that the validator must catch.
type Mutation = (&'static str, fn(&mut Value));

/// The validator catches a field missing, undocumented or mistyped, at any depth, in real
/// responses: a completed and a failed migration's views, and a daemon's info.
fn mutations_are_caught(completed: &Value, failed: &Value, info: &Value) {
    let doc = &*DOC;
    let migration = doc.schema("Migration");
    let mutations: [Mutation; 10] = [
        ("no bytes", |v| {
            v.as_object_mut().unwrap().remove("bytes");
        }),
        ("an extra field", |v| v["surprise"] = json!(1)),
        ("a string for an integer", |v| v["elapsed_ms"] = json!("12")),
        ("a null id", |v| v["id"] = Value::Null),
        ("an unknown state", |v| v["state"] = json!("done")),
        ("an unknown canceller", |v| {
            v["cancelled_by"] = json!("nobody")
        }),
        ("an error with an extra field", |v| {
            v["error"]["extra"] = json!(1)
        }),
        ("an error without errno", |v| {
            v["error"].as_object_mut().unwrap().remove("errno");
        }),
        ("a string channel", |v| v["error"]["channel"] = json!("0")),
        ("a string timestamp", |v| {
            v["timestamps"]["created"] = json!("now")
        }),
    ];
    for (what, mutate) in mutations {
        must_reject(doc, migration, failed, what, mutate);
    }
    let mutations: [Mutation; 3] = [
        ("a channel in an unknown state", |v| {
            v["channels"][0]["state"] = json!("idle")
        }),
        ("a peer total without bytes", |v| {
            v["peer_view"]["done"]
                .as_object_mut()
                .unwrap()
                .remove("bytes");
        }),
        ("a fractional byte count", |v| {
            v["bytes"]["to_destination"] = json!(1.5)
        }),
    ];
    for (what, mutate) in mutations {
        must_reject(doc, migration, completed, what, mutate);
    }
    let schema = doc.schema("Info");
    let mutations: [Mutation; 4] = [
        ("no peer_rejections", |v| {
            v.as_object_mut().unwrap().remove("peer_rejections");
        }),
        ("a string rejection count", |v| {
            v["peer_rejections"]["bad_token"] = json!("3")
        }),
        ("an extra limit", |v| v["limits"]["extra"] = json!(1)),
        ("a numeric tls_dir", |v| v["tls_dir"] = json!(5)),
    ];
    for (what, mutate) in mutations {
        must_reject(doc, schema, info, what, mutate);
    }
}

/// Every documented route was served (a success, not the router's 404 or 405), and every
/// documented success was seen and checked.
fn every_route_and_success_was_checked(api: &Api<'static>) {
    for (method, path) in ROUTES {
        assert!(
            api.seen
                .iter()
                .any(|(m, p, status)| m == method && p == path && (200..300).contains(status)),
            "{method} {path} never succeeded: {:?}",
            api.seen
        );
    }
    for (method, path) in DOC.routes() {
        let responses = DOC.operation(&method, &path)["responses"]
            .as_object()
            .unwrap();
        for status in responses.keys().filter(|s| s.starts_with('2')) {
            let status: u16 = status.parse().unwrap();
            assert!(
                api.seen.contains(&(method.clone(), path.clone(), status)),
                "{method} {path} -> {status} is documented but was never checked"
            );
        }
    }
}
