//! Deterministic tests of one session's life (quinn-proto's `Pair::drive`
//! idea): a simulated shard performs the session's ops on simulated
//! sockets, a scripted client and Conman write and read bytes, and the
//! clock only moves when a test moves it.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
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

mod admission;
mod handoff;
mod keepalive;
mod random;
mod registry;
mod relay;
mod setup;
mod tls;

pub(in crate::session) use random::trail;

const CLIENT_FD: RawFd = 10;
/// The TCP peer of the harness's client socket.
const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10));
/// The client a PROXY header names in [`Harness::proxied`].
const PROXIED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
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
    PlacementResult::Found(Arc::new(Found {
        vm: vm.into(),
        addr: "127.0.0.1:7000".parse::<SocketAddr>().unwrap(),
        host: "127.0.0.1:7000".into(),
        path: "/".into(),
        tls: None,
    }))
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
    /// The proxy reset this connection (`Op::Reset`).
    proxy_reset: bool,
    got: Vec<u8>,
    recv: Option<bool>,
    /// The last receive armed was on the TLS pool.
    recv_tls: bool,
    cancel: bool,
    send: Option<Batch>,
    /// That send was told the socket's close follows it (`Op::Send::fin`).
    send_fin: bool,
    send_cancel: bool,
    poll: Option<Who>,
    pipe: VecDeque<u8>,
    shut_wr: bool,
    closed: Vec<RawFd>,
}

/// The harness's fields as a session's `Env`, leaving `s` and the peers
/// borrowable beside it.
macro_rules! env {
    ($h:expr, $out:expr) => {
        Env {
            now: $h.now,
            ring: &$h.bufs,
            ring_low: $h.ring_low,
            more_input: $h.more_input,
            input_ends: $h.input_ends,
            cfg: &$h.cfg,
            shard: 0,
            stats: &$h.stats,
            gate: &mut $h.gate,
            rng: &mut $h.rng,
            vms: &mut $h.vms,
            out: $out,
        }
    };
}

impl RingBytes for HashMap<u16, Vec<u8>> {
    fn bytes(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        &self[&bid][off as usize..(off + len) as usize]
    }
}

struct Harness {
    cfg: Config,
    stats: ShardStats,
    gate: Gate,
    /// What the client sends before its request head (a PROXY header).
    preamble: Vec<u8>,
    rng: SmallRng,
    vms: crate::session::VmNames,
    now: Instant,
    s: Session,
    peers: [Peer; 2],
    bufs: HashMap<u16, Vec<u8>>,
    /// References beyond the first to each buffer in `bufs` (`Op::Retain`).
    extra_refs: HashMap<u16, u8>,
    next_bid: u16,
    verify: bool,
    placement: Option<u16>,
    connect: Option<bool>,
    next_fd: RawFd,
    ops: Vec<String>,
    ring_low: bool,
    /// `Env::more_input` for the next inputs.
    more_input: bool,
    /// `Env::input_ends` for the next inputs.
    input_ends: bool,
}

fn at(who: Who) -> usize {
    match who {
        Who::Client => 0,
        Who::Conman => 1,
    }
}

impl Harness {
    fn new(cfg: Config) -> Harness {
        Harness::with_peer(cfg, Some(PEER))
    }

