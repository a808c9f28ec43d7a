//! Setup: from the request head to relaying.

use super::*;

#[test]
fn happy_path_walks_every_setup_phase_in_order() {
    let mut h = Harness::new(Harness::cfg());
    assert_eq!(h.s.kind(), Kind::Head);
    let req = request();
    h.write(Who::Client, &req[..20]);
    h.settle();
    assert_eq!(h.s.kind(), Kind::Head);
    h.write(Who::Client, &req[20..]);
    h.settle();
    assert_eq!(h.s.kind(), Kind::Verify);
    h.answer_token(Ok(ident()));
    assert_eq!(h.s.kind(), Kind::Placement);
    h.settle();
    assert_eq!(
        status(&h.peers[0].got),
        101,
        "client-first: 101 before Conman"
    );
    h.answer_placement(found("vm-1"));
    assert_eq!(h.s.kind(), Kind::Connecting);
    h.answer_connect(0);
    assert_eq!(h.s.kind(), Kind::ConmanHandshake);
    h.settle();
    let sent = String::from_utf8(h.peers[1].got.clone()).unwrap();
    assert!(sent.starts_with("GET / HTTP/1.1\r\n"), "{sent}");
    for header in ["X-Eval-Session: ", "X-Repl-Id: repl-1", "X-User: alice"] {
        assert!(sent.contains(header), "{header} missing from {sent}");
    }
    h.conman_101();
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    assert_eq!(h.stats.established.load(Relaxed), 1);
    assert_eq!(h.stats.active.load(Relaxed), 1);
    h.write(Who::Client, &frame(OpCode::Close, &[3, 232], true));
    h.settle();
    h.write(Who::Conman, &frame(OpCode::Close, &[3, 232], false));
    h.finish();
    assert_eq!(h.stats.active.load(Relaxed), 0);
}

#[test]
fn header_timeout_answers_408() {
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, b"GET /wsv2/tok HTTP/1.1\r\n");
    h.settle();
    h.advance_to_deadline();
    h.settle();
    assert_eq!(status(&h.peers[0].got), 408);
    assert_eq!(h.s.kind(), Kind::Closing);
    h.finish();
}

#[test]
fn bad_request_gets_its_status_and_healthz_200() {
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, b"BREW /wsv2/tok HTTP/1.1\r\nHost: x\r\n\r\n");
    h.settle();
    assert!(status(&h.peers[0].got) >= 400);
    h.finish();
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    h.settle();
    assert_eq!(status(&h.peers[0].got), 200);
    h.finish();
}

#[test]
fn rejected_token_gets_101_then_1008_or_401() {
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Err("expired"));
    h.settle();
    assert_eq!(status(&h.peers[0].got), 101);
    assert_eq!(
        h.closes(Who::Client),
        vec![(1008, "stage=token;reason=expired".into())]
    );
    h.finish();
    let mut cfg = Harness::cfg();
    cfg.token.reject_with = crate::config::RejectWith::Http;
    let mut h = Harness::new(cfg);
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Err("bad_signature"));
    h.settle();
    assert_eq!(status(&h.peers[0].got), 401);
    h.finish();
}

#[test]
fn placement_failure_closes_1013_with_the_hint() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(PlacementResult::Failed {
        reason: PlacementFailure::NoCapacity,
        retry_after_ms: Some(1500),
    });
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(
            1013,
            "stage=controlplane;reason=no_capacity;retry_after_ms=1500".into()
        )]
    );
    h.finish();
}

#[test]
fn stale_placement_answer_is_ignored() {
    let mut h = Harness::placing(Harness::cfg());
    let seq = h.placement.unwrap();
    h.run(|s, env| s.handle_placement(env, seq.wrapping_add(9), found("vm-x")));
    assert_eq!(h.s.kind(), Kind::Placement);
}

#[test]
fn refused_connect_backs_off_and_retries_excluding_the_vm() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(found("vm-1"));
    let first_fd = h.peers[1].fd.unwrap();
    h.answer_connect(-libc::ECONNREFUSED);
    assert_eq!(h.s.kind(), Kind::Backoff);
    assert_eq!(h.peers[1].closed, vec![first_fd], "failed socket closed");
    assert!(h.placement.is_none(), "no new placement before the backoff");
    h.retry_on_vm_2();
    assert!(h.closes(Who::Client).is_empty(), "the client saw nothing");
}

