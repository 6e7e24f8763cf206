//! Every live phase, on either host, recoverable or not, against each way of ending.

use migproxy_proto::{Control, Host, Leg};

use super::super::*;
use super::driver::*;

/// From every live phase, on either host, recoverable or not: a certain failure, the peer's
/// failure, the peer's failure for good, the peer's cancel and a cancel asked here each end
/// the epoch (or are refused, which leaves the phase as it was).
pub(super) fn every_live_phase_ends_on_failure_or_cancel(seen: &mut Seen) {
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
                let inputs: [fn(Host) -> Input; 5] = [
                    |_| Input::Failure {
                        epoch: 1,
                        blame: blame(Leg::Qemu),
                        wait: false,
                    },
                    |_| Input::Peer {
                        epoch: 1,
                        control: Control::Failed(blame(Leg::Qemu)),
                    },
                    |_| Input::Peer {
                        epoch: 1,
                        control: Control::GaveUp(blame(Leg::Peer)),
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
