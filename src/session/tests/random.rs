//! Random event orders, stream cuts and setups; transition coverage.

use super::*;

thread_local! {
    /// Transitions taken on this test's thread.
    static TRAIL: std::cell::RefCell<std::collections::HashSet<(Kind, Kind)>> = Default::default();
}

pub(in crate::session) fn trail(from: Kind, to: Kind) {
    TRAIL.with(|t| t.borrow_mut().insert((from, to)));
}

fn random_setup_event(rng: &mut SmallRng) -> SetupEvent {
    let side = rng.gen::<bool>();
    match rng.gen_range(0..24) {
        0..=5 => SetupEvent::Io(Event::Deliver(side, rng.gen_range(1..200))),
        6..=11 => SetupEvent::Io(Event::Send(side, rng.gen_range(1..200))),
        12 => SetupEvent::Io(Event::End(side, rng.gen())),
        13 => SetupEvent::Io(Event::Timer),
        14 | 15 => SetupEvent::Token(rng.gen_bool(0.8)),
        16 | 17 => SetupEvent::Placement(rng.gen_bool(0.8)),
        18 | 19 => SetupEvent::Connect(rng.gen_bool(0.6)),
        20 | 21 => SetupEvent::Conman101,
        _ => SetupEvent::ClientBytes(rng.gen_range(1..300)),
    }
}

/// Random sessions from a fixed seed take every transition of the table
/// (and, by the debug assertion in `transition`, no other).
#[test]
fn every_allowed_transition_is_taken() {
    let mut rng = SmallRng::seed_from_u64(42);
    for i in 0..3000 {
        let mut h = match i % 4 {
            0 => Harness::proxied(Harness::cfg(), Some(PEER)),
            _ => Harness::new(Harness::cfg()),
        };
        let mut sent = 0;
        for _ in 0..rng.gen_range(1..120) {
            let e = random_setup_event(&mut rng);
            apply(&mut h, e, &mut sent);
        }
        h.wind_down();
        assert!(h.all_closed());
    }
    let taken = TRAIL.with(|t| t.borrow().clone());
    let missing: Vec<_> = ALLOWED.iter().filter(|t| !taken.contains(t)).collect();
    assert!(missing.is_empty(), "never taken: {missing:?}");
    assert!(taken.iter().all(|t| ALLOWED.contains(t)));
}

#[test]
fn backoff_grows_then_caps_and_stays_within_jitter() {
    assert_eq!(
        backoff(1, 50, 1000, 0.999_999),
        Duration::from_micros(49_999)
    );
    assert_eq!(backoff(3, 50, 1000, 0.5), Duration::from_millis(100));
    assert_eq!(backoff(10, 50, 1000, 0.5), Duration::from_millis(500));
    assert_eq!(backoff(200, 50, 1000, 1.0), Duration::from_millis(1000));
    assert_eq!(backoff(2, 50, 1000, 0.0), Duration::ZERO);
}

// ---- random event orders ---------------------------------------------------

/// One thing the world may do next.
#[derive(Clone, Debug)]
enum Event {
    /// The kernel completes a receive on a side with up to n bytes.
    Deliver(bool, usize),
    /// The kernel completes a send to a side with up to n bytes.
    Send(bool, usize),
    Poll(bool),
    /// A peer ends: FIN, or reset.
    End(bool, bool),
    /// Time passes to the next deadline.
    Timer,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => (any::<bool>(), 1..200usize).prop_map(|(c, n)| Event::Deliver(c, n)),
        8 => (any::<bool>(), 1..200usize).prop_map(|(c, n)| Event::Send(c, n)),
        2 => any::<bool>().prop_map(Event::Poll),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(c, r)| Event::End(c, r)),
        1 => Just(Event::Timer),
    ]
}

fn who(client: bool) -> Who {
    if client {
        Who::Client
    } else {
        Who::Conman
    }
}