impl Harness {
    /// After vm-1 failed the first attempt: the backoff ends, the retry's
    /// placement excludes vm-1, vm-2 answers and the session relays.
    fn retry_on_vm_2(&mut self) {
        self.advance_to_deadline();
        assert_eq!(self.s.kind(), Kind::Placement);
        let asked = self.last_op("Placement");
        assert!(
            asked.contains("attempt: 1") && asked.contains("vm-1"),
            "{asked}"
        );
        self.answer_placement(found("vm-2"));
        self.connect_and_upgrade();
    }
}

#[test]
fn every_failed_vm_stays_excluded_not_only_the_last() {
    let mut h = Harness::placing(Harness::cfg());
    let last_placement = |h: &Harness| {
        h.ops
            .iter()
            .rev()
            .find(|o| o.starts_with("Placement"))
            .unwrap()
            .clone()
    };
    assert!(last_placement(&h).contains("exclude: []"));
    // The third placement names vm-1 anyway (a Controlplane that ignores
    // the list): it is not listed twice.
    let table = [
        ("vm-1", "attempt: 1", r#"exclude: ["vm-1"]"#),
        ("vm-2", "attempt: 2", r#"exclude: ["vm-1", "vm-2"]"#),
        ("vm-1", "attempt: 3", r#"exclude: ["vm-1", "vm-2"]"#),
    ];
    for (vm, attempt, exclude) in table {
        h.answer_placement(found(vm));
        h.answer_connect(-libc::ECONNREFUSED);
        h.advance_to_deadline();
        let asked = last_placement(&h);
        assert!(
            asked.contains(attempt) && asked.contains(exclude),
            "{asked}"
        );
    }
    h.answer_placement(found("vm-3"));
    h.answer_connect(0);
    h.settle();
    h.conman_101();
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
}

#[test]
fn no_vm_left_on_a_retry_fails_with_the_last_conman_error() {
    let mut h = Harness::placing(Harness::cfg());
    for vm in ["vm-1", "vm-2"] {
        h.answer_placement(found(vm));
        h.answer_connect(-libc::ECONNREFUSED);
        h.advance_to_deadline();
    }
    h.answer_placement(PlacementResult::Failed {
        reason: PlacementFailure::NoCapacity,
        retry_after_ms: None,
    });
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1014, "stage=conman_connect;reason=refused".into())]
    );
    h.finish();
}

#[test]
fn attempts_exhausted_fail_with_the_last_error() {
    let mut cfg = Harness::cfg();
    cfg.limits.max_attempts = 2;
    let mut h = Harness::new(cfg);
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
    h.answer_placement(found("vm-1"));
    h.answer_connect(-libc::ECONNREFUSED);
    h.advance_to_deadline();
    h.answer_placement(found("vm-2"));
    h.answer_connect(-libc::ECONNREFUSED);
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1014, "stage=conman_connect;reason=refused".into())]
    );
    h.finish();
}

#[test]
fn setup_deadline_fails_a_stalled_conman_handshake() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(found("vm-1"));
    h.answer_connect(0);
    h.settle();
    // Conman never answers: each attempt times out, then the setup does.
    for _ in 0..20 {
        if h.s.kind() == Kind::Closing {
            break;
        }
        h.advance_to_deadline();
        h.settle();
        if h.placement.is_some() {
            h.answer_placement(found("vm-2"));
            h.answer_connect(0);
            h.settle();
        }
    }
    let closes = h.closes(Who::Client);
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0].0, 1014);
    assert!(closes[0]
        .1
        .starts_with("stage=conman_handshake;reason=timeout"));
    h.finish();
}

