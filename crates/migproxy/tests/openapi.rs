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
use std::sync::Arc;
use std::time::Duration;

use common::certs::Ca;
use common::daemon::{TestDaemon, migration_pair};
use common::openapi::Doc;
use common::openapi_call::{Api, must_reject, raw};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_responses_match_the_document() {
    let doc = Doc::load();
    let mut api = Api {
        doc: &doc,
        seen: BTreeSet::new(),
    };
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let mut source_events = api.subscribe(&source, "/v1/events").await;
    let mut ok_events = api.subscribe(&destination, "/v1/events?migration=ok").await;
    const CREATE: &str = "/v1/migrations";
    const ONE: &str = "/v1/migrations/{id}";
    const CANCEL: &str = "/v1/migrations/{id}/cancel";

    // A completed migration, created with every documented request field.
    let dir = short_tempdir();
    let target = dir.path().join("qemu-in.sock");
    let qemu_in = UnixListener::bind(&target).unwrap();
    let incoming = json!({
        "direction": "incoming",
        "id": "ok",
        "target": format!("unix:{}", target.display()),
        "max_channels": 4,
        "recoverable": false,
    });
    let (status, created) = api
        .call(&destination, "POST", CREATE, CREATE, Some(incoming))
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(
        doc.validate(doc.schema("CreatedIncoming"), &created)
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
    let (status, started) = api
        .call(&source, "POST", CREATE, CREATE, Some(outgoing))
        .await;
    assert_eq!(status, 201, "{started}");
    assert!(
        doc.validate(doc.schema("CreatedOutgoing"), &started)
            .is_empty()
    );
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = qemu_in.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        got.len()
    });
    let mut qemu = UnixStream::connect(unix_path(started["qemu_uri"].as_str().unwrap()))
        .await
        .unwrap();
    qemu.write_all(b"a migration stream").await.unwrap();
    // Mid-migration, with a channel running.
    let running = common::poll("channel 0 active", Duration::from_secs(5), async || {
        let (status, view) = api
            .call(&source, "GET", ONE, "/v1/migrations/ok", None)
            .await;
        assert_eq!(status, 200, "{view}");
        if view["channels"][0]["state"] == "active" {
            Ok(view)
        } else {
            Err(view)
        }
    })
    .await;
    assert_eq!(running["state"], "active", "{running}");
    qemu.shutdown().await.unwrap();
    let mut rest = Vec::new();
    qemu.read_to_end(&mut rest).await.unwrap();
    assert_eq!(accepting.await.unwrap(), 18);
    let mut completed = Vec::new();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("ok", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        let (status, view) = api
            .call(daemon, "GET", ONE, "/v1/migrations/ok", None)
            .await;
        assert_eq!(status, 200, "{view}");
        // The optional parts are there, so their schemas are exercised.
        assert!(!view["peer_view"]["done"].is_null(), "{view}");
        assert!(!view["channels"].as_array().unwrap().is_empty(), "{view}");
        assert!(
            !view["peer_view"]["channels"].as_array().unwrap().is_empty(),
            "{view}"
        );
        completed.push(view);
    }

    // A failed one: the destination QEMU is missing.
    let uri = migration_pair(&source, &destination, "bad", "unix:/nowhere").await;
    let mut qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let _ = qemu.write_all(b"QEVM").await; // the failure may have closed it already
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), qemu.read_to_end(&mut rest)).await;
    let mut failed = Vec::new();
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("bad", Duration::from_secs(5)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let (status, view) = api
            .call(daemon, "GET", ONE, "/v1/migrations/bad", None)
            .await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["error"]["channel"], 0, "{view}");
        assert_eq!(view["error"]["errno"], "ENOENT", "{view}");
        failed.push(view);
    }

    // A cancelled one, cancelled twice.
    let _ = migration_pair(&source, &destination, "c", "unix:/nowhere").await;
    let (status, cancelled) = api
        .call(&source, "POST", CANCEL, "/v1/migrations/c/cancel", None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["cancelled_by"], "source", "{cancelled}");
    destination.wait_final("c", Duration::from_secs(5)).await;
    let (status, again) = api
        .call(&source, "POST", CANCEL, "/v1/migrations/c/cancel", None)
        .await;
    assert_eq!(status, 409, "{again}");

    // A pending one with a generated id, which cannot be forgotten yet, and a wrong token.
    let (status, pending) = api
        .call(
            &destination,
            "POST",
            CREATE,
            CREATE,
            Some(json!({"direction": "incoming", "target": "unix:/x"})),
        )
        .await;
    assert_eq!(status, 201, "{pending}");
    let id = pending["id"].as_str().unwrap().to_owned();
    let (status, body) = api
        .call(
            &destination,
            "DELETE",
            ONE,
            &format!("/v1/migrations/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let wrong = json!({"direction": "outgoing", "id": id, "token": "11".repeat(32),
                       "peer": destination.peer});
    let (status, body) = api.call(&source, "POST", CREATE, CREATE, Some(wrong)).await;
    assert_eq!(status, 502, "{body}");
    // A peer that is not there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap().to_string();
    drop(closed);
    let gone = json!({"direction": "outgoing", "id": "gone", "token": "11".repeat(32),
                      "peer": nobody});
    let (status, body) = api.call(&source, "POST", CREATE, CREATE, Some(gone)).await;
    assert_eq!(status, 502, "{body}");

    // Lists, whole and filtered, and bad queries.
    for daemon in [&source, &destination] {
        let (status, all) = api
            .call(daemon, "GET", CREATE, "/v1/migrations", None)
            .await;
        assert_eq!(status, 200, "{all}");
        assert!(all["migrations"].as_array().unwrap().len() >= 3, "{all}");
    }
    let (status, only) = api
        .call(
            &source,
            "GET",
            CREATE,
            "/v1/migrations?state=transferred",
            None,
        )
        .await;
    assert_eq!(status, 200, "{only}");
    assert_eq!(only["migrations"][0]["id"], "ok", "{only}");
    for path in ["/v1/migrations?state=done", "/v1/migrations?colour=red"] {
        let (status, body) = api.call(&source, "GET", CREATE, path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    let (status, body) = api
        .call(&source, "GET", "/v1/events", "/v1/events?colour=red", None)
        .await;
    assert_eq!(status, 400, "{body}");

    // Unknown ids, bad bodies, a duplicate id.
    let (status, _) = api
        .call(&source, "GET", ONE, "/v1/migrations/nope", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = api
        .call(&source, "DELETE", ONE, "/v1/migrations/nope", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = api
        .call(&source, "POST", CANCEL, "/v1/migrations/nope/cancel", None)
        .await;
    assert_eq!(status, 404);
    for bad in [
        json!("not a request"),
        json!({"direction": "sideways"}),
        json!({"direction": "incoming", "target": "unix:/x", "colour": "red"}),
        json!({"direction": "incoming", "target": "unix:/x", "max_channels": 0}),
        json!({"direction": "incoming", "target": "unix:/x", "id": "../x"}),
        json!({"direction": "outgoing", "id": "o", "token": "11", "peer": destination.peer}),
    ] {
        let (status, body) = api
            .call(&destination, "POST", CREATE, CREATE, Some(bad.clone()))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let duplicate = json!({"direction": "incoming", "id": "ok", "target": "unix:/x"});
    let (status, body) = api
        .call(&destination, "POST", CREATE, CREATE, Some(duplicate))
        .await;
    assert_eq!(status, 409, "{body}");

    // A TLS daemon at its limit of migrations.
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

    // Info, plaintext and TLS, with rejections counted.
    let mut infos = Vec::new();
    for daemon in [&source, &destination, &secure] {
        let (status, info) = api.call(daemon, "GET", "/v1/info", "/v1/info", None).await;
        assert_eq!(status, 200, "{info}");
        infos.push(info);
    }
    assert!(
        infos[1]["peer_rejections"]["bad_token"].is_u64(),
        "{}",
        infos[1]
    );
    assert!(infos[2]["tls_dir"].is_string(), "{}", infos[2]);

    let (status, metrics) = api.call(&source, "GET", "/metrics", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(metrics.as_str().unwrap().contains("migproxy_"), "{metrics}");

    // The events of all three, as the source saw them, and those of one, filtered.
    let mut ends = BTreeMap::new();
    let events = api
        .events_until(&mut source_events, |name, data| {
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
    let filtered = api
        .events_until(&mut ok_events, |name, data| {
            name == "state" && data["state"] == "transferred"
        })
        .await;
    for (_, data) in &filtered {
        assert_eq!(data["migration"], "ok", "{filtered:?}");
    }

    // The validator catches a field missing, undocumented or mistyped, at any depth, in
    // these real responses.
    let migration = doc.schema("Migration");
    let view = &failed[0];
    must_reject(&doc, migration, view, "no bytes", |v| {
        v.as_object_mut().unwrap().remove("bytes");
    });
    must_reject(&doc, migration, view, "an extra field", |v| {
        v["surprise"] = json!(1)
    });
    must_reject(&doc, migration, view, "a string for an integer", |v| {
        v["elapsed_ms"] = json!("12");
    });
    must_reject(&doc, migration, view, "a null id", |v| {
        v["id"] = Value::Null
    });
    must_reject(&doc, migration, view, "an unknown state", |v| {
        v["state"] = json!("done")
    });
    must_reject(&doc, migration, view, "an unknown canceller", |v| {
        v["cancelled_by"] = json!("nobody");
    });
    must_reject(&doc, migration, view, "an error with an extra field", |v| {
        v["error"]["extra"] = json!(1);
    });
    must_reject(&doc, migration, view, "an error without errno", |v| {
        v["error"].as_object_mut().unwrap().remove("errno");
    });
    must_reject(&doc, migration, view, "a string channel", |v| {
        v["error"]["channel"] = json!("0");
    });
    must_reject(&doc, migration, view, "a string timestamp", |v| {
        v["timestamps"]["created"] = json!("now");
    });
    let view = &completed[0];
    must_reject(
        &doc,
        migration,
        view,
        "a channel in an unknown state",
        |v| {
            v["channels"][0]["state"] = json!("idle");
        },
    );
    must_reject(&doc, migration, view, "a peer total without bytes", |v| {
        v["peer_view"]["done"]
            .as_object_mut()
            .unwrap()
            .remove("bytes");
    });
    must_reject(&doc, migration, view, "a fractional byte count", |v| {
        v["bytes"]["to_destination"] = json!(1.5);
    });
    let info = doc.schema("Info");
    let view = &infos[1];
    must_reject(&doc, info, view, "no peer_rejections", |v| {
        v.as_object_mut().unwrap().remove("peer_rejections");
    });
    must_reject(&doc, info, view, "a string rejection count", |v| {
        v["peer_rejections"]["bad_token"] = json!("3");
    });
    must_reject(&doc, info, view, "an extra limit", |v| {
        v["limits"]["extra"] = json!(1)
    });
    must_reject(&doc, info, view, "a numeric tls_dir", |v| {
        v["tls_dir"] = json!(5)
    });

    // Forgetting, last: the migration is then unknown.
    let (status, _) = api
        .call(&source, "DELETE", ONE, "/v1/migrations/ok", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = api
        .call(&source, "GET", ONE, "/v1/migrations/ok", None)
        .await;
    assert_eq!(status, 404);

    // Every documented route was served (a success, not the router's 404 or 405), and every
    // documented success was seen and checked.
    for (method, path) in ROUTES {
        assert!(
            api.seen
                .iter()
                .any(|(m, p, status)| m == method && p == path && (200..300).contains(status)),
            "{method} {path} never succeeded: {:?}",
            api.seen
        );
    }
    for (method, path) in doc.routes() {
        let responses = doc.operation(&method, &path)["responses"]
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
    // No other method is served on the documented paths, and no other path at all.
    let paths: BTreeSet<String> = doc.routes().into_iter().map(|(_, path)| path).collect();
    for path in &paths {
        let concrete = path.replace("{id}", "c");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if doc.routes().contains(&(method.to_owned(), path.clone())) {
                continue;
            }
            let reply = raw(&source.api, method, &concrete, None).await;
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
        let reply = raw(&source.api, method, path, None).await;
        assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
        assert!(reply.body.is_empty(), "{method} {path}: {}", reply.body);
    }

    // An open event stream holds up the daemon's graceful shutdown: close them first.
    drop((source_events, ok_events));
    for daemon in [source, destination, secure] {
        daemon.stop().await;
    }
}