proptest! {

    /// Whatever the order of completions and however the streams are cut:
    /// bytes arrive byte-exact and in order (a prefix, when a side ends
    /// early), a side that ends gets exactly the Close the design's table
    /// names (or none, mid-frame), no op targets a closed socket, no buffer
    /// is lost or recycled twice, and nothing panics.
    #[test]
    fn random_orders_keep_streams_exact(
        sizes in proptest::collection::vec(1..3000usize, 1..6),
        splice in any::<bool>(),
        events in proptest::collection::vec(event(), 1..400),
    ) {
        let mut cfg = Harness::cfg();
        cfg.buffers.splice_min = if splice { 512 } else { 0 };
        cfg.limits.send_queue_bytes = 1024;
        // Timer events bring the proxy's Pings (the peers here never
        // answer them, so no side may be declared dead for it).
        cfg.keepalive.timeout_s = 0.0;
        let mut h = Harness::established(cfg);
        let up: Vec<u8> = sizes.iter().enumerate()
            .flat_map(|(i, n)| frame(OpCode::Binary, &vec![i as u8; *n], true)).collect();
        let down: Vec<u8> = sizes.iter().rev().enumerate()
            .flat_map(|(i, n)| frame(OpCode::Binary, &vec![0x80 | i as u8; *n], false)).collect();
        h.write(Who::Client, &up);
        h.write(Who::Conman, &down);
        let mut ended: Option<(Who, bool)> = None;
        for e in events {
            match e {
                Event::Deliver(c, n) => { h.deliver(who(c), n); }
                Event::Send(c, n) => { h.complete_send(who(c), n); }
                Event::Poll(c) => { h.complete_poll(who(c)); }
                Event::End(c, reset) => {
                    if ended.is_none() {
                        let p = &mut h.peers[at(who(c))];
                        if reset { p.reset = true } else { p.fin = true }
                        ended = Some((who(c), reset));
                    }
                }
                Event::Timer => {
                    if h.s.poll_timeout().is_some() {
                        h.advance_to_deadline();
                    }
                }
            }
        }
        h.settle();
        // Whatever arrived is a prefix of what was sent, ending at a frame
        // boundary if the proxy then added its own Close.
        for (to, sent) in [(Who::Conman, &up), (Who::Client, &down)] {
            // Pings injected anywhere but between frames garble the rest.
            let (got, _) = strip_pings(&h.peers[at(to)].got);
            let got = &got;
            let k = got.iter().zip(sent.iter()).take_while(|(a, b)| a == b).count();
            if ended.is_none() {
                prop_assert_eq!(got.len(), sent.len(), "bytes to {:?} lost or changed", to);
                prop_assert_eq!(k, sent.len());
                continue;
            }
            let extra = &got[k..];
            if extra.is_empty() {
                continue;
            }
            let frames = parse_frames(extra, to == Who::Conman);
            // A peer that stopped reading is forced down after the linger
            // time, which may cut the proxy's Close short.
            // So is a connection reset (by the proxy mid-frame, or by the
            // peer), which may cut a Ping of the proxy's short.
            let forced = h.ops.iter().any(|o| o.contains("both: true"))
                || h.peers[at(to)].reset;
            if frames.is_empty() && forced {
                // A Close, or a Ping of the proxy's before it.
                prop_assert!([0x88, 0x89].contains(&extra[0]), "not a Close after {}", k);
                continue;
            }
            prop_assert_eq!(frames.len(), 1, "bytes to {:?} differ after {}: {:?}", to, k, extra);
            prop_assert_eq!(frames[0].0, OpCode::Close);
            let (from, _) = ended.unwrap();
            prop_assert_eq!(to, from.other(), "a Close to the side that left");
            let code = u16::from_be_bytes([frames[0].1[0], frames[0].1[1]]);
            prop_assert_eq!(code, if from == Who::Client { 1001 } else { 1014 });
            prop_assert!(
                parse_frames(&sent[..k], to == Who::Conman).iter().map(|f| f.1.len()).sum::<usize>()
                    <= k,
                "Close injected mid-frame"
            );
        }
        h.finish();
    }
}

/// One thing the world may do during setup.
#[derive(Clone, Debug)]
enum SetupEvent {
    Io(Event),
    Token(bool),
    Placement(bool),
    Connect(bool),
    Conman101,
    ClientBytes(usize),
}

fn setup_event() -> impl Strategy<Value = SetupEvent> {
    prop_oneof![
        6 => event().prop_map(SetupEvent::Io),
        1 => any::<bool>().prop_map(SetupEvent::Token),
        1 => any::<bool>().prop_map(SetupEvent::Placement),
        1 => any::<bool>().prop_map(SetupEvent::Connect),
        1 => Just(SetupEvent::Conman101),
        1 => (1..300usize).prop_map(SetupEvent::ClientBytes),
    ]
}

