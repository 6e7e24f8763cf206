//! The lifecycle's scenarios, one function each: completion, disagreements, deadlines,
//! failures, cancels, epochs and refusals.

use migproxy_proto::{ChannelEnd, Control, Host, Leg, Op, Totals, Verdict};

use super::super::*;
use super::driver::*;

// ---- completion ----

pub(super) fn without_qmp_or_return_path_it_is_transferred(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    assert_eq!(d.phase(), "pending");
    let effects = d.ok(Input::Attach { first_channel: 0 });
    assert!(effects.contains(&Effect::Release { index: 0 }));
    assert!(effects.contains(&Effect::AwaitFirstChannel));
    assert_eq!(d.phase(), "attached");
    d.ok(Input::Open { index: 0 });
    assert_eq!(d.phase(), "active");
    d.ok(Input::Running { index: 0 });
    let effects = d.end_clean(0, 100, ReturnPath::Silent);
    assert_eq!(sent_done(&effects), Some(Verdict::Unknown));
    assert_eq!(d.phase(), "completing");
    d.peer_done(1, 100, Verdict::Unknown).unwrap();
    assert_eq!(d.core.state(), State::Transferred);
    // Ended: nothing more is taken.
    assert_eq!(
        d.refused(Input::Failure {
            epoch: 1,
            blame: blame(Leg::Qemu),
            wait: false
        }),
        Refusal::Phase("transferred")
    );
}

pub(super) fn the_destinations_shut_makes_it_completed(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.active(1);
    // The peer's Done first: the last channel's end completes it directly from active.
    d.peer_done(1, 100, Verdict::ReturnPath).unwrap();
    assert_eq!(d.phase(), "active");
    let effects = d.end_clean(0, 100, ReturnPath::Shut(0));
    assert_eq!(sent_done(&effects), Some(Verdict::ReturnPath));
    assert_eq!(d.core.state(), State::Completed);
    assert!(effects.contains(&Effect::Stop));
}

pub(super) fn one_host_without_evidence_makes_it_transferred(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.active(1);
    d.end_clean(0, 100, ReturnPath::Shut(0));
    d.peer_done(1, 100, Verdict::Unknown).unwrap();
    assert_eq!(
        d.core.state(),
        State::Transferred,
        "both hosts tell one story"
    );
}

pub(super) fn with_qmp_qemus_word_is_needed(seen: &mut Seen) {
    let mut d = Driver::new(
        Config {
            qemu: true,
            ..config(Role::Outgoing)
        },
        seen,
    );
    d.active(2);
    assert_eq!(sent_done(&d.end_clean(0, 50, ReturnPath::NotWatched)), None);
    assert_eq!(sent_done(&d.end_clean(1, 50, ReturnPath::NotWatched)), None);
    assert_eq!(d.phase(), "active", "no Done before QEMU's completed");
    d.ok(Input::Qemu {
        status: Status::Active,
    });
    let effects = d.ok(Input::Qemu {
        status: Status::Completed,
    });
    assert_eq!(sent_done(&effects), Some(Verdict::Qemu));
    assert_eq!(d.phase(), "completing");
    assert_eq!(
        d.refused(Input::AskCancel { by: Host::Source }),
        Refusal::Cancel(CancelRefused::Completed)
    );
    d.peer(Control::Done {
        channels: 2,
        bytes: Totals {
            to_destination: 100,
            to_source: 32,
        },
        verdict: Verdict::Qemu,
    })
    .unwrap();
    assert_eq!(d.core.state(), State::Completed);
}

pub(super) fn a_new_channel_reopens_a_completing_epoch(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.active(1);
    d.end_clean(0, 100, ReturnPath::Silent);
    assert_eq!(d.phase(), "completing");
    d.ok(Input::Open { index: 1 });
    assert_eq!(d.phase(), "active");
    d.ok(Input::Running { index: 1 });
    let effects = d.end_clean(1, 7, ReturnPath::NotWatched);
    assert!(
        sent_done(&effects).is_some(),
        "Done said again with 2 channels"
    );
    d.peer(Control::Done {
        channels: 2,
        bytes: Totals {
            to_destination: 107,
            to_source: 32,
        },
        verdict: Verdict::Unknown,
    })
    .unwrap();
    assert_eq!(d.core.state(), State::Transferred);
}

