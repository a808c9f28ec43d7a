//! Relaying and the ways a session ends.

use super::*;

#[test]
fn frames_pass_unchanged_both_ways() {
    let mut h = Harness::established(Harness::cfg());
    let up = frame(OpCode::Text, b"hello conman", true);
    let down = frame(OpCode::Binary, &[7; 300], false);
    h.write(Who::Client, &up);
    h.write(Who::Conman, &down);
    h.settle();
    assert_eq!(h.peers[1].got, up);
    assert_eq!(h.peers[0].got, down);
}

#[test]
fn close_from_client_is_relayed_and_answered() {
    let mut h = Harness::established(Harness::cfg());
    let mut c = Vec::new();
    write_close(&mut c, 4000, "bye", Some([9, 9, 9, 9]));
    h.write(Who::Client, &c);
    h.settle();
    assert_eq!(h.closes(Who::Conman), vec![(4000, "bye".into())]);
    let mut answer = Vec::new();
    write_close(&mut answer, 4000, "bye", None);
    h.write(Who::Conman, &answer);
    h.settle();
    assert_eq!(h.s.kind(), Kind::Closing);
    assert_eq!(h.closes(Who::Client), vec![(4000, "bye".into())]);
    h.finish();
}

#[test]
fn conman_lost_gives_the_client_1014_and_client_lost_gives_conman_1001() {
    let mut h = Harness::established(Harness::cfg());
    h.peers[1].fin = true;
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1014, "stage=relay;reason=conman_lost".into())]
    );
    h.finish();
    let mut h = Harness::established(Harness::cfg());
    h.peers[0].reset = true;
    h.settle();
    assert_eq!(
        h.closes(Who::Conman),
        vec![(1001, "stage=client_gone;reason=eof".into())]
    );
    h.finish();
}

#[test]
fn conman_lost_mid_frame_injects_no_close_into_the_frame() {
    let mut h = Harness::established(Harness::cfg());
    let f = frame(OpCode::Binary, &[5; 40], false);
    h.write(Who::Conman, &f[..20]);
    h.peers[1].fin = true;
    h.settle();
    assert_eq!(h.peers[0].got, &f[..20]);
    assert!(h.closes(Who::Client).is_empty());
    h.finish();
}

#[test]
fn violations_get_their_codes() {
    let mut h = Harness::established(Harness::cfg());
    h.write(Who::Client, &frame(OpCode::Text, b"unmasked", false));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1002, "stage=relay;reason=unmasked_frame".into())]
    );
    assert_eq!(
        h.closes(Who::Conman),
        vec![(1001, "stage=client_gone;reason=protocol_error".into())]
    );
    h.finish();
}

#[test]
fn one_way_close_times_out_then_lingers_then_forces_shutdown() {
    let mut h = Harness::established(Harness::cfg());
    let mut c = Vec::new();
    write_close(&mut c, 1000, "", Some([1, 1, 1, 1]));
    h.write(Who::Client, &c);
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    h.advance_to_deadline();
    assert_eq!(h.s.kind(), Kind::Closing);
    h.settle();
    // Neither peer sends FIN: the linger deadline forces both down.
    h.advance_to_deadline();
    h.settle();
    assert!(h.all_closed());
}

#[test]
fn drain_grace_over_closes_both_sides() {
    let mut h = Harness::established(Harness::cfg());
    h.run(|s, env| s.handle_grace_over(env));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1001, "stage=drain;reason=grace_over".into())]
    );
    assert_eq!(h.closes(Who::Conman).len(), 1);
    h.finish();
}

#[test]
fn backpressure_stops_reading_the_source_and_resumes() {
    let mut cfg = Harness::cfg();
    cfg.limits.send_queue_bytes = 256;
    let mut h = Harness::established(cfg);
    let f = frame(OpCode::Binary, &[1; 2000], false);
    h.write(Who::Conman, &f);
    // The client reads nothing: the proxy stops reading Conman.
    for _ in 0..100 {
        h.deliver(Who::Conman, BUF);
    }
    assert!(
        h.peers[1].cancel || h.peers[1].recv.is_none(),
        "conman still read"
    );
    assert!(h.stats.backpressure_pauses.load(Relaxed) >= 1);
    h.settle();
    assert_eq!(h.peers[0].got, f);
}

#[test]
fn partial_sends_resume_where_they_stopped() {
    let mut h = Harness::established(Harness::cfg());
    let f = frame(OpCode::Binary, &[3; 500], false);
    h.write(Who::Conman, &f);
    for _ in 0..50 {
        h.deliver(Who::Conman, BUF);
        h.complete_send(Who::Client, 7);
    }
    h.settle();
    assert_eq!(h.peers[0].got, f);
}

#[test]
fn long_frames_are_spliced_and_arrive_whole() {
    let mut cfg = Harness::cfg();
    cfg.buffers.splice_min = 256;
    let mut h = Harness::established(cfg);
    let big = frame(OpCode::Binary, &[9; 5000], false);
    let small = frame(OpCode::Text, b"after", false);
    h.write(Who::Conman, &big);
    h.write(Who::Conman, &small);
    h.settle();
    assert_eq!(h.peers[0].got, [big, small].concat());
    assert!(h.stats.spliced_bytes.load(Relaxed) > 0, "nothing spliced");
    h.finish();
}

#[test]
fn send_failure_discards_the_queue_and_ends_the_session() {
    let mut h = Harness::established(Harness::cfg());
    h.peers[0].reset = true;
    h.write(Who::Conman, &frame(OpCode::Binary, &[1; 10], false));
    h.settle();
    assert_eq!(h.s.kind(), Kind::Closing);
    h.finish();
}

#[test]
fn a_backlog_past_the_hold_limit_waits_in_session_memory_not_the_ring() {
    let mut h = Harness::established(Harness::cfg());
    let frames: Vec<u8> = (0..12u8)
        .flat_map(|i| frame(OpCode::Binary, &[i; 58], false))
        .collect();
    h.write(Who::Conman, &frames);
    // The client reads nothing: its send stays in flight.
    for _ in 0..20 {
        h.deliver(Who::Conman, BUF);
    }
    assert!(h.peers[1].unread.is_empty(), "everything was received");
    assert!(
        h.bufs.len() <= 1 + RING_HOLD_MAX,
        "{} ring buffers held for one stuck side",
        h.bufs.len()
    );
    h.settle();
    assert_eq!(h.peers[0].got, frames);
    h.finish();
}

#[test]
fn with_the_ring_low_every_buffer_goes_back_at_once() {
    let mut h = Harness::established(Harness::cfg());
    h.ring_low = true;
    let f = frame(OpCode::Binary, &[7; 500], false);
    h.write(Who::Conman, &f);
    for _ in 0..20 {
        h.deliver(Who::Conman, BUF);
    }
    assert!(h.bufs.is_empty(), "ring buffers held: {:?}", h.bufs.keys());
    h.settle();
    assert_eq!(h.peers[0].got, f);
    h.finish();
}
