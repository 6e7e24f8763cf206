//! Mutual TLS between daemons: real handshakes with certificates in QEMU's layout; who is
//! admitted (CA, name, allow-list patterns) and who is refused, and garbage in the handshake.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::certs::Ca;
use common::daemon::{TestDaemon, carry, migration_pair, story};
use common::tls::{outgoing, pki, refused, tls_daemon};
use common::{random_data, receive_all, send_all, short_tempdir};
use migproxy::tls::TlsHandle;
use rustls_pki_types::pem::PemObject;
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};

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