// ---- disagreements ----

pub(super) fn byte_counts_that_disagree_fail_it_naming_the_channel(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.active(1);
    d.peer(Control::ChannelClosed {
        channel: 0,
        end: ChannelEnd::Completed,
        bytes: bytes(99),
    })
    .unwrap();
    d.end_clean(0, 100, ReturnPath::Silent);
    let effects = d.peer_done(1, 99, Verdict::Unknown).unwrap();
    assert_eq!(d.core.state(), State::Failed);
    assert!(sends_failed(&effects));
    let error = d.core.error().expect("error");
    assert_eq!(error.channel, Some(0));
    assert!(
        error
            .message
            .contains("99 at the source, 100 at the destination")
    );
}

pub(super) fn a_destination_with_a_channel_the_source_never_opened_fails(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.active(2);
    d.end_clean(0, 100, ReturnPath::Silent);
    // Channel 1 (an intruder's) still runs; the source says it opened one channel.
    let effects = d.peer_done(1, 100, Verdict::Unknown).unwrap();
    assert_eq!(d.core.state(), State::Failed);
    assert!(sends_failed(&effects));
    let error = d.core.error().expect("error");
    assert!(
        error.message.contains("opened 1 channel(s)") && error.message.contains("carried 2"),
        "{}",
        error.message
    );
}

pub(super) fn a_source_told_of_more_channels_than_it_opened_fails(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.active(1);
    d.end_clean(0, 100, ReturnPath::Silent);
    d.peer_done(2, 100, Verdict::Unknown).unwrap();
    assert_eq!(d.core.state(), State::Failed);
    // Fewer at the destination is only a channel still on its way: wait.
    let mut d = Driver::new(config(Role::Outgoing), d.seen);
    d.active(2);
    d.end_clean(0, 100, ReturnPath::Silent);
    d.end_clean(1, 1, ReturnPath::NotWatched);
    d.peer_done(1, 100, Verdict::Unknown).unwrap();
    assert_eq!(d.phase(), "completing");
}

// ---- deadlines ----

pub(super) fn an_unused_token_expires_and_only_while_pending(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    let effects = d.ok(Input::TtlOver);
    assert_eq!(d.core.state(), State::Expired);
    assert!(effects.contains(&Effect::Stop));
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.ok(Input::Attach { first_channel: 0 });
    assert_eq!(d.refused(Input::TtlOver), Refusal::Phase("attached"));
}

pub(super) fn a_first_channel_that_never_comes_ends_it(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.ok(Input::Attach { first_channel: 0 });
    let over = |epoch| Input::FirstChannelOver {
        epoch,
        limit_ms: 60_000,
    };
    assert_eq!(d.refused(over(7)), Refusal::Stale);
    let effects = d.ok(over(1));
    assert!(sends_failed(&effects));
    assert_eq!(d.core.state(), State::Failed);
    let error = d.core.error().expect("error");
    assert_eq!(
        (error.host, error.leg, error.op),
        (Host::Source, Leg::Qemu, Op::Timeout)
    );
    assert!(error.message.contains("60.0 s"), "{}", error.message);
    // Once a channel has opened, the deadline is moot.
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.active(1);
    assert_eq!(d.refused(over(1)), Refusal::Phase("active"));
    // A recoverable one fails too: nothing was carried, so there is nothing to recover, and
    // a pause would hold the slot for ever.
    let mut d = Driver::new(
        Config {
            recoverable: true,
            ..config(Role::Outgoing)
        },
        d.seen,
    );
    d.ok(Input::Attach { first_channel: 0 });
    d.ok(over(1));
    assert_eq!(d.phase(), "failed");
}

