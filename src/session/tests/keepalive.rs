//! Liveness: the proxy's Pings to silent sides, their Pongs swallowed,
//! peers' own Pings and Pongs untouched, dead sides and idle sessions.

use super::*;
use crate::session::live::ping_payload;

fn cfg(interval_s: f64, timeout_s: f64) -> Config {
    let mut cfg = Harness::cfg();
    cfg.keepalive.interval_s = interval_s;
    cfg.keepalive.timeout_s = timeout_s;
    cfg
}

impl Harness {
    /// Moves the clock by `d`, firing the session's deadline if it passed.
    fn wait(&mut self, d: Duration) {
        self.now += d;
        if self.s.poll_timeout().is_some_and(|t| t <= self.now) {
            self.run(|s, env| s.handle_timeout(env));
        }
    }

    /// The proxy's Pings a peer received so far.
    fn pings(&self, who: Who) -> usize {
        strip_pings(&self.peers[at(who)].got).1
    }

    /// The peer answers every Ping of the proxy's it has not answered yet,
    /// as a WebSocket endpoint does, with a Pong carrying the same payload.
    fn answer_pings(&mut self, who: Who, answered: &mut usize) {
        let n = self.pings(who);
        for _ in *answered..n {
            let pong = frame(OpCode::Pong, &ping_payload(1), who == Who::Client);
            self.write(who, &pong);
        }
        *answered = n;
    }
}

#[test]
fn a_silent_side_gets_a_ping_masked_toward_conman_only() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    let t0 = h.now;
    assert_eq!(h.s.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    h.wait(Duration::from_secs(29));
    h.settle();
    assert_eq!((h.pings(Who::Client), h.pings(Who::Conman)), (0, 0));
    h.wait(Duration::from_secs(1));
    h.settle();
    // parse_frames asserts the mask bit by side.
    let to_client = parse_frames(&h.peers[0].got, false);
    let to_conman = parse_frames(&h.peers[1].got, true);
    assert_eq!(to_client, vec![(OpCode::Ping, ping_payload(1).to_vec())]);
    assert_eq!(to_conman, vec![(OpCode::Ping, ping_payload(1).to_vec())]);
    assert_eq!(h.stats.pings_to_client.load(Relaxed), 1);
    assert_eq!(h.stats.pings_to_conman.load(Relaxed), 1);
    // Unanswered, a Ping is not repeated; the next looks are an interval
    // after it (has its Pong come?), then the timeout.
    assert_eq!(h.s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    h.wait(Duration::from_secs(30));
    assert_eq!(h.s.poll_timeout(), Some(t0 + Duration::from_secs(75)));
    assert_eq!((h.pings(Who::Client), h.pings(Who::Conman)), (1, 1));
}

#[test]
fn a_chatty_side_is_never_pinged() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    for i in 0..10u8 {
        h.wait(Duration::from_secs(20));
        h.write(Who::Client, &frame(OpCode::Text, &[i], true));
        h.write(Who::Conman, &frame(OpCode::Text, &[i], false));
        h.settle();
    }
    assert_eq!((h.pings(Who::Client), h.pings(Who::Conman)), (0, 0));
    assert_eq!(h.s.kind(), Kind::Relay);
    h.finish();
}

