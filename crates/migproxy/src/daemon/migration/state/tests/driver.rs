//! The test driver: a lifecycle fed by hand, recording every phase change it makes.

use std::collections::BTreeSet;

use migproxy_proto::{Attribution, ChannelEnd, Control, Direction, Host, Leg, Op, Totals, Verdict};

use super::super::*;

pub(super) type Seen = BTreeSet<(&'static str, &'static str, &'static str)>;

pub(super) struct Driver<'a> {
    pub(super) core: Core,
    pub(super) seen: &'a mut Seen,
}

pub(super) fn config(role: Role) -> Config {
    Config {
        role,
        recoverable: false,
        max_channels: 4,
        qemu: false,
        postcopy: false,
        recover_timeout_ms: None,
    }
}

pub(super) fn now() -> Now {
    Now {
        bytes: Totals {
            to_destination: 10,
            to_source: 0,
        },
        elapsed_ms: 5,
    }
}

pub(super) fn blame(leg: Leg) -> Attribution {
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

pub(super) fn bytes(n: u64) -> Totals {
    Totals {
        to_destination: n,
        to_source: 16,
    }
}

impl Driver<'_> {
    pub(super) fn new(config: Config, seen: &mut Seen) -> Driver<'_> {
        Driver {
            core: Core::new(config),
            seen,
        }
    }

    pub(super) fn step(&mut self, input: Input) -> Steps {
        self.step_at(input, now().elapsed_ms)
    }

    /// As [`step`](Self::step), `elapsed_ms` after the migration's creation.
    pub(super) fn step_at(&mut self, input: Input, elapsed_ms: u64) -> Steps {
        let from = self.core.phase().name();
        let name = input.name();
        let result = self.core.step(
            input,
            Now {
                elapsed_ms,
                ..now()
            },
        );
        let to = self.core.phase().name();
        if result.is_err() {
            assert_eq!(from, to, "a refused {name} changed the phase");
        } else if from != to || name == "attach" {
            self.seen.insert((from, name, to));
        }
        result
    }

    pub(super) fn ok(&mut self, input: Input) -> Vec<Effect> {
        let name = input.name();
        self.step(input)
            .unwrap_or_else(|refusal| panic!("{name} refused: {refusal}"))
    }

    pub(super) fn refused(&mut self, input: Input) -> Refusal {
        let name = input.name();
        match self.step(input) {
            Err(refusal) => refusal,
            Ok(effects) => panic!("{name} taken: {effects:?}"),
        }
    }

    pub(super) fn phase(&self) -> &'static str {
        self.core.phase().name()
    }

    pub(super) fn epoch(&self) -> Epoch {
        self.core.epoch()
    }

    /// Attached, and channels `0..n` open and running.
    pub(super) fn active(&mut self, n: u32) {
        self.ok(Input::Attach { first_channel: 0 });
        for index in 0..n {
            self.ok(Input::Open { index });
            self.ok(Input::Running { index });
        }
    }

    pub(super) fn end_clean(&mut self, index: u32, n: u64, return_path: ReturnPath) -> Vec<Effect> {
        self.ok(Input::Ended {
            epoch: self.epoch(),
            index,
            end: ChannelEnd::Completed,
            bytes: bytes(n),
            failure: None,
            return_path,
        })
    }

    pub(super) fn peer(&mut self, control: Control) -> Steps {
        let epoch = self.epoch();
        self.step(Input::Peer { epoch, control })
    }

    /// The peer's `control` on the current epoch, taken.
    pub(super) fn peer_ok(&mut self, control: Control) -> Vec<Effect> {
        let epoch = self.epoch();
        self.ok(Input::Peer { epoch, control })
    }

    /// A certain failure on `leg` in the current epoch (no wait for an explanation), taken.
    pub(super) fn broke(&mut self, leg: Leg) -> Vec<Effect> {
        let epoch = self.epoch();
        let blame = blame(leg);
        self.ok(Input::Failure {
            epoch,
            blame,
            wait: false,
        })
    }

    pub(super) fn peer_done(&mut self, channels: u32, n: u64, verdict: Verdict) -> Steps {
        self.peer(Control::Done {
            channels,
            bytes: bytes(n),
            verdict,
        })
    }
}

pub(super) fn sent_done(effects: &[Effect]) -> Option<Verdict> {
    effects.iter().find_map(|e| match e {
        Effect::Send(Control::Done { verdict, .. }) => Some(*verdict),
        _ => None,
    })
}

pub(super) fn sends_failed(effects: &[Effect]) -> bool {
    effects
        .iter()
        .any(|e| matches!(e, Effect::Send(Control::Failed(_) | Control::GaveUp(_))))
}
