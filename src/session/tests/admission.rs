//! Before the token: the PROXY header, the Origin allowlist, the shard's
//! session cap and the per-address limits.

use super::*;
use crate::session::PerIp;

/// The response head the client got.
fn head_of(h: &Harness) -> String {
    let got = String::from_utf8_lossy(&h.peers[0].got).into_owned();
    got.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

fn request_with(extra: &str) -> Vec<u8> {
    let req = String::from_utf8(request()).unwrap();
    req.replacen("\r\n\r\n", &format!("\r\n{extra}\r\n\r\n"), 1)
        .into_bytes()
}

#[test]
fn a_proxy_header_names_the_client() {
    let mut h = Harness::proxied(Harness::cfg(), Some(PEER));
    assert_eq!(h.s.kind(), Kind::ProxyHeader);
    let stream = [h.preamble.clone(), request()].concat();
    // Byte by byte: the header and the head may end anywhere in a read.
    for b in &stream {
        h.write(Who::Client, std::slice::from_ref(b));
        h.settle();
    }
    assert_eq!(h.s.kind(), Kind::Verify);
    h.answer_token(Ok(ident()));
    h.answer_placement(found("vm-1"));
    h.answer_connect(0);
    h.settle();
    let sent = String::from_utf8(h.peers[1].got.clone()).unwrap();
    assert!(
        sent.contains(&format!("\r\nX-Forwarded-For: {PROXIED}\r\n")),
        "{sent}"
    );
}

#[test]
fn a_proxy_header_from_an_untrusted_peer_is_not_read() {
    let h = Harness::proxied(Harness::cfg(), Some("192.0.2.99".parse().unwrap()));
    assert!(
        h.ops.iter().all(|o| !o.starts_with("Recv")),
        "read from an untrusted peer: {:?}",
        h.ops
    );
    assert!(h.all_closed(), "{:?}", h.s.kind());
    assert!(h.peers[0].got.is_empty());
    assert_eq!(h.gate.sessions, 0);
}

#[test]
fn a_missing_malformed_or_late_proxy_header_closes_unanswered() {
    let cases: [(&[u8], &str); 3] = [
        (b"GET /wsv2/tok HTTP/1.1\r\n", "missing"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3", "late"),
    ];
    for (bytes, what) in cases {
        let mut h = Harness::proxied(Harness::cfg(), Some(PEER));
        h.write(Who::Client, bytes);
        h.settle();
        if what == "late" {
            assert_eq!(h.s.kind(), Kind::ProxyHeader);
            h.advance_to_deadline();
            h.settle();
        }
        assert_eq!(h.s.kind(), Kind::Closing, "{what}");
        h.finish();
        assert!(
            h.peers[0].got.is_empty(),
            "{what}: answered {:?}",
            h.peers[0].got
        );
        assert_eq!(h.stats.attempts.load(Relaxed), 0, "{what}: not an attempt");
    }
}

#[test]
fn an_origin_off_the_list_gets_403() {
    let mut cfg = Harness::cfg();
    cfg.websocket.allowed_origins = vec!["https://replit.com".into()];
    let mut h = Harness::new(cfg.clone());
    h.write(Who::Client, &request_with("Origin: https://evil.example"));
    h.settle();
    assert_eq!(status(&h.peers[0].got), 403, "{}", head_of(&h));
    assert!(!h.verify, "a refused request's token is not checked");
    h.finish();
    for origin in ["Origin: https://replit.com", "X-No-Origin: 1"] {
        let mut h = Harness::new(cfg.clone());
        h.write(Who::Client, &request_with(origin));
        h.settle();
        assert_eq!(h.s.kind(), Kind::Verify, "{origin}");
    }
}

#[test]
fn a_full_shard_answers_503_with_retry_after_and_a_finished_session_frees_its_place() {
    let mut cfg = Harness::cfg();
    cfg.limits.max_sessions_per_shard = 1;
    let mut h = Harness::new(cfg.clone());
    h.gate.sessions = 1;
    h.write(Who::Client, &request());
    h.settle();
    assert_eq!(status(&h.peers[0].got), 503);
    let head = head_of(&h);
    let after: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=5).contains(&after), "{head}");
    h.finish();
    assert_eq!(h.gate.sessions, 1, "a refused session takes no place");

    let mut h = Harness::new(cfg);
    h.write(Who::Client, &request());
    h.settle();
    assert_eq!(h.gate.sessions, 1);
    h.answer_token(Err("expired"));
    h.finish();
    assert_eq!(h.gate.sessions, 0, "the place is free again");
}

#[test]
fn an_address_over_its_limits_gets_429_and_its_slot_comes_back() {
    let table = Arc::new(PerIp::new(1, None));
    let now = Instant::now();
    table.admit(PEER, now).unwrap();
    let mut h = Harness::new(Harness::cfg());
    h.gate.per_ip = Some(table.clone());
    h.write(Who::Client, &request());
    h.settle();
    assert_eq!(status(&h.peers[0].got), 429, "{}", head_of(&h));
    assert!(head_of(&h).contains("\r\nRetry-After: "), "{}", head_of(&h));
    h.finish();

    // Another address, or the same once its first session is gone.
    table.release(PEER, now);
    let mut h = Harness::new(Harness::cfg());
    h.gate.per_ip = Some(table.clone());
    h.write(Who::Client, &request());
    h.settle();
    assert_eq!(h.s.kind(), Kind::Verify);
    assert_eq!(
        table.admit(PEER, now),
        Err(crate::session::Refused::Sessions)
    );
    h.answer_token(Err("expired"));
    h.finish();
    assert_eq!(table.admit(PEER, now), Ok(()), "released when it finished");
}

#[test]
fn behind_a_proxy_header_the_limits_count_the_client_not_the_balancer() {
    let table = Arc::new(PerIp::new(1, None));
    let now = Instant::now();
    table.admit(PEER, now).unwrap();
    let mut h = Harness::proxied(Harness::cfg(), Some(PEER));
    h.gate.per_ip = Some(table.clone());
    let stream = [h.preamble.clone(), request()].concat();
    h.write(Who::Client, &stream);
    h.settle();
    assert_eq!(h.s.kind(), Kind::Verify, "{}", head_of(&h));
    assert_eq!(
        table.admit(PROXIED, now),
        Err(crate::session::Refused::Sessions)
    );
}
