//! Calling a daemon's API and holding each exchange to `docs/api.yaml`: the document's
//! routes, raw requests (what is sent is exactly what the test says), event streams, and an
//! [`Api`] that checks and records every exchange. For `tests/openapi.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::daemon::TestDaemon;
use super::openapi::Doc;

/// The operations an OpenAPI path item may hold.
pub const OPERATIONS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The schema keywords the document may use: those the validator checks, and annotations.
pub const KEYWORDS: [&str; 19] = [
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

/// The JSON types a schema's `type` may name.
pub const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];

impl Doc {
    /// Every (METHOD, path) the document lists.
    pub fn routes(&self) -> BTreeSet<(String, String)> {
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

    pub fn operation(&self, method: &str, path: &str) -> &Value {
        self.0["paths"]
            .get(path)
            .and_then(|item| item.get(method.to_lowercase()))
            .unwrap_or_else(|| panic!("{method} {path} is not in the document"))
    }

    /// The documented response of `method path` with `status`.
    pub fn response(&self, method: &str, path: &str, status: u16) -> &Value {
        let responses = &self.operation(method, path)["responses"];
        let response = responses
            .get(status.to_string())
            .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
        self.resolve(response)
    }

    /// The parameters of an operation, its path's and its own, resolved.
    pub fn parameters(&self, method: &str, path: &str) -> Vec<&Value> {
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
    pub fn event_schema(&self, name: &str) -> &Value {
        self.response("GET", "/v1/events", 200)["x-events"]
            .get(name)
            .unwrap_or_else(|| panic!("event `{name}` is not documented in x-events"))
    }

    /// What is wrong with the document itself; empty if nothing.
    pub fn lint(&self) -> Vec<String> {
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

    pub fn lint_parameter(
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
    pub fn reachable(&self, schema: &Value, seen: &mut BTreeSet<String>) {
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
    pub fn lint_schema(
        &self,
        schema: &Value,
        at: &str,
        complete: bool,
        problems: &mut Vec<String>,
    ) {
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
pub fn path_parameters(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// `validate` must find something wrong with `value` once `mutate`d.
pub fn must_reject(
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
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// Splits a response head into its status and lowercased headers.
pub fn parse_head(head: &str) -> (u16, BTreeMap<String, String>) {
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

pub fn request_text(method: &str, path: &str, body: Option<&Value>, close: bool) -> String {
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
pub async fn raw(api: &Path, method: &str, path: &str, body: Option<&Value>) -> Reply {
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
pub struct Events {
    pub reader: BufReader<UnixStream>,
    pub chunked: bool,
    pub pending: Vec<u8>,
}

impl Events {
    /// The next event: its name and its data, parsed.
    pub async fn next(&mut self) -> (String, Value) {
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

    pub async fn fill(&mut self) {
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
pub struct Api<'a> {
    pub doc: &'a Doc,
    /// (METHOD, path template, status) of every exchange checked.
    pub seen: BTreeSet<(String, String, u16)>,
}

impl Api<'_> {
    /// `method path` (an instance of `template`) on `daemon`; checks that the status is
    /// documented, and the body against the documented content. On success, also checks
    /// that what was asked (body, query) is documented. Returns the body (JSON, or the text).
    pub async fn call(
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
    pub fn check_request(&self, method: &str, template: &str, path: &str, body: Option<&Value>) {
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
    pub async fn subscribe(&mut self, daemon: &TestDaemon, path: &str) -> Events {
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
    pub async fn events_until(
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
