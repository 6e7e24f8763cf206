//! Every transition of the lifecycle and every refused input, driven by hand. Each scenario
//! records the phase changes it sees; `the_table_lists_every_transition_taken` runs them all
//! and checks the record against [`TRANSITIONS`], so the table cannot drift from the code.

use std::collections::BTreeSet;

use migproxy_proto::{Direction, Leg, Op};

use super::*;

type Seen = BTreeSet<(&'static str, &'static str, &'static str)>;

struct Driver<'a> {
    core: Core,
    seen: &'a mut Seen,
}

fn config(role: Role) -> Config {
    Config {
        role,
        recoverable: false,
        max_channels: 4,
        qemu: false,
        postcopy: false,
    }
}

fn now() -> Now {
    Now {
        bytes: Totals {
            to_destination: 10,
            to_source: 0,
        },
        elapsed_ms: 5,
    }
}

fn blame(leg: Leg) -> Attribution {
    Attribution {
        host: Host::Source,
        leg,
        channel: Some(0),
        direction: Some(Direction::ToDestination),
        op: Op::Write,
        errno: Some("EPIPE".into()),
        message: "broken pipe".into(),
        bytes: Totals::default(),
        elapsed_ms: 1,
    }
}

fn bytes(n: u64) -> Totals {
    Totals {
        to_destination: n,
        to_source: 16,
    }
}

impl Driver<'_> {
    fn new(config: Config, seen: &mut Seen) -> Driver<'_> {
        Driver {
            core: Core::new(config),
            seen,
        }
    }

    fn step(&mut self, input: Input) -> Steps {
        let from = self.core.phase().name();
        let name = input.name();
        let result = self.core.step(input, now());
        let to = self.core.phase().name();
        if result.is_err() {
            assert_eq!(from, to, "a refused {name} changed the phase");
        } else if from != to || name == "attach" {
            self.seen.insert((from, name, to));
        }
        result
    }

    fn ok(&mut self, input: Input) -> Vec<Effect> {
        let name = input.name();
        self.step(input)
            .unwrap_or_else(|refusal| panic!("{name} refused: {refusal}"))
    }

    fn refused(&mut self, input: Input) -> Refusal {
        let name = input.name();
        match self.step(input) {
            Err(refusal) => refusal,
            Ok(effects) => panic!("{name} taken: {effects:?}"),
        }
    }

    fn phase(&self) -> &'static str {
        self.core.phase().name()
    }

    fn epoch(&self) -> Epoch {
        self.core.epoch()
    }

    /// Attached, and channels `0..n` open and running.
    fn active(&mut self, n: u32) {
        self.ok(Input::Attach { first_channel: 0 });
        for index in 0..n {
            self.ok(Input::Open { index });
            self.ok(Input::Running { index });
        }
    }

    fn end_clean(&mut self, index: u32, n: u64, return_path: ReturnPath) -> Vec<Effect> {
        self.ok(Input::Ended {
            epoch: self.epoch(),
            index,
            end: ChannelEnd::Completed,
            bytes: bytes(n),
            failure: None,
            return_path,
        })
    }

    fn peer(&mut self, control: Control) -> Steps {
        let epoch = self.epoch();
        self.step(Input::Peer { epoch, control })
    }

    fn peer_done(&mut self, channels: u32, n: u64, verdict: Verdict) -> Steps {
        self.peer(Control::Done {
            channels,
            bytes: bytes(n),
            verdict,
        })
    }
}

fn sent_done(effects: &[Effect]) -> Option<Verdict> {
    effects.iter().find_map(|e| match e {
        Effect::Send(Control::Done { verdict, .. }) => Some(*verdict),
        _ => None,
    })
}

fn sends_failed(effects: &[Effect]) -> bool {
    effects
        .iter()
        .any(|e| matches!(e, Effect::Send(Control::Failed(_))))
}

// ---- completion ----

