//! One client WebSocket connection, driven by readiness events: connect,
//! (TLS handshake,) upgrade, send stamped messages, verify their echoes as
//! they stream in, answer pings, close.
//!
//! Sending and verifying allocate nothing per message once the buffers have
//! grown to the workload's size: frames are assembled from the shared masked
//! template, large payloads are written straight from it, and echoes are
//! compared in place against the template.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;

use eval_proxy::proto::frame::{
    write_close, write_control, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use eval_proxy::proto::handshake::{
    accept_key, new_client_key, parse_conman_response, write_conman_request, HandshakeError,
};
use mio::net::TcpStream;

use crate::net;
use crate::report::Recorder;
use crate::stream::{Stream, TlsClient};
use crate::wire::{push_frame_head, stamp, Payloads, CLIENT_MASK};

/// Payload bytes copied into the connection's own buffer; longer payloads
/// are written from the shared template with writev.
const INLINE_PAYLOAD_MAX: usize = 16 * 1024;

/// Stop assembling frames once this much is waiting for the socket; the
/// rest stays queued as in-flight entries and costs 16 bytes each.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// Tokens make request lines long (up to 16 KiB); a 101 is far shorter.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Upgrading,
    Open,
    /// Our Close is queued; `reply_seen` once the peer's Close came back.
    /// The connection is finished when the peer then closes TCP.
    Closing {
        reply_seen: bool,
    },
}

/// Why a connection failed; [`ConnError::kind`] is the label errors are
/// counted under.
#[derive(Debug)]
pub enum ConnError {
    Connect(io::Error),
    Io(io::Error),
    /// The TLS client could not start, or the handshake or a record failed.
    Tls(String),
    /// TCP closed without a Close frame.
    Eof,
    /// With the `Retry-After` it gave, in milliseconds.
    HttpStatus(u16, Option<u64>),
    Handshake(HandshakeError),
    /// The peer sent a Close we did not ask for.
    PeerClose(u16, String),
    Protocol(&'static str),
    /// An echo differs from what was sent, at `at` bytes into message `seq`.
    Mismatch {
        seq: u32,
        at: usize,
    },
    /// A data frame arrived with no message outstanding.
    Unsolicited,
    Timeout(&'static str),
}

impl ConnError {
    pub fn kind(&self) -> String {
        match self {
            Self::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                "connect_refused".into()
            }
            Self::Connect(_) => "connect".into(),
            Self::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset".into(),
            // Only rustls reports InvalidData on a socket's stream.
            Self::Io(e) if e.kind() == io::ErrorKind::InvalidData => "tls".into(),
            Self::Tls(_) => "tls".into(),
            Self::Io(_) => "io".into(),
            Self::Eof => "eof_without_close".into(),
            Self::HttpStatus(status, _) => format!("http_{status}"),
            Self::Handshake(e) => format!("handshake_{}", e.as_str()),
            Self::PeerClose(code, _) => format!("close_{code}"),
            Self::Protocol(what) => format!("protocol_{what}"),
            Self::Mismatch { .. } => "mismatch".into(),
            Self::Unsolicited => "unsolicited".into(),
            Self::Timeout(stage) => format!("timeout_{stage}"),
        }
    }
}

impl ConnError {
    /// When the peer asked the client to come back: `retry_after_ms=N` in
    /// a Close reason (eval-proxy's format), or an HTTP `Retry-After`.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::PeerClose(_, reason) => reason
                .split(';')
                .find_map(|kv| kv.strip_prefix("retry_after_ms="))
                .and_then(|ms| ms.parse().ok()),
            Self::HttpStatus(_, retry_after) => *retry_after,
            _ => None,
        }
    }

    /// Whether the bytes that did arrive were wrong: an echo that differs, a
    /// frame nobody asked for, a broken protocol. Never a storm's doing.
    pub fn is_verification(&self) -> bool {
        matches!(
            self,
            Self::Mismatch { .. } | Self::Unsolicited | Self::Protocol(_)
        )
    }
}

