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

/// A relaying session whose client sent Close 1000 (relayed), and whose
/// Conman answer is on its way to the proxy (not yet received).
fn closes_crossing() -> Harness {
    let mut h = Harness::established(Harness::cfg());
    let mut c = Vec::new();
    write_close(&mut c, 1000, "", Some([3, 3, 3, 3]));
    h.write(Who::Client, &c);
    h.settle();
    let mut answer = Vec::new();
    write_close(&mut answer, 1000, "", None);
    h.write(Who::Conman, &answer);
    h
}

/// Both peers sent a Close, so neither may send more: the sockets are
/// closed as soon as the Closes are out, with no shutdown(2) and no wait
/// for FINs; close(2) sends the FIN. A peer the proxy closes on first may
/// still be sending, so that side is shut down and read until its FIN.
#[test]
fn sockets_close_without_lingering_only_after_a_close_handshake() {
    let mut h = closes_crossing();
    h.settle();
    assert!(h.all_closed(), "still open after the close handshake");
    assert!(!h.peers[0].shut_wr && !h.peers[1].shut_wr);

    let mut h = Harness::established(Harness::cfg());
    h.peers[1].fin = true;
    h.settle();
    assert!(h.peers[0].shut_wr, "client not shut down after its 1014");
    assert!(h.peers[0].fd.is_some(), "client closed before its FIN");
    assert!(
        !h.peers[1].shut_wr,
        "Conman sent FIN: close(2) alone ends it"
    );
    h.peers[0].fin = true;
    h.settle();
    assert!(h.all_closed());
}

/// The Close answer a client waits for goes in the same submission as the
/// close of its socket, so it is marked to leave with the FIN; a send with
/// no close behind it is not (the harness checks every `fin` send has one).
#[test]
fn the_last_send_before_a_close_carries_the_fin() {
    let mut h = closes_crossing();
    assert!(h.deliver(Who::Conman, BUF));
    let sends: Vec<&String> = h
        .ops
        .iter()
        .filter(|o| o.starts_with("Send { who: Client"))
        .collect();
    // The 101, then the Close answer.
    let (last, before) = sends.split_last().unwrap();
    assert!(last.ends_with("fin: true }"), "{last}");
    assert!(before.iter().all(|o| o.ends_with("fin: false }")));
    let send_at = h.ops.iter().position(|o| o == *last).unwrap();
    let close_at = h
        .ops
        .iter()
        .position(|o| *o == format!("Close {{ fd: {CLIENT_FD} }}"));
    assert!(
        close_at.is_some_and(|c| c > send_at),
        "no close of the client after its send: {:?}",
        h.ops
    );
    // The client's Close went to Conman before any close was due.
    let to_conman: Vec<&String> = h
        .ops
        .iter()
        .filter(|o| o.starts_with("Send { who: Conman"))
        .collect();
    assert!(!to_conman.is_empty() && to_conman.iter().all(|o| o.ends_with("fin: false }")));
}

