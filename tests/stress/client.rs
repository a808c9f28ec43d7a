//! The stress test's clients: each thread keeps a window of sessions in
//! flight on non-blocking sockets under poll(2). A session upgrades with its
//! own token, sends its frames (masked, in its Up pattern), checks every byte
//! it receives against its own session (echoes: Up, Conman's frames: Down),
//! and ends as its plan says: a RST at a chosen point, or a Close handshake.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use socket2::{Domain, Socket, Type};

use crate::pattern::{self, Checker, Stream};
use crate::plan::{frame_wire_len, ClientEnd, Ctx, SessionPlan};
use crate::wire::{self, Ev, FrameReader, Read1, WriteQueue};
use crate::Tally;

const TICK: Duration = Duration::from_millis(5);
/// How long a reset waits for its bytes to reach the proxy.
const DRAIN_WAIT: Duration = Duration::from_millis(100);
/// How long a mid-frame reset waits for Conman to see the frame begin.
const RELAY_WAIT: Duration = Duration::from_millis(300);
/// How long a reset during Conman's handshake waits for Conman to stall.
const STALL_WAIT: Duration = Duration::from_secs(5);
/// A session still running after this is stuck: a failure.
pub const SESSION_DEADLINE: Duration = Duration::from_secs(25);

/// What a planned reset waits for before it fires.
#[derive(Debug, Clone, Copy)]
enum Cond {
    Nothing,
    ConmanStalled,
    /// Conman has this many of the session's payload bytes.
    ConmanRx(u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum St {
    Connecting,
    /// Head queued; waiting for the response head.
    Upgrading,
    Open,
    /// The stop point is reached; RST once the condition holds.
    Resetting {
        since: Instant,
    },
    /// Our Close is sent, or the response was not a 101: read to EOF.
    Draining,
    Done,
}

struct Session {
    idx: usize,
    sock: Socket,
    st: St,
    key: String,
    resp: Vec<u8>,
    resp_done: bool,
    upgraded: bool,
    reader: FrameReader,
    echo: Checker,
    own: Checker,
    out: WriteQueue,
    cond: Cond,
    cond_wait: Duration,
    sent_close: bool,
    deadline: Instant,
}

pub struct Clients {
    pub proxy: SocketAddr,
    pub window: usize,
    pub seed: u64,
}

/// Runs `sessions` (indices into `ctx.plans`) on this thread.
pub fn run(ctx: Arc<Ctx>, cfg: &Clients, thread: u64, sessions: Vec<usize>) -> Tally {
    let mut t = Tally::default();
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ thread.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let signing = eval_proxy::token::dev_signing_key();
    let mut active: Vec<Session> = Vec::new();
    let mut next = sessions.into_iter();
    let mut buf = vec![0u8; 64 << 10];
    let mut fds = Vec::new();
    loop {
        if ctx.abort.load(Ordering::Relaxed) {
            t.bump("client_aborted", active.len() as u64 + next.len() as u64);
            for s in &active {
                wire::arm_reset(&s.sock);
            }
            return t;
        }
        while active.len() < cfg.window {
            let Some(idx) = next.next() else { break };
            if let Some(s) = Session::start(&ctx, &mut t, &mut rng, &signing, cfg.proxy, idx) {
                active.push(s);
            }
        }
        if active.is_empty() {
            return t;
        }
        fds.clear();
        fds.extend(
            active
                .iter()
                .map(|s| wire::pollfd(&s.sock, s.st == St::Connecting || s.out.wants_write())),
        );
        wire::poll(&mut fds, TICK);
        let now = Instant::now();
        for (s, fd) in active.iter_mut().zip(&fds) {
            if fd.revents != 0 {
                s.on_ready(&ctx, &mut t, &mut rng, &mut buf);
            }
            s.step(&ctx, &mut t, now);
        }
        active.retain(|s| s.st != St::Done);
    }
}

fn token(idx: usize, plan: &SessionPlan, key: &ed25519_dalek::SigningKey) -> String {
    let mut claims = crate::support::claims(&plan.repl(idx));
    claims.jti = format!("stress-{idx}");
    eval_proxy::token::mint(&claims, eval_proxy::token::DEV_KID, key)
}

/// A client socket from a random 127/8 address, so that ephemeral ports
/// last however many sessions a run has.
fn connect(rng: &mut StdRng, to: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    let from = Ipv4Addr::new(127, rng.gen(), rng.gen(), rng.gen_range(1..255));
    s.bind(&SocketAddr::V4(SocketAddrV4::new(from, 0)).into())?;
    match s.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s)
}

impl Session {
    fn start(
        ctx: &Ctx,
        t: &mut Tally,
        rng: &mut StdRng,
        signing: &ed25519_dalek::SigningKey,
        proxy: SocketAddr,
        idx: usize,
    ) -> Option<Session> {
        let plan = &ctx.plans[idx];
        let sock = match connect(rng, proxy) {
            Ok(s) => s,
            Err(e) => {
                t.bump(&format!("client_connect_error_{:?}", e.kind()), 1);
                return None;
            }
        };
        let key = base64::engine::general_purpose::STANDARD.encode(rng.gen::<[u8; 16]>());
        let head = format!(
            "GET /wsv2/{} HTTP/1.1\r\nHost: stress\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            token(idx, plan, signing)
        );
        let head_len = head.len() as u64;
        let wire_before = |frame: usize| -> u64 {
            plan.frames[..frame]
                .iter()
                .map(|&n| frame_wire_len(n, true) as u64)
                .sum()
        };
        let payload_before = |frame: usize| plan.frames[..frame].iter().sum::<usize>() as u64;
        let mut out = WriteQueue::default();
        out.push(head.into_bytes());
        let (stop_at, cond, cond_wait) = match plan.end {
            ClientEnd::InHead { bytes } => (
                Some((bytes as u64).min(head_len - 1)),
                Cond::Nothing,
                DRAIN_WAIT,
            ),
            ClientEnd::AfterHead => (Some(head_len), Cond::Nothing, DRAIN_WAIT),
            ClientEnd::InConmanHandshake => (
                Some(head_len + wire_before(1)),
                Cond::ConmanStalled,
                STALL_WAIT,
            ),
            ClientEnd::MidFrame { frame, part } | ClientEnd::MidSplice { frame, part } => {
                let hdr = frame_wire_len(0, true);
                let partial = u64::from(part > hdr);
                (
                    Some(head_len + wire_before(frame) + part as u64),
                    Cond::ConmanRx(payload_before(frame) + partial),
                    RELAY_WAIT,
                )
            }
            ClientEnd::Close => (None, Cond::Nothing, DRAIN_WAIT),
        };
        out.stop_at = stop_at;
        t.bump("client_sessions", 1);
        Some(Session {
            idx,
            sock,
            st: St::Connecting,
            key,
            resp: Vec::new(),
            resp_done: false,
            upgraded: false,
            reader: FrameReader::new(false),
            echo: Checker::new(idx, plan.tag, Stream::Up),
            own: Checker::new(idx, plan.tag, Stream::Down),
            out,
            cond,
            cond_wait,
            sent_close: false,
            deadline: Instant::now() + SESSION_DEADLINE,
        })
    }

