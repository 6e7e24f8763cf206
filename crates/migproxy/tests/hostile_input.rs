//! Input the daemon must not trust: targets that escape `--target-dir`, text from the peer
//! daemon that would forge log lines, socket paths two migrations would share, a runtime
//! directory changed under the daemon's feet, API clients that never finish, and what a
//! SIGKILLed daemon left behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::daemon::TestDaemon;
use common::process::DaemonProcess;
use common::short_tempdir;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn error_text(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_targets_are_refused_when_target_dirs_are_set() {
    let allowed = short_tempdir();
    let allowed_path = allowed.path().to_owned();
    let destination =
        TestDaemon::start_with("dst", move |c| c.target_dirs = vec![allowed_path]).await;
    let (status, body) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "target": "tcp:127.0.0.1:4444"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let error = error_text(&body);
    assert!(
        error.starts_with("target: \"tcp:127.0.0.1:4444\": only unix sockets inside")
            && error.contains("--target-dir"),
        "{body}"
    );
    let (status, list) = destination.request("GET", "/v1/migrations", None).await;
    assert_eq!((status, &list["migrations"]), (200, &json!([])), "{list}");

    // Without target directories, a TCP target is still allowed.
    let open = TestDaemon::start("open").await;
    let (status, body) = open
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "target": "tcp:127.0.0.1:4444"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Speaks the peer protocol to a daemon process as a source daemon would, up to the reply.
async fn hello_to(peer: &str, kind: migproxy_proto::Kind, id: &str, token: &str) -> TcpStream {
    use migproxy_proto::{Hello, HelloReply, Status, VERSION};
    let token = migproxy::daemon::token::Token::from_hex(token).unwrap();
    let mut stream = TcpStream::connect(peer).await.unwrap();
    let mut hello = Vec::new();
    Hello {
        version: VERSION,
        kind,
        migration: id.into(),
        channel: 0,
        token: *token.bytes(),
        flags: 0,
    }
    .encode(&mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut reply = vec![0; HelloReply::HEADER];
    stream.read_exact(&mut reply).await.unwrap();
    let len = migproxy_proto::reply_len(&reply).unwrap();
    reply.resize(HelloReply::HEADER + len, 0);
    stream
        .read_exact(&mut reply[HelloReply::HEADER..])
        .await
        .unwrap();
    assert_eq!(HelloReply::decode(&reply).unwrap().status, Status::Ok);
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newline_or_escape_sequence_from_the_peer_does_not_reach_the_log_raw() {
    use migproxy_proto::{Attribution, Control, Host, Kind, Leg, Op, Totals};
    let dir = short_tempdir();
    let destination = DaemonProcess::start(dir.path(), "dst", "127.0.0.1:0", None, &[]).await;
    let (_, info) = destination.request("GET", "/v1/info", None).await;
    let peer = info["advertise"].as_str().unwrap().to_owned();
    let target = format!("unix:{}", dir.path().join("qemu-in.sock").display());
    let (status, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "forge", "target": target})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let token = incoming["token"].as_str().unwrap();
    let mut control = hello_to(&peer, Kind::Control, "forge", token).await;
    let forged = "2099-01-01T00:00:00.000000Z  INFO migproxy: all is well";
    let mut frame = Vec::new();
    Control::Failed(Attribution {
        host: Host::Source,
        leg: Leg::Qemu,
        channel: None,
        direction: None,
        op: Op::Read,
        errno: None,
        message: format!("boom\n{forged}\u{1b}[2J"),
        bytes: Totals::default(),
        elapsed_ms: 0,
    })
    .encode(&mut frame);
    control.write_all(&frame).await.unwrap();
    let view = destination
        .wait_final("forge", Duration::from_secs(5))
        .await;
    assert_eq!(view["state"], "failed", "{view}");
    assert!(
        view["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("boom\\n{forged}\\u{{1b}}[2J")),
        "{view}"
    );

    let log = std::fs::read_to_string(dir.path().join("dst.log")).unwrap();
    assert!(
        log.contains(&format!("boom\\n{forged}\\u{{1b}}[2J")),
        "the failure is logged, escaped: {log}"
    );
    assert!(
        !log.lines().any(|line| line.starts_with("2099-01-01")),
        "a forged line: {log}"
    );
    assert!(!log.contains("\u{1b}[2J"), "a raw escape sequence: {log:?}");
}

/// Reads until the server closes the connection; fails if it is still open after `limit`.
async fn closed_within(stream: &mut tokio::net::UnixStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the API connection is still open after {limit:?}"
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_connections_that_send_nothing_or_stall_are_closed() {
    use tokio::net::UnixStream;
    let daemon = TestDaemon::start_with("api", |c| {
        c.api_limits.header_timeout = Duration::from_millis(300);
        c.api_limits.idle_timeout = Duration::from_millis(600);
    })
    .await;
    let started = std::time::Instant::now();
    let mut silent = UnixStream::connect(&daemon.api).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Half a request head, then nothing.
    let mut slow = UnixStream::connect(&daemon.api).await.unwrap();
    slow.write_all(b"GET /v1/info HTTP/1.1\r\nHost: m")
        .await
        .unwrap();
    closed_within(&mut slow, Duration::from_secs(5)).await;

    // A whole head announcing a body that never comes: the idle timeout ends it.
    let mut stalled = UnixStream::connect(&daemon.api).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/migrations HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    closed_within(&mut stalled, Duration::from_secs(5)).await;

    // A kept-alive connection is answered, then closed once idle.
    let mut kept = UnixStream::connect(&daemon.api).await.unwrap();
    kept.write_all(b"GET /v1/info HTTP/1.1\r\nHost: m\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut kept, Duration::from_secs(5)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let (status, _) = daemon.request("GET", "/v1/info", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_connections_beyond_the_limit_are_closed_at_once() {
    use tokio::net::UnixStream;
    let daemon = TestDaemon::start_with("apilimit", |c| c.api_limits.max_connections = 2).await;
    // Two kept-alive connections, each answered once: both are held by the server.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = UnixStream::connect(&daemon.api).await.unwrap();
        stream
            .write_all(b"GET /v1/info HTTP/1.1\r\nHost: m\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(stream);
    }
    let mut third = UnixStream::connect(&daemon.api).await.unwrap();
    let _ = third
        .write_all(b"GET /v1/info HTTP/1.1\r\nHost: m\r\n\r\n")
        .await;
    let answer = closed_within(&mut third, Duration::from_secs(2)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(daemon.daemon.rejections.counts().get("api_busy"), Some(&1));
    // Once one is closed, the API answers again (when the server has seen it close).
    drop(held.pop());
    let mut answered = false;
    for _ in 0..200 {
        let mut stream = UnixStream::connect(&daemon.api).await.unwrap();
        let _ = stream
            .write_all(b"GET /v1/info HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .await;
        let answer = closed_within(&mut stream, Duration::from_secs(2)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered, "the API never answered again");
}

/// An outgoing migration `id` on `source` (its destination `destination`); returns the
/// path of its socket for QEMU.
async fn outgoing(source: &TestDaemon, destination: &TestDaemon, id: &str) -> String {
    let target = format!("unix:/tmp/{id}-nobody.sock");
    let uri = common::daemon::migration_pair(source, destination, id, &target).await;
    uri.strip_prefix("unix:").unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_cannot_share_a_socket() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let socket = outgoing(&source, &destination, "vm").await;

    // An incoming migration whose target is the outgoing one's socket.
    let create = |body: Value| source.request("POST", "/v1/migrations", Some(body));
    let (status, body) = create(json!({"direction": "incoming", "id": "other",
                                        "target": format!("unix:{socket}")}))
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        error_text(&body),
        format!("{socket} is already the socket of migration \"vm\"")
    );

    // The socket of a QMP-driven incoming migration `vm2` is RUNTIME/vm2.incoming.sock: an
    // outgoing `vm2.incoming` has it already. Refused before QEMU is asked anything.
    let socket = outgoing(&source, &destination, "vm2.incoming").await;
    let (status, body) = create(json!({"direction": "incoming", "id": "vm2",
                                        "qmp": "/nonexistent/qmp.sock"}))
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        error_text(&body),
        format!("{socket} is already the socket of migration \"vm2.incoming\"")
    );
    // The outgoing migration keeps its socket.
    assert!(std::path::Path::new(&socket).exists());

    // Once a migration has ended, its socket is free again.
    let (status, body) = source
        .request("POST", "/v1/migrations/vm/cancel", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let socket = format!("{}/vm.sock", source.daemon.config.runtime_dir.display());
    let (status, body) = create(json!({"direction": "incoming", "id": "after",
                                        "target": format!("unix:{socket}")}))
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_target_for_two_incoming_migrations_is_refused() {
    let destination = TestDaemon::start("dst").await;
    let dir = short_tempdir();
    let create = |id: &str, target: String| {
        destination.request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": id, "target": target})),
        )
    };
    let (status, body) = create("one", format!("unix:{}/in.sock", dir.path().display())).await;
    assert_eq!(status, 201, "{body}");
    // The same path spelt through a symbolic link to its directory.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let (status, body) = create("two", format!("unix:{}/in.sock", link.display())).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        error_text(&body).ends_with("is already the socket of migration \"one\""),
        "{body}"
    );
}

/// Runs `migproxy daemon` with `args` and expects it to refuse to start; returns stderr.
async fn refused_to_start(dir: &std::path::Path, args: &[&str]) -> String {
    let api = dir.join("refused-api.sock");
    let mut child = tokio::process::Command::new(common::process::BIN)
        .arg("daemon")
        .arg("--api")
        .arg(&api)
        .args(["--peer-listen", "127.0.0.1:0", "--insecure-plaintext"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the daemon started when it should have refused");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert_eq!(status.unwrap().code(), Some(1), "{stderr}");
    assert!(!api.exists(), "{stderr}");
    stderr
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_and_gid(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_dir_through_a_link_or_writable_by_its_group_is_refused_at_start() {
    let dir = short_tempdir();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    set_mode(&real, 0o700);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let stderr = refused_to_start(dir.path(), &["--runtime-dir", link.to_str().unwrap()]).await;
    assert!(
        stderr.contains(&format!(
            "runtime dir {} is a symbolic link",
            link.display()
        )),
        "{stderr}"
    );
    for mode in [0o770, 0o777, 0o1770] {
        set_mode(&real, mode);
        let stderr = refused_to_start(dir.path(), &["--runtime-dir", real.to_str().unwrap()]).await;
        assert!(
            stderr.contains(&format!(
                "runtime dir {} is writable by its group or by others (mode {mode:o})",
                real.display()
            )),
            "{stderr}"
        );
    }
    // Named, QEMU's group may create sockets there, in a sticky directory only.
    let gid = nix::unistd::getegid();
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    set_mode(&real, 0o770);
    let stderr = refused_to_start(
        dir.path(),
        &[
            "--runtime-dir",
            real.to_str().unwrap(),
            "--runtime-dir-group",
            &group,
        ],
    )
    .await;
    assert!(
        stderr.contains("mode 1770 for --runtime-dir-group"),
        "{stderr}"
    );
    let daemon = DaemonProcess::start(
        dir.path(),
        "shared",
        "127.0.0.1:0",
        None,
        &["--runtime-dir-group", &group],
    )
    .await;
    assert_eq!(mode_and_gid(&daemon.runtime), (0o1770, gid.as_raw()));
}

/// Asks for an outgoing migration (to a peer nobody listens on): enough to make the daemon
/// create its socket in the runtime directory.
async fn ask_outgoing(daemon: &DaemonProcess, id: &str) -> (u16, Value) {
    daemon
        .request(
            "POST",
            "/v1/migrations",
            Some(
                json!({"direction": "outgoing", "id": id, "token": "ab".repeat(32),
                        "peer": "127.0.0.1:9"}),
            ),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_dir_replaced_while_the_daemon_runs_is_not_used() {
    let dir = short_tempdir();
    let daemon = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, &[]).await;
    let (status, body) = ask_outgoing(&daemon, "before").await;
    assert_eq!(
        status, 502,
        "the directory is fine, the peer is not there: {body}"
    );

    // Removed and made again, writable by everyone.
    std::fs::rename(&daemon.runtime, dir.path().join("old-run")).unwrap();
    std::fs::create_dir(&daemon.runtime).unwrap();
    set_mode(&daemon.runtime, 0o777);
    let (status, body) = ask_outgoing(&daemon, "recreated").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        error_text(&body),
        format!(
            "runtime dir {} is no longer the directory the daemon opened at start (removed, \
             replaced or reached through a changed path): restart the daemon",
            daemon.runtime.display()
        )
    );
    // Or a link to a directory of somebody else's.
    std::fs::remove_dir(&daemon.runtime).unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    set_mode(&theirs, 0o777);
    std::os::unix::fs::symlink(&theirs, &daemon.runtime).unwrap();
    let (status, body) = ask_outgoing(&daemon, "linked").await;
    assert_eq!(status, 500, "{body}");
    // A target there is refused as well: the destination QEMU would listen in that directory.
    let target = format!("unix:{}/vm.sock", daemon.runtime.display());
    let (status, body) = daemon
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "target": target})),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_left_by_a_killed_daemon_are_removed_at_its_next_start() {
    let dir = short_tempdir();
    let destination = DaemonProcess::start(dir.path(), "dst", "127.0.0.1:0", None, &[]).await;
    let mut source = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, &[]).await;
    let (_, info) = destination.request("GET", "/v1/info", None).await;
    let (status, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "vm", "target": "unix:/tmp/nobody.sock"})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let (status, body) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(
                json!({"direction": "outgoing", "id": "vm", "token": incoming["token"],
                        "peer": info["advertise"]}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let stale = source.runtime.join("vm.sock");
    assert!(stale.exists());
    // Beside it: a socket somebody still listens on, and a file that is not a socket.
    let live = source.runtime.join("live.sock");
    let _listening = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let plain = source.runtime.join("plain.sock");
    std::fs::write(&plain, b"not a socket").unwrap();

    source.child.kill().await.unwrap();
    assert!(stale.exists(), "SIGKILL leaves the socket behind");
    let restarted = DaemonProcess::start(dir.path(), "src", "127.0.0.1:0", None, &[]).await;
    assert!(!stale.exists(), "the stale socket is still there");
    assert!(live.exists() && plain.exists());
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outgoing_migration_cannot_take_the_socket_of_a_qmp_driven_incoming_one() {
    use common::qemu::{Qemu, Ram};
    let dir = short_tempdir();
    let qemu = Qemu::start(dir.path(), "dstvm", Ram::Anonymous, 64, true).await;
    let daemon = TestDaemon::start("both").await;
    let (status, body) = daemon
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "vm", "qmp": qemu.spare_qmp()})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let socket = daemon.daemon.config.runtime_dir.join("vm.incoming.sock");
    assert_eq!(
        body["target"],
        format!("unix:{}", socket.display()),
        "{body}"
    );
    let (status, body) = daemon
        .request(
            "POST",
            "/v1/migrations",
            Some(
                json!({"direction": "outgoing", "id": "vm.incoming", "token": "ab".repeat(32),
                        "peer": "127.0.0.1:9"}),
            ),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        error_text(&body),
        format!(
            "{} is already the socket of migration \"vm\"",
            socket.display()
        )
    );
}
