//! The `migproxy` binary: usage errors, `migproxy relay` end to end, signals, `migproxy demo`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::{short_tempdir, sock, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_migproxy");

fn run(args: &[&str]) -> Output {
    std::process::Command::new(BIN).args(args).output().unwrap()
}

/// As [`run`], for a command that must exit at once: one that runs on (a daemon that
/// accepted what it should have refused) is killed and the test fails.
fn run_refused(args: &[&str]) -> Output {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("{args:?} is still running: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn bad_flags_and_endpoints_exit_2_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["relay", "--listen", "tcp:foo", "--connect", "unix:/x"],
            r#"invalid endpoint "tcp:foo": missing port"#,
        ),
        (
            &["relay", "--listen", "unix:/x", "--connect", "ftp:host:1"],
            r#"unknown scheme "ftp""#,
        ),
        (
            &["relay", "--listen", "tcp:[::1:5", "--connect", "unix:/x"],
            "unclosed '['",
        ),
        (&["relay", "--listen", "unix:/x"], "--connect <ENDPOINT>"),
        (
            &[
                "relay",
                "--listen",
                "unix:/x",
                "--connect",
                "unix:/y",
                "--max-connections",
                "0",
            ],
            "--max-connections",
        ),
        (
            &[
                "relay",
                "--listen",
                "unix:/x",
                "--connect",
                "unix:/y",
                "--connect-timeout",
                "soon",
            ],
            r#""soon" is not a number of seconds"#,
        ),
        (&["demo", "--size", "1Q"], r#""1Q" is not a size"#),
        (&["teleport"], "unrecognized subcommand"),
        (&[], "Usage"),
    ];
    for (args, expected) in cases {
        let out = run(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn daemon_timeouts_must_be_positive_and_the_heartbeat_below_the_peer_timeout() {
    let dir = short_tempdir();
    let api = sock(&dir, "api.sock");
    let api = api.to_str().unwrap();
    let base = [
        "daemon",
        "--api",
        api,
        "--peer-listen",
        "127.0.0.1:0",
        "--insecure-plaintext",
    ];
    for flag in ["--peer-timeout", "--stall-timeout", "--token-ttl"] {
        let out = run_refused(&[&base[..], &[flag, "0"]].concat());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("'{flag} <SECONDS>'"))
                && stderr.contains("must be a positive number of seconds"),
            "{flag}: {stderr}"
        );
    }
    // The default heartbeat is 1 s: a peer timeout of 1 s or less fails every quiet migration.
    let out = run_refused(&[&base[..], &["--peer-timeout", "1"]].concat());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "timeouts.heartbeat (1 s) must be shorter than the peer timeout (1 s, --peer-timeout"
        ),
        "{stderr}"
    );
    let config = dir.path().join("migproxy.toml");
    std::fs::write(&config, "[timeouts]\nheartbeat = 20\n").unwrap();
    let out = run_refused(&[&base[..], &["--config", config.to_str().unwrap()]].concat());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("timeouts.heartbeat (20 s) must be shorter than the peer timeout (10 s"),
        "{stderr}"
    );
    assert!(!api_exists(&dir), "nothing was started");
}

fn api_exists(dir: &tempfile::TempDir) -> bool {
    sock(dir, "api.sock").exists()
}

#[test]
fn listen_path_in_use_is_refused_and_names_the_endpoint() {
    let dir = short_tempdir();
    let live = sock(&dir, "live.sock");
    let _holder = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let file = sock(&dir, "plain-file");
    std::fs::write(&file, b"not a socket").unwrap();
    for path in [&live, &file] {
        let listen = format!("unix:{}", path.display());
        let out = run(&["relay", "--listen", &listen, "--connect", "unix:/nowhere"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "listen on {listen} failed: address already in use (EADDRINUSE)"
            )),
            "{stderr}"
        );
        assert!(path.exists(), "{path:?} must be left alone");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

fn spawn_relay(listen: &str, connect: &str, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["relay", "--listen", listen, "--connect", connect])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn finish(mut child: Child) -> (Option<i32>, String, String) {
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("migproxy relay did not exit")
        .unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    (status.code(), out, err)
}

#[tokio::test]
async fn connections_are_connected_onwards_in_accept_order() {
    let dir = short_tempdir();
    let path = sock(&dir, "in.sock");
    let destination = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let onward = format!("tcp:{}", destination.local_addr().unwrap());
    let relay = spawn_relay(
        &format!("unix:{}", path.display()),
        &onward,
        &["--max-connections", "3"],
    );
    wait_until(Duration::from_secs(10), "the relay socket", || {
        path.exists()
    })
    .await;

    // Three channels opened one after the other, as QEMU opens multifd channels.
    let mut clients = Vec::new();
    for name in ["main", "multifd-0", "multifd-1"] {
        let mut client = UnixStream::connect(&path).await.unwrap();
        client.write_all(name.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        clients.push(client);
    }
    for expected in ["main", "multifd-0", "multifd-1"] {
        let (mut conn, _) = destination.accept().await.unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got, expected,
            "the destination must see channels in accept order"
        );
        conn.write_all(b"ok").await.unwrap();
    }
    for mut client in clients {
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"ok");
    }
    let (code, out, err) = finish(relay).await;
    assert_eq!(code, Some(0), "{out}{err}");
    for n in 1..=3 {
        assert!(out.contains(&format!("#{n} unix:")), "{out}");
    }
    assert!(
        out.contains("3 connections: 3 completed, 0 cancelled, 0 failed"),
        "{out}"
    );
    assert!(!path.exists(), "the relay must remove its socket file");
}