#[test]
fn client_gone_during_connect_cancels_it_and_closes_quietly() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(found("vm-1"));
    h.peers[0].fin = true;
    h.settle();
    assert_eq!(h.s.kind(), Kind::Closing);
    assert_eq!(h.connect, Some(true), "the connect was cancelled");
    assert!(
        h.peers[1].fd.is_some(),
        "its socket stays until the completion"
    );
    h.answer_connect(0);
    h.finish();
    assert_eq!(
        h.closes(Who::Client).len(),
        0,
        "nobody to tell: client_gone sends no Close"
    );
}

#[test]
fn held_client_frames_arrive_in_order_after_conman_answers() {
    let mut h = Harness::placing(Harness::cfg());
    let early: Vec<u8> = (1..=3u8)
        .flat_map(|i| frame(OpCode::Binary, &[i; 100], true))
        .collect();
    h.write(Who::Client, &early);
    h.settle();
    h.answer_placement(found("vm-1"));
    h.answer_connect(0);
    h.settle();
    let req_len = h.peers[1].got.len();
    h.conman_101();
    h.settle();
    assert_eq!(&h.peers[1].got[req_len..], &early[..]);
}

#[test]
fn upstream_first_answers_the_client_only_after_conman() {
    let mut cfg = Harness::cfg();
    cfg.websocket.mode = crate::config::UpgradeMode::UpstreamFirst;
    let mut h = Harness::new(cfg);
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
    assert!(h.peers[0].got.is_empty(), "no 101 before Conman's");
    h.answer_placement(PlacementResult::Failed {
        reason: PlacementFailure::Unavailable,
        retry_after_ms: None,
    });
    h.settle();
    assert_eq!(status(&h.peers[0].got), 503);
    h.finish();
}

#[test]
fn control_shard_lost_fails_a_waiting_placement() {
    let mut h = Harness::placing(Harness::cfg());
    h.run(|s, env| s.handle_control_lost(env));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1013, "stage=controlplane;reason=control_unavailable".into())]
    );
    h.finish();
}

#[test]
fn held_frames_never_follow_the_proxys_close_to_conman() {
    let mut h = Harness::placing(Harness::cfg());
    let held: Vec<u8> = (1..=3u8)
        .flat_map(|i| frame(OpCode::Text, &[b'a' + i; 10], true))
        .collect();
    h.write(Who::Client, &held);
    h.settle();
    h.answer_placement(found("vm-1"));
    h.answer_connect(0);
    h.settle();
    // Conman's 101 and a frame it must not send (masked) in one segment.
    h.conman_101();
    h.write(Who::Conman, &frame(OpCode::Text, b"bad", true));
    h.settle();
    let got = &h.peers[1].got;
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let frames = parse_frames(&got[head_end..], true);
    assert_eq!(frames.len(), 1, "after the Close: {frames:?}");
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(u16::from_be_bytes([frames[0].1[0], frames[0].1[1]]), 1002);
    h.finish();
}

#[test]
fn a_held_close_starts_the_close_timeout() {
    let mut h = Harness::placing(Harness::cfg());
    let mut close = Vec::new();
    write_close(&mut close, 1000, "", Some([1, 2, 3, 4]));
    h.write(Who::Client, &close);
    h.settle();
    h.answer_placement(found("vm-1"));
    h.answer_connect(0);
    h.settle();
    h.conman_101();
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    // Conman never answers: the session must not wait forever.
    h.advance_to_deadline();
    assert_eq!(h.s.kind(), Kind::Closing);
}

#[test]
fn a_hanging_connect_is_cancelled_at_its_timeout_and_retried() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(found("vm-1"));
    assert_eq!(h.s.kind(), Kind::Connecting);
    let t0 = h.now;
    // The attempt's own timeout, well within the setup's.
    let timeout = Duration::from_millis(h.cfg.limits.connect_timeout_ms);
    assert_eq!(h.s.poll_timeout(), Some(t0 + timeout));
    h.advance_to_deadline();
    assert_eq!(h.connect, Some(true), "the connect was cancelled");
    // Its completion (cancelled) comes; then the backoff, then vm-1 is
    // passed over.
    h.answer_connect(0);
    assert_eq!(h.s.kind(), Kind::Backoff);
    h.retry_on_vm_2();
}