/// A cancel asked on the destination crossing the source's Done: the source, done, ignores
/// the cancel; the destination's cancel wait does not end it while a Done is in; the Done
/// completes both. (From review: the hosts used to end completed and cancelled.)
pub(super) fn a_cancel_crossing_the_sources_done_completes_both(seen: &mut Seen) {
    let mut source = Driver::new(config(Role::Outgoing), seen);
    source.active(1);
    source.end_clean(0, 100, ReturnPath::Shut(0));
    assert_eq!(source.phase(), "completing");
    let refused = source
        .peer(Control::Cancel {
            by: Host::Destination,
        })
        .unwrap_err();
    assert_eq!(refused, Refusal::Cancel(CancelRefused::Completing));
    let mut destination = Driver::new(config(Role::Incoming), source.seen);
    destination.active(1);
    destination.ok(Input::AskCancel {
        by: Host::Destination,
    });
    destination.end_clean(0, 100, ReturnPath::Shut(0));
    assert_eq!(
        destination.refused(Input::CancelWaitOver),
        Refusal::Phase("completing")
    );
    destination.peer_done(1, 100, Verdict::ReturnPath).unwrap();
    assert_eq!(destination.core.state(), State::Completed);
}

/// A recoverable source that paused before it saw the destination's cancel: the destination
/// finishes its cancel rather than pausing for a recovery nobody will start.
pub(super) fn a_recoverable_pause_crossing_a_cancel_ends_the_cancel(seen: &mut Seen) {
    let mut d = Driver::new(
        Config {
            recoverable: true,
            ..config(Role::Incoming)
        },
        seen,
    );
    d.active(1);
    d.ok(Input::AskCancel {
        by: Host::Destination,
    });
    d.peer(Control::Failed(blame(Leg::Qemu))).unwrap();
    assert_eq!(d.core.state(), State::Cancelled);
    // A Done about a past epoch is not taken.
    let mut d = Driver::new(
        Config {
            recoverable: true,
            ..config(Role::Incoming)
        },
        d.seen,
    );
    d.active(1);
    d.ok(Input::Failure {
        epoch: 1,
        blame: blame(Leg::Qemu),
        wait: false,
    });
    assert_eq!(
        d.peer_done(1, 100, Verdict::ReturnPath).unwrap_err(),
        Refusal::Stale
    );
}

// ---- failures ----

pub(super) fn a_peer_leg_failure_waits_for_the_explanation(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.active(1);
    let effects = d.ok(Input::Failure {
        epoch: 1,
        blame: blame(Leg::Peer),
        wait: true,
    });
    assert!(matches!(
        effects.as_slice(),
        [Effect::AwaitExplanation { epoch: 1, .. }]
    ));
    assert_eq!(d.phase(), "active");
    // The explanation arrives: the peer's story, not echoed back.
    let mut theirs = blame(Leg::Qemu);
    theirs.host = Host::Destination;
    let effects = d.peer(Control::Failed(theirs.clone())).unwrap();
    assert!(!sends_failed(&effects));
    assert_eq!(d.core.error(), Some(&theirs));
    assert_eq!(d.core.state(), State::Failed);
    assert_eq!(
        d.refused(Input::GraceOver {
            epoch: 1,
            blame: blame(Leg::Peer)
        }),
        Refusal::Phase("failed")
    );
}

pub(super) fn no_explanation_in_time_fails_with_its_own_cause(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.ok(Input::Attach { first_channel: 0 });
    d.ok(Input::Failure {
        epoch: 1,
        blame: blame(Leg::Peer),
        wait: true,
    });
    assert_eq!(
        d.refused(Input::GraceOver {
            epoch: 9,
            blame: blame(Leg::Peer)
        }),
        Refusal::Stale
    );
    let effects = d.ok(Input::GraceOver {
        epoch: 1,
        blame: blame(Leg::Peer),
    });
    assert!(sends_failed(&effects));
    assert!(effects.contains(&Effect::EndEpoch) && effects.contains(&Effect::Stop));
    assert_eq!(d.core.state(), State::Failed);
}

