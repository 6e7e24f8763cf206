//! A channel whose local QEMU closes its socket with bytes unread — QEMU 7.2's destination
//! does so on a multifd channel as it completes — over real sockets: the end gives way to
//! QEMU's `completed` when QEMU says it, and stays a failure of the QEMU leg otherwise.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::*;
use crate::daemon::migration::state::ChannelState;
use crate::daemon::migration::{Role, State, Timers};
use crate::daemon::qemu::report::Settings;
use crate::transport::Stream;

const GRACE: Duration = Duration::from_millis(300);

fn migration() -> Arc<Migration> {
    let qemu = Settings {
        qmp: "/nowhere.qmp".into(),
        multifd: Some(1),
        postcopy: false,
        postcopy_after_ms: None,
        max_bandwidth: None,
        downtime_limit_ms: None,
    };
    let timers = Timers {
        explanation: GRACE,
        ..Timers::default()
    };
    crate::daemon::migration::testing::migration(Role::Incoming, Some(qemu), timers)
}

/// Runs channel 1 of `m` between a peer connection that sends `sent` bytes and then its end,
/// and a "QEMU" that reads none of them and closes: the daemon's read of the QEMU leg is
/// reset (`ECONNRESET`).
async fn reset_by_qemu(m: &Arc<Migration>) -> Duration {
    let admitted = m.open_channel(1).expect("admitted");
    assert!(m.channel_connected(admitted.epoch, 1));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (link, _) = listener.accept().await.unwrap();
    let (qemu, daemon_end) = UnixStream::pair().unwrap();
    let sender = tokio::spawn(async move {
        peer.write_all(&[7u8; 4096]).await.unwrap();
        peer.shutdown().await.unwrap();
        peer
    });
    let started = tokio::time::Instant::now();
    let channel = tokio::spawn(run(
        Arc::clone(m),
        1,
        admitted,
        Leg::new("tcp:peer", Stream::Tcp(link)),
        Leg::new("unix:qemu", Stream::Unix(daemon_end)),
        "unix:qemu".into(),
    ));
    let _peer = sender.await.unwrap();
    // The bytes are in QEMU's socket, unread, when it closes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(qemu);
    channel.await.unwrap();
    started.elapsed()
}

fn channel_state(m: &Migration, index: usize) -> ChannelState {
    m.snapshot().channels[index].state
}

#[tokio::test]
async fn a_qemu_leg_reset_gives_way_to_qemus_completed() {
    let m = migration();
    let _link = m.attach_control(0, None).expect("attached");
    m.open_channel(0).expect("admitted");
    let completed = serde_json::json!({"status": "completed"});
    m.qemu_observed(completed, None, &[], Duration::ZERO);
    reset_by_qemu(&m).await;
    assert_eq!(channel_state(&m, 1), ChannelState::Completed);
    assert_ne!(m.state(), State::Failed, "{:?}", m.snapshot().error);
}

#[tokio::test]
async fn a_qemu_leg_reset_without_qemus_completed_fails_the_qemu_leg() {
    let m = migration();
    let _link = m.attach_control(0, None).expect("attached");
    m.open_channel(0).expect("admitted");
    let active = serde_json::json!({"status": "active"});
    m.qemu_observed(active, None, &[], Duration::ZERO);
    let took = reset_by_qemu(&m).await;
    assert!(took >= GRACE, "QEMU was given the grace to say completed");
    assert_eq!(channel_state(&m, 1), ChannelState::Failed);
    assert_eq!(m.state(), State::Failed);
    let error = m.snapshot().error.expect("the failure");
    assert_eq!(error.leg.as_str(), "qemu", "{error:?}");
    assert_eq!(error.errno.as_deref(), Some("ECONNRESET"), "{error:?}");
}