fn without_qmp_or_return_path_it_is_transferred(seen: &mut Seen) {
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

fn the_destinations_shut_makes_it_completed(seen: &mut Seen) {
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

fn one_host_without_evidence_makes_it_transferred(seen: &mut Seen) {
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

fn with_qmp_qemus_word_is_needed(seen: &mut Seen) {
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

fn a_new_channel_reopens_a_completing_epoch(seen: &mut Seen) {
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

fn byte_counts_that_disagree_fail_it_naming_the_channel(seen: &mut Seen) {
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

fn a_destination_with_a_channel_the_source_never_opened_fails(seen: &mut Seen) {
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

fn a_source_told_of_more_channels_than_it_opened_fails(seen: &mut Seen) {
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

fn an_unused_token_expires_and_only_while_pending(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Incoming), seen);
    let effects = d.ok(Input::TtlOver);
    assert_eq!(d.core.state(), State::Expired);
    assert!(effects.contains(&Effect::Stop));
    let mut d = Driver::new(config(Role::Incoming), d.seen);
    d.ok(Input::Attach { first_channel: 0 });
    assert_eq!(d.refused(Input::TtlOver), Refusal::Phase("attached"));
}

fn a_first_channel_that_never_comes_ends_it(seen: &mut Seen) {
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
    // A recoverable migration pauses instead.
    let mut d = Driver::new(
        Config {
            recoverable: true,
            ..config(Role::Outgoing)
        },
        d.seen,
    );
    d.ok(Input::Attach { first_channel: 0 });
    d.ok(over(1));
    assert_eq!(d.phase(), "paused");
}

// ---- failures ----

fn a_peer_leg_failure_waits_for_the_explanation(seen: &mut Seen) {
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

fn no_explanation_in_time_fails_with_its_own_cause(seen: &mut Seen) {
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

fn a_certain_failure_ends_it_at_once_and_the_first_cause_wins(seen: &mut Seen) {
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

fn a_pending_migration_fails_at_once_even_when_it_could_wait(seen: &mut Seen) {
    let mut d = Driver::new(config(Role::Outgoing), seen);
    d.ok(Input::Failure {
        epoch: 0,
        blame: blame(Leg::Peer),
        wait: true,
    });
    assert_eq!(d.core.state(), State::Failed);
}

fn a_channel_whose_setup_fails_fails_the_epoch_unless_it_ended(seen: &mut Seen) {
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

fn a_stream_that_ends_without_the_destinations_shut_is_not_completed(seen: &mut Seen) {
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

fn a_cancel_on_the_source_ends_both_hosts_at_once(seen: &mut Seen) {
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

fn a_cancel_on_the_destination_asks_the_source_first(seen: &mut Seen) {
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

fn a_cancel_the_guest_would_not_survive_is_refused(seen: &mut Seen) {
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
    // The peer's cancel still ends it.
    d.peer(Control::Cancel {
        by: Host::Destination,
    })
    .unwrap();
    assert_eq!(d.core.state(), State::Cancelled);
}

fn a_source_driving_qemu_cancels_through_it(seen: &mut Seen) {
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

fn a_recoverable_migration_pauses_and_resumes_in_a_new_epoch(seen: &mut Seen) {
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

fn a_source_back_before_this_host_noticed_pauses_and_resumes_at_once(seen: &mut Seen) {
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

fn a_recoverable_migration_fails_in_pending_and_pauses_on_the_peers_word(seen: &mut Seen) {
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

fn inputs_that_do_not_fit_are_refused(seen: &mut Seen) {
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

/// From every live phase, on either host, recoverable or not: a certain failure, the peer's
/// failure, the peer's cancel and a cancel asked here each end the epoch (or are refused,
/// which leaves the phase as it was).
fn every_live_phase_ends_on_failure_or_cancel(seen: &mut Seen) {
    type Reach = fn(&mut Driver<'_>);
    let phases: [(&str, Reach); 4] = [
        ("attached", |d| {
            d.ok(Input::Attach { first_channel: 0 });
        }),
        ("active", |d| d.active(1)),
        ("completing", |d| {
            d.active(1);
            d.end_clean(0, 1, ReturnPath::Shut(0));
        }),
        ("cancelling", |d| {
            d.active(1);
            d.ok(Input::AskCancel {
                by: Host::Destination,
            });
        }),
    ];
    for role in [Role::Incoming, Role::Outgoing] {
        for recoverable in [false, true] {
            for (name, reach) in phases {
                if name == "cancelling" && role == Role::Outgoing {
                    continue;
                }
                let inputs: [fn(Host) -> Input; 4] = [
                    |_| Input::Failure {
                        epoch: 1,
                        blame: blame(Leg::Qemu),
                        wait: false,
                    },
                    |_| Input::Peer {
                        epoch: 1,
                        control: Control::Failed(blame(Leg::Qemu)),
                    },
                    |here| Input::Peer {
                        epoch: 1,
                        control: Control::Cancel {
                            by: match here {
                                Host::Source => Host::Destination,
                                Host::Destination => Host::Source,
                            },
                        },
                    },
                    |here| Input::AskCancel { by: here },
                ];
                for input in inputs {
                    let config = Config {
                        recoverable,
                        ..config(role)
                    };
                    let mut d = Driver::new(config, seen);
                    reach(&mut d);
                    assert_eq!(d.phase(), name);
                    let input = input(role.host());
                    let label = input.name();
                    match d.step(input) {
                        Ok(_) => assert!(
                            matches!(d.phase(), "failed" | "paused" | "cancelled" | "cancelling"),
                            "{name} --{label}--> {}",
                            d.phase()
                        ),
                        Err(refusal) => assert!(
                            matches!(
                                refusal,
                                Refusal::Phase("cancelling")
                                    | Refusal::Cancel(CancelRefused::Completing)
                            ),
                            "{name} --{label}--> refused: {refusal}"
                        ),
                    }
                }
            }
        }
    }
}

type Scenario = fn(&mut Seen);

const SCENARIOS: &[(&str, Scenario)] = &[
    ("endings", every_live_phase_ends_on_failure_or_cancel),
    ("transferred", without_qmp_or_return_path_it_is_transferred),
    ("shut", the_destinations_shut_makes_it_completed),
    ("one story", one_host_without_evidence_makes_it_transferred),
    ("qmp", with_qmp_qemus_word_is_needed),
    ("reopen", a_new_channel_reopens_a_completing_epoch),
    (
        "bytes",
        byte_counts_that_disagree_fail_it_naming_the_channel,
    ),
    (
        "intruder",
        a_destination_with_a_channel_the_source_never_opened_fails,
    ),
    (
        "counts",
        a_source_told_of_more_channels_than_it_opened_fails,
    ),
    ("ttl", an_unused_token_expires_and_only_while_pending),
    ("first channel", a_first_channel_that_never_comes_ends_it),
    ("grace", a_peer_leg_failure_waits_for_the_explanation),
    (
        "grace over",
        no_explanation_in_time_fails_with_its_own_cause,
    ),
    (
        "certain",
        a_certain_failure_ends_it_at_once_and_the_first_cause_wins,
    ),
    (
        "pending",
        a_pending_migration_fails_at_once_even_when_it_could_wait,
    ),
    (
        "setup",
        a_channel_whose_setup_fails_fails_the_epoch_unless_it_ended,
    ),
    (
        "unfinished",
        a_stream_that_ends_without_the_destinations_shut_is_not_completed,
    ),
    ("cancel", a_cancel_on_the_source_ends_both_hosts_at_once),
    (
        "cancelling",
        a_cancel_on_the_destination_asks_the_source_first,
    ),
    (
        "refused cancel",
        a_cancel_the_guest_would_not_survive_is_refused,
    ),
    ("qemu cancel", a_source_driving_qemu_cancels_through_it),
    (
        "pause",
        a_recoverable_migration_pauses_and_resumes_in_a_new_epoch,
    ),
    (
        "early resume",
        a_source_back_before_this_host_noticed_pauses_and_resumes_at_once,
    ),
    (
        "recoverable",
        a_recoverable_migration_fails_in_pending_and_pauses_on_the_peers_word,
    ),
    ("refusals", inputs_that_do_not_fit_are_refused),
];

#[test]
fn every_scenario() {
    for (name, scenario) in SCENARIOS {
        let mut seen = Seen::new();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&mut seen)));
        assert!(run.is_ok(), "scenario {name} failed");
    }
}

#[test]
fn the_table_lists_every_transition_taken() {
    let mut seen = Seen::new();
    for (_, scenario) in SCENARIOS {
        scenario(&mut seen);
    }
    let table: Seen = TRANSITIONS.iter().copied().collect();
    let missing: Vec<_> = seen.difference(&table).collect();
    let untested: Vec<_> = table.difference(&seen).collect();
    assert!(
        missing.is_empty() && untested.is_empty(),
        "taken but not in TRANSITIONS: {missing:#?}\nin TRANSITIONS but never taken: {untested:#?}"
    );
}

#[test]
fn docs_carry_the_table() {
    let doc = include_str!("../../../../../../docs/daemon.md");
    let table = transition_table();
    assert!(
        doc.contains(&table),
        "docs/daemon.md must carry the lifecycle table exactly as `transition_table()` renders \
         it:\n{table}"
    );
}
