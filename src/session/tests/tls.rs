//! A session whose client speaks TLS: a rustls client on one end of the
//! simulated shard, sends completing a few hundred bytes at a time.

use std::io::{Read, Write};
use std::sync::Arc;

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
        self.pump(Who::Client, c)
    }

    /// Moves bytes between `who`'s socket and the rustls peer `c` on its
    /// other end until neither moves; returns the plaintext `c` received.
    fn pump<D>(&mut self, who: Who, c: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
        let mut plain = Vec::new();
        for _ in 0..100_000 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            self.write(who, &wire);
            let mut any = !wire.is_empty();
            for who in [Who::Client, Who::Conman] {
                any |= self.complete_send(who, SHORT);
                any |= self.deliver(who, BUF);
            }
            let got = std::mem::take(&mut self.peers[at(who)].got);
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
fn a_tls_session_receives_into_the_tls_pool_and_falls_back_when_it_is_dry() {
    let (cfg, ccfg) = tls_cfg();
    let (mut h, mut c) = tls_established(cfg, &ccfg);
    // Both sides, Conman's plaintext too.
    assert!(h.peers[0].recv_tls && h.peers[1].recv_tls);
    // The pool is empty when the client's bytes arrive: one main buffer,
    // at once, not a wait for the shard's retry.
    h.peers[0].recv = None;
    let mut outcome = None;
    h.run(|s, env| {
        outcome = Some(s.handle_recv(env, Who::Client, -libc::ENOBUFS, false, None));
    });
    assert_eq!(outcome, Some(RecvOutcome::Ok));
    assert!(!h.s.starved(Who::Client));
    assert_eq!(h.peers[0].recv, Some(true), "one buffer");
    assert!(!h.peers[0].recv_tls, "from the main pool");
    assert_eq!(h.stats.tls_pool_exhausted.load(Relaxed), 1);
    assert_eq!(h.stats.buffer_exhausted.load(Relaxed), 0);
    // Bytes come in that buffer; the receive after it is the pool's again.
    let up = frame(OpCode::Text, b"after", true);
    c.writer().write_all(&up).unwrap();
    h.pump_tls(&mut c);
    assert_eq!(h.peers[1].got, up);
    assert!(h.peers[0].recv_tls);
    h.finish();
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

// ---- Conman over TLS ------------------------------------------------------

/// A config whose Conman URLs may be `wss://` (the client config trusts
/// `eval.test`'s certificate), and the server config of that Conman.
fn conman_tls_cfg() -> (Config, Arc<rustls::ServerConfig>) {
    let (server, client) = crate::tls::testkit::pair(&[&rustls::version::TLS13]);
    let mut cfg = Harness::cfg();
    cfg.conman.tls.client = Some(client);
    cfg.conman.tls.handshake_timeout_ms = 1_000;
    (cfg, server)
}

fn found_wss(vm: &str) -> PlacementResult {
    let PlacementResult::Found(f) = found(vm) else {
        unreachable!()
    };
    let mut f = Arc::unwrap_or_clone(f);
    f.tls = Some("eval.test".into());
    PlacementResult::Found(Arc::new(f))
}

/// wss:// to Conman: the hello goes out after the connect, the upgrade
/// request only once the handshake is done, Conman's 101 and frames are
/// decrypted, the client's frames sealed unchanged (never re-masked), and
/// close_notify follows the closing handshake.
#[test]
fn conman_over_tls_relays_both_ways() {
    let (cfg, server) = conman_tls_cfg();
    let mut h = Harness::placing(cfg);
    h.answer_placement(found_wss("vm-1"));
    h.answer_connect(0);
    let mut srv = rustls::ServerConnection::new(server).unwrap();
    let req = h.pump(Who::Conman, &mut srv);
    assert!(!srv.is_handshaking());
    assert_eq!(srv.server_name(), Some("eval.test"), "SNI");
    let req = String::from_utf8(req).unwrap();
    assert!(req.starts_with("GET / HTTP/1.1\r\n"), "{req}");
    assert_eq!(
        h.s.poll_timeout(),
        Some(h.now + Duration::from_millis(h.cfg.limits.connect_timeout_ms)),
        "the 101 gets the connect timeout once the handshake is done"
    );
    let key = req
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap();
    let hello = frame(OpCode::Text, b"from conman", false);
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )
    .into_bytes();
    resp.extend_from_slice(&hello);
    srv.writer().write_all(&resp).unwrap();
    h.pump(Who::Conman, &mut srv);
    assert_eq!(h.s.kind(), Kind::Relay);
    assert!(h.peers[0].got.ends_with(&hello));

    let payload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let up = frame(OpCode::Binary, &payload, true);
    h.write(Who::Client, &up);
    assert_eq!(h.pump(Who::Conman, &mut srv), up);
    let down = frame(OpCode::Binary, &payload[..30_000], false);
    h.peers[0].got.clear();
    srv.writer().write_all(&down).unwrap();
    h.pump(Who::Conman, &mut srv);
    assert_eq!(h.peers[0].got, down);
    assert!(!h.ops.iter().any(|o| o.contains("NeedPipe")));

    let mut close = Vec::new();
    write_close(&mut close, 1000, "bye", Some([1, 2, 3, 4]));
    h.write(Who::Client, &close);
    h.pump(Who::Conman, &mut srv);
    let mut answer = Vec::new();
    write_close(&mut answer, 1000, "bye", None);
    srv.writer().write_all(&answer).unwrap();
    h.pump(Who::Conman, &mut srv);
    assert_eq!(h.s.kind(), Kind::Closing);
    let mut tail = [0u8; 1];
    assert_eq!(srv.reader().read(&mut tail).ok(), Some(0), "close_notify");
    h.finish();
}

/// A Conman whose certificate the CA did not sign, and one that never
/// answers the hello: each attempt fails as `conman_tls` with its reason,
/// and after the last the client hears it.
#[test]
fn conman_tls_failures_name_their_reason() {
    for (reason, answer) in [("unknown_ca", true), ("timeout", false)] {
        let (mut cfg, _) = conman_tls_cfg();
        cfg.limits.max_attempts = 1;
        // Another self-signed certificate for the same name.
        let (stranger, _) = crate::tls::testkit::pair(&[&rustls::version::TLS13]);
        let mut h = Harness::placing(cfg);
        h.answer_placement(found_wss("vm-1"));
        h.answer_connect(0);
        if answer {
            let mut srv = rustls::ServerConnection::new(stranger).unwrap();
            let mut wire = Vec::new();
            h.settle();
            let hello = std::mem::take(&mut h.peers[1].got);
            srv.read_tls(&mut &hello[..]).unwrap();
            srv.process_new_packets().unwrap();
            srv.write_tls(&mut wire).unwrap();
            h.write(Who::Conman, &wire);
        } else {
            h.settle();
            assert_eq!(
                h.s.poll_timeout(),
                Some(h.now + Duration::from_millis(1_000)),
                "the handshake's own deadline"
            );
            h.advance_to_deadline();
        }
        h.settle();
        assert_eq!(
            h.closes(Who::Client),
            vec![(1014, format!("stage=conman_tls;reason={reason}"))]
        );
        h.finish();
    }
}

/// A Controlplane answer naming wss:// while no `conman.tls.ca_file` is
/// set: the attempt cannot start, and says why; the VM is not blamed.
#[test]
fn wss_without_a_ca_fails_as_no_ca() {
    let mut h = Harness::placing(Harness::cfg());
    h.answer_placement(found_wss("vm-1"));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1014, "stage=conman_tls;reason=no_ca".into())]
    );
    assert!(!h
        .ops
        .iter()
        .any(|o| o.contains("Connect") || o.contains("VmFailed")));
    h.finish();
}

/// An IP literal in a wss:// URL: no SNI is sent, and the certificate
/// must name that address (this one names only `eval.test`).
#[test]
fn an_ip_literal_sends_no_sni_and_needs_an_ip_san() {
    let (mut cfg, server) = conman_tls_cfg();
    cfg.limits.max_attempts = 1;
    let mut h = Harness::placing(cfg);
    let PlacementResult::Found(f) = found_wss("vm-1") else {
        unreachable!()
    };
    let mut f = Arc::unwrap_or_clone(f);
    f.tls = Some("127.0.0.1".into());
    h.answer_placement(PlacementResult::Found(Arc::new(f)));
    h.answer_connect(0);
    h.settle();
    let hello = std::mem::take(&mut h.peers[1].got);
    let mut srv = rustls::ServerConnection::new(server).unwrap();
    srv.read_tls(&mut &hello[..]).unwrap();
    srv.process_new_packets().unwrap();
    assert_eq!(srv.server_name(), None, "no SNI for an address");
    let mut wire = Vec::new();
    srv.write_tls(&mut wire).unwrap();
    h.write(Who::Conman, &wire);
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1014, "stage=conman_tls;reason=wrong_name".into())]
    );
    h.finish();
}
