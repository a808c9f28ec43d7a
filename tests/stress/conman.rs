//! The stress test's fake Conman: one thread per VM, non-blocking sockets
//! under poll(2), real WebSocket on the wire. It learns the session from
//! `X-Repl-Id`, checks every client byte against that session's pattern,
//! echoes each frame, sends its own frames in the session's Down pattern,
//! and misbehaves as the session's plan says (503, stall before the 101,
//! RST mid-session or in the middle of one of its own frames).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::pattern::{self, Checker, Stream};
use crate::plan::{ConmanPlan, Ctx, SessionPlan};
use crate::wire::{self, Ev, FrameReader, Read1, WriteQueue};
use crate::Tally;

/// How long a reset waits for the bytes before it to reach the proxy.
const DRAIN_WAIT: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_millis(5);

pub struct Vm {
    pub addr: SocketAddr,
    thread: JoinHandle<Tally>,
}

impl Vm {
    pub fn spawn(ctx: Arc<Ctx>) -> Vm {
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.set_reuse_address(true).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        l.listen(4096).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let thread = std::thread::Builder::new()
            .name(format!("conman-{}", addr.port()))
            .spawn(move || run(l, ctx))
            .unwrap();
        Vm { addr, thread }
    }

    /// Joins the thread once `ctx.stop` is set.
    pub fn join(self) -> Tally {
        self.thread.join().expect("fake conman thread panicked")
    }
}

