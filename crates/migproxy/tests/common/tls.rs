//! Daemons with mutual TLS, their certificates, and how a refusal reads: what the TLS
//! tests share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use migproxy::tls::TlsHandle;
use serde_json::{Value, json};

use super::certs::Ca;
use super::daemon::{TestDaemon, story};

pub async fn tls_daemon(name: &str, dir: &Path, allow: &[&str]) -> TestDaemon {
    let allow: Vec<String> = allow.iter().map(|a| a.to_string()).collect();
    let tls = Arc::new(TlsHandle::load(dir, allow).unwrap());
    TestDaemon::start_with(name, move |config| config.tls = Some(tls)).await
}

/// Destination and source host directories signed by one CA.
pub fn pki(root: &Path) -> (Ca, std::path::PathBuf, std::path::PathBuf, u64) {
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

pub async fn outgoing(
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

/// Creating the outgoing migration fails with 502 and an error containing `expected`; the
/// destination's migration is left pending, untouched.
pub async fn refused(source: &TestDaemon, destination: &TestDaemon, extra: Value, expected: &str) {
    let (status, body) = outgoing(source, destination, "r1", extra).await;
    assert_eq!(status, 502, "{body}");
    let error = story(&body);
    assert!(error.contains(expected), "expected {expected:?} in {error}");
    assert_eq!(destination.show("r1").await["state"], "pending");
    assert!(source.daemon.list().is_empty());
}

/// What `ca-crl.pem` may hold that is not a revocation list, and what the error must say.
pub fn broken_crls(ca: &Ca) -> Vec<(&'static str, Vec<u8>, &'static str)> {
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

/// The child's output once it exits; a child still running after 10 s is killed and fails
/// the test (a daemon that should have refused to start runs forever).
pub fn wait_for_exit(mut child: std::process::Child) -> std::process::Output {
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
