//! Mutual TLS between daemons: real handshakes with certificates in QEMU's layout, and every
//! way a peer can fail to prove who it is.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::certs::Ca;
use common::daemon::{TestDaemon, carry, migration_pair, story};
use common::{random_data, receive_all, send_all, short_tempdir};
use migproxy::tls::{Records, TlsHandle};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};

async fn tls_daemon(name: &str, dir: &Path, allow: &[&str]) -> TestDaemon {
    let allow: Vec<String> = allow.iter().map(|a| a.to_string()).collect();
    let tls = Arc::new(TlsHandle::load(dir, allow).unwrap());
    TestDaemon::start_with(name, move |config| config.tls = Some(tls)).await
}

async fn tls_daemon_with(name: &str, dir: &Path, records: Records) -> TestDaemon {
    let tls = Arc::new(TlsHandle::load_with(dir, Vec::new(), records).unwrap());
    assert_eq!(tls.current().records(), records);
    TestDaemon::start_with(name, move |config| config.tls = Some(tls)).await
}

/// Destination and source host directories signed by one CA.
fn pki(root: &Path) -> (Ca, std::path::PathBuf, std::path::PathBuf, u64) {
    let mut ca = Ca::new("migproxy test CA");
    let (src, dst) = (root.join("src"), root.join("dst"));
    let issued = ca.write_host(&src, &["source.test", "127.0.0.1"], "source-daemon");
    ca.write_host(
        &dst,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
    );
    (ca, src, dst, issued.client_serial)
}

async fn outgoing(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    extra: Value,
) -> (u16, Value) {
    let (status, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": id, "target": format!("unix:/x-{id}")})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let mut body = json!({"direction": "outgoing", "id": id, "token": incoming["token"], "peer": incoming["peer"]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    source.request("POST", "/v1/migrations", Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_over_mutual_tls_is_exact_and_says_so() {
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &["CN=source-*"]).await;
    let target = root.path().join("qemu-in.sock");
    let qemu_in = UnixListener::bind(&target).unwrap();
    let uri = migration_pair(
        &source,
        &destination,
        "t1",
        &format!("unix:{}", target.display()),
    )
    .await;

    const SIZE: usize = 16 << 20;
    let data = random_data(5, SIZE);
    let back = random_data(6, 1 << 20);
    let receiver = {
        let back = Arc::clone(&back);
        tokio::spawn(async move {
            let (stream, _) = qemu_in.accept().await.unwrap();
            let (read, write) = stream.into_split();
            let sending = tokio::spawn(send_all(write, back, 1));
            let got = receive_all(read).await.unwrap();
            sending.await.unwrap().unwrap();
            got
        })
    };
    let qemu = UnixStream::connect(uri.trim_start_matches("unix:"))
        .await
        .unwrap();
    let (read, write) = qemu.into_split();
    let (sent, got_back) = tokio::join!(send_all(write, Arc::clone(&data), 2), receive_all(read));
    sent.unwrap();
    assert_eq!(got_back.unwrap(), (1 << 20, blake3::hash(&back)));
    assert_eq!(receiver.await.unwrap(), (SIZE as u64, blake3::hash(&data)));
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("t1", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        assert_eq!(view["link"], "tls");
        assert_eq!(view["bytes"]["to_destination"], SIZE as u64);
        let (_, info) = daemon.request("GET", "/v1/info", None).await;
        assert_eq!(info["link"], "tls", "{info}");
    }
}

/// The escape hatch: stock rustls's record layer on both daemons, and on either one facing
/// migproxy's (the records are standard TLS 1.3 both ways).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_go_through_stock_rustls_records_on_either_side() {
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    for (i, (src, dst)) in [
        (Records::Stock, Records::Stock),
        (Records::Stock, Records::Migproxy),
        (Records::Migproxy, Records::Stock),
    ]
    .into_iter()
    .enumerate()
    {
        let source = tls_daemon_with("src", &src_dir, src).await;
        let destination = tls_daemon_with("dst", &dst_dir, dst).await;
        carry(&source, &destination, &format!("stock{i}"), 8 << 20).await;
        assert_eq!(source.show(&format!("stock{i}")).await["link"], "tls");
    }
}

