//! The migration's timers in paused time (`start_paused`): each fires exactly at its
//! deadline and not a moment before, and an answer that arrives in time stops it.

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::{Attribution, Control, Direction, Host, Leg, Op, Totals};

use super::*;
use crate::relay::Counters;

const TIMERS: Timers = Timers {
    explanation: Duration::from_millis(1000),
    cancel_wait: Duration::from_secs(2),
    token_ttl: Duration::from_secs(300),
    first_channel: Duration::from_secs(60),
};

fn migration(role: Role) -> Arc<Migration> {
    testing::migration(role, None, TIMERS)
}

fn peer_blame() -> Attribution {
    Attribution {
        host: Host::Source,
        leg: Leg::Peer,
        channel: Some(0),
        direction: Some(Direction::ToDestination),
        op: Op::Read,
        errno: Some("ECONNRESET".into()),
        message: "connection reset by peer".into(),
        bytes: Totals::default(),
        elapsed_ms: 0,
    }
}

/// Lets every task woken so far run, without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn an_unused_token_expires_at_its_ttl() {
    let m = migration(Role::Incoming);
    advance(TIMERS.token_ttl - Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Pending);
    advance(Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Expired);
}

#[tokio::test(start_paused = true)]
async fn a_used_token_does_not_expire() {
    let m = migration(Role::Incoming);
    let _link = m.attach_control(0, None).expect("attached");
    m.open_channel(0).expect("admitted");
    advance(TIMERS.token_ttl).await;
    assert_eq!(m.phase(), Phase::Active);
}

#[tokio::test(start_paused = true)]
async fn the_first_channel_deadline_fails_an_idle_pair_and_a_channel_stops_it() {
    let m = migration(Role::Outgoing);
    let _link = m.attach_control(0, None).expect("attached");
    advance(TIMERS.first_channel - Duration::from_millis(1)).await;
    assert_eq!(m.phase(), Phase::Attached);
    advance(Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Failed);

    let m = migration(Role::Outgoing);
    let _link = m.attach_control(0, None).expect("attached");
    m.open_channel(0).expect("admitted");
    advance(TIMERS.first_channel * 2).await;
    assert_eq!(m.phase(), Phase::Active);
}

#[tokio::test(start_paused = true)]
async fn a_peer_leg_failure_waits_exactly_the_grace_for_an_explanation() {
    let m = migration(Role::Outgoing);
    let link = m.attach_control(0, None).expect("attached");
    m.fail_or_wait(link.epoch, peer_blame());
    advance(TIMERS.explanation - Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Active, "still waiting");
    advance(Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Failed);
    assert_eq!(m.snapshot().error.map(|e| e.host.as_str()), Some("source"));

    // The explanation arrives within the grace: the peer's story, and the timer is moot.
    let m = migration(Role::Outgoing);
    let link = m.attach_control(0, None).expect("attached");
    m.fail_or_wait(link.epoch, peer_blame());
    advance(TIMERS.explanation / 2).await;
    let mut theirs = peer_blame();
    theirs.host = Host::Destination;
    theirs.leg = Leg::Qemu;
    m.on_peer(link.epoch, Control::Failed(theirs));
    advance(TIMERS.explanation).await;
    let error = m.snapshot().error.expect("failed");
    assert_eq!(
        (error.host.as_str(), error.leg.as_str()),
        ("destination", "qemu")
    );
}

#[tokio::test(start_paused = true)]
async fn a_destination_cancel_waits_for_the_source_then_ends_anyway() {
    let m = migration(Role::Incoming);
    let mut link = m.attach_control(0, None).expect("attached");
    m.open_channel(0).expect("admitted");
    let cancelling = tokio::spawn({
        let m = Arc::clone(&m);
        async move { m.cancel_through_qemu(Host::Destination).await }
    });
    settle().await;
    assert_eq!(
        m.phase(),
        Phase::Cancelling {
            by: Host::Destination.into()
        }
    );
    // The source is asked first.
    assert!(matches!(
        link.queue.try_recv(),
        Ok(Outbound::Frame(Control::Cancel {
            by: Host::Destination
        }))
    ));
    advance(TIMERS.cancel_wait - Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Active);
    advance(Duration::from_millis(1)).await;
    assert_eq!(m.state(), State::Cancelled);
    assert_eq!(cancelling.await.unwrap(), Ok(true));
}

#[tokio::test(start_paused = true)]
async fn the_stall_watch_fires_within_a_twentieth_of_its_limit() {
    let limit = Duration::from_secs(30);
    let m = migration(Role::Outgoing);
    let _link = m.attach_control(0, None).expect("attached");
    m.open_channel(0).expect("admitted");
    m.channel_running(0, Arc::new(Counters::new()));
    let watch = tokio::spawn(Arc::clone(&m).watch_stall(limit));
    // Sleeping (not advancing in one jump) lets the watch tick as it would: paused time runs
    // from timer to timer.
    tokio::time::sleep(limit - Duration::from_millis(100)).await;
    assert_eq!(m.state(), State::Active);
    // Checked every min(limit/20, 0.5 s): concluded by limit + 1.5 s at the latest.
    tokio::time::sleep(limit / 20 + Duration::from_millis(100)).await;
    settle().await;
    assert_eq!(m.state(), State::Failed);
    let error = m.snapshot().error.expect("failed");
    assert!(
        error.detail.contains("the source QEMU sent nothing"),
        "{}",
        error.detail
    );
    watch.await.unwrap();
}
