//! The registry's inputs: listing, an operator's close, an evacuation.

use super::*;
use crate::session::registry::{Filter, OnVm};

fn evacuated(vms: &[&str]) -> Vec<String> {
    vms.iter().map(|v| v.to_string()).collect()
}

#[test]
fn the_listing_shows_ids_vm_phase_bytes_and_each_sides_silence() {
    let mut h = Harness::established(Harness::cfg());
    h.now += Duration::from_millis(700);
    h.write(Who::Client, &frame(OpCode::Text, b"hello", true));
    h.settle();
    h.now += Duration::from_millis(300);
    let info = h.s.info(3, h.now);
    assert_eq!(info.id, h.s.id);
    assert_eq!(info.shard, 3);
    assert_eq!(info.phase.as_str(), "relay");
    assert_eq!(info.ident.as_deref().map(|i| i.repl()), Some("repl-1"));
    assert_eq!(info.vm.as_deref(), Some("vm-1"));
    assert_eq!(info.since_client_ms, Some(300));
    assert_eq!(info.since_conman_ms, Some(1000));
    assert_eq!(info.bytes_from_client, 11, "one masked 5-byte frame");
    assert_eq!(info.bytes_from_conman, 0);
    assert!(h.s.matches(&Filter {
        repl: Some("repl-1".into()),
        user: Some("alice".into()),
        vm: Some("vm-1".into()),
    }));
    assert!(!h.s.matches(&Filter {
        vm: Some("vm-2".into()),
        ..Filter::default()
    }));
}

#[test]
fn an_evacuation_closes_a_relay_on_that_vm_with_1012_and_the_hint() {
    let mut h = Harness::established(Harness::cfg());
    assert_eq!(h.s.on_vm(&evacuated(&["vm-2"])), None);
    let vms = evacuated(&["vm-2", "vm-1"]);
    assert_eq!(h.s.on_vm(&vms), Some(OnVm::Relay));
    h.run(|s, env| s.handle_evacuate(env, &vms, 250));
    h.settle();
    let reason = "stage=conman;reason=evacuate;retry_after_ms=250";
    assert_eq!(h.s.kind(), Kind::Closing);
    assert_eq!(h.closes(Who::Client), vec![(1012, reason.into())]);
    assert_eq!(h.closes(Who::Conman), vec![(1001, reason.into())]);
    h.finish();
}

#[test]
fn a_restored_vm_keeps_its_sessions_when_their_close_comes() {
    let mut h = Harness::established(Harness::cfg());
    h.run(|s, env| s.handle_evacuate(env, &evacuated(&["vm-2"]), 250));
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    assert!(h.closes(Who::Client).is_empty());
}

#[test]
fn an_attempt_on_an_evacuated_vm_moves_to_another_vm_without_the_client_noticing() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(found("vm-1"));
    assert_eq!(h.s.kind(), Kind::Connecting);
    let vms = evacuated(&["vm-1"]);
    assert_eq!(h.s.on_vm(&vms), Some(OnVm::Setup));
    assert!(h.s.matches(&Filter {
        vm: Some("vm-1".into()),
        ..Filter::default()
    }));
    h.run(|s, env| s.handle_evacuate(env, &vms, 0));
    // The connect in flight is cancelled; its completion still comes.
    h.answer_connect(0);
    assert_eq!(h.s.kind(), Kind::Backoff);
    h.advance_to_deadline();
    let asked = h
        .ops
        .iter()
        .rev()
        .find(|o| o.starts_with("Placement"))
        .unwrap();
    assert!(asked.contains("vm-1"), "the retry excludes it: {asked}");
    h.answer_placement(found("vm-2"));
    h.answer_connect(0);
    h.settle();
    h.conman_101();
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    assert!(h.closes(Who::Client).is_empty(), "the client saw nothing");
    assert!(
        !h.ops.iter().any(|o| o.starts_with("VmFailed")),
        "an evacuation says nothing of the VM's health"
    );
}

#[test]
fn an_operators_close_carries_the_code_to_the_client_and_1001_to_conman() {
    let mut h = Harness::established(Harness::cfg());
    h.run(|s, env| s.handle_admin_close(env, 4001));
    h.settle();
    let reason = "stage=admin;reason=closed";
    assert_eq!(h.closes(Who::Client), vec![(4001, reason.into())]);
    assert_eq!(h.closes(Who::Conman), vec![(1001, reason.into())]);
    h.finish();
}

#[test]
fn an_operators_close_during_setup_ends_it_as_a_drain_would() {
    let mut h = Harness::placing(Harness::cfg());
    h.run(|s, env| s.handle_admin_close(env, 1000));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1012, "stage=drain;reason=closed".into())]
    );
    h.finish();
}
