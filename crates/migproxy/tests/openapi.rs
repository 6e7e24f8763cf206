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
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::certs::Ca;
use common::daemon::{TestDaemon, migration_pair};
use common::openapi::Doc;
use common::short_tempdir;
use migproxy::tls::TlsHandle;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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

/// The operations an OpenAPI path item may hold.
const OPERATIONS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The schema keywords the document may use: those the validator checks, and annotations.
const KEYWORDS: [&str; 19] = [
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "nullable",
    "enum",
    "items",
    "allOf",
    "oneOf",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    // Annotations only.
    "discriminator",
    "description",
    "example",
    "default",
    "title",
];

const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];

impl Doc {
    /// Every (METHOD, path) the document lists.
    fn routes(&self) -> BTreeSet<(String, String)> {
        let paths = self.0["paths"].as_object().expect("`paths` is a map");
        let mut routes = BTreeSet::new();
        for (path, item) in paths {
            for method in OPERATIONS {
                if item.get(method).is_some() {
                    routes.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        routes
    }

    fn operation(&self, method: &str, path: &str) -> &Value {
        self.0["paths"]
            .get(path)
            .and_then(|item| item.get(method.to_lowercase()))
            .unwrap_or_else(|| panic!("{method} {path} is not in the document"))
    }

    /// The documented response of `method path` with `status`.
    fn response(&self, method: &str, path: &str, status: u16) -> &Value {
        let responses = &self.operation(method, path)["responses"];
        let response = responses
            .get(status.to_string())
            .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
        self.resolve(response)
    }

    /// The parameters of an operation, its path's and its own, resolved.
    fn parameters(&self, method: &str, path: &str) -> Vec<&Value> {
        let item = &self.0["paths"][path];
        let own = &self.operation(method, path)["parameters"];
        [&item["parameters"], own]
            .into_iter()
            .filter_map(Value::as_array)
            .flatten()
            .map(|p| self.resolve(p))
            .collect()
    }

    /// The schema of the data of SSE events named `name`.
    fn event_schema(&self, name: &str) -> &Value {
        self.response("GET", "/v1/events", 200)["x-events"]
            .get(name)
            .unwrap_or_else(|| panic!("event `{name}` is not documented in x-events"))
    }

    /// What is wrong with the document itself; empty if nothing.
    fn lint(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let version = self.0["openapi"].as_str().unwrap_or_default();
        if !version.starts_with("3.0.") {
            problems.push(format!("openapi: {version:?}, expected 3.0.x"));
        }
        // Schemas reachable from a response describe what serde writes: every field, always.
        let mut in_responses = BTreeSet::new();
        let mut in_requests = BTreeSet::new();
        for (path, item) in self.0["paths"].as_object().into_iter().flatten() {
            for parameter in item["parameters"].as_array().into_iter().flatten() {
                self.lint_parameter(parameter, path, &mut in_requests, &mut problems);
            }
            for method in OPERATIONS {
                let Some(operation) = item.get(method) else {
                    continue;
                };
                let at = format!("{} {path}", method.to_uppercase());
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    self.lint_parameter(parameter, &at, &mut in_requests, &mut problems);
                }
                for name in path_parameters(path) {
                    let declared = self
                        .parameters(&method.to_uppercase(), path)
                        .iter()
                        .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true);
                    if !declared {
                        problems.push(format!("{at}: path parameter `{name}` not declared"));
                    }
                }
                for (media, content) in operation["requestBody"]["content"]
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    let at = format!("{at} request {media}");
                    self.lint_schema(&content["schema"], &at, false, &mut problems);
                    self.reachable(&content["schema"], &mut in_requests);
                }
                let responses = operation["responses"].as_object();
                if responses.is_none_or(|r| r.is_empty()) {
                    problems.push(format!("{at}: no responses"));
                }
                for (status, response) in responses.into_iter().flatten() {
                    let at = format!("{at} {status}");
                    if let Some(reference) = response.get("$ref").and_then(Value::as_str)
                        && self.target(reference).is_none()
                    {
                        problems.push(format!("{at}: unresolved $ref {reference}"));
                        continue;
                    }
                    let response = self.resolve(response);
                    if !response["description"].is_string() {
                        problems.push(format!("{at}: no description"));
                    }
                    for (media, content) in response["content"].as_object().into_iter().flatten() {
                        let at = format!("{at} {media}");
                        self.lint_schema(&content["schema"], &at, true, &mut problems);
                        self.reachable(&content["schema"], &mut in_responses);
                    }
                    for (name, schema) in response["x-events"].as_object().into_iter().flatten() {
                        let at = format!("{at} event {name}");
                        self.lint_schema(schema, &at, true, &mut problems);
                        self.reachable(schema, &mut in_responses);
                    }
                }
            }
        }
        for (name, schema) in self.0["components"]["schemas"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let reference = format!("#/components/schemas/{name}");
            if !in_responses.contains(&reference) && !in_requests.contains(&reference) {
                problems.push(format!("schema {name} is used nowhere"));
            }
            let complete = in_responses.contains(&reference);
            self.lint_schema(schema, &format!("schema {name}"), complete, &mut problems);
        }
        problems
    }