/// `Retry-After` of a refused upgrade's head, in delay-seconds (the date
/// form is not used by any peer here), as milliseconds.
fn retry_after_header(head: &[u8]) -> Option<u64> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&head[..head.len().min(MAX_RESPONSE_HEAD)])
        .ok()?;
    let h = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("retry-after"))?;
    let secs: u64 = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
    Some(secs.saturating_mul(1000))
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Io(e) if e.kind() == io::ErrorKind::InvalidData => write!(f, "TLS: {e}"),
            Self::Io(e) => write!(f, "socket: {e}"),
            Self::Tls(e) => write!(f, "TLS: {e}"),
            Self::Eof => f.write_str("connection closed without a Close frame"),
            Self::HttpStatus(status, _) => write!(f, "upgrade answered with HTTP {status}"),
            Self::Handshake(e) => write!(f, "upgrade: {e}"),
            Self::PeerClose(code, reason) => write!(f, "peer sent Close {code} {reason:?}"),
            Self::Protocol(what) => write!(f, "protocol violation: {what}"),
            Self::Mismatch { seq, at } => {
                write!(
                    f,
                    "echo of message {seq} differs from what was sent at byte {at}"
                )
            }
            Self::Unsolicited => f.write_str("data frame with no message outstanding"),
            Self::Timeout(stage) => write!(f, "timed out in {stage}"),
        }
    }
}

/// What epoll said about a connection.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer's FIN (or an error) is already queued.
    pub read_closed: bool,
}

/// What one event did to a connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// The upgrade completed.
    pub opened: bool,
    /// Echoes verified.
    pub echoes: u32,
    /// The close handshake is over; drop the connection.
    pub finished: bool,
}

/// A message sent (or due to be sent) and not yet echoed.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    pub len: u32,
    pub seq: u32,
    /// When it was issued; for open-loop modes, when it was *meant* to be
    /// sent, so a stalled peer shows up as latency instead of vanishing.
    pub at_ns: u64,
}

/// Where and how to connect.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    pub target: SocketAddr,
    /// Source address to bind, if any.
    pub source: Option<Ipv4Addr>,
    /// Host header value.
    pub host: &'a str,
    /// Request target, token included.
    pub path: &'a str,
    /// Random bytes for Sec-WebSocket-Key.
    pub key_random: [u8; 16],
    /// Speak TLS (wss://) with this client.
    pub tls: Option<&'a TlsClient>,
}

struct Upgrade {
    request: Vec<u8>,
    accept: eval_proxy::proto::handshake::AcceptKey,
    response: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    Data,
    Ping,
    Pong,
    Close,
}

/// Receive-side state. Only a partial header and a control payload are
/// ever buffered; data payloads are checked as they arrive.
struct Rx {
    head: [u8; MAX_HEADER_LEN],
    head_len: usize,
    /// Inside a frame: its kind, fin bit and payload bytes still to come.
    frame: Option<(FrameKind, bool, u64)>,
    /// Inside a (possibly fragmented) message: bytes of it seen so far.
    msg_off: Option<usize>,
    ctrl: [u8; MAX_CONTROL_PAYLOAD],
    ctrl_len: usize,
}

pub struct Conn {
    sock: Stream,
    pub id: u32,
    pub phase: Phase,
    /// When the connect started, or the close, in ns of the worker's clock.
    pub phase_started_ns: u64,
    pub connect_started_ns: u64,
    upgrade: Option<Box<Upgrade>>,
    out: Vec<u8>,
    out_pos: usize,
    /// Template bytes to send once `out` is drained (a large payload).
    tail: Range<usize>,
    /// Control frames that must wait until `tail` is out.
    pending_ctrl: Vec<u8>,
    /// The socket returned EAGAIN; wait for writability before writing.
    write_blocked: bool,
    inflight: VecDeque<InFlight>,
    /// The last this many `inflight` entries are not yet in `out`.
    unwritten: usize,
    next_seq: u32,
    rx: Rx,
}