/// `--tls-records stock` on real daemon processes: a migration goes through, and the flag
/// without `--tls-dir` is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_started_with_tls_records_stock_carry_a_migration() {
    use common::process::{BIN, DaemonProcess};
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let start = |name: &'static str, dir: std::path::PathBuf| {
        let root = root.path().to_owned();
        async move {
            let dir = dir.to_str().unwrap().to_owned();
            let flags = ["--tls-dir", dir.as_str(), "--tls-records", "stock"];
            DaemonProcess::start(&root, name, "127.0.0.1:0", None, &flags).await
        }
    };
    let source = start("src", src_dir).await;
    let destination = start("dst", dst_dir).await;
    let target = root.path().join("qemu-in.sock");
    let qemu_in = UnixListener::bind(&target).unwrap();
    let (status, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "p1",
                        "target": format!("unix:{}", target.display())})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let (status, outgoing) = source
        .request(
            "POST",
            "/v1/migrations",
            Some(
                json!({"direction": "outgoing", "id": "p1", "token": incoming["token"],
                        "peer": incoming["peer"], "tls_hostname": "destination.test"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{outgoing}");
    const SIZE: usize = 8 << 20;
    let data = random_data(9, SIZE);
    let receiver = tokio::spawn(async move {
        let (stream, _) = qemu_in.accept().await.unwrap();
        receive_all(stream).await.unwrap()
    });
    let qemu = UnixStream::connect(
        outgoing["qemu_uri"]
            .as_str()
            .unwrap()
            .trim_start_matches("unix:"),
    )
    .await
    .unwrap();
    let (_read, write) = qemu.into_split();
    send_all(write, Arc::clone(&data), 4).await.unwrap();
    assert_eq!(receiver.await.unwrap(), (SIZE as u64, blake3::hash(&data)));
    for daemon in [&source, &destination] {
        let view = daemon.wait_final("p1", Duration::from_secs(10)).await;
        assert_eq!(view["state"], "transferred", "{view}");
        assert_eq!(view["link"], "tls", "{view}");
    }

    let output = std::process::Command::new(BIN)
        .args([
            "daemon",
            "--api",
            "/nonexistent/api.sock",
            "--peer-listen",
            "127.0.0.1:0",
        ])
        .args(["--insecure-plaintext", "--tls-records", "stock"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-records needs --tls-dir"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_daemons_say_so_everywhere() {
    let source = TestDaemon::start("src").await;
    let destination = TestDaemon::start("dst").await;
    let (status, _) = outgoing(&source, &destination, "p1", json!({})).await;
    assert_eq!(status, 201);
    for daemon in [&source, &destination] {
        assert_eq!(daemon.show("p1").await["link"], "plaintext");
        let (_, info) = daemon.request("GET", "/v1/info", None).await;
        assert_eq!(info["link"], "plaintext", "{info}");
    }
}

/// Creating the outgoing migration fails with 502 and an error containing `expected`; the
/// destination's migration is left pending, untouched.
async fn refused(source: &TestDaemon, destination: &TestDaemon, extra: Value, expected: &str) {
    let (status, body) = outgoing(source, destination, "r1", extra).await;
    assert_eq!(status, 502, "{body}");
    let error = story(&body);
    assert!(error.contains(expected), "expected {expected:?} in {error}");
    assert_eq!(destination.show("r1").await["state"], "pending");
    assert!(source.daemon.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let root = short_tempdir();
    let (_ca, _src_dir, dst_dir, _) = pki(root.path());
    let mut other = Ca::new("some other CA");
    let rogue = root.path().join("rogue");
    other.write_host(&rogue, &["rogue.test"], "source-daemon");
    // The rogue trusts the real CA, so it could verify the destination: only its own
    // certificate is wrong.
    std::fs::copy(dst_dir.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
    let source = tls_daemon("rogue", &rogue, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &[]).await;
    refused(
        &source,
        &destination,
        json!({}),
        "received fatal alert: UnknownCA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_certificate_for_another_name_is_refused() {
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &[]).await;
    refused(
        &source,
        &destination,
        json!({"tls_hostname": "impostor.test"}),
        "certificate",
    )
    .await;
    // The right name works.
    let (status, body) = outgoing(
        &source,
        &destination,
        "ok1",
        json!({"tls_hostname": "destination.test"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outside_the_allow_list_is_refused() {
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &["CN=backup-*", "DNS:*.example.org"]).await;
    refused(
        &source,
        &destination,
        json!({}),
        "is not allowed here (--tls-allow)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused() {
    let root = short_tempdir();
    let (ca, src_dir, dst_dir, client_serial) = pki(root.path());
    ca.write_crl(&dst_dir, &[client_serial]);
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &[]).await;
    refused(
        &source,
        &destination,
        json!({}),
        "received fatal alert: CertificateRevoked",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused_with_a_der_crl() {
    let root = short_tempdir();
    let (ca, src_dir, dst_dir, client_serial) = pki(root.path());
    ca.write_crl_der(&dst_dir, &[client_serial]);
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &[]).await;
    refused(
        &source,
        &destination,
        json!({}),
        "received fatal alert: CertificateRevoked",
    )
    .await;
}

/// What `ca-crl.pem` may hold that is not a revocation list, and what the error must say.
fn broken_crls(ca: &Ca) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let pem = ca.crl(&[1]).pem().unwrap();
    let der = ca.crl(&[1]).der().to_vec();
    vec![
        ("empty", Vec::new(), "the file is empty"),
        (
            "garbage",
            b"this is not a CRL\n".to_vec(),
            "neither PEM with an \"X509 CRL\" block nor a DER revocation list",
        ),
        (
            "mistyped PEM header",
            pem.replace("X509 CRL", "X509 CRLS").into_bytes(),
            "1 PEM blocks of which 0 are \"X509 CRL\"",
        ),
        (
            "truncated DER",
            der[..der.len() / 2].to_vec(),
            "not a valid revocation list",
        ),
        (
            "a PEM block that does not parse",
            b"-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n".to_vec(),
            "not a valid revocation list",
        ),
    ]
}

#[test]
fn a_crl_file_that_holds_no_list_stops_the_load_naming_it() {
    let root = short_tempdir();
    let (ca, _src_dir, dst_dir, _) = pki(root.path());
    for (what, content, reason) in broken_crls(&ca) {
        std::fs::write(dst_dir.join("ca-crl.pem"), content).unwrap();
        let error = TlsHandle::load(&dst_dir, vec![]).expect_err(what);
        let chain = migproxy::human::Chain(&error).to_string();
        assert!(chain.contains("ca-crl.pem"), "{what}: {chain}");
        assert!(!chain.contains("ca-cert.pem"), "{what}: {chain}");
        assert!(chain.contains(reason), "{what}: {chain}");
    }
    // A link to nowhere is a broken deployment, not "no revocation list".
    std::fs::remove_file(dst_dir.join("ca-crl.pem")).unwrap();
    std::os::unix::fs::symlink(root.path().join("gone.pem"), dst_dir.join("ca-crl.pem")).unwrap();
    let error = TlsHandle::load(&dst_dir, vec![]).expect_err("dangling link");
    let chain = migproxy::human::Chain(&error).to_string();
    assert!(
        chain.contains("ca-crl.pem") && chain.contains("does not exist"),
        "{chain}"
    );
    // One that cannot be read (as root, a directory stands in for a file without permission).
    std::fs::remove_file(dst_dir.join("ca-crl.pem")).unwrap();
    std::fs::create_dir(dst_dir.join("ca-crl.pem")).unwrap();
    let error = TlsHandle::load(&dst_dir, vec![]).expect_err("a directory");
    let chain = migproxy::human::Chain(&error).to_string();
    assert!(chain.contains("ca-crl.pem: cannot read it: "), "{chain}");
    // No file at all: nothing is revoked.
    std::fs::remove_dir(dst_dir.join("ca-crl.pem")).unwrap();
    TlsHandle::load(&dst_dir, vec![]).unwrap();
}

#[test]
fn a_daemon_with_a_broken_crl_does_not_start() {
    let root = short_tempdir();
    let (_ca, _src_dir, dst_dir, _) = pki(root.path());
    std::fs::write(dst_dir.join("ca-crl.pem"), b"garbage\n").unwrap();
    let out = std::process::Command::new(common::process::BIN)
        .arg("daemon")
        .arg("--api")
        .arg(root.path().join("api.sock"))
        .args(["--peer-listen", "127.0.0.1:0"])
        .arg("--runtime-dir")
        .arg(root.path().join("run"))
        .arg("--tls-dir")
        .arg(&dst_dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_for_exit(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "TLS revocation list {}: it is neither PEM",
        dst_dir.join("ca-crl.pem").display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

/// The child's output once it exits; a child still running after 10 s is killed and fails
/// the test (a daemon that should have refused to start runs forever).
fn wait_for_exit(mut child: std::process::Child) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the daemon started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_crl_keeps_the_old_revocations() {
    use common::process::DaemonProcess;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let root = short_tempdir();
    let (ca, src_dir, dst_dir, client_serial) = pki(root.path());
    ca.write_crl(&dst_dir, &[client_serial]);
    let source = tls_daemon("src", &src_dir, &[]).await;
    let dst = dst_dir.display().to_string();
    let destination = DaemonProcess::start(
        root.path(),
        "dst",
        "127.0.0.1:0",
        None,
        &["--tls-dir", &dst],
    )
    .await;
    let log = root.path().join("dst.log");
    for (n, (what, content, reason)) in broken_crls(&ca).into_iter().enumerate() {
        std::fs::write(dst_dir.join("ca-crl.pem"), content).unwrap();
        kill(
            Pid::from_raw(destination.child.id().unwrap() as i32),
            Signal::SIGHUP,
        )
        .unwrap();
        common::wait_until(
            Duration::from_secs(5),
            "the failed reload to be logged",
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.matches("reload failed, keeping the old TLS material")
                    .count()
                    > n
            },
        )
        .await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(reason), "{what}: {text}");

        let id = format!("r{n}");
        let (status, incoming) = destination
            .request(
                "POST",
                "/v1/migrations",
                Some(json!({"direction": "incoming", "id": id, "target": format!("unix:/x-{n}")})),
            )
            .await;
        assert_eq!(status, 201, "{incoming}");
        let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"], "peer": incoming["peer"]});
        let (status, body) = source.request("POST", "/v1/migrations", Some(body)).await;
        assert_eq!(
            status, 502,
            "{what}: the revoked source was admitted: {body}"
        );
        assert!(
            story(&body).contains("CertificateRevoked"),
            "{what}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_alone_admits_every_identity() {
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = tls_daemon("dst", &dst_dir, &["*"]).await;
    let (status, body) = outgoing(&source, &destination, "s1", json!({})).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_patterns_match_by_attribute_in_either_order() {
    use rcgen::DnType::{CommonName, OrganizationName};
    let root = short_tempdir();
    let mut ca = Ca::new("migproxy test CA");
    let dst_dir = root.path().join("dst");
    ca.write_host(
        &dst_dir,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
    );
    let cn_first = root.path().join("cn-first");
    ca.write_host_as(
        &cn_first,
        &["source.test"],
        &[(CommonName, "source-daemon"), (OrganizationName, "Example")],
        common::certs::Validity::NOW,
    );
    // The order `openssl req -subj /O=Example/CN=source-daemon` gives.
    let o_first = root.path().join("o-first");
    ca.write_host_as(
        &o_first,
        &["source.test"],
        &[(OrganizationName, "Example"), (CommonName, "source-daemon")],
        common::certs::Validity::NOW,
    );
    let sources = [
        tls_daemon("cn-first", &cn_first, &[]).await,
        tls_daemon("o-first", &o_first, &[]).await,
    ];
    let cases = [
        ("CN=source-daemon", true),
        ("O=Example, CN=source-*", true),
        ("cn = source-daemon , o = Example", true),
        ("CN=source-daemon, O=Elsewhere", false),
        ("CN=source", false),
    ];
    for (n, (pattern, admitted)) in cases.into_iter().enumerate() {
        let destination = tls_daemon("dst", &dst_dir, &[pattern]).await;
        for (m, source) in sources.iter().enumerate() {
            let (status, body) =
                outgoing(source, &destination, &format!("p{n}-{m}"), json!({})).await;
            if admitted {
                assert_eq!(status, 201, "{pattern} must admit source {m}: {body}");
            } else {
                assert_eq!(status, 502, "{pattern} must refuse source {m}: {body}");
                let error = story(&body);
                assert!(
                    error.contains("is not allowed here (--tls-allow)"),
                    "{error}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_source_cannot_talk_to_a_tls_destination() {
    let root = short_tempdir();
    let (_ca, _src_dir, dst_dir, _) = pki(root.path());
    let source = TestDaemon::start("src").await;
    let destination = tls_daemon("dst", &dst_dir, &[]).await;
    refused(&source, &destination, json!({}), "handshake with peer").await;
}

#[test]
fn missing_tls_files_are_named() {
    let root = short_tempdir();
    let error = TlsHandle::load(root.path(), vec![])
        .unwrap_err()
        .to_string();
    assert!(error.contains("ca-cert.pem"), "{error}");
    let (_ca, src_dir, _, _) = pki(root.path());
    std::fs::remove_file(src_dir.join("client-key.pem")).unwrap();
    let error = TlsHandle::load(&src_dir, vec![]).unwrap_err().to_string();
    assert!(error.contains("client-key.pem"), "{error}");
}

#[test]
fn the_daemon_will_not_start_insecure_unless_told() {
    let dir = short_tempdir();
    let api = dir.path().join("api.sock");
    let run = |extra: &[&str]| {
        let mut child = std::process::Command::new(common::process::BIN)
            .arg("daemon")
            .arg("--api")
            .arg(&api)
            .args(["--peer-listen", "127.0.0.1:0"])
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A daemon that starts when it should have refused would run forever.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("migproxy daemon {extra:?} started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no --tls-dir given"), "{stderr}");
    assert!(!api.exists(), "nothing is left behind");

    let out = run(&["--tls-dir", "/nonexistent", "--insecure-plaintext"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--tls-allow", "CN=x", "--insecure-plaintext"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--tls-dir", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca-cert.pem"), "{stderr}");

    // A runtime directory others can write to is refused.
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let out = run(&["--insecure-plaintext"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is writable by its group or by others (mode 777)"),
        "{stderr}"
    );
    assert!(!api.exists(), "nothing is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_without_dropping_running_migrations() {
    use common::process::DaemonProcess;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let source = tls_daemon("src", &src_dir, &[]).await;
    let dst_dir_arg = dst_dir.display().to_string();
    let destination = DaemonProcess::start(
        root.path(),
        "dst",
        "127.0.0.1:0",
        None,
        &["--tls-dir", &dst_dir_arg],
    )
    .await;
    let create = |id: &str| {
        let id = id.to_owned();
        let (source, destination) = (&source, &destination);
        async move {
            let (status, incoming) = destination
                .request(
                    "POST",
                    "/v1/migrations",
                    Some(json!({"direction": "incoming", "id": id, "target": format!("unix:/x-{id}")})),
                )
                .await;
            assert_eq!(status, 201, "{incoming}");
            let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"], "peer": incoming["peer"]});
            source.request("POST", "/v1/migrations", Some(body)).await
        }
    };
    let (status, body) = create("before").await;
    assert_eq!(status, 201, "{body}");

    // The destination's material is replaced by another CA's, which the source does not trust.
    let mut other = Ca::new("replacement CA");
    other.write_host(
        &dst_dir,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
    );
    kill(
        Pid::from_raw(destination.child.id().unwrap() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    common::wait_until(Duration::from_secs(5), "the reload to be logged", || {
        std::fs::read_to_string(root.path().join("dst.log"))
            .unwrap_or_default()
            .contains("TLS material reloaded")
    })
    .await;

    let (status, body) = create("after").await;
    assert_eq!(
        status, 502,
        "new connections must use the new certificate: {body}"
    );
    assert!(story(&body).contains("UnknownIssuer"), "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // more than a heartbeat
    assert_eq!(
        source.show("before").await["state"],
        "active",
        "the running migration survives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_destination_certificate_is_refused() {
    use common::certs::Validity;
    let root = short_tempdir();
    // The destination's server certificate has expired: the source refuses it.
    let mut ca = Ca::new("migproxy test CA");
    let (src, dst) = (root.path().join("src"), root.path().join("dst"));
    ca.write_host(&src, &["source.test", "127.0.0.1"], "source-daemon");
    ca.write_host_valid(
        &dst,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
        Validity::EXPIRED,
    );
    let source = tls_daemon("src", &src, &[]).await;
    let destination = tls_daemon("dst", &dst, &[]).await;
    refused(&source, &destination, json!({}), "certificate expired").await;
}

/// TLS has one alert for an expired and a not yet valid certificate: the source, which knows
/// its own certificate, says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_is_said_to_be_not_yet_valid_or_expired() {
    use common::certs::Validity;
    let root = short_tempdir();
    let mut ca = Ca::new("migproxy test CA");
    let dst = root.path().join("dst");
    ca.write_host(
        &dst,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
    );
    let destination = tls_daemon("dst", &dst, &[]).await;
    let cases = [
        (
            Validity::NOT_YET,
            "it is not valid yet, only from Jan  1 00:00:00 2098",
        ),
        (Validity::EXPIRED, "it expired on Jan  1 00:00:00 2002"),
    ];
    for (n, (validity, expected)) in cases.into_iter().enumerate() {
        let src = root.path().join(format!("src{n}"));
        ca.write_host_valid(&src, &["source.test"], "source-daemon", validity);
        let source = tls_daemon("src", &src, &[]).await;
        let (status, body) = outgoing(&source, &destination, &format!("v{n}"), json!({})).await;
        assert_eq!(status, 502, "{body}");
        let error = story(&body);
        let refused = format!(
            "the peer refused this daemon's certificate {}",
            src.join("client-cert.pem").display()
        );
        assert!(error.contains(&refused), "{error}");
        assert!(error.contains(expected), "expected {expected:?} in {error}");
    }
}

/// The destination learns of the source's refusal of its certificate by the same alert, and
/// its log says which of the two it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_logs_why_its_expired_certificate_was_refused() {
    use common::certs::Validity;
    use common::process::DaemonProcess;
    let root = short_tempdir();
    let mut ca = Ca::new("migproxy test CA");
    let (src, dst) = (root.path().join("src"), root.path().join("dst"));
    ca.write_host(&src, &["source.test", "127.0.0.1"], "source-daemon");
    ca.write_host_valid(
        &dst,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
        Validity::EXPIRED,
    );
    let source = tls_daemon("src", &src, &[]).await;
    let dst_arg = dst.display().to_string();
    let destination = DaemonProcess::start(
        root.path(),
        "dst",
        "127.0.0.1:0",
        None,
        &["--tls-dir", &dst_arg],
    )
    .await;
    let (status, incoming) = destination
        .request(
            "POST",
            "/v1/migrations",
            Some(json!({"direction": "incoming", "id": "e1", "target": "unix:/x"})),
        )
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": "e1", "token": incoming["token"], "peer": incoming["peer"]});
    let (status, body) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 502, "{body}");
    let expected = format!(
        "the peer refused this daemon's certificate {} as expired or not yet valid (alert \
         CertificateExpired): it expired on Jan  1 00:00:00 2002",
        dst.join("server-cert.pem").display()
    );
    common::wait_until(Duration::from_secs(5), "the refusal to be logged", || {
        std::fs::read_to_string(root.path().join("dst.log"))
            .unwrap_or_default()
            .contains(&expected)
    })
    .await;
}

/// The source judges the destination's certificate itself: rustls names a not yet valid one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_certificate_not_yet_valid_is_said_to_be() {
    use common::certs::Validity;
    let root = short_tempdir();
    let mut ca = Ca::new("migproxy test CA");
    let (src, dst) = (root.path().join("src"), root.path().join("dst"));
    ca.write_host(&src, &["source.test", "127.0.0.1"], "source-daemon");
    ca.write_host_valid(
        &dst,
        &["destination.test", "127.0.0.1"],
        "destination-daemon",
        Validity::NOT_YET,
    );
    let source = tls_daemon("src", &src, &[]).await;
    let destination = tls_daemon("dst", &dst, &[]).await;
    refused(
        &source,
        &destination,
        json!({}),
        "certificate not valid yet",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_gets_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = short_tempdir();
    let (ca, _src, dst_dir, _) = pki(root.path());
    let destination = tls_daemon("dst", &dst_dir, &[]).await;
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&destination.peer)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("destination.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // TLS 1.3 lets the client finish first; the server's refusal arrives on the first read.
    if let Ok(mut stream) = connector.connect(name, tcp).await {
        let _ = stream.write_all(b"MGPX").await;
        let mut buf = Vec::new();
        let read = stream.read_to_end(&mut buf).await;
        assert!(read.is_err() || buf.is_empty(), "got {buf:?}");
    }
    common::wait_until(Duration::from_secs(2), "the refusal to be counted", || {
        destination.daemon.rejections.counts().get("tls") == Some(&1)
    })
    .await;
}

/// A TLS client, with or without a client certificate from `dir` (QEMU layout).
fn tls_client(ca: &Ca, client: Option<&Path>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(dir) => {
            let chain =
                rustls_pki_types::CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
            let key =
                rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// GET `path` over TLS; the whole response, or the error that ended it.
async fn get_over_tls(
    connector: &tokio_rustls::TlsConnector,
    address: &str,
    path: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("destination.test").unwrap();
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_mutual_tls_on_tcp_when_asked() {
    use common::process::DaemonProcess;
    let root = short_tempdir();
    let (ca, src_dir, dst_dir, _) = pki(root.path());
    let dst = dst_dir.display().to_string();
    let destination = DaemonProcess::start(
        root.path(),
        "dst",
        "127.0.0.1:0",
        None,
        &[
            "--tls-dir",
            &dst,
            "--api-listen",
            "127.0.0.1:0",
            "--tls-allow",
            "CN=source-*",
        ],
    )
    .await;
    let (_, info) = destination.request("GET", "/v1/info", None).await;
    let address = info["api_tls"].as_str().unwrap().to_owned();

    let response = get_over_tls(&tls_client(&ca, Some(&src_dir)), &address, "/v1/info")
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"link\":\"tls\""), "{response}");

    // No client certificate, or one outside the allow-list: no API.
    let refused = get_over_tls(&tls_client(&ca, None), &address, "/v1/info").await;
    // Refused in the handshake (an error) or right after it (no HTTP answer at all).
    assert!(
        refused.as_ref().map_or(true, |r| !r.contains("HTTP/")),
        "{refused:?}"
    );
    let refused = get_over_tls(&tls_client(&ca, Some(&dst_dir)), &address, "/v1/info").await;
    assert!(
        refused.as_ref().map_or(true, |r| !r.contains("HTTP/")),
        "destination-daemon is not allowed: {refused:?}"
    );
    let (_, info) = destination.request("GET", "/v1/info", None).await;
    assert_eq!(info["peer_rejections"]["api_tls"], 2, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_tls_handshake_is_refused_and_a_real_migration_still_goes_through() {
    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = short_tempdir();
    let (_ca, src_dir, dst_dir, _) = pki(root.path());
    let source = tls_daemon("src", &src_dir, &[]).await;
    let destination = {
        let tls = Arc::new(TlsHandle::load(&dst_dir, Vec::new()).unwrap());
        TestDaemon::start_with("dst", move |config| {
            config.tls = Some(tls);
            config.timing.handshake_timeout = Duration::from_millis(500);
            // Every connection comes from 127.0.0.1: let them all reach rustls (the address
            // limit has tests of its own, in tests/flood.rs).
            config.max_handshakes_per_address = config.max_handshakes;
        })
        .await
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut wave = Vec::new();
    for n in 0..120 {
        let len = rng.gen_range(0..6000);
        let mut garbage: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        // A third look like TLS records (handshake type, version 3.x, any length), so that
        // they reach rustls and the record framing rather than being refused at byte one.
        if n % 3 == 0 && garbage.len() >= 5 {
            garbage[..3].copy_from_slice(&[22, 3, rng.gen_range(1..=4)]);
        }
        let peer = destination.peer.clone();
        wave.push(tokio::spawn(async move {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(peer).await {
                let _ = stream.write_all(&garbage).await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut sink))
                    .await;
            }
        }));
    }
    for connection in wave {
        connection.await.unwrap();
    }
    // Refused in the handshake ("tls"), or turned away while 64 handshakes ran ("busy").
    let counts = destination.daemon.rejections.counts();
    let counted: u64 = counts.values().sum();
    assert!(counted >= 100, "refusals counted: {counts:?}");
    assert!(counts["tls"] >= 40, "{counts:?}");

    // A real migration still goes through, over TLS.
    carry(&source, &destination, "after", 4 << 20).await;
}