    fn with_peer(cfg: Config, peer: Option<IpAddr>) -> Harness {
        let now = Instant::now();
        let s = Session::new(1, CLIENT_FD, peer, now, &cfg);
        let mut h = Harness {
            cfg,
            stats: ShardStats::default(),
            gate: Gate::default(),
            preamble: Vec::new(),
            rng: SmallRng::seed_from_u64(7),
            vms: Default::default(),
            now,
            s,
            peers: Default::default(),
            bufs: HashMap::new(),
            extra_refs: HashMap::new(),
            next_bid: 0,
            verify: false,
            placement: None,
            connect: None,
            next_fd: 100,
            ops: Vec::new(),
            ring_low: false,
            more_input: false,
            input_ends: false,
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
        input(&mut self.s, &mut env!(self, &mut out));
        while let Some(op) = out.pop_front() {
            self.perform(op, &mut out);
        }
        for p in &self.peers {
            // MSG_MORE holds a send's last segment back until the close:
            // without one in the same submission the bytes would wait.
            assert!(
                !(p.send_fin && p.fd.is_some()),
                "a send marked fin, and no close behind it"
            );
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
        let mut env = env!(self, out);
        match op {
            Op::Recv {
                who,
                fd,
                single,
                tls,
            } => {
                let p = &mut self.peers[at(who)];
                assert_eq!(p.fd, Some(fd));
                assert!(p.recv.is_none(), "two receives on one socket");
                p.recv = Some(single);
                p.recv_tls = tls;
            }
            Op::CancelSend { who } => {
                let p = &mut self.peers[at(who)];
                assert!(p.send.is_some(), "cancel of no send");
                p.send_cancel = true;
            }
            Op::CancelRecv { who, tls } => {
                let p = &mut self.peers[at(who)];
                assert_eq!(tls, p.recv_tls, "a cancel aimed at the other pool");
                p.cancel = true;
            }
            Op::Send {
                who,
                fd,
                batch,
                fin,
            } => {
                let p = &mut self.peers[at(who)];
                assert_eq!(p.fd, Some(fd));
                assert!(p.send.is_none(), "two sends on one socket");
                assert!(!p.shut_wr, "send after shutdown");
                p.send = Some(batch);
                p.send_fin = fin;
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
                assert!(self.s.handle_socket(&mut env, Ok(fd)));
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
            Op::TcpKeepalive { fd } => {
                assert_eq!(
                    self.peers[1].fd,
                    Some(fd),
                    "keepalive for a socket not Conman's"
                );
            }
            Op::Close { fd } => {
                let p = self.peer_of(fd);
                // A receive may still be in flight if its cancel went
                // first, and a send (whole, MSG_WAITALL): each holds the
                // socket until it ends.
                assert!(
                    (p.recv.is_none() || p.cancel) && p.poll.is_none(),
                    "close with an op in flight"
                );
                p.fd = None;
                p.closed.push(fd);
                if fd != CLIENT_FD {
                    assert!(self.connect.is_none(), "close with a connect in flight");
                }
            }
            Op::Recycle { bid } => match self.extra_refs.get_mut(&bid) {
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        self.extra_refs.remove(&bid);
                    }
                }
                None => assert!(
                    self.bufs.remove(&bid).is_some(),
                    "buffer {bid} recycled twice"
                ),
            },
            Op::Retain { bid } => {
                assert!(
                    self.bufs.contains_key(&bid),
                    "retain of a free buffer {bid}"
                );
                *self.extra_refs.entry(bid).or_default() += 1;
            }
            Op::Reset { fd } => {
                let p = self.peer_of(fd);
                p.reset = true;
                p.proxy_reset = true;
                p.shut_wr = true;
            }
            Op::NeedPipe { from } => {
                let pipe = Pipe {
                    r: 1000,
                    w: 1001,
                    cap: 4096,
                };
                self.s.handle_pipe(&mut env, from, Some(pipe));
            }
            Op::ReleasePipe { .. } | Op::VmFailed { .. } => {}
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
            Op::SpliceOut {
                from, socket, len, ..
            } => {
                assert!(
                    !self.peers[at(from.other())].closed.contains(&socket),
                    "splice into a closed socket"
                );
                let n = len.min(self.peers[at(from)].pipe.len());
                let moved: Vec<u8> = self.peers[at(from)].pipe.drain(..n).collect();
                self.peers[at(from.other())].got.extend(moved);
                self.s.handle_spliced_out(&mut env, from, Ok(n));
            }
            Op::Poll { socket, fd, from } => {
                assert!(
                    !self.peers[at(socket)].closed.contains(&fd),
                    "poll on a closed socket"
                );
                self.peers[at(socket)].poll = Some(from)
            }
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
        // A socket closed behind its last send (a small one, MSG_WAITALL)
        // sends it whole.
        let max = if p.fd.is_none() { usize::MAX } else { max };
        let Some(batch) = p.send.take() else {
            return false;
        };
        let res = if std::mem::take(&mut p.send_cancel) {
            -libc::ECANCELED
        } else if p.reset {
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
        self.run(|s, env| s.handle_token(env, verdict));
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

    /// A session behind a load balancer that sends PROXY v1 headers, from
    /// `peer` (trusted if it is [`PEER`]) for client [`PROXIED`].
    fn proxied(mut cfg: Config, peer: Option<IpAddr>) -> Harness {
        cfg.listen.proxy_protocol = true;
        cfg.listen.trusted_proxies = vec![crate::config::Cidr::try_from(PEER.to_string()).unwrap()];
        let mut h = Harness::with_peer(cfg, peer);
        h.preamble = format!("PROXY TCP4 {PROXIED} 10.0.0.1 4000 443\r\n").into_bytes();
        h
    }

    /// From accept to waiting for a placement: head read, token accepted.
    fn placing(cfg: Config) -> Harness {
        let mut h = Harness::new(cfg);
        h.write(Who::Client, &request());
        h.settle();
        h.answer_token(Ok(ident()));
        assert_eq!(h.s.kind(), Kind::Placement);
        h
    }

    /// The connect succeeds and Conman answers 101: relaying.
    fn connect_and_upgrade(&mut self) {
        self.answer_connect(0);
        self.settle();
        self.conman_101();
        self.settle();
        assert_eq!(self.s.kind(), Kind::Relay);
    }

    /// The last op asked for whose debug form starts with `prefix`.
    fn last_op(&self, prefix: &str) -> &str {
        let found = self.ops.iter().rev().find(|o| o.starts_with(prefix));
        found.unwrap_or_else(|| panic!("no {prefix} op"))
    }

    /// From accept to relaying, every step answered at once.
    fn established(cfg: Config) -> Harness {
        let mut h = Harness::placing(cfg);
        h.answer_placement(found("vm-1"));
        h.connect_and_upgrade();
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

/// A peer's received stream without the proxy's own keepalive Pings to it
/// (payload [`live::ping_payload`] of the harness's session), and how many
/// there were. A Ping inside a frame would garble what follows it, so
/// comparing the rest with what was sent also checks where they went.
fn strip_pings(bytes: &[u8]) -> (Vec<u8>, usize) {
    let ours = live::ping_payload(1);
    let mut rest = bytes;
    let mut out = Vec::with_capacity(bytes.len());
    let mut pings = 0;
    while let Ok(Some((h, n))) = FrameHeader::parse(rest) {
        let len = h.payload_len as usize;
        if rest.len() < n + len {
            break;
        }
        let mut p = rest[n..n + len].to_vec();
        if let Some(m) = h.mask {
            crate::proto::frame::apply_mask(&mut p, m, 0);
        }
        if h.opcode == OpCode::Ping && p == ours {
            pings += 1;
        } else {
            out.extend_from_slice(&rest[..n + len]);
        }
        rest = &rest[n + len..];
    }
    out.extend_from_slice(rest);
    (out, pings)
}

fn status(bytes: &[u8]) -> u16 {
    std::str::from_utf8(&bytes[9..12]).unwrap().parse().unwrap()
}