impl Conn {
    /// Starts connecting connection `id` as `dial` says.
    pub fn connect(
        id: u32,
        dial: &Dial<'_>,
        inflight_capacity: usize,
        now_ns: u64,
    ) -> Result<Self, ConnError> {
        let tcp = net::start_connect(dial.target, dial.source).map_err(ConnError::Connect)?;
        let sock = Stream::new(tcp, dial.tls).map_err(|e| ConnError::Tls(e.to_string()))?;
        let key = new_client_key(dial.key_random);
        let mut request = Vec::with_capacity(dial.path.len() + 256);
        write_conman_request(&mut request, dial.host, dial.path, &key, &[], None, &[]);
        Ok(Self {
            sock,
            id,
            phase: Phase::Connecting,
            phase_started_ns: now_ns,
            connect_started_ns: now_ns,
            upgrade: Some(Box::new(Upgrade {
                request,
                accept: accept_key(&key),
                response: Vec::new(),
            })),
            out: Vec::new(),
            out_pos: 0,
            tail: 0..0,
            pending_ctrl: Vec::new(),
            write_blocked: false,
            inflight: VecDeque::with_capacity(inflight_capacity),
            unwritten: 0,
            next_seq: 0,
            rx: Rx {
                head: [0; MAX_HEADER_LEN],
                head_len: 0,
                frame: None,
                msg_off: None,
                ctrl: [0; MAX_CONTROL_PAYLOAD],
                ctrl_len: 0,
            },
        })
    }

