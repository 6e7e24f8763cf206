//! `migproxy migration …`: the real binary against real daemons.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::TestDaemon;
use common::{random_data, receive_all, send_all, short_tempdir};
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_migproxy");

async fn cli(daemon: &TestDaemon, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("migration")
        .arg("--api")
        .arg(&daemon.api)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Creates the migration on both daemons through the CLI; returns QEMU's socket path.
async fn create(source: &TestDaemon, destination: &TestDaemon, id: &str, target: &str) -> String {
    let out = cli(
        destination,
        &["--json", "create-incoming", "--target", target, "--id", id],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let incoming: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = incoming["token"].as_str().unwrap();
    let peer = incoming["peer"].as_str().unwrap();
    let out = cli(
        source,
        &[
            "--json",
            "create-outgoing",
            "--id",
            id,
            "--token",
            token,
            "--peer",
            peer,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let outgoing: Value = serde_json::from_slice(&out.stdout).unwrap();
    outgoing["qemu_uri"]
        .as_str()
        .unwrap()
        .trim_start_matches("unix:")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_watch_to_completion_list_and_forget() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let dir = short_tempdir();
    let target = dir.path().join("qemu-in.sock");
    let qemu_in = UnixListener::bind(&target).unwrap();

    // The human form tells the operator what to run on the other host.
    let out = cli(
        &destination,
        &[
            "create-incoming",
            "--target",
            &format!("unix:{}", target.display()),
            "--id",
            "probe",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("migproxy migration create-outgoing --id probe --token "),
        "{}",
        stdout(&out)
    );
    // Two live migrations may not share a target: the probe makes way.
    let out = cli(&destination, &["cancel", "probe"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let qemu_uri = create(
        &source,
        &destination,
        "w1",
        &format!("unix:{}", target.display()),
    )
    .await;
    let data = random_data(3, 16 << 20);
    let receiver = tokio::spawn(async move {
        let (stream, _) = qemu_in.accept().await.unwrap();
        receive_all(stream).await.unwrap()
    });
    let watcher = {
        let api = source.api.clone();
        tokio::spawn(async move {
            Command::new(BIN)
                .args(["migration", "--api"])
                .arg(api)
                .args(["watch", "w1", "--interval", "0.05"])
                .output()
                .await
                .unwrap()
        })
    };
    let qemu = UnixStream::connect(&qemu_uri).await.unwrap();
    let (_read, write) = qemu.into_split();
    send_all(write, Arc::clone(&data), 1).await.unwrap();
    assert_eq!(receiver.await.unwrap().0, 16 << 20);
    drop(_read);
    let watched = tokio::time::timeout(Duration::from_secs(20), watcher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        watched.status.code(),
        Some(0),
        "{}{}",
        stdout(&watched),
        stderr(&watched)
    );
    let report = stdout(&watched);
    assert!(
        report.contains("migration w1 (outgoing, plaintext): transferred")
            && report.contains("QEMU's verdict unknown"),
        "{report}"
    );
    assert!(
        report.contains("channel 0: completed, 16.0 MiB to destination"),
        "{report}"
    );

    let out = cli(&source, &["list"]).await;
    assert!(
        stdout(&out).contains("w1") && stdout(&out).contains("transferred"),
        "{}",
        stdout(&out)
    );
    let out = cli(&source, &["forget", "w1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(&source, &["show", "w1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("error: no migration \"w1\""),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_a_failure_read_well() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let _ = create(&source, &destination, "c1", "unix:/nowhere/qemu.sock").await;
    let out = cli(&destination, &["cancel", "c1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(": cancelled"), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("cancelled by the destination host"),
        "{}",
        stdout(&out)
    );
    let out = cli(&source, &["watch", "c1"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cancelled migration is not a success"
    );

    // A failure: the destination QEMU is not there.
    let qemu_uri = create(&source, &destination, "f1", "unix:/nowhere/qemu.sock").await;
    let _qemu = UnixStream::connect(&qemu_uri).await.unwrap();
    let out = cli(&source, &["watch", "f1"]).await;
    assert_eq!(out.status.code(), Some(1));
    let report = stdout(&out);
    assert!(report.contains(": failed"), "{report}");
    assert!(
        report.contains("error: destination QEMU: connect failed on channel 0"),
        "{report}"
    );
    assert!(
        report.contains("    1: unix:/nowhere/qemu.sock: no such file or directory (ENOENT)"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_an_unreachable_daemon_have_their_exit_codes() {
    let daemon = TestDaemon::start("api").await;
    let out = cli(
        &daemon,
        &[
            "create-outgoing",
            "--id",
            "x",
            "--token",
            "00",
            "--peer",
            "127.0.0.1:1",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("error: token: expected the 64 hex digits"),
        "{}",
        stderr(&out)
    );

    // A state the API does not name is a usage error, before the daemon is asked.
    let out = cli(&daemon, &["list", "--state", "sleeping"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"sleeping\" is not one of pending, active"),
        "{}",
        stderr(&out)
    );

    let out = Command::new(BIN)
        .args(["migration", "--api", "/nonexistent/api.sock", "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "error: cannot reach the migproxy daemon at /nonexistent/api.sock\n  \
             1: no such file or directory (ENOENT)"
        ),
        "{}",
        stderr(&out)
    );
    let out = Command::new(BIN)
        .args(["migration", "show"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a missing id is a usage error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_and_the_cli_read_the_config_file() {
    let dir = short_tempdir();
    let api = dir.path().join("api.sock");
    let config = dir.path().join("migproxy.toml");
    std::fs::write(
        &config,
        format!(
            "api = \"{}\"\npeer_listen = \"127.0.0.1:0\"\nruntime_dir = \"{}\"\n\
             insecure_plaintext = true\n\n[limits]\nmax_channels = 7\n\n[timeouts]\npeer = 4\n",
            api.display(),
            dir.path().join("run").display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new(BIN)
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .args(["--stall-timeout", "9"]) // a flag overrides the file (and the default)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    common::wait_until(Duration::from_secs(10), "the API socket", || {
        std::os::unix::net::UnixStream::connect(&api).is_ok()
    })
    .await;
    let (_, info) = common::daemon::http(&api, "GET", "/v1/info", None).await;
    assert_eq!(info["limits"]["max_channels"], 7, "{info}");
    assert_eq!(info["timeouts_ms"]["peer"], 4000, "{info}");
    assert_eq!(info["timeouts_ms"]["stall"], 9000, "{info}");
    let out = Command::new(BIN)
        .args(["migration", "--config"])
        .arg(&config)
        .arg("list")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("no migrations"), "{}", stdout(&out));
    daemon.start_kill().unwrap();
    daemon.wait().await.unwrap();

    std::fs::write(
        &config,
        "api = \"/x\"\npeer_listen = \"127.0.0.1:0\"\ncolour = 3\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let error = stderr(&out);
    assert!(error.contains(&config.display().to_string()), "{error}");
    assert!(
        error.contains("line 3") && error.contains("colour"),
        "{error}"
    );
}

/// Runs `migproxy migration ARGS` with stdout a pipe whose reader is already gone, as in
/// `migproxy migration show ID | head -1` once head has exited.
async fn cli_into_closed_pipe(daemon: &TestDaemon, args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    Command::new(BIN)
        .arg("migration")
        .arg("--api")
        .arg(&daemon.api)
        .args(args)
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        // Not `output()`, which would replace stdout with a pipe of its own.
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let destination = TestDaemon::start("dst").await;
    let out = cli(
        &destination,
        &["create-incoming", "--target", "unix:/x", "--id", "p"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let commands: &[&[&str]] = &[
        &["show", "p"],
        &["--json", "show", "p"],
        &["list"],
        &["--json", "list"],
        &["create-incoming", "--target", "unix:/y", "--id", "q"],
    ];
    for args in commands {
        let out = cli_into_closed_pipe(&destination, args).await;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}, {}",
            out.status,
            stderr(&out)
        );
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}

/// `create-outgoing --id ID --peer PEER` plus `extra`, with `env` and `stdin`.
async fn create_outgoing(
    source: &TestDaemon,
    (id, peer): (&str, &str),
    extra: &[&str],
    env: Option<&str>,
    stdin: Option<&str>,
) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut command = Command::new(BIN);
    command
        .arg("migration")
        .arg("--api")
        .arg(&source.api)
        .args(["--json", "create-outgoing", "--id", id, "--peer", peer])
        .args(extra)
        .env_remove("MIGPROXY_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(token) = env {
        command.env("MIGPROXY_TOKEN", token);
    }
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    child.wait_with_output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_a_file_stdin_or_the_environment() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let dir = short_tempdir();
    let incoming = |id: &'static str| {
        let destination = &destination;
        async move {
            let out = cli(
                destination,
                &[
                    "--json",
                    "create-incoming",
                    "--target",
                    &format!("unix:/x-{id}"),
                    "--id",
                    id,
                ],
            )
            .await;
            let created: Value = serde_json::from_slice(&out.stdout).unwrap();
            (
                created["token"].as_str().unwrap().to_owned(),
                created["peer"].as_str().unwrap().to_owned(),
            )
        }
    };
    let created = |out: &Output, id: &str| {
        assert_eq!(out.status.code(), Some(0), "{id}: {}", stderr(out));
        let body: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(body["id"], id, "{body}");
    };

    let (token, peer) = incoming("file").await;
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let out = create_outgoing(
        &source,
        ("file", &peer),
        &["--token-file", file.to_str().unwrap()],
        None,
        None,
    )
    .await;
    created(&out, "file");

    let (token, peer) = incoming("stdin").await;
    let out = create_outgoing(
        &source,
        ("stdin", &peer),
        &["--token-file", "-"],
        None,
        Some(&format!("{token}\n")),
    )
    .await;
    created(&out, "stdin");

    let (token, peer) = incoming("env").await;
    let out = create_outgoing(&source, ("env", &peer), &[], Some(&token), None).await;
    created(&out, "env");

    // Refusals: no token anywhere, a file that is not there or empty, two sources at once.
    let (token, peer) = incoming("refused").await;
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.path().join("missing");
    let cases: [(&[&str], String); 4] = [
        (
            &[],
            "create-outgoing needs the token: --token-file PATH".to_owned(),
        ),
        (
            &["--token-file", missing.to_str().unwrap()],
            format!(
                "--token-file {}: cannot read it: no such file",
                missing.display()
            ),
        ),
        (
            &["--token-file", empty.to_str().unwrap()],
            format!("--token-file {}: no token in it", empty.display()),
        ),
        (
            &["--token", &token, "--token-file", "-"],
            "'--token <TOKEN>' cannot be used with '--token-file <PATH>'".to_owned(),
        ),
    ];
    for (extra, expected) in cases {
        let out = create_outgoing(&source, ("refused", &peer), extra, None, None).await;
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&expected),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
    let (status, _) = source.request("GET", "/v1/migrations/refused", None).await;
    assert_eq!(status, 404, "nothing was created");
}

/// The group (`--group`) reaches both daemons from the CLI, and a bad name is the API's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_takes_a_group_on_both_hosts() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let out = cli(
        &destination,
        &[
            "--json",
            "create-incoming",
            "--target",
            "unix:/x-grouped",
            "--id",
            "grouped",
            "--group",
            "vm",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let incoming: Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = create_outgoing(
        &source,
        ("grouped", incoming["peer"].as_str().unwrap()),
        &["--group", "vm"],
        incoming["token"].as_str(),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for daemon in [&source, &destination] {
        let out = cli(daemon, &["--json", "show", "grouped"]).await;
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(shown["group"], "vm", "{shown}");
    }

    let out = cli(
        &destination,
        &[
            "create-incoming",
            "--target",
            "unix:/x-bad",
            "--group",
            "../etc",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("group:"), "{}", stderr(&out));
}