pub(super) fn a_certain_failure_ends_it_at_once_and_the_first_cause_wins(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.active(1);
    let first = blame(Leg::Qemu);
    let effects = d.ok(Input::Ended {
        epoch: 1,
        index: 0,
        end: ChannelEnd::Failed,
        bytes: bytes(3),
        failure: Some((first.clone(), false)),
        return_path: ReturnPath::NotWatched,
    });
    assert!(sends_failed(&effects));
    assert_eq!(d.core.state(), State::Failed);
    let mut second = blame(Leg::Peer);
    second.message = "later".into();
    d.refused(Input::Failure {
        epoch: 1,
        blame: second,
        wait: false,
    });
    assert_eq!(d.core.error(), Some(&first));
}

pub(super) fn a_pending_migration_fails_at_once_even_when_it_could_wait(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.ok(Input::Failure {
        epoch: 0,
        blame: blame(Leg::Peer),
        wait: true,
    });
    assert_eq!(d.core.state(), State::Failed);
}

pub(super) fn a_channel_whose_setup_fails_fails_the_epoch_unless_it_ended(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.ok(Input::Attach { first_channel: 0 });
    d.ok(Input::Open { index: 0 });
    d.ok(Input::SetupFailed {
        epoch: 1,
        index: 0,
        blame: blame(Leg::Qemu),
        wait: false,
    });
    assert_eq!(d.core.channels()[0].state, ChannelState::Failed);
    assert_eq!(d.core.state(), State::Failed);
    // Its epoch ended first: only abandoned.
    let mut d = Driver::new(config(Role::Outgoing), d.seen);
    d.active(1);
    d.ok(Input::Open { index: 1 });
    d.ok(Input::AskCancel { by: Host::Source });
    d.ok(Input::SetupFailed {
        epoch: 1,
        index: 1,
        blame: blame(Leg::Peer),
        wait: true,
    });
    assert_eq!(d.core.channels()[1].state, ChannelState::Cancelled);
    assert_eq!(d.core.state(), State::Cancelled);
    assert_eq!(d.refused(Input::Abandoned { index: 1 }), Refusal::Stale);
}

pub(super) fn a_stream_that_ends_without_the_destinations_shut_is_not_completed(seen: &mut Seen) {
    // The source concludes about its own QEMU at once, and tells the destination.
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.active(1);
    let effects = d.end_clean(0, 100, ReturnPath::Unfinished);
    assert!(sends_failed(&effects));
    assert_eq!(d.core.state(), State::Failed);
    // The destination waits for the source's word.
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.active(1);
    let effects = d.end_clean(0, 100, ReturnPath::Unfinished);
    assert_eq!(sent_done(&effects), None);
    let Some(Effect::AwaitExplanation { blame, .. }) = effects
        .iter()
        .find(|e| matches!(e, Effect::AwaitExplanation { .. }))
    else {
        panic!("no wait in {effects:?}")
    };
    assert_eq!((blame.host, blame.leg), (Host::Source, Leg::Qemu));
    assert!(blame.message.contains("no SHUT"), "{}", blame.message);
    let blame = blame.clone();
    d.ok(Input::GraceOver { epoch: 1, blame });
    assert_eq!(d.core.state(), State::Failed);
    // The destination said it failed: its own story, which the source waits for.
    let mut d = Driver::new(config(Role::Outgoing), d.seen);
    d.active(1);
    let effects = d.end_clean(0, 100, ReturnPath::Shut(1));
    let Some(Effect::AwaitExplanation { blame, .. }) = effects.last() else {
        panic!("no wait in {effects:?}")
    };
    assert_eq!(blame.host, Host::Destination);
    // QEMU driven here: its own verdict decides, not the stream.
    let mut d = Driver::new(
        Config {
            qemu: true,
            ..config(Role::Outgoing)
        },
        d.seen,
    );
    d.active(1);
    d.end_clean(0, 100, ReturnPath::Unfinished);
    assert_eq!(d.phase(), "active");
}

