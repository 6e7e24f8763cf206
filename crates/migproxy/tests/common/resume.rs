//! Two daemons with resumable channels, and one channel between them: the setup the
//! resumable channels' daemon tests share.

use std::time::Duration;

use migproxy_proto::{Hello, Status};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::daemon::{TestDaemon, stand_in_target, unix_path};
use super::receive_all;

/// Two daemons resuming for 20 s.
pub async fn resumable_daemons() -> (TestDaemon, TestDaemon) {
    resumable_daemons_for(Duration::from_secs(20)).await
}

pub async fn resumable_daemons_for(timeout: Duration) -> (TestDaemon, TestDaemon) {
    let resume = |c: &mut migproxy::daemon::Config| c.resume_timeout = timeout;
    let source = TestDaemon::start_with("src", resume).await;
    let destination = TestDaemon::start_with("dst", resume).await;
    (source, destination)
}

/// The migration `id` on both daemons, the source dialling `peer`; returns the URI for the
/// source QEMU.
pub async fn pair_via(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    target: &str,
    peer: &str,
) -> String {
    // A migration whose id says so is recoverable (postcopy recovery).
    let recoverable = id.starts_with("rec");
    let body = json!({"direction": "incoming", "id": id, "target": target,
                      "recoverable": recoverable});
    let (status, incoming) = destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"], "peer": peer,
                      "recoverable": recoverable});
    let (status, outgoing) = source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    outgoing["qemu_uri"].as_str().unwrap().to_owned()
}

/// Migration `id` with its one channel open, the source dialling `peer`: the destination
/// QEMU stand-in reads all it is given (its count and digest once the stream ends), the
/// source QEMU stand-in writes through `write`.
pub struct OneChannel {
    pub write: tokio::net::unix::OwnedWriteHalf,
    pub received: tokio::task::JoinHandle<std::io::Result<(u64, blake3::Hash)>>,
    _read: tokio::net::unix::OwnedReadHalf,
    _dir: tempfile::TempDir,
}

pub async fn one_channel(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    peer: &str,
) -> OneChannel {
    let (dir, qemu_in, target) = stand_in_target();
    let uri = pair_via(source, destination, id, &target, peer).await;
    let received = tokio::spawn(async move {
        let (stream, _) = qemu_in.accept().await?;
        receive_all(stream).await
    });
    let qemu = UnixStream::connect(unix_path(&uri)).await.unwrap();
    let (read, write) = qemu.into_split();
    OneChannel {
        write,
        received,
        _read: read,
        _dir: dir,
    }
}

/// [`one_channel`] with 1 MiB written, once the destination's channel is open: a
/// migration in flight.
pub async fn flowing(
    source: &TestDaemon,
    destination: &TestDaemon,
    id: &str,
    peer: &str,
) -> OneChannel {
    let mut channel = one_channel(source, destination, id, peer).await;
    channel.write.write_all(&[7; 1 << 20]).await.unwrap();
    destination
        .wait_for(id, "the channel open", Duration::from_secs(5), |v| {
            v["channels"][0]["state"] == "active"
        })
        .await;
    channel
}

/// Waits until `daemon` counts its migration `id`'s control link down.
pub async fn link_down(daemon: &TestDaemon, id: &str) {
    daemon
        .wait_for(id, "the control link down", Duration::from_secs(5), |v| {
            v["resume"]["link_outages"] == 1
        })
        .await;
}

/// Dials the destination daemon's peer port with `hello` (of either kind); returns its
/// answer.
pub async fn hello_answer(peer: &str, hello: &Hello) -> (Status, String) {
    let mut stream = TcpStream::connect(peer).await.unwrap();
    let mut wire = Vec::new();
    hello.encode(&mut wire);
    stream.write_all(&wire).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    let reply = migproxy_proto::HelloReply::decode(&reply).unwrap();
    (reply.status, reply.message)
}
