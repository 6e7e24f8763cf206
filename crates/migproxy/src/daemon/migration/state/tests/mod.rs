//! Every transition of the lifecycle and every refused input, driven by hand. Each scenario
//! records the phase changes it sees; `the_table_lists_every_transition_taken` runs them all
//! and checks the record against [`TRANSITIONS`], so the table cannot drift from the code.

mod driver;
mod endings;
mod recovery;
mod scenarios;

use super::*;
use driver::Seen;
use endings::*;
use recovery::*;
use scenarios::*;

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
    (
        "cancel crossing done",
        a_cancel_crossing_the_sources_done_completes_both,
    ),
    (
        "pause crossing cancel",
        a_recoverable_pause_crossing_a_cancel_ends_the_cancel,
    ),
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
    (
        "recovery",
        postcopy_driven_over_qmp_pauses_on_a_break_and_counts_the_frozen_time,
    ),
    (
        "what does not pause",
        with_qmp_only_a_broken_transport_in_postcopy_pauses,
    ),
    (
        "one story at the switch",
        around_the_switch_each_host_follows_the_others_conclusion,
    ),
    (
        "recover timeout",
        a_pause_not_recovered_in_time_fails_for_good_in_every_phase,
    ),
    (
        "peer gave up",
        a_peer_that_gave_up_fails_this_host_too_never_a_pause,
    ),
    (
        "cancel told while paused",
        a_cancel_told_while_paused_is_taken_after_this_hosts_done,
    ),
    ("resume refused", a_resume_the_peer_refuses_fails_for_good),
    (
        "cancel paused",
        a_cancel_while_paused_stops_the_recovery_on_either_host,
    ),
    (
        "quick recovery",
        a_recovery_ends_however_quickly_qemu_gets_back,
    ),
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
    let doc = include_str!("../../../../../../../docs/daemon.md");
    let table = transition_table();
    assert!(
        doc.contains(&table),
        "docs/daemon.md must carry the lifecycle table exactly as `transition_table()` renders \
         it:\n{table}"
    );
}
