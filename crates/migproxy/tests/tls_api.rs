//! The daemon's API over TCP behind the peer port's mutual TLS (`--api-listen`).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::certs::Ca;
use common::short_tempdir;
use common::tls::pki;
use rustls_pki_types::pem::PemObject;

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
