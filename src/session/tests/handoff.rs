//! A session moved to another process mid-stream (`handoff.rs`): stopped,
//! exported at a movable point, let go of, and adopted from its record on
//! the same sockets, it relays the rest of both streams as if it had never
//! moved.

use super::*;
use crate::session::handoff::{Export, Moving, Record};

/// Both streams: frames of every kind, some longer than a receive, and a
/// fragmented message.
fn streams() -> (Vec<u8>, Vec<u8>) {
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (i, len) in [5usize, 200, 0, 70, 1000, 3].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
        let op = if i % 2 == 0 {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        up.extend(frame(op, &payload, true));
        down.extend(frame(op, &payload, false));
        if i == 2 {
            up.extend(frame(OpCode::Ping, b"peer ping", true));
            down.extend(frame(OpCode::Pong, b"peer pong", false));
        }
    }
    (up, down)
}

/// Stops the session, lets the kernel finish what is in flight, exports,
/// lets go of the old copy and adopts the record on the same sockets.
fn move_session(h: &mut Harness) -> Record {
    let mut started = false;
    h.run(|s, env| started = s.handle_move_start(env));
    assert!(started, "a relaying session can move");
    // Sends complete and the cancelled receives end; no byte is read.
    for _ in 0..100 {
        let mut any = false;
        for who in [Who::Client, Who::Conman] {
            any |= h.complete_send(who, usize::MAX);
            any |= h.deliver(who, BUF);
        }
        if !any {
            break;
        }
    }
    let mut rec = None;
    h.run(|s, env| match s.poll_export(env) {
        Export::Ready(r) => rec = Some(r),
        other => panic!("not movable: {other:?}"),
    });
    assert_eq!(h.s.moving(), Moving::Exported);
    assert_eq!(h.s.poll_timeout(), None, "a parked session has no timer");
    let bytes = rec.unwrap().encode();
    h.run(|s, env| s.handle_moved(env));
    assert!(h.s.is_finished());
    assert!(h.peers.iter().all(|p| p.fd.is_none()), "our copies closed");
    assert!(h.bufs.is_empty(), "buffers given back: {:?}", h.bufs.keys());
    assert_eq!(h.stats.active.load(Relaxed), 0);
    let rec = Record::decode(&bytes).unwrap();
    let fds = [h.peers[0].closed.pop(), h.peers[1].closed.pop()].map(Option::unwrap);
    for (p, fd) in h.peers.iter_mut().zip(fds) {
        p.fd = Some(fd);
        assert!(p.recv.is_none() && p.send.is_none());
    }
    let mut out = VecDeque::new();
    // (The harness's `env!` is defined after this module is declared.)
    let adopted = Session::adopt(
        rec.clone(),
        fds[0],
        fds[1],
        &mut Env {
            now: h.now,
            ring: &h.bufs,
            ring_low: h.ring_low,
            more_input: false,
            input_ends: false,
            cfg: &h.cfg,
            shard: 0,
            stats: &h.stats,
            gate: &mut h.gate,
            rng: &mut h.rng,
            vms: &mut h.vms,
            out: &mut out,
        },
    );
    h.s = adopted;
    assert!(out.is_empty(), "no op before the shard gives it a slot");
    h.run(|s, env| s.handle_adopted(env));
    while let Some(op) = out.pop_front() {
        h.perform(op, &mut out);
    }
    assert_eq!(h.stats.active.load(Relaxed), 1);
    assert!(
        h.peers.iter().all(|p| p.recv.is_some()),
        "both sides read again"
    );
    rec
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Wherever the streams stand when the move comes (inside a header, a
    /// held frame, a streamed one, a control frame), every byte arrives
    /// once, in order.
    #[test]
    fn a_moved_session_relays_the_rest_of_both_streams(
        cut_up in any::<usize>(),
        cut_down in any::<usize>(),
        hold_max in prop_oneof![Just(0u64), Just(100), Just(64 * 1024)],
    ) {
        let mut cfg = Harness::cfg();
        cfg.relay.hold_max = hold_max;
        let mut h = Harness::established(cfg);
        let (up, down) = streams();
        let (cu, cd) = (cut_up % (up.len() + 1), cut_down % (down.len() + 1));
        h.write(Who::Client, &up[..cu]);
        h.write(Who::Conman, &down[..cd]);
        h.settle();
        let before = h.s.bytes;
        let rec = move_session(&mut h);
        prop_assert_eq!(rec.bytes, before);
        h.write(Who::Client, &up[cu..]);
        h.write(Who::Conman, &down[cd..]);
        h.settle();
        prop_assert_eq!(&h.peers[1].got, &up);
        prop_assert_eq!(&h.peers[0].got, &down);
        prop_assert_eq!(h.s.bytes, [up.len() as u64, down.len() as u64]);
        // And it ends like any session.
        h.finish();
    }
}

#[test]
fn a_session_whose_peer_does_not_read_is_not_movable_until_it_does() {
    let mut h = Harness::established(Harness::cfg());
    h.write(Who::Client, &frame(OpCode::Binary, &[1; 100], true));
    // Conman takes nothing: the send stays in flight.
    h.deliver(Who::Client, BUF);
    h.deliver(Who::Client, BUF);
    let mut started = false;
    h.run(|s, env| started = s.handle_move_start(env));
    assert!(started);
    h.deliver(Who::Client, BUF);
    let mut verdict = None;
    h.run(|s, env| verdict = Some(format!("{:?}", s.poll_export(env))));
    assert_eq!(verdict.as_deref(), Some("NotYet"));
    // Too late: the move is off and the session reads again.
    h.run(|s, env| s.handle_move_cancelled(env));
    assert_eq!(h.s.moving(), Moving::No);
    h.settle();
    assert!(h.peers[0].recv.is_some(), "the client is read again");
    h.write(Who::Client, &frame(OpCode::Text, b"after", true));
    h.settle();
    let mut want = frame(OpCode::Binary, &[1; 100], true);
    want.extend(frame(OpCode::Text, b"after", true));
    assert_eq!(h.peers[1].got, want);
}

#[test]
fn a_session_the_proxy_began_to_close_never_moves() {
    let mut h = Harness::established(Harness::cfg());
    h.run(|s, env| s.handle_drain_close(env, 0));
    let mut started = true;
    h.run(|s, env| started = s.handle_move_start(env));
    assert!(!started);
    h.finish();
}

#[test]
fn a_moved_session_gets_its_conman_tcp_keepalive_in_the_new_process() {
    // Deferring: at the first liveness look there.
    let mut h = Harness::established(Harness::cfg());
    move_session(&mut h);
    let conman = h.peers[1].fd.unwrap();
    assert!(!h.ops.iter().any(|o| o.starts_with("TcpKeepalive")));
    h.now += Duration::from_secs(30);
    h.run(|s, env| s.handle_timeout(env));
    assert_eq!(
        h.last_op("TcpKeepalive"),
        format!("TcpKeepalive {{ fd: {conman} }}")
    );
    // Not deferring (no liveness looks): at once, whatever the old
    // process did.
    let mut h = Harness::established(Harness::cfg());
    h.cfg.keepalive.interval_s = 0.0;
    move_session(&mut h);
    let conman = h.peers[1].fd.unwrap();
    assert_eq!(
        h.last_op("TcpKeepalive"),
        format!("TcpKeepalive {{ fd: {conman} }}")
    );
}
