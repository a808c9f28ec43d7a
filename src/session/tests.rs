//! Deterministic tests of one session's life (quinn-proto's `Pair::drive`
//! idea): a simulated shard performs the session's ops on simulated
//! sockets, a scripted client and Conman write and read bytes, and the
//! clock only moves when a test moves it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::control::wire::{Found, PlacementFailure, PlacementResult};
use crate::keys::Ident;
use crate::metrics::ShardStats;
use crate::proto::frame::{write_close, FrameHeader, OpCode};
use crate::proto::handshake::accept_key;
use crate::token::Claims;

const CLIENT_FD: RawFd = 10;
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const BUF: usize = 64;

fn request() -> Vec<u8> {
    format!(
        "GET /wsv2/tok HTTP/1.1\r\nHost: eval\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

fn ident() -> Arc<Ident> {
    Arc::new(Ident::new(&Claims {
        repl: "repl-1".into(),
        user: "alice".into(),
        cluster: "dev".into(),
        exp: i64::MAX,
        nbf: 0,
        jti: String::new(),
    }))
}

fn found(vm: &str) -> PlacementResult {
    PlacementResult::Found(Found {
        vm: vm.into(),
        addr: "127.0.0.1:7000".parse::<SocketAddr>().unwrap(),
        host: "127.0.0.1:7000".into(),
        path: "/".into(),
    })
}

/// A WebSocket frame; client frames are masked.
fn frame(op: OpCode, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = masked.then_some([1, 2, 3, 4]);
    let h = FrameHeader {
        fin: true,
        rsv: 0,
        opcode: op,
        mask,
        payload_len: payload.len() as u64,
    };
    let mut head = [0u8; crate::proto::frame::MAX_HEADER_LEN];
    let n = h.encode(&mut head);
    let mut out = head[..n].to_vec();
    let mut p = payload.to_vec();
    if let Some(m) = mask {
        crate::proto::frame::apply_mask(&mut p, m, 0);
    }
    out.extend_from_slice(&p);
    out
}

/// A peer as the simulated shard sees it: bytes it wrote and the proxy has
/// not read, bytes the proxy sent it, and the ops in flight on its socket.
#[derive(Default)]
struct Peer {
    fd: Option<RawFd>,
    unread: VecDeque<u8>,
    /// It sent FIN (after `unread`), or reset.
    fin: bool,
    reset: bool,
    got: Vec<u8>,
    recv: Option<bool>,
    cancel: bool,
    send: Option<Batch>,
    poll: Option<Who>,
    pipe: VecDeque<u8>,
    shut_wr: bool,
    closed: Vec<RawFd>,
}

struct Harness {
    cfg: Config,
    stats: ShardStats,
    rng: SmallRng,
    now: Instant,
    s: Session,
    peers: [Peer; 2],
    bufs: HashMap<u16, Vec<u8>>,
    next_bid: u16,
    verify: bool,
    placement: Option<u16>,
    connect: Option<bool>,
    next_fd: RawFd,
    ops: Vec<String>,
}

fn at(who: Who) -> usize {
    match who {
        Who::Client => 0,
        Who::Conman => 1,
    }
}

impl Harness {
    fn new(cfg: Config) -> Harness {
        let now = Instant::now();
        let s = Session::new(1, CLIENT_FD, now, &cfg);
        let mut h = Harness {
            cfg,
            stats: ShardStats::default(),
            rng: SmallRng::seed_from_u64(7),
            now,
            s,
            peers: Default::default(),
            bufs: HashMap::new(),
            next_bid: 0,
            verify: false,
            placement: None,
            connect: None,
            next_fd: 100,
            ops: Vec::new(),
        };
        h.peers[0].fd = Some(CLIENT_FD);
        h.run(|s, env| s.start(env));
        h
    }

    fn cfg() -> Config {
        let mut cfg = Config::default();
        cfg.buffers.splice_min = 0;
        cfg
    }

    /// Feeds one input, then performs every op it produced.
    fn run(&mut self, input: impl FnOnce(&mut Session, &mut Env)) {
        let mut out = VecDeque::new();
        {
            let mut env = Env {
                now: self.now,
                cfg: &self.cfg,
                stats: &self.stats,
                rng: &mut self.rng,
                out: &mut out,
            };
            input(&mut self.s, &mut env);
        }
        while let Some(op) = out.pop_front() {
            self.perform(op, &mut out);
        }
    }

    fn peer_of(&mut self, fd: RawFd) -> &mut Peer {
        let i = self
            .peers
            .iter()
            .position(|p| p.fd == Some(fd))
            .unwrap_or_else(|| panic!("op on fd {fd}, which no live side has"));
        &mut self.peers[i]
    }

    fn perform(&mut self, op: Op, out: &mut VecDeque<Op>) {
        self.ops.push(format!("{op:?}"));
        let mut env = Env {
            now: self.now,
            cfg: &self.cfg,
            stats: &self.stats,
            rng: &mut self.rng,
            out,
        };
        match op {
            Op::Recv { who, fd, single } => {
                let p = &mut self.peers[at(who)];
                assert_eq!(p.fd, Some(fd));
                assert!(p.recv.is_none(), "two receives on one socket");
                p.recv = Some(single);
            }
            Op::CancelRecv { who } => self.peers[at(who)].cancel = true,
            Op::Send { who, fd, batch } => {
                let p = &mut self.peers[at(who)];
                assert_eq!(p.fd, Some(fd));
                assert!(p.send.is_none(), "two sends on one socket");
                assert!(!p.shut_wr, "send after shutdown");
                p.send = Some(batch);
            }
            Op::Verify => self.verify = true,
            Op::Placement { seq, .. } => self.placement = Some(seq),
            Op::Connect { .. } => {
                let fd = self.next_fd;
                self.next_fd += 1;
                self.peers[1] = Peer {
                    fd: Some(fd),
                    closed: std::mem::take(&mut self.peers[1].closed),
                    ..Peer::default()
                };
                self.s.handle_socket(&mut env, Ok(fd));
                self.connect = Some(false);
            }
            Op::CancelConnect => {
                if self.connect.is_some() {
                    self.connect = Some(true);
                }
            }
            Op::Shutdown { fd, both } => {
                let p = self.peer_of(fd);
                p.shut_wr = true;
                if both {
                    p.reset = true;
                }
            }
            Op::Close { fd } => {
                let p = self.peer_of(fd);
                assert!(
                    p.recv.is_none() && p.send.is_none() && p.poll.is_none(),
                    "close with an op in flight"
                );
                p.fd = None;
                p.closed.push(fd);
                if fd != CLIENT_FD {
                    assert!(self.connect.is_none(), "close with a connect in flight");
                }
            }
            Op::Recycle { bid } => {
                assert!(
                    self.bufs.remove(&bid).is_some(),
                    "buffer {bid} recycled twice"
                );
            }
            Op::NeedPipe { from } => {
                let pipe = Pipe {
                    r: 1000,
                    w: 1001,
                    cap: 4096,
                };
                self.s.handle_pipe(&mut env, from, Some(pipe));
            }
            Op::ReleasePipe { .. } | Op::SetNonblocking { .. } => {}
            Op::SpliceIn { from, len, .. } => {
                let p = &mut self.peers[at(from)];
                let res = if p.reset {
                    Err(libc::ECONNRESET)
                } else if p.unread.is_empty() {
                    if p.fin {
                        Ok(0)
                    } else {
                        Err(libc::EAGAIN)
                    }
                } else {
                    let n = len.min(p.unread.len());
                    let moved: Vec<u8> = p.unread.drain(..n).collect();
                    p.pipe.extend(moved);
                    Ok(n)
                };
                self.s.handle_spliced_in(&mut env, from, res);
            }
            Op::SpliceOut { from, len, .. } => {
                let n = len.min(self.peers[at(from)].pipe.len());
                let moved: Vec<u8> = self.peers[at(from)].pipe.drain(..n).collect();
                self.peers[at(from.other())].got.extend(moved);
                self.s.handle_spliced_out(&mut env, from, Ok(n));
            }
            Op::Poll { socket, from, .. } => self.peers[at(socket)].poll = Some(from),
        }
    }

    // ---- what the peers do ----------------------------------------------

    fn write(&mut self, who: Who, bytes: &[u8]) {
        self.peers[at(who)].unread.extend(bytes);
    }

    /// The kernel completes a receive on `who` with up to `max` bytes.
    /// False if nothing could happen.
    fn deliver(&mut self, who: Who, max: usize) -> bool {
        let p = &mut self.peers[at(who)];
        let Some(single) = p.recv else {
            return false;
        };
        if p.cancel {
            p.recv = None;
            p.cancel = false;
            self.run(|s, env| {
                s.handle_recv(env, who, -libc::ECANCELED, false, None);
            });
            return true;
        }
        if p.reset {
            p.recv = None;
            self.run(|s, env| {
                s.handle_recv(env, who, -libc::ECONNRESET, false, None);
            });
            return true;
        }
        if p.unread.is_empty() {
            if !p.fin {
                return false;
            }
            p.recv = None;
            self.run(|s, env| {
                s.handle_recv(env, who, 0, false, None);
            });
            return true;
        }
        let n = max.clamp(1, BUF).min(p.unread.len());
        let data: Vec<u8> = p.unread.drain(..n).collect();
        if single {
            p.recv = None;
        }
        let bid = self.next_bid;
        self.next_bid = self.next_bid.wrapping_add(1);
        self.bufs.insert(bid, data.clone());
        self.run(|s, env| {
            s.handle_recv(env, who, n as i32, !single, Some((bid, &data)));
        });
        true
    }

    /// The kernel completes the send to `who`, taking up to `max` bytes.
    fn complete_send(&mut self, who: Who, max: usize) -> bool {
        let p = &mut self.peers[at(who)];
        let Some(batch) = p.send.take() else {
            return false;
        };
        let res = if p.reset {
            -libc::EPIPE
        } else {
            let mut left = max.max(1);
            for c in batch.chunks() {
                let bytes: &[u8] = match c {
                    Chunk::Buf { bid, off, len } => {
                        let b = self.bufs.get(bid).expect("sent buffer still owned");
                        &b[*off as usize..(*off + *len) as usize]
                    }
                    Chunk::Owned { data, off } => &data[*off as usize..],
                };
                let take = left.min(bytes.len());
                p.got.extend_from_slice(&bytes[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
            (max.max(1) - left) as i32
        };
        self.run(|s, env| s.handle_sent(env, who, res, batch));
        true
    }

    fn complete_poll(&mut self, who: Who) -> bool {
        let Some(from) = self.peers[at(who)].poll.take() else {
            return false;
        };
        self.run(|s, env| s.handle_poll(env, who, from));
        true
    }

    fn answer_token(&mut self, verdict: Result<Arc<Ident>, &'static str>) {
        assert!(std::mem::take(&mut self.verify), "no token check asked for");
        self.run(|s, env| s.handle_token(env, verdict, None));
    }

    fn answer_placement(&mut self, result: PlacementResult) {
        let seq = self.placement.take().expect("no placement asked for");
        self.run(|s, env| s.handle_placement(env, seq, result));
    }

    fn answer_connect(&mut self, res: i32) {
        let cancelled = self.connect.take().expect("no connect in flight");
        let res = if cancelled { -libc::ECANCELED } else { res };
        self.run(|s, env| s.handle_connected(env, res));
    }

    fn advance_to_deadline(&mut self) {
        let t = self.s.poll_timeout().expect("a deadline");
        self.now = self.now.max(t);
        self.run(|s, env| s.handle_timeout(env));
    }

    /// Lets the kernel do everything it can, whole chunks at a time.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut any = false;
            for who in [Who::Client, Who::Conman] {
                any |= self.complete_send(who, usize::MAX);
                any |= self.deliver(who, BUF);
                any |= self.complete_poll(who);
            }
            if !any {
                return;
            }
        }
        panic!("no quiescence");
    }

    /// Conman's 101 for the request it was sent.
    fn conman_101(&mut self) {
        let req = String::from_utf8(self.peers[1].got.clone()).unwrap();
        let key = req
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key in Conman's request");
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(key)
        );
        self.write(Who::Conman, resp.as_bytes());
    }

    /// From accept to relaying, every step answered at once.
    fn established(cfg: Config) -> Harness {
        let mut h = Harness::new(cfg);
        h.write(Who::Client, &request());
        h.settle();
        h.answer_token(Ok(ident()));
        h.answer_placement(found("vm-1"));
        h.answer_connect(0);
        h.settle();
        h.conman_101();
        h.settle();
        assert_eq!(h.s.kind(), Kind::Relay);
        h.peers[0].got.clear();
        h.peers[1].got.clear();
        h
    }

    /// The Close frames a peer received: (code, reason).
    fn closes(&self, who: Who) -> Vec<(u16, String)> {
        parse_frames(&self.peers[at(who)].got, who == Who::Conman)
            .into_iter()
            .filter(|(op, _)| *op == OpCode::Close)
            .map(|(_, p)| {
                let code = u16::from_be_bytes([p[0], p[1]]);
                (code, String::from_utf8_lossy(&p[2..]).into_owned())
            })
            .collect()
    }

    fn all_closed(&self) -> bool {
        self.s.is_finished() && self.peers.iter().all(|p| p.fd.is_none())
    }

    /// Ends the session: peers answer and FIN, the linger deadline passes.
    fn finish(&mut self) {
        self.settle();
        for who in [Who::Client, Who::Conman] {
            self.peers[at(who)].fin = true;
        }
        self.settle();
        if !self.s.is_finished() {
            self.advance_to_deadline();
            self.settle();
        }
        assert!(
            self.all_closed(),
            "session not finished: {:?}",
            self.s.kind()
        );
        assert!(
            self.bufs.is_empty(),
            "buffers never recycled: {:?}",
            self.bufs.keys()
        );
    }
}

/// Frames of a byte stream (skipping an HTTP head if there is one):
/// opcode and unmasked payload.
fn parse_frames(bytes: &[u8], masked: bool) -> Vec<(OpCode, Vec<u8>)> {
    let mut rest = bytes;
    if rest.starts_with(b"HTTP/1.1") {
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        rest = &rest[end..];
    }
    let mut out = Vec::new();
    while let Ok(Some((h, n))) = FrameHeader::parse(rest) {
        assert_eq!(h.mask.is_some(), masked, "mask bit");
        let len = h.payload_len as usize;
        if rest.len() < n + len {
            break;
        }
        let mut p = rest[n..n + len].to_vec();
        if let Some(m) = h.mask {
            crate::proto::frame::apply_mask(&mut p, m, 0);
        }
        out.push((h.opcode, p));
        rest = &rest[n + len..];
    }
    out
}

fn status(bytes: &[u8]) -> u16 {
    std::str::from_utf8(&bytes[9..12]).unwrap().parse().unwrap()
}

// ---- setup -----------------------------------------------------------------

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

use std::sync::atomic::Ordering::Relaxed;

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
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
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
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
    let seq = h.placement.unwrap();
    h.run(|s, env| s.handle_placement(env, seq.wrapping_add(9), found("vm-x")));
    assert_eq!(h.s.kind(), Kind::Placement);
}

#[test]
fn refused_connect_backs_off_and_retries_excluding_the_vm() {
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
    h.answer_placement(found("vm-1"));
    let first_fd = h.peers[1].fd.unwrap();
    h.answer_connect(-libc::ECONNREFUSED);
    assert_eq!(h.s.kind(), Kind::Backoff);
    assert_eq!(h.peers[1].closed, vec![first_fd], "failed socket closed");
    assert!(h.placement.is_none(), "no new placement before the backoff");
    h.advance_to_deadline();
    assert_eq!(h.s.kind(), Kind::Placement);
    let asked = h
        .ops
        .iter()
        .rev()
        .find(|o| o.starts_with("Placement"))
        .unwrap();
    assert!(
        asked.contains("attempt: 1") && asked.contains("vm-1"),
        "{asked}"
    );
    h.answer_placement(found("vm-2"));
    h.answer_connect(0);
    h.settle();
    h.conman_101();
    h.settle();
    assert_eq!(h.s.kind(), Kind::Relay);
    assert!(h.closes(Who::Client).is_empty(), "the client saw nothing");
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
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
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
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
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
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
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
    let mut h = Harness::new(Harness::cfg());
    h.write(Who::Client, &request());
    h.settle();
    h.answer_token(Ok(ident()));
    h.run(|s, env| s.handle_control_lost(env));
    h.settle();
    assert_eq!(
        h.closes(Who::Client),
        vec![(1013, "stage=controlplane;reason=control_unavailable".into())]
    );
    h.finish();
}

// ---- relay -----------------------------------------------------------------

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

thread_local! {
    /// Transitions taken on this test's thread.
    static TRAIL: std::cell::RefCell<std::collections::HashSet<(Kind, Kind)>> = Default::default();
}

pub(super) fn trail(from: Kind, to: Kind) {
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
    for _ in 0..3000 {
        let mut h = Harness::new(Harness::cfg());
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
            let got = &h.peers[at(to)].got;
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
            let forced = h.ops.iter().any(|o| o.contains("both: true"));
            if frames.is_empty() && forced {
                prop_assert_eq!(extra[0], 0x88, "not a Close after {}", k);
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
    let req = request();
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
    fn random_setups_end_cleanly(events in proptest::collection::vec(setup_event(), 1..150)) {
        let mut h = Harness::new(Harness::cfg());
        let mut sent = 0;
        for e in events {
            apply(&mut h, e, &mut sent);
        }
        h.wind_down();
        prop_assert!(h.all_closed(), "not finished in {:?}", h.s.kind());
        prop_assert!(h.bufs.is_empty(), "buffers held: {:?}", h.bufs.keys().collect::<Vec<_>>());
        prop_assert_eq!(h.stats.active.load(Relaxed), 0);
        prop_assert!(h.connect.is_none() && h.peers.iter().all(|p| p.send.is_none() && p.recv.is_none()));
    }
}