    fn lint_parameter(
        &self,
        parameter: &Value,
        at: &str,
        used: &mut BTreeSet<String>,
        problems: &mut Vec<String>,
    ) {
        let parameter = self.resolve(parameter);
        let at = format!("{at} parameter {}", parameter["name"]);
        if !["path", "query"].contains(&parameter["in"].as_str().unwrap_or_default()) {
            problems.push(format!("{at}: `in` must be path or query"));
        }
        self.lint_schema(&parameter["schema"], &at, false, problems);
        self.reachable(&parameter["schema"], used);
    }

    /// Adds every schema `$ref` reachable from `schema` to `seen`.
    fn reachable(&self, schema: &Value, seen: &mut BTreeSet<String>) {
        match schema {
            Value::Object(map) => {
                if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                    if seen.insert(reference.to_owned())
                        && let Some(target) = self.target(reference)
                    {
                        self.reachable(target, seen);
                    }
                    return;
                }
                for value in map.values() {
                    self.reachable(value, seen);
                }
            }
            Value::Array(values) => {
                for value in values {
                    self.reachable(value, seen);
                }
            }
            _ => {}
        }
    }

    /// Checks one schema (and those inline in it). `complete`: it describes a response, so
    /// every property must be required (serde writes every field, `null` for a `None`).
    fn lint_schema(&self, schema: &Value, at: &str, complete: bool, problems: &mut Vec<String>) {
        let Some(map) = schema.as_object() else {
            problems.push(format!("{at}: not a schema: {schema}"));
            return;
        };
        if let Some(reference) = map.get("$ref") {
            match reference.as_str().map(|r| (r, self.target(r))) {
                Some((_, Some(_))) if map.len() == 1 => {}
                Some((_, Some(_))) => problems.push(format!(
                    "{at}: $ref with siblings (OpenAPI 3.0 ignores them; use allOf)"
                )),
                _ => problems.push(format!("{at}: unresolved $ref {reference}")),
            }
            return;
        }
        for keyword in map.keys() {
            if !KEYWORDS.contains(&keyword.as_str()) && !keyword.starts_with("x-") {
                problems.push(format!(
                    "{at}: keyword `{keyword}` is not checked by this test"
                ));
            }
        }
        let kind = map.get("type").and_then(Value::as_str);
        match kind {
            Some(kind) if !TYPES.contains(&kind) => {
                problems.push(format!("{at}: unknown type `{kind}`"));
            }
            None if !map.contains_key("allOf") && !map.contains_key("oneOf") => {
                problems.push(format!("{at}: no type"));
            }
            _ => {}
        }
        if let Some(values) = map.get("enum").and_then(Value::as_array)
            && map.get("nullable") == Some(&Value::Bool(true))
            && !values.contains(&Value::Null)
        {
            problems.push(format!("{at}: nullable enum without null in it"));
        }
        if kind == Some("array") && !map.contains_key("items") {
            problems.push(format!("{at}: array without items"));
        }
        if kind == Some("object") {
            let properties = map.get("properties").and_then(Value::as_object);
            match map.get("additionalProperties") {
                Some(Value::Bool(false)) => {}
                Some(extra @ Value::Object(_)) => {
                    self.lint_schema(extra, &format!("{at}.*"), complete, problems);
                }
                _ => problems.push(format!(
                    "{at}: object without `additionalProperties: false` (or a schema)"
                )),
            }
            let required: BTreeSet<&str> = map
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let documented: BTreeSet<&str> = properties
                .into_iter()
                .flatten()
                .map(|(name, _)| name.as_str())
                .collect();
            for name in required.difference(&documented) {
                problems.push(format!("{at}: `{name}` is required but not a property"));
            }
            if complete {
                for name in documented.difference(&required) {
                    problems.push(format!(
                        "{at}: `{name}` is always in the response: list it in `required`"
                    ));
                }
            }
            for (name, property) in properties.into_iter().flatten() {
                self.lint_schema(property, &format!("{at}.{name}"), complete, problems);
            }
        }
        if let Some(items) = map.get("items") {
            self.lint_schema(items, &format!("{at}[]"), complete, problems);
        }
        for keyword in ["allOf", "oneOf"] {
            for (i, part) in map
                .get(keyword)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                self.lint_schema(part, &format!("{at} {keyword}[{i}]"), complete, problems);
            }
        }
    }
}