// ---- cancel ----

pub(super) fn a_cancel_on_the_source_ends_both_hosts_at_once(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.active(1);
    let (effects, route) = d.core.ask(Host::Source).unwrap();
    assert_eq!(route, CancelRoute::Now);
    assert!(effects.contains(&Effect::Send(Control::Cancel { by: Host::Source })));
    assert_eq!(d.core.state(), State::Cancelled);
    assert_eq!(d.core.cancelled_by(), Some(Host::Source));
    d.seen.insert(("active", "ask cancel", "cancelled"));
    // Pending and paused migrations are cancelled directly too.
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.ok(Input::AskCancel {
        by: Host::Destination,
    });
    assert_eq!(d.core.state(), State::Cancelled);
    let mut d = Driver::new(
        Config {
            recoverable: true,
            ..config(Role::Outgoing)
        },
        d.seen,
    );
    d.active(1);
    d.ok(Input::Failure {
        epoch: 1,
        blame: blame(Leg::Qemu),
        wait: false,
    });
    d.ok(Input::AskCancel { by: Host::Source });
    assert_eq!(d.core.state(), State::Cancelled);
}

pub(super) fn a_cancel_on_the_destination_asks_the_source_first(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    d.active(2);
    let (effects, route) = d.core.ask(Host::Destination).unwrap();
    d.seen.insert(("active", "ask cancel", "cancelling"));
    assert_eq!(route, CancelRoute::AskedTheSource);
    assert_eq!(
        effects,
        vec![
            Effect::Send(Control::Cancel {
                by: Host::Destination
            }),
            Effect::AwaitSourceCancel
        ]
    );
    assert_eq!(d.phase(), "cancelling");
    // Asked again: nothing more is sent.
    assert_eq!(d.core.ask(Host::Destination).unwrap().0, vec![]);
    // The source tears its side down: echoes, not failures.
    d.refused(Input::Failure {
        epoch: 1,
        blame: blame(Leg::Peer),
        wait: true,
    });
    d.ok(Input::Ended {
        epoch: 1,
        index: 0,
        end: ChannelEnd::Failed,
        bytes: bytes(1),
        failure: Some((blame(Leg::Peer), true)),
        return_path: ReturnPath::NotWatched,
    });
    assert_eq!(d.core.channels()[0].state, ChannelState::Cancelled);
    assert_eq!(
        d.refused(Input::LinkClosed { epoch: 9 }),
        Refusal::Phase("cancelling")
    );
    d.ok(Input::LinkClosed { epoch: 1 });
    assert_eq!(d.core.state(), State::Cancelled);
    assert_eq!(d.core.cancelled_by(), Some(Host::Destination));
    // A source that does not end its side in time.
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.active(1);
    d.ok(Input::AskCancel {
        by: Host::Destination,
    });
    d.ok(Input::CancelWaitOver);
    assert_eq!(d.core.state(), State::Cancelled);
    assert_eq!(
        d.refused(Input::CancelWaitOver),
        Refusal::Phase("cancelled")
    );
    // The source had failed before it saw the cancel: its story wins.
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.active(1);
    d.ok(Input::AskCancel {
        by: Host::Destination,
    });
    d.peer(Control::Failed(blame(Leg::Qemu))).unwrap();
    assert_eq!(d.core.state(), State::Failed);
    // The source completed before it saw the cancel: completed it is.
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.active(1);
    d.ok(Input::AskCancel {
        by: Host::Destination,
    });
    d.peer_done(1, 100, Verdict::ReturnPath).unwrap();
    d.end_clean(0, 100, ReturnPath::Shut(0));
    assert_eq!(d.core.state(), State::Completed);
}

