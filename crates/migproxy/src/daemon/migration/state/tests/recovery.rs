//! Postcopy recovery driven over QMP: what pauses, what fails, how each pause is counted,
//! and the deadline.

use migproxy_proto::{Control, Host, Leg};

use super::super::*;
use super::driver::*;
use crate::daemon::qemu::report::Status;

const LIMIT: u64 = 600_000;

fn driven(role: Role) -> Config {
    Config {
        recoverable: true,
        qemu: true,
        postcopy: true,
        recover_timeout_ms: Some(LIMIT),
        ..config(role)
    }
}

/// Active with one channel, QEMU in postcopy; then the link breaks at `at_ms`.
fn paused_at(d: &mut Driver<'_>, at_ms: u64) -> Vec<Effect> {
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::PostcopyActive,
    });
    let epoch = d.epoch();
    d.step_at(
        Input::Failure {
            epoch,
            blame: blame(Leg::Peer),
            wait: false,
        },
        at_ms,
    )
    .expect("the break is taken")
}

pub(super) fn postcopy_driven_over_qmp_pauses_on_a_break_and_counts_the_frozen_time(
    seen: &mut Seen,
) {
    let mut d = Driver::new(driven(Role::Outgoing), seen);
    let effects = paused_at(&mut d, 1_000);
    assert_eq!(d.phase(), "paused");
    assert!(effects.contains(&Effect::AwaitRecovery {
        pause: 1,
        limit_ms: LIMIT
    }));
    assert!(effects.contains(&Effect::Announce(Note::Paused {
        pause: 1,
        cause: blame(Leg::Peer)
    })));
    d.ok(Input::Qemu {
        status: Status::PostcopyPaused,
    });
    d.ok(Input::ResumeFailed {
        blame: blame(Leg::Peer),
    });
    // The link is back: recovering, and QEMU's postcopy-active ends the pause.
    let effects = d
        .step_at(Input::Attach { first_channel: 1 }, 21_000)
        .unwrap();
    assert!(effects.contains(&Effect::Announce(Note::Recovering { pause: 1 })));
    d.ok(Input::Qemu {
        status: Status::PostcopyRecover,
    });
    let resumed = Input::Qemu {
        status: Status::PostcopyActive,
    };
    let effects = d.step_at(resumed, 21_500).unwrap();
    assert!(effects.contains(&Effect::Announce(Note::Resumed {
        pause: 1,
        frozen_ms: 20_500
    })));
    let r = d.core.recoveries();
    assert_eq!((r.recovered(), r.all()[0].failed_attempts), (1, 1));
    // Its deadline is moot now.
    d.refused(Input::RecoverOver {
        pause: 1,
        limit_ms: LIMIT,
    });
    // A second break is a second pause, with a deadline of its own.
    let epoch = d.epoch();
    let failure = Input::Failure {
        epoch,
        blame: blame(Leg::Peer),
        wait: false,
    };
    let effects = d.step_at(failure, 30_000).unwrap();
    assert!(effects.contains(&Effect::AwaitRecovery {
        pause: 2,
        limit_ms: LIMIT
    }));
    assert_eq!(d.core.recoveries().frozen_ms(31_000), 20_500 + 1_000);
}

pub(super) fn with_qmp_only_a_broken_transport_in_postcopy_pauses(seen: &mut Seen) {
    // In precopy the guest still runs on the source: the migration fails as any other.
    let mut d = Driver::new(driven(Role::Outgoing), seen);
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::Active,
    });
    let epoch = d.epoch();
    d.ok(Input::Failure {
        epoch,
        blame: blame(Leg::Peer),
        wait: false,
    });
    assert_eq!(d.phase(), "failed");
    // A dead QEMU in postcopy cannot be recovered.
    let mut d = Driver::new(driven(Role::Incoming), d.seen);
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::PostcopyActive,
    });
    let epoch = d.epoch();
    d.ok(Input::Failure {
        epoch,
        blame: blame(Leg::Qemu),
        wait: false,
    });
    assert_eq!(d.phase(), "failed");
    assert!(d.core.recoveries().all().is_empty());
}