/// After a close handshake, a side is closed in the same breath as its
/// receive's cancel, and behind its last (small) send still in flight: its
/// FIN waits for no loop turn (the peer, a client per RFC 6455, waits for
/// the server's FIN). The session ends only once every operation has; at
/// the linger deadline a send still stuck and a receive whose cancel missed
/// are cancelled (no fd is left to shut down).
#[test]
fn a_finished_side_closes_behind_its_last_send_and_receive_cancel() {
    let mut h = closes_crossing();
    assert!(h.deliver(Who::Conman, BUF));
    for p in &h.peers {
        assert!(p.fd.is_none(), "not closed with its cancel");
        assert!(p.recv.is_some() && p.cancel, "closed with no cancel first");
    }
    assert!(
        h.peers[0].send.is_some(),
        "the Close to the client not in flight"
    );
    assert!(!h.s.is_finished(), "finished with operations in flight");
    // The client reads nothing, and its cancel missed; Conman's ends.
    h.peers[0].cancel = false;
    assert!(h.deliver(Who::Conman, BUF));
    assert!(!h.s.is_finished());
    let count = |h: &Harness, op: &str| h.ops.iter().filter(|o| o.starts_with(op)).count();
    let (sends, recvs) = (
        count(&h, "CancelSend { who: Client"),
        count(&h, "CancelRecv { who: Client"),
    );
    h.advance_to_deadline();
    assert_eq!(
        count(&h, "CancelSend { who: Client"),
        sends + 1,
        "stuck send not cancelled"
    );
    assert_eq!(
        count(&h, "CancelRecv { who: Client"),
        recvs + 1,
        "receive not cancelled again"
    );
    h.settle();
    assert!(h.all_closed());
    assert!(
        h.peers[0].got.is_empty(),
        "a cancelled send delivered bytes"
    );

    // io_uring gives up on that send (EAGAIN, nothing sent): with no
    // socket left to send it on, its buffers go back at once.
    let mut h = closes_crossing();
    assert!(h.deliver(Who::Conman, BUF));
    assert!(h.peers[0].fd.is_none());
    let batch = h.peers[0].send.take().expect("the Close in flight");
    h.run(|s, env| s.handle_sent(env, Who::Client, -libc::EAGAIN, batch));
    h.settle();
    assert!(h.all_closed());
    assert!(h.bufs.is_empty(), "buffers kept: {:?}", h.bufs.keys());

    // The usual end: the send goes, the cancel lands.
    let mut h = closes_crossing();
    h.settle();
    assert!(h.all_closed());
    assert_eq!(h.closes(Who::Client), vec![(1000, String::new())]);
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
fn conman_lost_mid_held_frame_gives_the_client_1014_and_no_torn_bytes() {
    let mut h = Harness::established(Harness::cfg());
    let whole = frame(OpCode::Text, b"whole", false);
    let f = frame(OpCode::Binary, &[5; 40], false);
    h.write(Who::Conman, &[whole.as_slice(), &f[..20]].concat());
    h.peers[1].fin = true;
    h.settle();
    assert_eq!(parse_frames(&h.peers[0].got, false)[0].1, b"whole");
    assert_eq!(
        h.closes(Who::Client),
        vec![(1014, "stage=relay;reason=conman_lost".into())]
    );
    assert_eq!(
        h.peers[0].got.len(),
        whole.len() + 4 + "stage=relay;reason=conman_lost".len(),
        "the held half frame stayed in the proxy"
    );
    assert!(!h.peers[0].proxy_reset);
    h.finish();
}

#[test]
fn conman_lost_mid_long_frame_resets_the_client() {
    let mut cfg = Harness::cfg();
    cfg.relay.hold_max = 16;
    let mut h = Harness::established(cfg);
    let f = frame(OpCode::Binary, &[5; 40], false);
    h.write(Who::Conman, &f[..20]);
    h.peers[1].fin = true;
    h.settle();
    assert_eq!(h.peers[0].got, &f[..20], "a long frame streams");
    assert!(h.closes(Who::Client).is_empty());
    assert!(
        h.peers[0].proxy_reset,
        "the client must see a reset, not a FIN"
    );
    h.finish();
}

#[test]
fn a_short_frame_goes_only_once_complete_in_one_gathered_send() {
    let mut h = Harness::established(Harness::cfg());
    let f = frame(OpCode::Binary, &[3; 150], false);
    h.write(Who::Conman, &f[..100]);
    h.settle();
    assert!(h.peers[0].got.is_empty(), "part of a held frame went out");
    let sends_before = h.ops.iter().filter(|o| o.starts_with("Send")).count();
    h.write(Who::Conman, &f[100..]);
    h.settle();
    assert_eq!(h.peers[0].got, f);
    let sends: Vec<_> = h.ops.iter().filter(|o| o.starts_with("Send")).collect();
    assert_eq!(sends.len() - sends_before, 1, "{sends:?}");
    assert!(
        sends.last().unwrap().contains("Many"),
        "gathered from its buffers"
    );
    h.finish();
}

#[test]
fn a_receive_split_between_passed_and_held_bytes_is_shared_not_copied() {
    let mut h = Harness::established(Harness::cfg());
    let a = frame(OpCode::Text, b"first", false);
    let b = frame(OpCode::Binary, &[4; 100], false);
    let stream = [a.as_slice(), &b].concat();
    h.write(Who::Conman, &stream);
    h.deliver(Who::Conman, BUF);
    assert!(h.ops.iter().any(|o| o.starts_with("Retain")), "{:?}", h.ops);
    h.settle();
    assert_eq!(h.peers[0].got, stream);
    h.finish();
}

#[test]
fn a_dripping_peer_holds_a_bounded_share_of_the_ring() {
    let mut h = Harness::established(Harness::cfg());
    let f = frame(OpCode::Binary, &[6; 120], false);
    h.write(Who::Conman, &f);
    for _ in 0..f.len() - 1 {
        h.deliver(Who::Conman, 1);
        assert!(
            h.bufs.len() <= RING_HOLD_MAX,
            "{} buffers held",
            h.bufs.len()
        );
    }
    assert!(h.peers[0].got.is_empty());
    h.settle();
    assert_eq!(h.peers[0].got, f);
    h.finish();
}

#[test]
fn a_bad_client_frame_split_across_receives_leaves_conman_no_torn_bytes() {
    // Defect 4 of issue 11: a Close whose reason is not UTF-8, in two
    // segments. Its start used to reach Conman, then only a FIN.
    let mut h = Harness::established(Harness::cfg());
    let ok = frame(OpCode::Text, b"fine", true);
    let mut bad = Vec::new();
    write_close(&mut bad, 1000, "ab", Some([1, 2, 3, 4]));
    let n = bad.len();
    let (k0, k1) = (bad[n - 2] ^ 3, bad[n - 1] ^ 4);
    bad[n - 2] = 0xff ^ 3;
    bad[n - 1] = 0xfe ^ 4;
    assert_ne!((k0, k1), (0xff, 0xfe));
    h.write(Who::Client, &[ok.as_slice(), &bad[..n - 2]].concat());
    h.settle();
    h.write(Who::Client, &bad[n - 2..]);
    h.settle();
    let frames = parse_frames(&h.peers[1].got, true);
    assert_eq!(frames[0], (OpCode::Text, b"fine".to_vec()));
    assert_eq!(
        h.closes(Who::Conman),
        vec![(1001, "stage=client_gone;reason=protocol_error".into())]
    );
    assert_eq!(frames.len(), 2, "nothing torn before the Close");
    assert_eq!(h.closes(Who::Client)[0].0, 1007);
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
fn a_drain_close_is_1012_with_the_hint_to_the_client_and_1001_to_conman() {
    let mut h = Harness::established(Harness::cfg());
    h.run(|s, env| s.handle_drain_close(env, 1234));
    h.settle();
    let reason = "stage=drain;reason=restart;retry_after_ms=1234";
    assert_eq!(h.closes(Who::Client), vec![(1012, reason.into())]);
    assert_eq!(h.closes(Who::Conman), vec![(1001, reason.into())]);
    h.finish();
}

#[test]
fn a_drain_close_during_setup_tells_the_client_too() {
    let mut h = Harness::placing(Harness::cfg());
    h.run(|s, env| s.handle_drain_close(env, 0));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1012, "stage=drain;reason=restart;retry_after_ms=0".into())]
    );
    h.finish();
}