/// An address that refuses TCP: bound, never listening. Keep it alive as
/// long as the proxy may dial it.
pub fn refusing() -> (Socket, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum St {
    Head,
    Stalled {
        until: Option<Instant>,
    },
    /// Writing the 503, then closing.
    Rejecting,
    Open,
    /// Our Close is queued or sent: write it, half-close, read to EOF.
    Closing,
    /// Stopped writing at the planned byte; RST once it reached the proxy.
    Resetting {
        since: Instant,
    },
    Done,
}

struct Conn {
    sock: Socket,
    st: St,
    head: Vec<u8>,
    /// Sec-WebSocket-Accept for a 101 held back by a stall.
    accept: String,
    /// The session, once the head named it.
    idx: usize,
    reader: FrameReader,
    up: Option<Checker>,
    echo: Vec<u8>,
    echoes: usize,
    own_next: usize,
    own_off: u64,
    /// Where the 101 ends in the written stream.
    upgraded_at: u64,
    out: WriteQueue,
    shut: bool,
}

fn run(listener: Socket, ctx: Arc<Ctx>) -> Tally {
    let mut t = Tally::default();
    let mut conns: Vec<Conn> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut fds = Vec::new();
    while !ctx.stop.load(Ordering::Relaxed) {
        fds.clear();
        fds.push(wire::pollfd(&listener, false));
        fds.extend(
            conns
                .iter()
                .map(|c| wire::pollfd(&c.sock, c.out.wants_write())),
        );
        wire::poll(&mut fds, TICK);
        if fds[0].revents != 0 {
            while let Ok((sock, _)) = listener.accept() {
                sock.set_nonblocking(true).unwrap();
                ctx.conman_open.fetch_add(1, Ordering::SeqCst);
                conns.push(Conn::new(sock));
            }
        }
        let now = Instant::now();
        for (c, fd) in conns.iter_mut().zip(&fds[1..]) {
            if fd.revents != 0 {
                c.on_ready(&ctx, &mut t, &mut buf, now);
            }
            c.step(&ctx, &mut t, now);
        }
        conns.retain(|c| {
            let done = c.st == St::Done;
            if done {
                ctx.conman_open.fetch_sub(1, Ordering::SeqCst);
            }
            !done
        });
    }
    for _ in conns.drain(..) {
        ctx.conman_open.fetch_sub(1, Ordering::SeqCst);
    }
    t
}

impl Conn {
    fn new(sock: Socket) -> Conn {
        Conn {
            sock,
            st: St::Head,
            head: Vec::new(),
            accept: String::new(),
            idx: usize::MAX,
            reader: FrameReader::new(true),
            up: None,
            echo: Vec::new(),
            echoes: 0,
            own_next: 0,
            own_off: 0,
            upgraded_at: 0,
            out: WriteQueue::default(),
            shut: false,
        }
    }

    fn plan<'a>(&self, ctx: &'a Ctx) -> &'a SessionPlan {
        &ctx.plans[self.idx]
    }

    fn on_ready(&mut self, ctx: &Ctx, t: &mut Tally, buf: &mut [u8], now: Instant) {
        if let Err(e) = self.out.flush(&self.sock) {
            t.bump(&format!("conman_write_error_{:?}", e.kind()), 1);
            return self.finish(ctx);
        }
        loop {
            if self.st == St::Done {
                return;
            }
            match wire::read1(&self.sock, buf) {
                Read1::Data(n) => self.on_bytes(ctx, t, &buf[..n], now),
                Read1::WouldBlock => break,
                Read1::Eof | Read1::Reset => return self.finish(ctx),
            }
        }
        if let Err(e) = self.out.flush(&self.sock) {
            t.bump(&format!("conman_write_error_{:?}", e.kind()), 1);
            self.finish(ctx);
        }
    }

    fn finish(&mut self, ctx: &Ctx) {
        if matches!(self.st, St::Stalled { .. }) {
            ctx.progress[self.idx]
                .conman_stalled
                .store(false, Ordering::SeqCst);
        }
        self.st = St::Done;
    }

    fn on_bytes(&mut self, ctx: &Ctx, t: &mut Tally, data: &[u8], now: Instant) {
        match self.st {
            St::Head => {
                self.head.extend_from_slice(data);
                if let Some(end) = wire::head_end(&self.head) {
                    if end < self.head.len() {
                        t.bump("conman_early_data", 1);
                        ctx.reg.note(format!(
                            "conman: {} bytes after the upgrade request, before any 101",
                            self.head.len() - end
                        ));
                    }
                    let head = std::mem::take(&mut self.head);
                    self.on_head(ctx, t, &head[..end], now);
                }
            }
            St::Stalled { .. } | St::Rejecting => {
                t.bump("conman_early_data", 1);
                ctx.reg.note(format!(
                    "conman: session {}: {} bytes before any 101",
                    self.idx,
                    data.len()
                ));
            }
            St::Open | St::Closing | St::Resetting { .. } => self.on_frames(ctx, t, data, now),
            St::Done => {}
        }
    }

    fn on_head(&mut self, ctx: &Ctx, t: &mut Tally, head: &[u8], now: Instant) {
        t.bump("conman_heads", 1);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = matches!(req.parse(head), Ok(httparse::Status::Complete(_)));
        let key = wire::header(req.headers, "sec-websocket-key");
        let repl = wire::header(req.headers, "x-repl-id").and_then(SessionPlan::parse_repl);
        let session = wire::header(req.headers, "x-eval-session");
        let (Some(key), Some((idx, tag)), Some(_), true) = (key, repl, session, parsed) else {
            t.bump("conman_bad_heads", 1);
            // Name the session if its X-Repl-Id line survived.
            let text = String::from_utf8_lossy(head);
            let whose = text
                .split("\r\n")
                .find_map(|l| SessionPlan::parse_repl(l.strip_prefix("X-Repl-Id: ")?))
                .and_then(|(idx, _)| {
                    let p = ctx.plans.get(idx)?;
                    let attempt = ctx.progress[idx].conman_heads.load(Ordering::SeqCst);
                    Some(format!(
                        "session {idx} (client {:?}, conman {:?}, {attempt} earlier requests)",
                        p.end, p.conman
                    ))
                })
                .unwrap_or_default();
            ctx.reg
                .note(format!("conman: unusable upgrade request {text:?} {whose}"));
            return self.finish(ctx);
        };
        if ctx.plans.get(idx).map(|p| p.tag) != Some(tag) {
            t.bump("conman_foreign_heads", 1);
            ctx.reg.note(format!(
                "conman: X-Repl-Id {idx}/{tag:016x} names no session of this run"
            ));
            return self.finish(ctx);
        }
        self.idx = idx;
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let progress = &ctx.progress[idx];
        let attempt = progress.conman_heads.fetch_add(1, Ordering::SeqCst);
        match self.plan(ctx).conman {
            ConmanPlan::Reject { times } if attempt < times => {
                t.bump("conman_rejected503", 1);
                self.out.push(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec(),
                );
                self.st = St::Rejecting;
            }
            ConmanPlan::Stall { ms } => {
                t.bump("conman_stalled", 1);
                progress.conman_stalled.store(true, Ordering::SeqCst);
                self.st = St::Stalled {
                    until: ms.map(|ms| now + Duration::from_millis(ms.into())),
                };
                self.accept = accept;
            }
            _ => self.upgrade(ctx, t, &accept),
        }
    }

    fn upgrade(&mut self, ctx: &Ctx, t: &mut Tally, accept: &str) {
        t.bump("conman_upgraded", 1);
        self.out.push(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .into_bytes(),
        );
        self.upgraded_at = self.out.written + self.out.pending() as u64;
        self.up = Some(Checker::new(self.idx, self.plan(ctx).tag, Stream::Up));
        self.st = St::Open;
        self.queue_own(ctx, 1);
    }

    /// Queues up to `n` of the session's own frames.
    fn queue_own(&mut self, ctx: &Ctx, n: usize) {
        let plan = &ctx.plans[self.idx];
        for _ in 0..n {
            let Some(&len) = plan.own.get(self.own_next) else {
                return;
            };
            let payload = pattern::bytes(plan.tag, Stream::Down, self.own_off, len);
            if let ConmanPlan::ResetMidOwnFrame { frame, part } = plan.conman {
                if frame == self.own_next {
                    self.out.stop_at = Some(self.out.written + (self.out.pending() + part) as u64);
                }
            }
            self.out
                .push(crate::support::frame(true, 1, &payload, None));
            self.own_off += len as u64;
            self.own_next += 1;
        }
    }

    fn on_frames(&mut self, ctx: &Ctx, t: &mut Tally, data: &[u8], now: Instant) {
        let mut events = Vec::new();
        let up = self.up.as_mut().expect("open");
        let echo = &mut self.echo;
        let reg = &ctx.reg;
        let res = self.reader.feed(data, &mut |ev| match ev {
            Ev::Data { chunk, .. } => {
                t.bump("conman_bytes_checked", chunk.len() as u64);
                let bad = up.check(chunk, reg, "conman");
                if bad > 0 {
                    t.bump("foreign_bytes_conman", bad);
                }
                echo.extend_from_slice(chunk);
            }
            Ev::DataEnd { opcode } => events.push((opcode, Vec::new())),
            Ev::Control { opcode, payload } => events.push((opcode, payload.to_vec())),
        });
        ctx.progress[self.idx]
            .conman_rx
            .fetch_max(up.off, Ordering::SeqCst);
        if let Err(e) = res {
            t.bump("protocol_errors_conman", 1);
            ctx.reg.note(format!("conman: session {}: {e}", self.idx));
            return self.finish(ctx);
        }
        for (opcode, payload) in events {
            if self.st != St::Open {
                continue;
            }
            match opcode {
                1 | 2 => {
                    let echo = std::mem::take(&mut self.echo);
                    self.out
                        .push(crate::support::frame(true, opcode, &echo, None));
                    self.echoes += 1;
                    let n = if self.echoes >= self.plan(ctx).frames.len() {
                        usize::MAX
                    } else {
                        1
                    };
                    self.queue_own(ctx, n);
                }
                8 => {
                    t.bump("conman_close_handshakes", 1);
                    self.out.drop_unstarted();
                    self.out
                        .push(crate::support::frame(true, 8, &payload, None));
                    self.out.stop_at = None;
                    self.st = St::Closing;
                }
                9 => self
                    .out
                    .push_urgent(crate::support::frame(true, 10, &payload, None)),
                _ => {}
            }
        }
        if let (St::Open, ConmanPlan::ResetAfterRecv { bytes }) = (self.st, self.plan(ctx).conman) {
            if self.up.as_ref().expect("open").off >= bytes {
                t.bump("conman_reset_mid_session", 1);
                self.out.stop_at = Some(self.out.written.max(self.upgraded_at));
                self.st = St::Resetting { since: now };
            }
        }
    }

    fn step(&mut self, ctx: &Ctx, t: &mut Tally, now: Instant) {
        match self.st {
            St::Stalled { until: Some(u) } if now >= u => {
                ctx.progress[self.idx]
                    .conman_stalled
                    .store(false, Ordering::SeqCst);
                let accept = std::mem::take(&mut self.accept);
                self.upgrade(ctx, t, &accept);
                self.flush(ctx, t);
            }
            St::Rejecting if self.out.is_empty() => self.finish(ctx),
            St::Open if self.out.stopped() => {
                t.bump("conman_reset_mid_frame", 1);
                self.st = St::Resetting { since: now };
            }
            St::Closing if self.out.is_empty() && !self.shut => {
                let _ = self.sock.shutdown(std::net::Shutdown::Write);
                self.shut = true;
            }
            St::Resetting { since } => {
                let written = self.out.stopped() || self.out.is_empty();
                if (written && wire::unsent(&self.sock) == 0) || now - since > DRAIN_WAIT {
                    wire::arm_reset(&self.sock);
                    self.finish(ctx);
                }
            }
            _ => {}
        }
    }

    fn flush(&mut self, ctx: &Ctx, t: &mut Tally) {
        if let Err(e) = self.out.flush(&self.sock) {
            t.bump(&format!("conman_write_error_{:?}", e.kind()), 1);
            self.finish(ctx);
        }
    }
}