/// Around QEMU's switch to postcopy the two hosts' polls of QEMU may disagree for a moment:
/// each host follows the other's conclusion, so both tell one story. A host that failed
/// says so for good (`GaveUp`), and one that paused says `Failed`, which pauses the peer
/// whatever its own poll has seen.
pub(super) fn around_the_switch_each_host_follows_the_others_conclusion(seen: &mut Seen) {
    // The source, still `active` at its last poll, hears that the destination paused.
    let mut d = Driver::new(driven(Role::Outgoing), seen);
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::Active,
    });
    d.peer_ok(Control::Failed(blame(Leg::Peer)));
    assert_eq!(d.phase(), "paused");
    // The source fails in precopy: it tells the destination so for good.
    let mut d = Driver::new(driven(Role::Outgoing), d.seen);
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::Active,
    });
    let effects = d.broke(Leg::Peer);
    assert_eq!(d.phase(), "failed");
    let gave_up = |e: &Effect| matches!(e, Effect::Send(Control::GaveUp(_)));
    assert!(effects.iter().any(gave_up), "{effects:?}");
    // The destination, which saw postcopy already, fails with it rather than pause alone.
    let mut d = Driver::new(driven(Role::Incoming), d.seen);
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::PostcopyActive,
    });
    d.peer_ok(Control::GaveUp(blame(Leg::Peer)));
    assert_eq!(d.phase(), "failed");
}

pub(super) fn a_pause_not_recovered_in_time_fails_for_good_in_every_phase(seen: &mut Seen) {
    let over = Input::RecoverOver {
        pause: 1,
        limit_ms: LIMIT,
    };
    // Still paused.
    let mut d = Driver::new(driven(Role::Incoming), seen);
    paused_at(&mut d, 1_000);
    let effects = d.ok(over.clone());
    assert_eq!(d.phase(), "failed");
    assert!(effects.contains(&Effect::Stop) && sends_failed(&effects));
    let error = d.core.error().expect("the cause");
    assert!(error.message.contains("recover_timeout"), "{error:?}");
    assert!(
        error.message.contains("migrate-recover"),
        "says what a person can do"
    );
    // The link came back, QEMU did not resume.
    let mut d = Driver::new(driven(Role::Incoming), d.seen);
    paused_at(&mut d, 1_000);
    d.ok(Input::Attach { first_channel: 1 });
    d.ok(over.clone());
    assert_eq!(d.phase(), "failed");
    // Its channels opened, QEMU did not resume.
    let mut d = Driver::new(driven(Role::Incoming), d.seen);
    paused_at(&mut d, 1_000);
    d.ok(Input::Attach { first_channel: 1 });
    d.ok(Input::Open { index: 1 });
    d.ok(over);
    assert_eq!(d.phase(), "failed");
}

/// The peer's recover timeout ran out while this host's link was back (a by-hand
/// recovery brings it back at once): it failed for good, and so does this host, which
/// would otherwise pause again with no timer of its own (the pause is already open) and
/// wait for a recovery nobody will make.
pub(super) fn a_peer_that_gave_up_fails_this_host_too_never_a_pause(seen: &mut Seen) {
    let config = Config {
        qemu: false,
        recover_timeout_ms: None,
        ..driven(Role::Incoming)
    };
    let mut d = Driver::new(config, seen);
    d.active(1);
    d.broke(Leg::Peer);
    assert_eq!(d.phase(), "paused");
    d.ok(Input::Attach { first_channel: 1 });
    d.peer_ok(Control::GaveUp(blame(Leg::Peer)));
    assert_eq!(d.phase(), "failed");
    // The same once the recovery's first channel opened.
    let mut d = Driver::new(config, d.seen);
    d.active(1);
    d.broke(Leg::Peer);
    d.ok(Input::Attach { first_channel: 1 });
    d.ok(Input::Open { index: 1 });
    assert_eq!(d.phase(), "active");
    d.peer_ok(Control::GaveUp(blame(Leg::Peer)));
    assert_eq!(d.phase(), "failed");
    // A plain failure from the peer, by contrast, pauses a recoverable migration here.
    let mut d = Driver::new(config_paused_by_failed(), d.seen);
    d.active(1);
    d.peer_ok(Control::Failed(blame(Leg::Peer)));
    assert_eq!(d.phase(), "paused");
}