    fn plan<'a>(&self, ctx: &'a Ctx) -> &'a SessionPlan {
        &ctx.plans[self.idx]
    }

    fn on_ready(&mut self, ctx: &Ctx, t: &mut Tally, rng: &mut StdRng, buf: &mut [u8]) {
        if self.st == St::Connecting {
            match self.sock.take_error() {
                Ok(None) => self.st = St::Upgrading,
                Ok(Some(e)) | Err(e) => {
                    t.bump(&format!("client_connect_error_{:?}", e.kind()), 1);
                    return self.finish();
                }
            }
        }
        self.flush(t);
        loop {
            if self.st == St::Done {
                return;
            }
            match wire::read1(&self.sock, buf) {
                Read1::Data(n) => self.on_bytes(ctx, t, rng, &buf[..n]),
                Read1::WouldBlock => break,
                Read1::Eof => {
                    t.bump("client_eof", 1);
                    return self.end(ctx, t);
                }
                Read1::Reset => {
                    t.bump("client_got_rst", 1);
                    return self.end(ctx, t);
                }
            }
        }
        self.flush(t);
    }

    fn flush(&mut self, t: &mut Tally) {
        if self.st == St::Done || self.st == St::Connecting {
            return;
        }
        if let Err(e) = self.out.flush(&self.sock) {
            t.bump(&format!("client_write_error_{:?}", e.kind()), 1);
        }
    }

    /// The proxy ended the connection (EOF or RST).
    fn end(&mut self, ctx: &Ctx, t: &mut Tally) {
        if let St::Resetting { .. } = self.st {
            // The proxy was quicker than the planned reset.
            t.bump(
                &format!("reset_{}_preempted", self.plan(ctx).end.label()),
                1,
            );
        } else if self.out.stop_at.is_some() && !self.sent_close {
            t.bump(
                &format!("reset_{}_not_reached", self.plan(ctx).end.label()),
                1,
            );
        }
        if self.plan(ctx).end == ClientEnd::Close {
            let complete = self.echo.off == self.plan(ctx).up_total()
                && self.own.off == self.plan(ctx).own_total();
            t.bump(
                if complete {
                    "close_sessions_complete"
                } else {
                    "close_sessions_cut"
                },
                1,
            );
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.st = St::Done;
    }

    fn on_bytes(&mut self, ctx: &Ctx, t: &mut Tally, rng: &mut StdRng, data: &[u8]) {
        if self.upgraded {
            return self.on_frames(ctx, t, rng, data);
        }
        if self.resp_done {
            return; // a refusal's body
        }
        self.resp.extend_from_slice(data);
        let Some(end) = wire::head_end(&self.resp) else {
            return;
        };
        self.resp_done = true;
        let resp = std::mem::take(&mut self.resp);
        self.on_response(ctx, t, rng, &resp[..end]);
        if self.upgraded && end < resp.len() {
            self.on_frames(ctx, t, rng, &resp[end..]);
        }
    }

    fn on_response(&mut self, ctx: &Ctx, t: &mut Tally, rng: &mut StdRng, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let status = match resp.parse(head) {
            Ok(httparse::Status::Complete(_)) => resp.code.unwrap_or(0),
            _ => 0,
        };
        t.bump(&format!("client_http_{status}"), 1);
        if status != 101 {
            if !matches!(self.st, St::Resetting { .. }) {
                self.out.stop_at = None;
                self.st = St::Draining;
            }
            return;
        }
        let want = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        if wire::header(resp.headers, "sec-websocket-accept") != Some(want.as_str()) {
            t.bump("protocol_errors_client", 1);
            ctx.reg.note(format!(
                "client: session {}: 101 with the wrong accept key: {:?}",
                self.idx,
                String::from_utf8_lossy(head)
            ));
            return self.finish();
        }
        self.upgraded = true;
        if self.st == St::Upgrading {
            self.st = St::Open;
        }
        let plan = &ctx.plans[self.idx];
        let mut off = 0u64;
        for &len in &plan.frames {
            let payload = pattern::bytes(plan.tag, Stream::Up, off, len);
            off += len as u64;
            self.out
                .push(crate::support::frame(true, 2, &payload, Some(rng.gen())));
        }
    }

    fn on_frames(&mut self, ctx: &Ctx, t: &mut Tally, rng: &mut StdRng, data: &[u8]) {
        let mut controls = Vec::new();
        let (echo, own, reg) = (&mut self.echo, &mut self.own, &ctx.reg);
        let res = self.reader.feed(data, &mut |ev| match ev {
            Ev::Data { opcode, chunk } => {
                t.bump("client_bytes_checked", chunk.len() as u64);
                let checker = if opcode == 2 { &mut *echo } else { &mut *own };
                let bad = checker.check(chunk, reg, "client");
                if bad > 0 {
                    t.bump("foreign_bytes_client", bad);
                }
            }
            Ev::DataEnd { .. } => {}
            Ev::Control { opcode, payload } => controls.push((opcode, payload.to_vec())),
        });
        if let Err(e) = res {
            t.bump("protocol_errors_client", 1);
            ctx.reg.note(format!("client: session {}: {e}", self.idx));
            return self.finish();
        }
        for (opcode, payload) in controls {
            match opcode {
                8 => {
                    let code = match payload[..] {
                        [a, b, ..] => u16::from_be_bytes([a, b]),
                        _ => 1005,
                    };
                    t.bump(&format!("client_close_{code}"), 1);
                    if let St::Resetting { .. } = self.st {
                        continue;
                    }
                    if !self.sent_close {
                        if self.out.stop_at.is_some() {
                            t.bump(
                                &format!("reset_{}_not_reached", self.plan(ctx).end.label()),
                                1,
                            );
                            self.out.stop_at = None;
                        }
                        self.out.drop_unstarted();
                        let reply = payload.get(..2).unwrap_or(&[]);
                        self.out
                            .push(crate::support::frame(true, 8, reply, Some(rng.gen())));
                        self.sent_close = true;
                    }
                    self.st = St::Draining;
                }
                9 => {
                    self.out
                        .push_urgent(crate::support::frame(true, 10, &payload, Some(rng.gen())))
                }
                _ => {}
            }
        }
    }

    fn step(&mut self, ctx: &Ctx, t: &mut Tally, now: Instant) {
        if self.st == St::Done {
            return;
        }
        if now > self.deadline {
            t.bump("stuck_sessions", 1);
            let plan = self.plan(ctx);
            ctx.reg.note(format!(
                "client: session {} stuck in {:?}: end {:?}, conman {:?}, echo {}/{}, own {}/{}, sent_close {}, conman heads {}",
                self.idx,
                self.st,
                plan.end,
                plan.conman,
                self.echo.off,
                plan.up_total(),
                self.own.off,
                plan.own_total(),
                self.sent_close,
                ctx.progress[self.idx].conman_heads.load(Ordering::SeqCst),
            ));
            wire::arm_reset(&self.sock);
            return self.finish();
        }
        match self.st {
            St::Upgrading | St::Open if self.out.stopped() => {
                self.st = St::Resetting { since: now };
            }
            St::Open if !self.sent_close && self.out.is_empty() => {
                let plan = self.plan(ctx);
                if self.echo.off == plan.up_total() && self.own.off == plan.own_total() {
                    let mut payload = 1000u16.to_be_bytes().to_vec();
                    payload.extend_from_slice(b"done");
                    self.out
                        .push(crate::support::frame(true, 8, &payload, Some([1, 2, 3, 4])));
                    self.sent_close = true;
                    self.st = St::Draining;
                    self.flush(t);
                }
            }
            _ => {}
        }
        if let St::Resetting { since } = self.st {
            let waited = now - since;
            let drained = wire::unsent(&self.sock) == 0 || waited > DRAIN_WAIT;
            let progress = &ctx.progress[self.idx];
            let met = match self.cond {
                Cond::Nothing => true,
                Cond::ConmanStalled => progress.conman_stalled.load(Ordering::SeqCst),
                Cond::ConmanRx(n) => progress.conman_rx.load(Ordering::SeqCst) >= n,
            };
            if drained && (met || waited > self.cond_wait) {
                let label = self.plan(ctx).end.label();
                t.bump(&format!("reset_{label}"), 1);
                if met {
                    t.bump(&format!("reset_{label}_on_point"), 1);
                }
                wire::arm_reset(&self.sock);
                self.finish();
            }
        }
    }
}