impl Harness {
    /// Answers whatever is pending with a failure, lets peers FIN and time
    /// pass until the session has ended.
    fn wind_down(&mut self) {
        for _ in 0..50 {
            self.settle();
            if self.verify {
                self.answer_token(Err("expired"));
            }
            if self.placement.is_some() {
                self.answer_placement(PlacementResult::Failed {
                    reason: PlacementFailure::Unavailable,
                    retry_after_ms: None,
                });
            }
            if self.connect.is_some() {
                self.answer_connect(-libc::ECONNREFUSED);
            }
            self.peers[0].fin = true;
            if self.peers[1].fd.is_some() {
                self.peers[1].fin = true;
            }
            self.settle();
            if self.s.is_finished() {
                return;
            }
            if self.s.poll_timeout().is_some() {
                self.advance_to_deadline();
            }
        }
    }
}

/// Plays one setup event on the harness; `sent` counts the request bytes
/// the client has written so far.
fn apply(h: &mut Harness, e: SetupEvent, sent: &mut usize) {
    let req = [h.preamble.as_slice(), &request()].concat();
    let sent_head = sent;
    match e {
        SetupEvent::Io(Event::Deliver(c, n)) => {
            h.deliver(who(c), n);
        }
        SetupEvent::Io(Event::Send(c, n)) => {
            h.complete_send(who(c), n);
        }
        SetupEvent::Io(Event::Poll(c)) => {
            h.complete_poll(who(c));
        }
        SetupEvent::Io(Event::End(c, reset)) => {
            let p = &mut h.peers[at(who(c))];
            if p.fd.is_some() {
                if reset {
                    p.reset = true
                } else {
                    p.fin = true
                }
            }
        }
        SetupEvent::Io(Event::Timer) if h.s.poll_timeout().is_some() => {
            h.advance_to_deadline();
        }
        SetupEvent::Token(ok) if h.verify => {
            h.answer_token(if ok { Ok(ident()) } else { Err("expired") });
        }
        SetupEvent::Placement(ok) if h.placement.is_some() => {
            h.answer_placement(if ok {
                found("vm-1")
            } else {
                PlacementResult::Failed {
                    reason: PlacementFailure::Timeout,
                    retry_after_ms: None,
                }
            });
        }
        SetupEvent::Connect(ok) if h.connect.is_some() => {
            h.answer_connect(if ok { 0 } else { -libc::ECONNREFUSED });
        }
        SetupEvent::Conman101 if h.s.kind() == Kind::ConmanHandshake && h.peers[1].fd.is_some() => {
            let whole = h.peers[1].got.windows(4).any(|w| w == b"\r\n\r\n");
            if whole && h.peers[1].unread.is_empty() {
                h.conman_101();
            }
        }
        SetupEvent::ClientBytes(n) => {
            if *sent_head < req.len() {
                let end = (*sent_head + n).min(req.len());
                let part = req[*sent_head..end].to_vec();
                h.write(Who::Client, &part);
                *sent_head = end;
            } else {
                h.write(Who::Client, &frame(OpCode::Binary, &vec![1; n], true));
            }
        }
        _ => {}
    }
}

proptest! {
    /// Any interleaving of peers, answers, resets and timers during setup
    /// and relay ends with both sockets closed, every buffer back, the
    /// active gauge at zero, no op on a closed socket and no panic.
    #[test]
    fn random_setups_end_cleanly(
        events in proptest::collection::vec(setup_event(), 1..150),
        proxied in any::<bool>(),
    ) {
        let mut h = if proxied {
            Harness::proxied(Harness::cfg(), Some(PEER))
        } else {
            Harness::new(Harness::cfg())
        };
        let mut sent = 0;
        for e in events {
            apply(&mut h, e, &mut sent);
        }
        h.wind_down();
        prop_assert!(h.all_closed(), "not finished in {:?}", h.s.kind());
        prop_assert!(h.bufs.is_empty(), "buffers held: {:?}", h.bufs.keys().collect::<Vec<_>>());
        prop_assert_eq!(h.stats.active.load(Relaxed), 0);
        prop_assert_eq!(h.gate.sessions, 0, "the shard's admitted count");
        prop_assert!(h.connect.is_none() && h.peers.iter().all(|p| p.send.is_none() && p.recv.is_none()));
    }
}