#[test]
fn idle_since_follows_the_last_bytes_received() {
    let mut h = Harness::established(Harness::cfg());
    let before = h.s.idle_since();
    h.now += Duration::from_secs(5);
    h.write(Who::Conman, &frame(OpCode::Text, b"out", false));
    h.settle();
    assert_eq!(h.s.idle_since(), before.max(h.now));
    assert!(h.s.idle_since() > before);
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
    cfg.relay.hold_max = 1024;
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

proptest! {
    /// Conman sends frames of random lengths around `relay.hold_max`, cut
    /// into random receives, then ends at a random byte. The client gets
    /// every frame before the cut whole, and then: a Close 1014 if the cut
    /// fell between frames or inside a frame short enough to hold (none of
    /// whose bytes went out); a reset if it fell inside a longer frame.
    #[test]
    fn a_stream_cut_anywhere_leaves_whole_frames_then_close_or_reset(
        sizes in proptest::collection::vec(0..400usize, 1..8),
        hold_max in 0..300u64,
        splice in any::<bool>(),
        cut_at in any::<prop::sample::Index>(),
        reads in proptest::collection::vec(1..BUF, 1..20),
    ) {
        let mut cfg = Harness::cfg();
        cfg.relay.hold_max = hold_max;
        cfg.buffers.splice_min = if splice { 64 } else { 0 };
        let mut h = Harness::established(cfg);
        let frames: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| frame(OpCode::Binary, &vec![i as u8; *n], false))
            .collect();
        let stream = frames.concat();
        let cut = cut_at.index(stream.len() + 1);
        h.write(Who::Conman, &stream[..cut]);
        let mut i = 0;
        while !h.peers[1].unread.is_empty() {
            if !h.deliver(Who::Conman, reads[i % reads.len()]) {
                h.settle();
            }
            h.complete_send(Who::Client, usize::MAX);
            i += 1;
            prop_assert!(i < 100_000);
        }
        h.peers[1].fin = true;
        h.settle();
        // Which frame the cut fell in, and where that frame began.
        let mut start = 0;
        let mut torn = None;
        for (f, n) in frames.iter().zip(&sizes) {
            if cut > start && cut < start + f.len() {
                // A header is held until the length in it is known.
                let header = f.len() - n;
                let long = *n as u64 > hold_max && cut >= start + header;
                torn = Some((start, long));
                break;
            }
            start += f.len();
            if start >= cut {
                break;
            }
        }
        let got = &h.peers[0].got;
        match torn {
            Some((start, true)) => {
                prop_assert!(h.peers[0].proxy_reset, "no reset after a torn long frame");
                prop_assert!(got.len() <= cut && got.len() >= start, "{} of {}", got.len(), cut);
                prop_assert_eq!(&got[..], &stream[..got.len()]);
            }
            _ => {
                let whole = torn.map_or(cut, |(start, _)| start);
                prop_assert!(!h.peers[0].proxy_reset);
                prop_assert_eq!(&got[..whole], &stream[..whole]);
                let rest = parse_frames(&got[whole..], false);
                prop_assert_eq!(rest.len(), 1, "bytes after the whole frames: {:?}", &got[whole..]);
                prop_assert_eq!(rest[0].0, OpCode::Close);
                prop_assert_eq!(&rest[0].1[..2], &1014u16.to_be_bytes());
            }
        }
        h.finish();
    }
}

