//! A session whose client speaks TLS: a rustls client on one end of the
//! simulated shard, sends completing a few hundred bytes at a time.

use std::io::{Read, Write};

use rustls::ClientConnection;

use super::*;

/// Bytes a send completion takes at most: records come back cut anywhere.
const SHORT: usize = 300;

fn tls_cfg() -> (Config, Arc<rustls::ClientConfig>) {
    let (server, client) = crate::tls::testkit::pair(&[&rustls::version::TLS13]);
    let mut cfg = Harness::cfg();
    cfg.tls.server = Some(server);
    cfg.tls.handshake_timeout_ms = 2_000;
    (cfg, client)
}

impl Harness {
    /// Moves bytes between the rustls client and the session until
    /// neither moves; returns the plaintext the client received.
    fn pump_tls(&mut self, c: &mut ClientConnection) -> Vec<u8> {
        let mut plain = Vec::new();
        for _ in 0..100_000 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            self.write(Who::Client, &wire);
            let mut any = !wire.is_empty();
            for who in [Who::Client, Who::Conman] {
                any |= self.complete_send(who, SHORT);
                any |= self.deliver(who, BUF);
            }
            let got = std::mem::take(&mut self.peers[0].got);
            any |= !got.is_empty();
            let mut rd = &got[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                let st = c.process_new_packets().unwrap();
                let at = plain.len();
                plain.resize(at + st.plaintext_bytes_to_read(), 0);
                c.reader().read_exact(&mut plain[at..]).unwrap();
            }
            if !any {
                return plain;
            }
        }
        panic!("no quiescence");
    }
}

/// From accept to relaying over TLS, every step answered at once.
fn tls_established(cfg: Config, ccfg: &Arc<rustls::ClientConfig>) -> (Harness, ClientConnection) {
    let mut h = Harness::new(cfg);
    let mut c = crate::tls::testkit::client(ccfg);
    h.pump_tls(&mut c);
    assert!(!c.is_handshaking());
    assert_eq!(h.s.kind(), Kind::Head);
    c.writer().write_all(&request()).unwrap();
    h.pump_tls(&mut c);
    h.answer_token(Ok(ident()));
    let head = h.pump_tls(&mut c);
    assert_eq!(status(&head), 101);
    h.answer_placement(found("vm-1"));
    h.answer_connect(0);
    h.settle();
    h.conman_101();
    h.pump_tls(&mut c);
    assert_eq!(h.s.kind(), Kind::Relay);
    h.peers[1].got.clear();
    (h, c)
}

#[test]
fn frames_pass_through_tls_unchanged_both_ways() {
    let (mut cfg, ccfg) = tls_cfg();
    // Long frames stream, and would be spliced if the client were plain.
    cfg.buffers.splice_min = 1;
    cfg.relay.hold_max = 100;
    let (mut h, mut c) = tls_established(cfg, &ccfg);

    // Masked frames from the client reach Conman byte for byte (never
    // re-masked), however the records and receives cut them.
    let payload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let up = frame(OpCode::Binary, &payload, true);
    c.writer().write_all(&up).unwrap();
    h.pump_tls(&mut c);
    assert_eq!(h.peers[1].got, up);
    // Conman's frames reach the client, sealed from the ring buffers they
    // came in, through sends cut every SHORT bytes.
    let down = frame(OpCode::Binary, &payload[..30_000], false);
    h.write(Who::Conman, &down);
    let got = h.pump_tls(&mut c);
    assert_eq!(got, down);
    assert!(
        !h.ops.iter().any(|o| o.contains("NeedPipe")),
        "a TLS session asked for a pipe"
    );

    // The closing handshake, then close_notify before the socket closes.
    let mut close = Vec::new();
    write_close(&mut close, 1000, "bye", Some([1, 2, 3, 4]));
    c.writer().write_all(&close).unwrap();
    h.pump_tls(&mut c);
    let mut answer = Vec::new();
    write_close(&mut answer, 1000, "bye", None);
    h.write(Who::Conman, &answer);
    let got = h.pump_tls(&mut c);
    assert_eq!(got, answer);
    assert_eq!(h.s.kind(), Kind::Closing);
    let mut tail = [0u8; 1];
    assert_eq!(
        c.reader().read(&mut tail).ok(),
        Some(0),
        "close_notify received"
    );
    h.finish();
}