    /// For registering with the poller.
    pub fn source(&mut self) -> &mut TcpStream {
        self.sock.tcp()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// When the oldest outstanding message was issued.
    pub fn oldest_ns(&self) -> Option<u64> {
        self.inflight.front().map(|m| m.at_ns)
    }

    /// Queues a `len`-byte message issued at `at_ns`; [`Conn::flush`] sends it.
    pub fn issue(&mut self, len: u32, at_ns: u64) {
        self.inflight.push_back(InFlight {
            len,
            seq: self.next_seq,
            at_ns,
        });
        self.next_seq = self.next_seq.wrapping_add(1);
        self.unwritten += 1;
    }

    /// Queues our Close (1000); outstanding messages are abandoned.
    pub fn start_close(&mut self, now_ns: u64) {
        let written = self.inflight.len() - self.unwritten;
        self.inflight.truncate(written);
        self.unwritten = 0;
        let buf = if self.tail.is_empty() {
            &mut self.out
        } else {
            &mut self.pending_ctrl
        };
        write_close(buf, 1000, "", Some(CLIENT_MASK));
        self.phase = Phase::Closing { reply_seen: false };
        self.phase_started_ns = now_ns;
    }

    /// Answers a Close the peer started, just before the connection is
    /// dropped, so the peer sees a complete close handshake. Best effort:
    /// skipped if a frame of ours is half written, and a full socket is
    /// not waited for.
    pub fn answer_close(&mut self) {
        if self.out_pos < self.out.len() || !self.tail.is_empty() {
            return;
        }
        let mut close = Vec::with_capacity(8);
        write_close(&mut close, 1000, "", Some(CLIENT_MASK));
        let _ = self.sock.write(&close);
    }

    /// Handles a readiness event. `rxbuf` is the worker's shared read buffer.
    pub fn on_event(
        &mut self,
        ev: Readiness,
        rxbuf: &mut [u8],
        payloads: &Payloads,
        rec: &mut Recorder,
        now_ns: u64,
    ) -> Result<Outcome, ConnError> {
        let mut outcome = Outcome::default();
        if self.phase == Phase::Connecting {
            if !self.connected()? {
                return Ok(outcome);
            }
            self.phase = Phase::Upgrading;
            if let Some(upgrade) = &mut self.upgrade {
                self.out.append(&mut upgrade.request);
            }
        }
        if ev.writable {
            self.write_blocked = false;
        }
        if ev.readable || ev.read_closed {
            self.read(ev.read_closed, rxbuf, payloads, rec, now_ns, &mut outcome)?;
        }
        if !outcome.finished {
            self.flush(payloads)?;
        }
        Ok(outcome)
    }

    /// A connecting socket turns writable when the connect is done, either
    /// way; asking for the peer first costs one syscall on success.
    fn connected(&mut self) -> Result<bool, ConnError> {
        match self.sock.tcp().peer_addr() {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => return Err(ConnError::Connect(e)),
        }
        match self.sock.tcp().take_error().map_err(ConnError::Connect)? {
            Some(e) => Err(ConnError::Connect(e)),
            // Not connected and no error yet: a spurious wake-up.
            None => Ok(false),
        }
    }

    fn read(
        &mut self,
        read_closed: bool,
        rxbuf: &mut [u8],
        payloads: &Payloads,
        rec: &mut Recorder,
        now_ns: u64,
        outcome: &mut Outcome,
    ) -> Result<(), ConnError> {
        loop {
            let n = match self.sock.read(rxbuf) {
                Ok(0) => {
                    return match self.phase {
                        Phase::Closing { reply_seen: true } => {
                            outcome.finished = true;
                            Ok(())
                        }
                        _ => Err(ConnError::Eof),
                    }
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::Io(e)),
            };
            let bytes = &rxbuf[..n];
            if self.phase == Phase::Upgrading {
                self.on_response(bytes, payloads, rec, now_ns, outcome)?;
            } else {
                self.on_frames(bytes, payloads, rec, now_ns, outcome)?;
            }
            // A short read emptied the socket, and epoll reports every later
            // arrival as a new edge, so the read that would say EAGAIN can be
            // skipped: one syscall per event instead of two. A FIN that came
            // with this event is no later arrival, so then read on to the EOF.
            if n < rxbuf.len() && !read_closed && self.sock.short_read_drains() {
                return Ok(());
            }
        }
    }

    fn on_response(
        &mut self,
        bytes: &[u8],
        payloads: &Payloads,
        rec: &mut Recorder,
        now_ns: u64,
        outcome: &mut Outcome,
    ) -> Result<(), ConnError> {
        let Some(upgrade) = &mut self.upgrade else {
            return Err(ConnError::Protocol("upgrade_state"));
        };
        upgrade.response.extend_from_slice(bytes);
        let head_len =
            match parse_conman_response(&upgrade.response, &upgrade.accept, MAX_RESPONSE_HEAD) {
                Ok(Some((_, head_len))) => head_len,
                Ok(None) => return Ok(()),
                Err(HandshakeError::Status(status)) => {
                    let retry_after = retry_after_header(&upgrade.response);
                    return Err(ConnError::HttpStatus(status, retry_after));
                }
                Err(e) => return Err(ConnError::Handshake(e)),
            };
        let Some(upgrade) = self.upgrade.take() else {
            return Err(ConnError::Protocol("upgrade_state"));
        };
        self.phase = Phase::Open;
        outcome.opened = true;
        if let Some(resumed) = self.sock.resumed() {
            rec.tls_handshake(resumed);
        }
        self.on_frames(
            &upgrade.response[head_len..],
            payloads,
            rec,
            now_ns,
            outcome,
        )
    }

    fn on_frames(
        &mut self,
        mut buf: &[u8],
        payloads: &Payloads,
        rec: &mut Recorder,
        now_ns: u64,
        outcome: &mut Outcome,
    ) -> Result<(), ConnError> {
        while !buf.is_empty() {
            let Some((kind, fin, left)) = self.rx.frame else {
                let Some(used) = self.take_header(buf)? else {
                    return Ok(());
                };
                buf = &buf[used..];
                if matches!(self.rx.frame, Some((_, _, 0))) {
                    self.end_frame(rec, now_ns, outcome)?;
                }
                continue;
            };
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let (chunk, rest) = buf.split_at(n);
            buf = rest;
            if kind == FrameKind::Data {
                self.check_data(chunk, payloads)?;
            } else {
                let at = self.rx.ctrl_len;
                self.rx.ctrl[at..at + n].copy_from_slice(chunk);
                self.rx.ctrl_len += n;
            }
            let left = left - n as u64;
            self.rx.frame = Some((kind, fin, left));
            if left == 0 {
                self.end_frame(rec, now_ns, outcome)?;
            }
        }
        Ok(())
    }

    /// Parses the next frame header from `buf` (after any partial header
    /// kept from the last read) and returns how many bytes of `buf` it used,
    /// or `None` if all of `buf` went into the partial header.
    fn take_header(&mut self, buf: &[u8]) -> Result<Option<usize>, ConnError> {
        let have = self.rx.head_len;
        let take = (MAX_HEADER_LEN - have).min(buf.len());
        let parsed = if have == 0 {
            FrameHeader::parse(buf)
        } else {
            self.rx.head[have..have + take].copy_from_slice(&buf[..take]);
            FrameHeader::parse(&self.rx.head[..have + take])
        };
        let (header, head_len) = match parsed {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                // Shorter than the header needs, so all of `buf` fits in `head`.
                if have == 0 {
                    self.rx.head[..take].copy_from_slice(&buf[..take]);
                }
                self.rx.head_len = have + take;
                return Ok(None);
            }
            Err(_) => return Err(ConnError::Protocol("frame_length")),
        };
        self.rx.head_len = 0;
        self.begin_frame(&header)?;
        Ok(Some(head_len - have))
    }