#[test]
fn past_the_shard_budget_a_side_whose_peer_is_behind_stops_being_read() {
    let mut cfg = Harness::cfg();
    cfg.limits.shard_buffer_bytes = cfg.limits.send_queue_bytes;
    let mut h = Harness::established(cfg);
    // Other sessions of the shard already hold the whole budget.
    let others = h.cfg.limits.shard_buffer_bytes as u64;
    h.stats.buffered_bytes.store(others, Relaxed);
    let frames: Vec<u8> = (0..40u8)
        .flat_map(|i| frame(OpCode::Binary, &[i; 58], false))
        .collect();
    h.write(Who::Conman, &frames);
    h.ops.clear();
    // The client reads nothing, so Conman is read no further than one
    // buffer beyond what is in flight to it.
    for _ in 0..200 {
        h.deliver(Who::Conman, BUF);
    }
    assert!(
        h.peers[1].unread.len() >= frames.len() - 3 * BUF,
        "Conman was read on: {} of {} left",
        h.peers[1].unread.len(),
        frames.len()
    );
    assert!(h.stats.budget_pauses.load(Relaxed) >= 1);
    let mine = h.stats.buffered_bytes.load(Relaxed) - others;
    assert!(mine <= BUF as u64, "{mine} bytes held past the budget");
    assert!(
        h.ops
            .iter()
            .filter(|o| o.starts_with("Recv"))
            .all(|o| o.contains("single: true")),
        "a multishot receive past the budget: {:?}",
        h.ops
    );
    // A client that reads gets everything, and the count goes back.
    h.settle();
    assert_eq!(h.peers[0].got, frames);
    assert_eq!(h.stats.buffered_bytes.load(Relaxed), others);
    h.finish();
    assert_eq!(h.stats.buffered_bytes.load(Relaxed), others);
}

#[test]
fn buffered_bytes_come_back_to_zero_whatever_the_end() {
    for end in 0..3 {
        let mut h = Harness::established(Harness::cfg());
        let frames: Vec<u8> = (0..20u8)
            .flat_map(|i| frame(OpCode::Binary, &[i; 58], false))
            .collect();
        h.write(Who::Conman, &frames);
        for _ in 0..40 {
            h.deliver(Who::Conman, BUF);
        }
        assert!(h.stats.buffered_bytes.load(Relaxed) > 0);
        match end {
            0 => h.peers[0].reset = true,
            1 => h.peers[1].fin = true,
            _ => h.run(|s, env| s.handle_drain_close(env, 0)),
        }
        h.finish();
        assert_eq!(h.stats.buffered_bytes.load(Relaxed), 0, "end {end}");
    }
}

#[test]
fn receives_that_come_in_one_batch_go_out_in_one_send() {
    let mut h = Harness::established(Harness::cfg());
    let a = frame(OpCode::Binary, &[1; 40], false);
    let b = frame(OpCode::Binary, &[2; 40], false);
    h.write(Who::Conman, &a);
    h.more_input = true;
    assert!(h.deliver(Who::Conman, a.len()));
    assert!(
        h.peers[0].send.is_none(),
        "sent before the batch's last receive"
    );
    h.write(Who::Conman, &b);
    h.more_input = false;
    assert!(h.deliver(Who::Conman, b.len()));
    let send = h.peers[0].send.as_ref().expect("a send after the last");
    let n: usize = send.chunks().iter().map(Chunk::remaining).sum();
    assert_eq!(n, a.len() + b.len(), "both receives in it");
    h.settle();
    assert_eq!(h.peers[0].got, [a, b].concat());
    h.finish();
}