#[test]
fn a_stalled_handshake_ends_at_the_handshake_deadline() {
    let (cfg, ccfg) = tls_cfg();
    let start = Instant::now();
    let mut h = Harness::new(cfg);
    let mut c = crate::tls::testkit::client(&ccfg);
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    h.write(Who::Client, &hello[..hello.len() / 2]);
    h.settle();
    assert_eq!(
        h.s.poll_timeout(),
        Some(h.now + Duration::from_millis(2_000))
    );
    assert!(h.now >= start);
    h.advance_to_deadline();
    h.settle();
    assert_eq!(h.s.kind(), Kind::Closing);
    assert!(h.peers[0].got.is_empty(), "nothing to say to it");
    h.finish();
}

#[test]
fn after_the_handshake_the_head_gets_its_own_deadline() {
    let (mut cfg, ccfg) = tls_cfg();
    cfg.limits.header_timeout_ms = 5_000;
    let mut h = Harness::new(cfg);
    let mut c = crate::tls::testkit::client(&ccfg);
    h.pump_tls(&mut c);
    assert!(!c.is_handshaking());
    assert_eq!(
        h.s.poll_timeout(),
        Some(h.now + Duration::from_millis(5_000))
    );
    // A slow head gets its 408, sealed.
    h.advance_to_deadline();
    let got = h.pump_tls(&mut c);
    assert_eq!(status(&got), 408);
}

/// Behind a load balancer: the PROXY header in clear, then the handshake,
/// even when both arrive in one receive.
#[test]
fn the_proxy_header_comes_before_the_handshake() {
    let (cfg, ccfg) = tls_cfg();
    let mut h = Harness::proxied(cfg, Some(PEER));
    let mut c = crate::tls::testkit::client(&ccfg);
    let mut first = std::mem::take(&mut h.preamble);
    c.write_tls(&mut first).unwrap();
    h.write(Who::Client, &first);
    h.pump_tls(&mut c);
    assert!(!c.is_handshaking());
    assert_eq!(h.s.kind(), Kind::Head);
    assert_eq!(h.s.client_ip, Some(PROXIED));
    c.writer().write_all(&request()).unwrap();
    h.pump_tls(&mut c);
    assert_eq!(h.s.kind(), Kind::Verify);
}

/// A record that does not decrypt mid-session: the client gets its alert,
/// Conman a Close as if the client had gone.
#[test]
fn a_forged_record_ends_the_client_side() {
    let (cfg, ccfg) = tls_cfg();
    let (mut h, mut c) = tls_established(cfg, &ccfg);
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
    forged.extend_from_slice(&[0x55; 0x20]);
    h.write(Who::Client, &forged);
    h.settle();
    assert_eq!(
        h.closes(Who::Conman),
        vec![(1001, "stage=client_gone;reason=eof".into())]
    );
    let got = std::mem::take(&mut h.peers[0].got);
    let mut rd = &got[..];
    c.read_tls(&mut rd).unwrap();
    assert!(
        matches!(
            c.process_new_packets(),
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadRecordMac
            ))
        ),
        "the client hears bad_record_mac"
    );
    h.finish();
}

/// A TLS session never moves to another process (its keys stay here): it
/// drains where it is.
#[test]
fn a_tls_session_cannot_move() {
    let (cfg, ccfg) = tls_cfg();
    let (mut h, _c) = tls_established(cfg, &ccfg);
    assert!(!h.s.can_move());
    let mut started = true;
    h.run(|s, env| started = s.handle_move_start(env));
    assert!(!started);
    assert_eq!(h.s.moving(), crate::session::handoff::Moving::No);
}