/// Paused after this host said Done (its channel ended cleanly, then the link broke, with
/// no QMP to say QEMU completed): the source's cancel, told on a hello with no link up, is
/// taken. That Done belongs to an epoch that is over; only QEMU's own `completed` refuses.
pub(super) fn a_cancel_told_while_paused_is_taken_after_this_hosts_done(seen: &mut Seen) {
    let mut d = Driver::new(config_paused_by_failed(), seen);
    d.active(1);
    d.end_clean(0, 1, ReturnPath::Shut(0));
    assert_eq!(d.phase(), "completing");
    d.broke(Leg::Peer);
    assert_eq!(d.phase(), "paused");
    d.peer_ok(Control::Cancel { by: Host::Source });
    assert_eq!(d.phase(), "cancelled");
}

fn config_paused_by_failed() -> Config {
    Config {
        qemu: false,
        ..driven(Role::Incoming)
    }
}

pub(super) fn a_resume_the_peer_refuses_fails_for_good(seen: &mut Seen) {
    let mut d = Driver::new(driven(Role::Outgoing), seen);
    d.refused(Input::ResumeRefused {
        blame: blame(Leg::Peer),
    });
    paused_at(&mut d, 1_000);
    d.ok(Input::ResumeRefused {
        blame: blame(Leg::Peer),
    });
    assert_eq!(d.phase(), "failed");
}

pub(super) fn a_cancel_while_paused_stops_the_recovery_on_either_host(seen: &mut Seen) {
    for role in [Role::Outgoing, Role::Incoming] {
        let mut d = Driver::new(driven(role), seen);
        d.ok(Input::QemuFollowing);
        paused_at(&mut d, 1_000);
        d.ok(Input::Qemu {
            status: Status::PostcopyPaused,
        });
        // Not through QEMU, which cannot cancel in postcopy, and not refused: nothing moves.
        let (effects, route) = d.core.ask(role.host()).expect("a cancel while paused");
        assert_eq!(route, CancelRoute::Now, "{effects:?}");
        assert_eq!(d.core.state(), State::Cancelled);
        assert!(
            d.core.cancelled_paused(),
            "the view says where the guest is"
        );
        d.seen.insert(("paused", "ask cancel", "cancelled"));
    }
    // The peer's cancel (the destination refused a resume: cancelled there) ends it too.
    let mut d = Driver::new(driven(Role::Outgoing), seen);
    paused_at(&mut d, 1_000);
    d.ok(Input::Cancel {
        by: Host::Destination,
    });
    assert_eq!(d.core.cancelled_by(), Some(Host::Destination));
}

pub(super) fn a_recovery_ends_however_quickly_qemu_gets_back(seen: &mut Seen) {
    // QEMU went on to completed within one look: the pause is closed all the same.
    let mut d = Driver::new(driven(Role::Outgoing), seen);
    paused_at(&mut d, 1_000);
    d.ok(Input::Qemu {
        status: Status::PostcopyPaused,
    });
    d.step_at(Input::Attach { first_channel: 1 }, 2_000)
        .unwrap();
    let effects = d
        .step_at(
            Input::Qemu {
                status: Status::Completed,
            },
            3_000,
        )
        .unwrap();
    assert!(effects.contains(&Effect::Announce(Note::Resumed {
        pause: 1,
        frozen_ms: 2_000
    })));
    // A cancel while recovering (the link back, QEMU not yet) is taken as while paused.
    let mut d = Driver::new(driven(Role::Outgoing), d.seen);
    d.ok(Input::QemuFollowing);
    paused_at(&mut d, 1_000);
    d.ok(Input::Attach { first_channel: 1 });
    let (_, route) = d.core.ask(Host::Source).expect("a cancel while recovering");
    assert_eq!(route, CancelRoute::Now);
    assert!(d.core.cancelled_paused());
    d.seen.insert(("attached", "ask cancel", "cancelled"));
    // An epoch that broke before any channel: the source's next link names the same first
    // channel, and a host that had not noticed takes it as a new epoch.
    let mut d = Driver::new(driven(Role::Incoming), d.seen);
    paused_at(&mut d, 1_000);
    d.ok(Input::Attach { first_channel: 1 });
    d.ok(Input::Attach { first_channel: 1 });
    assert_eq!((d.phase(), d.epoch(), d.core.paused()), ("attached", 3, 2));
}