#[test]
fn a_side_the_ring_starved_waits_for_buffers_not_for_its_peer() {
    let mut h = Harness::established(Harness::cfg());
    h.write(Who::Conman, &frame(OpCode::Binary, &[1; 40], false));
    // The ring is empty when Conman's bytes arrive.
    h.peers[1].recv = None;
    let mut outcome = None;
    h.run(|s, env| {
        outcome = Some(s.handle_recv(env, Who::Conman, -libc::ENOBUFS, false, None));
    });
    assert_eq!(outcome, Some(RecvOutcome::Starved));
    assert!(h.s.starved(Who::Conman));
    // Sends completing toward the client must not re-arm it (that was a
    // loop of ENOBUFS under a long shortage) ...
    h.write(Who::Client, &frame(OpCode::Text, b"up", true));
    h.settle();
    assert!(h.peers[1].recv.is_none(), "re-armed into the shortage");
    assert!(h.s.starved(Who::Conman));
    // ... only the shard's retry does, with one buffer.
    h.run(|s, env| s.handle_buffers_available(env, Who::Conman));
    assert_eq!(h.peers[1].recv, Some(true));
    h.settle();
    assert_eq!(h.peers[0].got, frame(OpCode::Binary, &[1; 40], false));
    h.finish();
}

fn revoked_user(user: &str) -> crate::token::revoke::RevokeSet {
    use crate::token::revoke::{Revocation, RevokeSet, Scope};
    let mut set = RevokeSet::default();
    let r = Revocation {
        scope: Scope::User,
        value: user.into(),
        until: 2_000,
    };
    set.insert(r, 1_000).unwrap();
    set
}

#[test]
fn a_revocation_is_1008_to_the_client_and_1001_to_conman() {
    let mut h = Harness::established(Harness::cfg());
    assert!(!h.s.revoked_by(&revoked_user("mallory"), 1_000));
    let set = revoked_user(h.s.ident().unwrap().user());
    assert!(h.s.revoked_by(&set, 1_000));
    // Not once the revocation has expired.
    assert!(!h.s.revoked_by(&set, 2_000));
    h.run(|s, env| s.handle_revoked(env));
    h.settle();
    let reason = "stage=token;reason=revoked";
    assert_eq!(h.closes(Who::Client), vec![(1008, reason.into())]);
    assert_eq!(h.closes(Who::Conman), vec![(1001, reason.into())]);
    assert_eq!(h.stats.revoked_closes.load(Relaxed), 1);
    // Ending already: asked again, it does not match.
    assert!(!h.s.revoked_by(&set, 1_000));
    h.finish();
}

#[test]
fn a_revocation_during_setup_fails_it_with_the_same_reason() {
    let mut h = Harness::placing(Harness::cfg());
    assert!(h.s.revoked_by(&revoked_user("alice"), 1_000));
    h.run(|s, env| s.handle_revoked(env));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1008, "stage=token;reason=revoked".into())]
    );
    h.finish();
}

#[test]
fn a_receive_that_already_ended_is_not_cancelled() {
    // Conman answers the client's Close and sends its FIN: both come in
    // one batch, the Close's completion first. The Close makes the
    // session stop reading Conman, but that receive has already ended in
    // the kernel (its last completion is next): a cancel would only come
    // back with ENOENT.
    let mut h = Harness::established(Harness::cfg());
    let mut close = Vec::new();
    write_close(&mut close, 1000, "", Some([3, 3, 3, 3]));
    h.write(Who::Client, &close);
    h.settle();
    assert_eq!(h.closes(Who::Conman), vec![(1000, String::new())]);
    let mut reply = Vec::new();
    write_close(&mut reply, 1000, "", None);
    h.write(Who::Conman, &reply);
    h.peers[1].fin = true;
    let before = h.ops.len();
    h.input_ends = true;
    assert!(h.deliver(Who::Conman, reply.len()));
    h.input_ends = false;
    let cancels: Vec<_> = h.ops[before..]
        .iter()
        .filter(|o| o.starts_with("CancelRecv { who: Conman"))
        .collect();
    assert!(cancels.is_empty(), "{cancels:?}");
    // The FIN, the receive's last completion, ends it as usual.
    assert!(h.deliver(Who::Conman, BUF));
    h.settle();
    assert_eq!(h.closes(Who::Client), vec![(1000, String::new())]);
    h.finish();
}