#[test]
fn the_pong_to_the_proxys_ping_is_swallowed_and_keeps_the_side_alive() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    // One Ping per interval of silence, counted from the Pong.
    h.wait(Duration::from_secs(30));
    h.settle();
    let mut answered = [0, 0];
    h.wait(Duration::from_secs(5));
    h.answer_pings(Who::Client, &mut answered[0]);
    h.settle();
    h.wait(Duration::from_secs(25));
    h.settle();
    assert_eq!(h.pings(Who::Client), 1, "the Pong at 35 s counts as speech");
    h.wait(Duration::from_secs(5));
    h.settle();
    assert_eq!(h.pings(Who::Client), 2, "pinged again at 65 s");
    h.answer_pings(Who::Client, &mut answered[0]);
    h.answer_pings(Who::Conman, &mut answered[1]);
    h.settle();
    for _ in 0..10 {
        h.wait(Duration::from_secs(31));
        h.settle();
        h.answer_pings(Who::Client, &mut answered[0]);
        h.answer_pings(Who::Conman, &mut answered[1]);
        h.settle();
    }
    assert_eq!(h.s.kind(), Kind::Relay, "ten minutes of Pongs keep it open");
    assert!(answered[0] >= 5 && answered[1] >= 5, "{answered:?}");
    // Neither side ever saw the other's Pong.
    let pongs = |who: Who| {
        parse_frames(&h.peers[at(who)].got, who == Who::Conman)
            .iter()
            .filter(|f| f.0 == OpCode::Pong)
            .count()
    };
    assert_eq!((pongs(Who::Client), pongs(Who::Conman)), (0, 0));
    assert_eq!(
        h.stats.pongs.load(Relaxed),
        (answered[0] + answered[1]) as u64
    );
    h.finish();
}

#[test]
fn peers_own_pings_and_pongs_pass_untouched() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    let up = [
        frame(OpCode::Ping, b"client ping", true),
        frame(OpCode::Pong, b"unsolicited", true),
        // Looks like the proxy's, but is a Ping, not a Pong.
        frame(OpCode::Ping, &ping_payload(1), true),
    ]
    .concat();
    let down = [
        frame(OpCode::Pong, b"client ping", false),
        frame(OpCode::Ping, b"conman ping", false),
        // Another session's Pong.
        frame(OpCode::Pong, &ping_payload(2), false),
    ]
    .concat();
    h.write(Who::Client, &up);
    h.write(Who::Conman, &down);
    h.settle();
    assert_eq!(h.peers[1].got, up);
    assert_eq!(h.peers[0].got, down);
    assert_eq!(h.stats.pongs.load(Relaxed), 0);
    h.finish();
}

#[test]
fn a_silent_client_is_dead_at_the_timeout_and_conman_gets_1001() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    let active = h.stats.active.load(Relaxed);
    let t0 = h.now;
    // Conman keeps talking; the client never answers.
    for _ in 0..7 {
        h.wait(Duration::from_secs(10));
        h.write(Who::Conman, &frame(OpCode::Text, b"tick", false));
        h.settle();
        assert_eq!(h.s.kind(), Kind::Relay);
    }
    h.wait(t0 + Duration::from_secs(75) - h.now);
    h.settle();
    assert_eq!(
        h.closes(Who::Conman),
        vec![(1001, "stage=relay;reason=client_timeout".into())]
    );
    assert!(h.peers[0].proxy_reset, "the dead client's socket is reset");
    assert_eq!(h.s.end, crate::session::access::End::ClientTimeout);
    assert_eq!(h.s.proxy_close, [0, 1001]);
    assert_eq!(h.stats.client_timeouts.load(Relaxed), 1);
    h.finish();
    assert_eq!(h.stats.active.load(Relaxed), active - 1);
}

#[test]
fn a_silent_conman_is_dead_at_the_timeout_and_the_client_gets_1014() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    for _ in 0..8 {
        h.wait(Duration::from_secs(10));
        h.write(Who::Client, &frame(OpCode::Text, b"tick", true));
        h.settle();
    }
    h.wait(Duration::from_secs(5));
    h.settle();
    let closes = h.closes(Who::Client);
    assert_eq!(
        closes,
        vec![(1014, "stage=relay;reason=conman_timeout".into())]
    );
    assert!(h.peers[1].proxy_reset);
    assert_eq!(h.stats.conman_timeouts.load(Relaxed), 1);
    h.finish();
}