/// The `{name}`s in a path template.
fn path_parameters(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// `validate` must find something wrong with `value` once `mutate`d.
fn must_reject(
    doc: &Doc,
    schema: &Value,
    value: &Value,
    what: &str,
    mutate: impl FnOnce(&mut Value),
) {
    let mut changed = value.clone();
    mutate(&mut changed);
    assert_ne!(&changed, value, "{what}: the mutation changed nothing");
    assert!(
        !doc.validate(schema, &changed).is_empty(),
        "the validator accepted {what}: {changed:#}"
    );
}

/// One HTTP response, read whole.
struct Reply {
    status: u16,
    content_type: Option<String>,
    body: String,
}

/// Splits a response head into its status and lowercased headers.
fn parse_head(head: &str) -> (u16, BTreeMap<String, String>) {
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers)
}

fn request_text(method: &str, path: &str, body: Option<&Value>, close: bool) -> String {
    let body = body.map(Value::to_string).unwrap_or_default();
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: migproxy\r\n{connection}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One request over the API socket, with the response's content type (which the helpers
/// in `common` do not return).
async fn raw(api: &Path, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let mut stream = UnixStream::connect(api).await.unwrap();
    stream
        .write_all(request_text(method, path, body, true).as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no complete response in 10 s"))
        .unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = parse_head(head);
    assert!(
        !headers.contains_key("transfer-encoding"),
        "{method} {path}: unexpected {head}"
    );
    Reply {
        status,
        content_type: headers.get("content-type").cloned(),
        body: body.to_owned(),
    }
}

/// A server-sent event stream being read.
struct Events {
    reader: BufReader<UnixStream>,
    chunked: bool,
    pending: Vec<u8>,
}

impl Events {
    /// The next event: its name and its data, parsed.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap();
                let mut name = "message".to_owned();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.strip_prefix(' ').unwrap_or(value).to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = data.join("\n");
                let value = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event {name}: data is not JSON ({e}): {data}"));
                return (name, value);
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        if self.chunked {
            let mut size = String::new();
            self.reader.read_line(&mut size).await.unwrap();
            let size = size.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("chunk {size:?}"));
            assert!(size > 0, "the event stream ended");
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await.unwrap();
            self.pending.extend_from_slice(&chunk[..size]);
        } else {
            let mut buf = [0u8; 4096];
            let n = self.reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "the event stream ended");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// Calls the API of running daemons and checks every exchange against the document.
struct Api<'a> {
    doc: &'a Doc,
    /// (METHOD, path template, status) of every exchange checked.
    seen: BTreeSet<(String, String, u16)>,
}

impl Api<'_> {
    /// `method path` (an instance of `template`) on `daemon`; checks that the status is
    /// documented, and the body against the documented content. On success, also checks
    /// that what was asked (body, query) is documented. Returns the body (JSON, or the text).
    async fn call(
        &mut self,
        daemon: &TestDaemon,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let reply = raw(&daemon.api, method, path, body.as_ref()).await;
        let what = format!("{method} {path} -> {}", reply.status);
        self.seen
            .insert((method.to_owned(), template.to_owned(), reply.status));
        let response = self.doc.response(method, template, reply.status);
        if (200..300).contains(&reply.status) {
            self.check_request(method, template, path, body.as_ref());
        }
        let value = match response.get("content").and_then(Value::as_object) {
            None => {
                assert!(
                    reply.body.is_empty(),
                    "{what}: documented without a body: {}",
                    reply.body
                );
                Value::Null
            }
            Some(content) => {
                let content_type = reply.content_type.as_deref().unwrap_or_default();
                let media = content_type.split(';').next().unwrap_or_default().trim();
                let documented = content.get(media).unwrap_or_else(|| {
                    panic!("{what}: content type {content_type:?} is not documented")
                });
                if media == "application/json" {
                    let value: Value = serde_json::from_str(&reply.body)
                        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", reply.body));
                    let errors = self.doc.validate(&documented["schema"], &value);
                    assert!(
                        errors.is_empty(),
                        "{what} does not match docs/api.yaml:\n  {}\n{value:#}",
                        errors.join("\n  ")
                    );
                    value
                } else {
                    assert_eq!(documented["schema"]["type"], "string", "{what}");
                    Value::String(reply.body)
                }
            }
        };
        (reply.status, value)
    }

    /// What a successful request sent must be documented: its query parameters (and their
    /// values) and its body.
    fn check_request(&self, method: &str, template: &str, path: &str, body: Option<&Value>) {
        let parameters = self.doc.parameters(method, template);
        let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let parameter = parameters
                .iter()
                .find(|p| p["in"] == "query" && p["name"] == name)
                .unwrap_or_else(|| panic!("{method} {path}: query `{name}` is not documented"));
            let errors = self.doc.validate(&parameter["schema"], &json!(value));
            assert!(errors.is_empty(), "{method} {path}: {errors:?}");
        }
        let documented = &self.doc.operation(method, template)["requestBody"];
        match body {
            Some(body) => {
                let schema = &documented["content"]["application/json"]["schema"];
                assert!(
                    !schema.is_null(),
                    "{method} {template}: no request body documented"
                );
                let errors = self.doc.validate(schema, body);
                assert!(
                    errors.is_empty(),
                    "{method} {path}: the request does not match docs/api.yaml:\n  {}\n{body:#}",
                    errors.join("\n  ")
                );
            }
            None => assert!(
                documented["required"] != true,
                "{method} {template}: a body is documented as required"
            ),
        }
    }

    /// Subscribes to `path` (an instance of `/v1/events`) on `daemon`.
    async fn subscribe(&mut self, daemon: &TestDaemon, path: &str) -> Events {
        let mut stream = UnixStream::connect(&daemon.api).await.unwrap();
        stream
            .write_all(request_text("GET", path, None, false).as_bytes())
            .await
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let (status, headers) = parse_head(&head);
        self.seen
            .insert(("GET".to_owned(), "/v1/events".to_owned(), status));
        assert_eq!(status, 200, "GET {path}: {head}");
        self.check_request("GET", "/v1/events", path, None);
        let response = self.doc.response("GET", "/v1/events", status);
        let content_type = headers.get("content-type").cloned().unwrap_or_default();
        let media = content_type.split(';').next().unwrap_or_default().trim();
        assert!(
            response["content"].get(media).is_some(),
            "GET {path}: content type {content_type:?} is not documented"
        );
        Events {
            reader,
            chunked: headers
                .get("transfer-encoding")
                .is_some_and(|t| t.contains("chunked")),
            pending: Vec::new(),
        }
    }

    /// Reads events until `done` says so, checking each against the document.
    async fn events_until(
        &self,
        events: &mut Events,
        mut done: impl FnMut(&str, &Value) -> bool,
    ) -> Vec<(String, Value)> {
        let mut seen = Vec::new();
        let reading = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let (name, data) = events.next().await;
                let errors = self.doc.validate(self.doc.event_schema(&name), &data);
                assert!(
                    errors.is_empty(),
                    "event {name} does not match docs/api.yaml:\n  {}\n{data:#}",
                    errors.join("\n  ")
                );
                let finished = done(&name, &data);
                seen.push((name, data));
                if finished {
                    return;
                }
            }
        })
        .await;
        assert!(reading.is_ok(), "events so far: {seen:?}");
        seen
    }
}

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
