//! The escape hatch from migproxy's own TLS record layer: stock rustls records
//! (`--tls-records stock`), on both daemons or facing migproxy's own.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{TestDaemon, carry};
use common::tls::pki;
use common::{random_data, receive_all, send_all, short_tempdir};
use migproxy::tls::{Records, TlsHandle};
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};

async fn tls_daemon_with(name: &str, dir: &Path, records: Records) -> TestDaemon {
    let tls = Arc::new(TlsHandle::load_with(dir, Vec::new(), records).unwrap());
    assert_eq!(tls.current().records(), records);
    TestDaemon::start_with(name, move |config| config.tls = Some(tls)).await
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