#[test]
fn a_slow_reader_and_the_side_held_back_for_it_are_not_dead() {
    let mut cfg = cfg(30.0, 75.0);
    cfg.limits.send_queue_bytes = 1024;
    let mut h = Harness::established(cfg);
    // Conman has a lot to say; the client reads none of it for minutes, so
    // a send to it stays in flight and the proxy stops reading Conman.
    let frames: Vec<u8> = (0..200u8)
        .flat_map(|i| frame(OpCode::Binary, &[i; 50], false))
        .collect();
    h.write(Who::Conman, &frames);
    for _ in 0..100 {
        h.deliver(Who::Conman, BUF);
    }
    assert!(
        h.peers[0].send.is_some(),
        "a send to the client is in flight"
    );
    for _ in 0..30 {
        h.wait(Duration::from_secs(10));
        h.deliver(Who::Conman, BUF);
    }
    assert_eq!(h.s.kind(), Kind::Relay, "300 s of a slow reader");
    // Once it reads, everything arrives, the proxy's Pings between frames.
    h.settle();
    let (got, _) = strip_pings(&h.peers[0].got);
    assert_eq!(got, frames);
    h.finish();
}

#[test]
fn a_ping_waits_for_the_end_of_a_frame_under_way() {
    let mut cfg = cfg(1.0, 0.0);
    cfg.relay.hold_max = 16;
    let mut h = Harness::established(cfg);
    let long = frame(OpCode::Binary, &[7; 500], false);
    // The first half of a long frame streams to the client ...
    h.write(Who::Conman, &long[..250]);
    h.settle();
    h.wait(Duration::from_millis(1500));
    h.settle();
    // ... so the client's Ping has to wait; Conman's goes at once.
    assert_eq!((h.pings(Who::Client), h.pings(Who::Conman)), (0, 1));
    let mut rest = long[250..].to_vec();
    rest.extend(frame(OpCode::Binary, &[8; 300], false));
    h.write(Who::Conman, &rest);
    h.settle();
    let mut expected = long.clone();
    expected.extend(frame(OpCode::Ping, &ping_payload(1), false));
    expected.extend(frame(OpCode::Binary, &[8; 300], false));
    assert_eq!(h.peers[0].got, expected, "the Ping between the two frames");
    h.finish();
}

#[test]
fn with_no_data_either_way_the_session_ends_idle() {
    let mut cfg = cfg(30.0, 75.0);
    cfg.limits.idle_timeout_s = 300.0;
    let mut h = Harness::established(cfg);
    let mut answered = [0, 0];
    // Pongs keep both sides alive, but carry no data.
    for _ in 0..12 {
        h.wait(Duration::from_secs(31));
        h.settle();
        h.answer_pings(Who::Client, &mut answered[0]);
        h.answer_pings(Who::Conman, &mut answered[1]);
        h.settle();
        if h.s.kind() != Kind::Relay {
            break;
        }
    }
    assert_eq!(
        h.closes(Who::Client),
        vec![(1001, "stage=relay;reason=idle_timeout".into())]
    );
    assert_eq!(h.stats.idle_timeouts.load(Relaxed), 1);
    h.finish();
}

#[test]
fn a_one_way_close_stops_the_pings_and_its_timer_rules() {
    let mut h = Harness::established(cfg(1.0, 2.0));
    let mut c = Vec::new();
    write_close(&mut c, 1000, "", Some([1, 1, 1, 1]));
    h.write(Who::Client, &c);
    h.settle();
    // The close timer (10 s) decides, not liveness (2 s).
    h.wait(Duration::from_secs(5));
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    assert_eq!((h.pings(Who::Client), h.pings(Who::Conman)), (0, 0));
    h.wait(Duration::from_secs(6));
    assert_eq!(h.s.kind(), Kind::Closing);
    h.finish();
}

/// What a scripted peer does next.
#[derive(Clone, Debug)]
enum Step {
    /// The next frame of its script goes into its socket.
    Write(bool),
    /// It answers the proxy's Pings it has received.
    Answer(bool),
    Deliver(bool, usize),
    Send(bool, usize),
    Poll(bool),
    /// Time passes (ms).
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => any::<bool>().prop_map(Step::Write),
        2 => any::<bool>().prop_map(Step::Answer),
        6 => (any::<bool>(), 1..200usize).prop_map(|(c, n)| Step::Deliver(c, n)),
        6 => (any::<bool>(), 1..200usize).prop_map(|(c, n)| Step::Send(c, n)),
        1 => any::<bool>().prop_map(Step::Poll),
        3 => (0..1500u64).prop_map(Step::Wait),
    ]
}

