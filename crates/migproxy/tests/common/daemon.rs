//! Daemons in-process on loopback, and requests to their unix-socket API through the
//! library's client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migproxy::client::{Client, Received};
use migproxy::daemon::migration::view::Event;
use migproxy::daemon::{Config, Daemon};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestDaemon {
    pub daemon: Arc<Daemon>,
    pub api: PathBuf,
    pub peer: String,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The in-process daemons' log (info and up, or `MIGPROXY_TEST_LOG`), captured with the
/// test's output: shown when a test fails, so that a failure seen once in CI says what the
/// daemons did.
fn log_to_the_test() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIGPROXY_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("migproxy=info"));
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(filter)
        .try_init();
}

impl TestDaemon {
    pub async fn start(name: &str) -> TestDaemon {
        Self::start_with(name, |_| {}).await
    }

    pub async fn start_with(name: &str, tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        log_to_the_test();
        let dir = tempfile::Builder::new()
            .prefix(&format!("mpd-{name}-"))
            .tempdir_in("/tmp")
            .unwrap();
        let api = dir.path().join("api.sock");
        let api_listener = UnixListener::bind(&api).unwrap();
        let peers = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = peers.local_addr().unwrap().to_string();
        let mut config = Config::new(peer.clone(), dir.path().join("run"));
        std::fs::create_dir(&config.runtime_dir).unwrap();
        tweak(&mut config);
        let daemon = Daemon::new(config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(migproxy::server::run(
            Arc::clone(&daemon),
            api_listener,
            peers,
            shutdown.clone(),
        ));
        TestDaemon {
            daemon,
            api,
            peer,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        http(&self.api, method, path, body).await
    }

    pub async fn show(&self, id: &str) -> Value {
        let (status, body) = self
            .request("GET", &format!("/v1/migrations/{id}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls the migration's view until `ready` says so; returns that view.
    pub async fn wait_for(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        super::poll(what, limit, async || {
            let view = self.show(id).await;
            if ready(&view) { Ok(view) } else { Err(view) }
        })
        .await
    }

    /// Polls until the migration is in `state`; returns the view.
    pub async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Value {
        self.wait_for(id, state, limit, |view| view["state"] == state)
            .await
    }

    /// Polls until the migration has paused (the pause recorded, not yet recovered): it may
    /// read `paused`, or `active` again already, the source's control link back (it is
    /// dialled at once) and QEMU's recovery still to come. The pause is `pauses`' last.
    pub async fn wait_paused(&self, id: &str, limit: Duration) -> Value {
        self.wait_for(id, "paused", limit, |view| {
            let open = view["recoveries"].as_array().and_then(|r| r.last());
            open.is_some_and(|r| r["frozen_ms"].is_null())
        })
        .await
    }

    /// Polls until the migration's state is final; returns the last view.
    pub async fn wait_final(&self, id: &str, limit: Duration) -> Value {
        self.wait_for(id, "ended", limit, super::is_final).await
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("daemon did not stop")
                .unwrap();
        }
    }
}

/// Creates an incoming migration on `destination` and the matching outgoing one on `source`;
/// returns the id and the URI for the source QEMU.
pub async fn migration_pair(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    target: &str,
) -> String {
    migration_pair_with(source, destination, id, target, false).await
}

/// As [`migration_pair`], optionally recoverable (postcopy recovery) on both sides.
pub async fn migration_pair_with(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    target: &str,
    recoverable: bool,
) -> String {
    migration_pair_asking(source, destination, (id, target), recoverable, json!({})).await
}

/// As [`migration_pair_with`], the source's request also carrying the fields of `source_asks`
/// (e.g. its own `recover_timeout`).
pub async fn migration_pair_asking(
    source: &TestDaemon,
    destination: &TestDaemon,
    (id, target): (&str, &str),
    recoverable: bool,
    source_asks: Value,
) -> String {
    let (status, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": id, "target": target,
                        "recoverable": recoverable})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let (status, outgoing) = source
        .request(
            "POST",
            "/v1/migrations",
            Some({
                let mut body = json!({
                    "direction": "outgoing",
                    "id": id,
                    "token": incoming["token"],
                    "peer": incoming["peer"],
                    "recoverable": recoverable,
                });
                if let (Some(body), Some(asks)) = (body.as_object_mut(), source_asks.as_object()) {
                    body.extend(asks.clone());
                }
                body
            }),
        )
        .await;
    assert_eq!(status, 201, "{outgoing}");
    outgoing["qemu_uri"].as_str().unwrap().to_owned()
}

/// Carries `bytes` of pseudo-random data through a fresh migration `id` between the two
/// daemons, from a source QEMU stand-in to a destination one (real unix sockets), checks
/// the digest, and that both daemons call the migration completed.
pub async fn carry(source: &TestDaemon, destination: &TestDaemon, id: &str, bytes: usize) {
    let dir = super::short_tempdir();
    let target = dir.path().join("qemu-in.sock");
    let qemu_in = UnixListener::bind(&target).unwrap();
    let uri = migration_pair(
        source,
        destination,
        id,
        &format!("unix:{}", target.display()),
    )
    .await;
    let data = super::random_data(bytes as u64, bytes);
    let receiver = tokio::spawn(async move {
        let (stream, _) = qemu_in.accept().await.unwrap();
        super::receive_all(stream).await.unwrap()
    });
    let qemu = UnixStream::connect(uri.trim_start_matches("unix:"))
        .await
        .unwrap();
    let (_read, write) = qemu.into_split();
    super::send_all(write, Arc::clone(&data), 3).await.unwrap();
    assert_eq!(receiver.await.unwrap(), (bytes as u64, blake3::hash(&data)));
    for daemon in [source, destination] {
        let view = daemon.wait_final(id, Duration::from_secs(5)).await;
        assert_eq!(view["state"], "transferred", "{view}");
    }
}

/// One request to the API on `socket`, through the library's client; returns the status
/// and the JSON body (a string when not JSON, null when empty).
pub async fn http(socket: &PathBuf, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = method.parse().expect("an HTTP method");
    let (status, value) = Client::new(socket)
        .request(method, path, body)
        .await
        .expect("an answer from the daemon");
    (status.as_u16(), value)
}

/// An API error body as one line: `error`, then each of its `causes` after a colon.
pub fn story(body: &Value) -> String {
    let mut line = body["error"].as_str().unwrap_or_default().to_owned();
    for cause in body["causes"].as_array().into_iter().flatten() {
        line.push_str(": ");
        line.push_str(cause.as_str().unwrap_or_default());
    }
    line
}

/// A unix listener standing in for the destination QEMU, and its endpoint (`unix:…`); the
/// directory lives as long as the returned guard.
pub fn stand_in_target() -> (tempfile::TempDir, UnixListener, String) {
    let dir = super::short_tempdir();
    let path = dir.path().join("qemu-in.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, listener, format!("unix:{}", path.display()))
}

pub fn unix_path(uri: &str) -> &str {
    uri.strip_prefix("unix:").unwrap()
}

pub fn error_of(view: &Value) -> &Value {
    assert!(!view["error"].is_null(), "no error in {view}");
    &view["error"]
}

/// A synchronous look at a migration, for `wait_until` predicates.
pub fn futures_lite_show(daemon: &TestDaemon, id: &str) -> Value {
    let migration = daemon.daemon.get(id).unwrap();
    serde_json::to_value(migration.snapshot()).unwrap()
}

/// A migration whose destination QEMU stand-in accepts but never reads; returns the source
/// stand-in's writer task (which ends with the error its blocked write got).
pub async fn stuck_migration(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
) -> (JoinHandle<std::io::Error>, UnixListener, tempfile::TempDir) {
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

/// The event stream of one migration, subscribed before anything happens to it (the
/// response head, which says the subscription is in place, has arrived).
pub async fn subscribe(daemon: &TestDaemon, id: &str) -> migproxy::client::Events {
    Client::new(&daemon.api).events(Some(id)).await.unwrap()
}

/// The next event of `events` (the stream must not end first).
pub async fn next_event(events: &mut migproxy::client::Events) -> Event {
    match events.next().await.unwrap() {
        Some(Received::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}