pub(super) fn a_cancel_the_guest_would_not_survive_is_refused(seen: &mut Seen) {
    let qemu = Config {
        qemu: true,
        postcopy: true,
        ..config(Role::Outgoing)
    };
    let mut d = Driver::new(qemu, seen);
    d.active(1);
    d.ok(Input::Qemu {
        status: Status::PostcopyActive,
    });
    assert_eq!(
        d.refused(Input::AskCancel { by: Host::Source }),
        Refusal::Cancel(CancelRefused::Postcopy)
    );
    // The peer's cancel is not refused: this host can only spare its QEMU.
    d.peer(Control::Cancel {
        by: Host::Destination,
    })
    .unwrap();
    assert_eq!(d.core.state(), State::Cancelled);
    let mut d = Driver::new(
        Config {
            role: Role::Incoming,
            ..qemu
        },
        d.seen,
    );
    d.active(1);
    assert_eq!(
        d.refused(Input::AskCancel {
            by: Host::Destination
        }),
        Refusal::Cancel(CancelRefused::AskTheSource)
    );
    // Once this host said Done, the peer may have completed.
    let mut d = Driver::new(config(Role::Outgoing), d.seen);
    d.active(1);
    d.end_clean(0, 100, ReturnPath::Silent);
    assert_eq!(
        d.refused(Input::AskCancel { by: Host::Source }),
        Refusal::Cancel(CancelRefused::Completing)
    );
    // Nor does the peer's: its Done will come (see the crossing scenario).
    d.peer(Control::Cancel {
        by: Host::Destination,
    })
    .unwrap_err();
    assert_eq!(d.phase(), "completing");
}

pub(super) fn a_source_driving_qemu_cancels_through_it(seen: &mut Seen) {
    let mut d = Driver::new(
        Config {
            qemu: true,
            ..config(Role::Outgoing)
        },
        seen,
    );
    d.active(1);
    d.ok(Input::QemuFollowing);
    let (effects, route) = d.core.ask(Host::Source).unwrap();
    assert_eq!(route, CancelRoute::ThroughQemu);
    assert_eq!(effects, vec![Effect::CancelQemu { by: Host::Source }]);
    assert_eq!(d.phase(), "active", "cancelled once QEMU has");
    let effects = d
        .peer(Control::Cancel {
            by: Host::Destination,
        })
        .unwrap();
    assert_eq!(
        effects,
        vec![Effect::CancelQemu {
            by: Host::Destination
        }]
    );
    d.ok(Input::Cancel {
        by: Host::Destination,
    });
    assert_eq!(d.core.cancelled_by(), Some(Host::Destination));
}

// ---- epochs: pause and resume ----

pub(super) fn a_recoverable_migration_pauses_and_resumes_in_a_new_epoch(seen: &mut Seen) {
    let recoverable = Config {
        recoverable: true,
        ..config(Role::Incoming)
    };
    let mut d = Driver::new(recoverable, seen);
    d.active(1);
    let effects = d.end_clean(0, 100, ReturnPath::Silent);
    assert!(effects.contains(&Effect::EndEpoch), "{effects:?}");
    assert_eq!(d.phase(), "paused");
    assert_eq!(d.core.paused(), 1);
    // Reports from the broken epoch change nothing.
    d.refused(Input::Open { index: 1 });
    d.refused(Input::Failure {
        epoch: 1,
        blame: blame(Leg::Peer),
        wait: false,
    });
    d.ok(Input::ResumeFailed {
        blame: blame(Leg::Peer),
    });
    assert_eq!((d.phase(), d.core.pauses().len()), ("paused", 2));
    // QEMU reconnects: a new epoch from channel 1, not absurdly far.
    assert_eq!(
        d.refused(Input::Attach { first_channel: 0 }),
        Refusal::Phase("paused")
    );
    assert_eq!(
        d.refused(Input::Attach { first_channel: 99 }),
        Refusal::Phase("paused")
    );
    let effects = d.ok(Input::Attach { first_channel: 1 });
    assert_eq!(d.phase(), "attached");
    assert!(effects.contains(&Effect::BeginEpoch {
        epoch: 2,
        first_channel: 1
    }));
    assert!(d.core.error().is_none(), "the pause's cause is history now");
    assert_eq!(
        d.refused(Input::Open { index: 0 }),
        Refusal::TooMany { index: 0, max: 4 }
    );
    d.ok(Input::Open { index: 1 });
    d.ok(Input::Running { index: 1 });
    d.end_clean(1, 30, ReturnPath::Shut(0));
    d.peer_done(1, 30, Verdict::ReturnPath).unwrap();
    assert_eq!(d.core.state(), State::Completed, "the last epoch counts");
}