/// A peer's script: data frames of any length (some fragmented), and its
/// own Pings and Pongs.
fn script(sizes: &[(usize, u8)], masked: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, &(n, kind)) in sizes.iter().enumerate() {
        let payload = vec![i as u8; n];
        let f = |fin: bool, op: OpCode, p: &[u8]| {
            let mask = masked.then_some([9, 8, 7, i as u8]);
            let h = FrameHeader {
                fin,
                rsv: 0,
                opcode: op,
                mask,
                payload_len: p.len() as u64,
            };
            let mut head = [0u8; crate::proto::frame::MAX_HEADER_LEN];
            let k = h.encode(&mut head);
            let mut v = head[..k].to_vec();
            let mut p = p.to_vec();
            if let Some(m) = mask {
                crate::proto::frame::apply_mask(&mut p, m, 0);
            }
            v.extend(p);
            v
        };
        match kind % 4 {
            0 => out.push(f(true, OpCode::Binary, &payload)),
            1 => {
                // A fragmented message with a Ping of the peer's inside.
                let half = n / 2;
                out.push(f(false, OpCode::Text, &payload[..half]));
                out.push(f(true, OpCode::Ping, b"peer's own"));
                out.push(f(true, OpCode::Continuation, &payload[half..]));
            }
            2 => out.push(f(true, OpCode::Pong, &payload[..n.min(125)])),
            _ => out.push(f(true, OpCode::Ping, &payload[..n.min(125)])),
        }
    }
    out
}

proptest! {
    /// Both peers stream frames of every kind, cut into arbitrary receives
    /// and sends, while time passes and the proxy pings them, and they
    /// answer. Whatever the interleaving: each side receives exactly the
    /// other's stream with the proxy's Pings added, each between two frames
    /// (stripping them must give the stream back byte for byte), and never
    /// a Pong that answers the proxy's own Ping.
    #[test]
    fn pings_never_split_a_frame_and_their_pongs_never_pass(
        up_sizes in proptest::collection::vec((0..3000usize, any::<u8>()), 1..8),
        down_sizes in proptest::collection::vec((0..3000usize, any::<u8>()), 1..8),
        hold_max in 0..2000u64,
        splice in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..400),
    ) {
        pings_and_pongs(&up_sizes, &down_sizes, hold_max, splice, steps)?;
    }
}

fn pings_and_pongs(
    up_sizes: &[(usize, u8)],
    down_sizes: &[(usize, u8)],
    hold_max: u64,
    splice: bool,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let mut cfg = cfg(1.0, 0.0);
    cfg.relay.hold_max = hold_max;
    cfg.buffers.splice_min = if splice { 512 } else { 0 };
    cfg.limits.send_queue_bytes = 4096;
    let mut h = Harness::established(cfg);
    let mut scripts = [script(up_sizes, true), script(down_sizes, false)];
    let expected: Vec<Vec<u8>> = scripts.iter().map(|s| s.concat()).collect();
    for s in &mut scripts {
        s.reverse();
    }
    let mut answered = [0usize, 0];
    let answer = |h: &mut Harness, who: Who, answered: &mut [usize; 2]| {
        h.answer_pings(who, &mut answered[at(who)]);
    };
    for st in steps {
        match st {
            Step::Write(c) => {
                if let Some(f) = scripts[at(who_of(c))].pop() {
                    h.write(who_of(c), &f);
                }
            }
            Step::Answer(c) => answer(&mut h, who_of(c), &mut answered),
            Step::Deliver(c, n) => {
                h.deliver(who_of(c), n);
            }
            Step::Send(c, n) => {
                h.complete_send(who_of(c), n);
            }
            Step::Poll(c) => {
                h.complete_poll(who_of(c));
            }
            Step::Wait(ms) => h.wait(Duration::from_millis(ms)),
        }
    }
    // The rest of both scripts, and the last answers.
    for who in [Who::Client, Who::Conman] {
        while let Some(f) = scripts[at(who)].pop() {
            h.write(who, &f);
        }
    }
    h.settle();
    for who in [Who::Client, Who::Conman] {
        answer(&mut h, who, &mut answered);
    }
    h.settle();
    prop_assert_eq!(h.s.kind(), Kind::Relay);
    for (to, from) in [(Who::Conman, Who::Client), (Who::Client, Who::Conman)] {
        let (got, _) = strip_pings(&h.peers[at(to)].got);
        prop_assert!(got == expected[at(from)], "stream to {:?} differs", to);
    }
    prop_assert_eq!(
        h.stats.pongs.load(Relaxed),
        (answered[0] + answered[1]) as u64
    );
    h.finish();
    Ok(())
}

