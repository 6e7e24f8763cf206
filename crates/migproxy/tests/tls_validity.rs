//! Mutual TLS between daemons: certificates expired or not yet valid are refused and said to
//! be; missing files are named; a daemon will not run without TLS unless told.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::certs::Ca;
use common::daemon::story;
use common::short_tempdir;
use common::tls::{outgoing, pki, refused, tls_daemon};
use migproxy::tls::TlsHandle;
use serde_json::json;

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