pub(super) fn a_source_back_before_this_host_noticed_pauses_and_resumes_at_once(seen: &mut Seen) {
    let recoverable = Config {
        recoverable: true,
        ..config(Role::Incoming)
    };
    let mut d = Driver::new(recoverable, seen);
    d.active(1);
    let effects = d.ok(Input::Attach { first_channel: 1 });
    assert_eq!(effects[0], Effect::EndEpoch, "the old epoch ends first");
    assert_eq!((d.phase(), d.epoch(), d.core.paused()), ("attached", 2, 1));
    let cause = &d.core.pauses()[0];
    assert!(cause.message.contains("resumed on a new control link"));
    assert_eq!(cause.bytes, now().bytes);
}

pub(super) fn a_recoverable_migration_fails_in_pending_and_pauses_on_the_peers_word(
    seen: &mut Seen,
) {
    let recoverable = Config {
        recoverable: true,
        ..config(Role::Incoming)
    };
    let mut d = Driver::new(recoverable, seen);
    d.ok(Input::Failure {
        epoch: 0,
        blame: blame(Leg::Qemu),
        wait: false,
    });
    assert_eq!(d.core.state(), State::Failed);
    let mut d = Driver::new(recoverable, d.seen);
    d.active(1);
    d.peer(Control::Failed(blame(Leg::Qemu))).unwrap();
    assert_eq!(d.phase(), "paused");
}

// ---- refusals ----

pub(super) fn inputs_that_do_not_fit_are_refused(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    assert_eq!(
        d.refused(Input::Open { index: 0 }),
        Refusal::Phase("pending")
    );
    assert_eq!(
        d.refused(Input::Attach { first_channel: 1 }),
        Refusal::Phase("pending")
    );
    assert_eq!(d.refused(Input::CancelWaitOver), Refusal::Phase("pending"));
    assert_eq!(
        d.refused(Input::ResumeFailed {
            blame: blame(Leg::Peer)
        }),
        Refusal::Phase("pending")
    );
    d.ok(Input::Attach { first_channel: 0 });
    assert_eq!(
        d.refused(Input::Attach { first_channel: 0 }),
        Refusal::Attached
    );
    assert_eq!(
        d.refused(Input::Open { index: 4 }),
        Refusal::TooMany { index: 4, max: 4 }
    );
    d.ok(Input::Open { index: 3 });
    assert_eq!(
        d.refused(Input::Open { index: 3 }),
        Refusal::Duplicate { index: 3 }
    );
    assert_eq!(
        d.refused(Input::Connected { epoch: 2, index: 3 }),
        Refusal::Stale
    );
    assert_eq!(
        d.ok(Input::Connected { epoch: 1, index: 3 }),
        vec![Effect::Release { index: 4 }]
    );
    assert_eq!(d.refused(Input::Running { index: 9 }), Refusal::Stale);
    assert_eq!(
        d.refused(Input::Peer {
            epoch: 0,
            control: Control::Heartbeat
        }),
        Refusal::Stale
    );
    assert_eq!(
        d.refused(Input::LinkClosed { epoch: 1 }),
        Refusal::Phase("active")
    );
    d.ok(Input::Cancel { by: Host::Source });
    assert_eq!(d.core.state(), State::Cancelled);
    // An ended migration still records its channels' ends, and nothing else.
    d.ok(Input::Running { index: 3 });
    assert_eq!(
        d.refused(Input::Cancel { by: Host::Source }),
        Refusal::Phase("cancelled")
    );
    assert_eq!(
        d.refused(Input::Attach { first_channel: 0 }),
        Refusal::Phase("cancelled")
    );
}