fn who_of(client: bool) -> Who {
    if client {
        Who::Client
    } else {
        Who::Conman
    }
}

/// The ops the session asked for whose debug form starts with `prefix`.
fn ops_named(h: &Harness, prefix: &str) -> Vec<String> {
    h.ops
        .iter()
        .filter(|o| o.starts_with(prefix))
        .cloned()
        .collect()
}

#[test]
fn conman_tcp_keepalive_waits_for_the_first_liveness_look() {
    let mut h = Harness::established(cfg(30.0, 75.0));
    let connects = ops_named(&h, "Connect");
    assert_eq!(connects.len(), 1);
    assert!(connects[0].contains("keepalive: false"), "{connects:?}");
    assert!(ops_named(&h, "TcpKeepalive").is_empty());
    h.wait(Duration::from_secs(30));
    h.settle();
    let set = ops_named(&h, "TcpKeepalive");
    assert_eq!(
        set,
        vec![format!("TcpKeepalive {{ fd: {} }}", h.peers[1].fd.unwrap())]
    );
    // Once only.
    h.wait(Duration::from_secs(30));
    h.settle();
    assert_eq!(ops_named(&h, "TcpKeepalive").len(), 1);
}

#[test]
fn conman_tcp_keepalive_is_set_at_connect_when_it_cannot_wait() {
    // No liveness looks at all; a look later than the keepalive idle time;
    // one later than the user timeout.
    let mut late_idle = cfg(30.0, 75.0);
    late_idle.keepalive.tcp_keepidle_s = 20;
    let mut late_user = cfg(30.0, 75.0);
    late_user.keepalive.tcp_user_timeout_ms = 30_000;
    for c in [cfg(0.0, 0.0), late_idle, late_user] {
        assert!(!defer_tcp_keepalive(&c));
        let mut h = Harness::established(c);
        let connects = ops_named(&h, "Connect");
        assert!(connects[0].contains("keepalive: true"), "{connects:?}");
        h.wait(Duration::from_secs(31));
        h.settle();
        assert!(ops_named(&h, "TcpKeepalive").is_empty());
    }
    // Nothing to set: nothing deferred either.
    let mut off = cfg(30.0, 75.0);
    off.keepalive.tcp_keepalive = false;
    off.keepalive.tcp_user_timeout_ms = 0;
    assert!(!defer_tcp_keepalive(&off));
}

#[test]
fn conman_tcp_keepalive_goes_at_the_upgrade_when_a_reload_ends_the_looks() {
    let mut h = Harness::placing(cfg(30.0, 75.0));
    h.answer_placement(found("vm-1"));
    assert!(ops_named(&h, "Connect")[0].contains("keepalive: false"));
    // A reload while connecting: no liveness looks any more.
    h.cfg.keepalive.interval_s = 0.0;
    h.connect_and_upgrade();
    let fd = h.peers[1].fd.unwrap();
    assert_eq!(
        ops_named(&h, "TcpKeepalive"),
        vec![format!("TcpKeepalive {{ fd: {fd} }}")]
    );
}
