//! Mutual TLS between daemons: revocation lists (PEM and DER, broken ones named) and reloads
//! on SIGHUP that keep running migrations and the old revocations when the new ones are broken.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::certs::Ca;
use common::daemon::story;
use common::short_tempdir;
use common::tls::{broken_crls, pki, refused, tls_daemon, wait_for_exit};
use migproxy::tls::TlsHandle;
use serde_json::json;

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