#[tokio::test]
async fn connect_refused_is_reported_and_the_source_connection_ends() {
    let dir = short_tempdir();
    let path = sock(&dir, "in.sock");
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let onward = format!("tcp:{}", closed.local_addr().unwrap());
    drop(closed);
    let relay = spawn_relay(
        &format!("unix:{}", path.display()),
        &onward,
        &["--max-connections", "1"],
    );
    wait_until(Duration::from_secs(10), "the relay socket", || {
        path.exists()
    })
    .await;

    let mut client = UnixStream::connect(&path).await.unwrap();
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut buf)).await;
    assert!(
        ended.is_ok(),
        "the source connection must end when the onward connect fails"
    );

    let (code, out, err) = finish(relay).await;
    assert_eq!(code, Some(1), "{out}{err}");
    let expected = format!("failed: connect to {onward} failed before any byte moved (");
    assert!(out.contains(&expected), "{out}");
    assert!(out.contains("connection refused (ECONNREFUSED)"), "{out}");
    assert!(
        out.contains("1 connection: 0 completed, 0 cancelled, 1 failed"),
        "{out}"
    );
}

#[tokio::test]
async fn sigterm_cancels_a_stuck_relay_and_prints_a_summary() {
    let dir = short_tempdir();
    let path = sock(&dir, "in.sock");
    let destination = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let onward = format!("tcp:{}", destination.local_addr().unwrap());
    let relay = spawn_relay(&format!("unix:{}", path.display()), &onward, &[]);
    wait_until(Duration::from_secs(10), "the relay socket", || {
        path.exists()
    })
    .await;

    let client = UnixStream::connect(&path).await.unwrap();
    let (accepted, _) = destination.accept().await.unwrap(); // never reads
    let (_client_read, mut client_write) = client.into_split();
    let writer = tokio::spawn(async move {
        let block = vec![0u8; 1 << 20];
        loop {
            if let Err(e) = client_write.write_all(&block).await {
                return e;
            }
        }
    });
    // Data is flowing through the relay (and will pile up: nobody reads it).
    accepted.peek(&mut [0u8; 1]).await.unwrap();
    kill(Pid::from_raw(relay.id().unwrap() as i32), Signal::SIGTERM).unwrap();

    let (code, out, err) = finish(relay).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    assert!(
        out.contains("#1 unix:") && out.contains(": cancelled after "),
        "{out}"
    );
    assert!(
        out.contains("1 connection: 0 completed, 1 cancelled, 0 failed"),
        "{out}"
    );
    let error = tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .expect("the source's blocked write must fail once the relay is cancelled")
        .unwrap();
    eprintln!("source write ended with: {error}");
    assert!(!path.exists(), "the relay must remove its socket file");
}

#[tokio::test]
async fn stale_socket_file_is_replaced() {
    let dir = short_tempdir();
    let path = sock(&dir, "stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves the file behind
    assert!(path.exists());
    let relay = spawn_relay(
        &format!("unix:{}", path.display()),
        "unix:/nowhere",
        &["--max-connections", "1"],
    );
    wait_until(Duration::from_secs(10), "the relay to listen", || {
        std::os::unix::net::UnixStream::connect(&path).is_ok()
    })
    .await;
    let (code, out, err) = finish(relay).await;
    // The probe connection above was relayed to a missing path and failed.
    assert!(out.contains("connect to unix:/nowhere failed"), "{out}");
    assert!(out.contains("no such file or directory (ENOENT)"), "{out}");
    assert_eq!(code, Some(1), "{err}");
    assert!(!path.exists());
}

#[test]
fn demo_migrates_a_real_qemu_vm_through_two_daemons() {
    // The test suite installs QEMU, so the demo takes its real-VM path here.
    let out = run(&["demo", "--size", "64M"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("migproxy demo: migrating a real QEMU VM (64.0 MiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "the source daemon reports:\nmigration demo (outgoing, plaintext): completed"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "the destination daemon reports:\nmigration demo (incoming, plaintext): completed"
        ),
        "{stdout}"
    );
    // QEMU's verdict, as each daemon took it over QMP.
    assert_eq!(
        stdout.matches("\n  QEMU: completed after ").count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("guest RAM: source ") && stdout.contains(": identical"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("migproxy demo: OK"), "{stdout}");
}

#[test]
fn demo_streams_synthetic_data_through_two_daemons_without_qemu() {
    let out = run(&["demo", "--size", "64M", "--synthetic"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("streaming 64.0 MiB of pseudo-random migration data between two daemons"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "the source daemon reports:\nmigration demo (outgoing, plaintext): transferred"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("64.0 MiB to destination"), "{stdout}");
    assert!(stdout.contains(": identical"), "{stdout}");
    assert!(stdout.contains("the same byte counts: yes"), "{stdout}");
    assert!(stdout.trim_end().ends_with("migproxy demo: OK"), "{stdout}");
}