    fn begin_frame(&mut self, h: &FrameHeader) -> Result<(), ConnError> {
        if h.mask.is_some() {
            return Err(ConnError::Protocol("masked_server_frame"));
        }
        if h.rsv != 0 {
            return Err(ConnError::Protocol("rsv_bits"));
        }
        let kind = match h.opcode {
            OpCode::Binary | OpCode::Continuation => {
                let offset = match (h.opcode, self.rx.msg_off) {
                    (OpCode::Binary, None) => 0,
                    (OpCode::Continuation, Some(offset)) => offset,
                    (OpCode::Binary, Some(_)) => {
                        return Err(ConnError::Protocol("data_frame_inside_message"))
                    }
                    _ => return Err(ConnError::Protocol("stray_continuation")),
                };
                let Some(msg) = self.sent_front() else {
                    return Err(ConnError::Unsolicited);
                };
                if offset as u64 + h.payload_len > u64::from(msg.len) {
                    return Err(ConnError::Mismatch {
                        seq: msg.seq,
                        at: msg.len as usize,
                    });
                }
                self.rx.msg_off = Some(offset);
                FrameKind::Data
            }
            OpCode::Text => return Err(ConnError::Protocol("text_frame")),
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                if !h.fin || h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(ConnError::Protocol("bad_control_frame"));
                }
                self.rx.ctrl_len = 0;
                match h.opcode {
                    OpCode::Close => FrameKind::Close,
                    OpCode::Ping => FrameKind::Ping,
                    _ => FrameKind::Pong,
                }
            }
            OpCode::Reserved(_) => return Err(ConnError::Protocol("reserved_opcode")),
        };
        self.rx.frame = Some((kind, h.fin, h.payload_len));
        Ok(())
    }

    /// The oldest message that has been (at least partly) written: only
    /// that one can be echoing.
    fn sent_front(&self) -> Option<InFlight> {
        if self.inflight.len() > self.unwritten {
            self.inflight.front().copied()
        } else {
            None
        }
    }

    fn check_data(&mut self, chunk: &[u8], payloads: &Payloads) -> Result<(), ConnError> {
        let (Some(offset), Some(msg)) = (self.rx.msg_off, self.inflight.front()) else {
            return Err(ConnError::Unsolicited);
        };
        payloads
            .check(chunk, offset, &stamp(self.id, msg.seq), msg.len as usize)
            .map_err(|at| ConnError::Mismatch { seq: msg.seq, at })?;
        self.rx.msg_off = Some(offset + chunk.len());
        Ok(())
    }

    fn end_frame(
        &mut self,
        rec: &mut Recorder,
        now_ns: u64,
        outcome: &mut Outcome,
    ) -> Result<(), ConnError> {
        let Some((kind, fin, _)) = self.rx.frame.take() else {
            return Ok(());
        };
        match kind {
            FrameKind::Data if fin => {
                let (Some(offset), Some(msg)) = (self.rx.msg_off.take(), self.inflight.pop_front())
                else {
                    return Err(ConnError::Unsolicited);
                };
                if offset != msg.len as usize {
                    return Err(ConnError::Mismatch {
                        seq: msg.seq,
                        at: offset,
                    });
                }
                rec.echo(now_ns.saturating_sub(msg.at_ns), msg.len);
                outcome.echoes += 1;
            }
            FrameKind::Data | FrameKind::Pong => {}
            FrameKind::Ping => {
                let buf = if self.tail.is_empty() {
                    &mut self.out
                } else {
                    &mut self.pending_ctrl
                };
                let payload = &self.rx.ctrl[..self.rx.ctrl_len];
                write_control(buf, OpCode::Pong, payload, Some(CLIENT_MASK));
            }
            FrameKind::Close => {
                if let Phase::Closing { .. } = self.phase {
                    self.phase = Phase::Closing { reply_seen: true };
                } else {
                    let payload = &self.rx.ctrl[..self.rx.ctrl_len];
                    let code = match payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                    return Err(ConnError::PeerClose(code, reason.into_owned()));
                }
            }
        }
        Ok(())
    }

    /// Assembles queued messages into frames and writes as much as the
    /// socket takes.
    pub fn flush(&mut self, payloads: &Payloads) -> Result<(), ConnError> {
        if self.write_blocked || self.phase == Phase::Connecting {
            return Ok(());
        }
        match self.sock.push() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.write_blocked = true;
                return Ok(());
            }
            Err(e) => return Err(ConnError::Io(e)),
        }
        loop {
            if self.tail.is_empty() {
                if !self.pending_ctrl.is_empty() {
                    self.out.extend_from_slice(&self.pending_ctrl);
                    self.pending_ctrl.clear();
                }
                self.assemble(payloads);
            }
            let head = &self.out[self.out_pos..];
            let tail = &payloads.masked()[self.tail.clone()];
            if head.is_empty() && tail.is_empty() {
                self.out.clear();
                self.out_pos = 0;
                return Ok(());
            }
            let written = if tail.is_empty() {
                self.sock.write(head)
            } else if head.is_empty() {
                self.sock.write(tail)
            } else {
                self.sock
                    .write_vectored(&[IoSlice::new(head), IoSlice::new(tail)])
            };
            match written {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let from_head = n.min(head.len());
                    self.out_pos += from_head;
                    self.tail.start += n - from_head;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }

    fn assemble(&mut self, payloads: &Payloads) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= OUT_HIGH_WATER {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        while self.unwritten > 0
            && self.tail.is_empty()
            && self.out.len() - self.out_pos < OUT_HIGH_WATER
        {
            let msg = self.inflight[self.inflight.len() - self.unwritten];
            let len = msg.len as usize;
            let covered = push_frame_head(&mut self.out, len, &stamp(self.id, msg.seq));
            if len - covered > INLINE_PAYLOAD_MAX {
                self.tail = covered..len;
            } else {
                self.out.extend_from_slice(&payloads.masked()[covered..len]);
            }
            self.unwritten -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_hints_from_a_close_reason_or_retry_after() {
        let close = |reason: &str| ConnError::PeerClose(1013, reason.into());
        assert_eq!(
            close("stage=controlplane;reason=no_capacity;retry_after_ms=1500").retry_after_ms(),
            Some(1500)
        );
        assert_eq!(
            close("stage=relay;reason=conman_lost").retry_after_ms(),
            None
        );
        assert_eq!(close("retry_after_ms=soon").retry_after_ms(), None);
        let head = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\n\r\n";
        assert_eq!(retry_after_header(head), Some(2000));
        assert_eq!(
            retry_after_header(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
            None
        );
        assert_eq!(
            ConnError::HttpStatus(503, Some(2000)).retry_after_ms(),
            Some(2000)
        );
        assert!(ConnError::Mismatch { seq: 0, at: 0 }.is_verification());
        assert!(!ConnError::Eof.is_verification());
    }
}
