//! A relaying session's state as a record another process can continue
//! from (issue 13: live sessions survive an upgrade). The shard moves the
//! session's two sockets over `SCM_RIGHTS` beside the record
//! (`shard::handoff`); everything else the session needs is here.
//!
//! # When a session can move
//! [`Session::handle_move_start`] stops reading both sides (the receives
//! are cancelled; their last completions still come). The session is at a
//! *movable point* once, on both sides, nothing is in flight (no receive,
//! send, poll or splice), nothing is queued to send, and the proxy has sent
//! no Close of its own. A frame may be under way in either direction: its
//! position (remaining length, mask key, the start of a split header, a
//! control payload so far) travels in the tracker's state, and the start of
//! a frame held back (`relay.hold_max`) travels as bytes. A spliced frame
//! finishes its splice first. TLS sessions never move: their keys stay in
//! this process, so they drain here. [`Session::poll_export`] then parks
//! the session (no reading, no timer) until the shard reports the new
//! process's verdict: [`Session::handle_moved`] (it runs there now: this
//! copy lets go of its descriptors without a word on either socket) or
//! [`Session::handle_move_cancelled`] (refused, too late, or the handover
//! connection lost: it reads again as if nothing had happened).
//!
//! # The record
//! Length-framed and versioned: `"EPSR"`, the version (u16), the body's
//! length (u32), the body; little-endian. A reader refuses a version it
//! does not know ([`RecordError::UnknownVersion`]) and any body that does
//! not describe a state a session could be in. Times travel as durations
//! relative to the sender's `now` (the two processes share no `Instant`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use super::access::End;
use super::live::Live;
use super::relay::FrameHold;
use super::{hold_index, Env, Kind, Op, Phase, Session, Side, Who};
use crate::keys::Ident;
use crate::proto::relay::{Direction, FramePos, Tracker, TrackerState};

/// The record version this build writes and reads.
pub const VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"EPSR";
/// Magic, version and body length.
const FRAME_HEAD: usize = 10;
/// Larger bodies are refused: two held frames (`relay.hold_max` each, 64
/// KiB by default) and the identity fit many times over.
pub const MAX_BODY: usize = 64 << 20;

/// Where a session stands in a move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Moving {
    #[default]
    No,
    /// Not reading either side; waiting for a movable point.
    Stopping,
    /// Its record is with the new process: no reading, no timer.
    Exported,
}

/// What the token said, as far as a session keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentRecord {
    pub repl: String,
    pub user: String,
    pub cluster: String,
    /// The token's id: revocations by `jti` must still reach the session.
    pub jti: String,
    pub exp: i64,
    pub nbf: i64,
}

/// The keepalive clock, as milliseconds before the sender's `now`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveRecord {
    pub heard_ago_ms: [u32; 2],
    pub pinged_ago_ms: [u32; 2],
    pub data_ago_ms: u32,
    pub ping_due: [bool; 2],
    /// A Close went one way: the deadline is the close timer's.
    pub closing: bool,
}

/// Everything a relaying session is, but its two sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub age_ms: u64,
    pub client_ip: Option<IpAddr>,
    pub vm: Option<String>,
    pub ident: Option<IdentRecord>,
    /// Bytes relayed from the client and from Conman.
    pub bytes: [u64; 2],
    /// A Close from one peer already began the end (`End` as a byte: 0
    /// open, 1 client's Close, 2 Conman's).
    pub end: u8,
    /// To Conman, to the client.
    pub trackers: [TrackerState; 2],
    /// The start of a frame held back per direction, if one is.
    pub holds: [Option<Vec<u8>>; 2],
    pub live: LiveRecord,
    pub deadline_in_ms: Option<u64>,
}

/// Why a record was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated")]
    Truncated,
    #[error("not a session record")]
    BadMagic,
    #[error("record version {0} unknown (this build reads {VERSION})")]
    UnknownVersion(u16),
    #[error("record body of {0} bytes is too large")]
    TooLarge(usize),
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// What [`Session::poll_export`] found.
#[derive(Debug)]
pub enum Export {
    /// Something is still in flight or queued.
    NotYet,
    /// The session is parked; its record goes to the new process.
    Ready(Box<Record>),
    /// It can no longer move (it began to end): read again.
    Never,
}

// ---- encoding -------------------------------------------------------------

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn bool(&mut self) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RecordError::Malformed("bad flag")),
        }
    }
    fn bytes(&mut self) -> Result<Vec<u8>, RecordError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, RecordError> {
        String::from_utf8(self.bytes()?).map_err(|_| RecordError::Malformed("text not UTF-8"))
    }
}

fn put_tracker(w: &mut W, t: &TrackerState) {
    w.u64(t.max_frame);
    w.bool(t.allow_rsv1);
    w.bytes(&t.head);
    match t.current {
        None => w.u8(0),
        Some(c) => {
            w.u8(1);
            w.u8(c.opcode);
            match c.mask {
                None => w.u8(0),
                Some(m) => {
                    w.u8(1);
                    w.0.extend_from_slice(&m);
                }
            }
            w.u8(c.header_len);
            w.u64(c.len);
            w.u64(c.remaining);
        }
    }
    w.bytes(&t.control);
    w.bool(t.in_message);
    w.u16(t.close_code);
    w.u64(t.frames);
}

fn get_tracker(r: &mut R, dir: Direction) -> Result<TrackerState, RecordError> {
    let max_frame = r.u64()?;
    let allow_rsv1 = r.bool()?;
    let head = r.bytes()?;
    let current = match r.u8()? {
        0 => None,
        1 => {
            let opcode = r.u8()?;
            let mask = match r.u8()? {
                0 => None,
                1 => Some(<[u8; 4]>::try_from(r.take(4)?).unwrap_or_default()),
                _ => return Err(RecordError::Malformed("bad mask flag")),
            };
            Some(FramePos {
                opcode,
                mask,
                header_len: r.u8()?,
                len: r.u64()?,
                remaining: r.u64()?,
            })
        }
        _ => return Err(RecordError::Malformed("bad frame flag")),
    };
    let st = TrackerState {
        max_frame,
        allow_rsv1,
        head,
        current,
        control: r.bytes()?,
        in_message: r.bool()?,
        close_code: r.u16()?,
        frames: r.u64()?,
    };
    // Refused here, so that adopting it cannot fail.
    Tracker::from_state(dir, &st).map_err(RecordError::Malformed)?;
    Ok(st)
}

const DIRS: [Direction; 2] = [Direction::ToConman, Direction::ToClient];

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(256));
        w.0.extend_from_slice(MAGIC);
        w.u16(VERSION);
        w.u32(0);
        w.u64(self.id);
        w.u64(self.age_ms);
        match self.client_ip {
            None => w.u8(0),
            Some(IpAddr::V4(a)) => {
                w.u8(4);
                w.0.extend_from_slice(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                w.u8(6);
                w.0.extend_from_slice(&a.octets());
            }
        }
        match &self.vm {
            None => w.u8(0),
            Some(vm) => {
                w.u8(1);
                w.bytes(vm.as_bytes());
            }
        }
        match &self.ident {
            None => w.u8(0),
            Some(i) => {
                w.u8(1);
                for s in [&i.repl, &i.user, &i.cluster, &i.jti] {
                    w.bytes(s.as_bytes());
                }
                w.u64(i.exp as u64);
                w.u64(i.nbf as u64);
            }
        }
        w.u64(self.bytes[0]);
        w.u64(self.bytes[1]);
        w.u8(self.end);
        for t in &self.trackers {
            put_tracker(&mut w, t);
        }
        for h in &self.holds {
            match h {
                None => w.u8(0),
                Some(b) => {
                    w.u8(1);
                    w.bytes(b);
                }
            }
        }
        let l = &self.live;
        for v in [l.heard_ago_ms, l.pinged_ago_ms].iter().flatten() {
            w.u32(*v);
        }
        w.u32(l.data_ago_ms);
        w.bool(l.ping_due[0]);
        w.bool(l.ping_due[1]);
        w.bool(l.closing);
        match self.deadline_in_ms {
            None => w.u8(0),
            Some(d) => {
                w.u8(1);
                w.u64(d);
            }
        }
        let body = (w.0.len() - FRAME_HEAD) as u32;
        w.0[6..10].copy_from_slice(&body.to_le_bytes());
        w.0
    }

    /// A record of [`VERSION`].
    pub fn decode(buf: &[u8]) -> Result<Record, RecordError> {
        Record::decode_version(buf, VERSION)
    }

    /// A record of version `accept` only (`shard::handoff` passes another
    /// value in tests, to play a process that reads another version).
    pub fn decode_version(buf: &[u8], accept: u16) -> Result<Record, RecordError> {
        let mut r = R(buf);
        if r.take(4)? != MAGIC {
            return Err(RecordError::BadMagic);
        }
        let version = r.u16()?;
        if version != accept {
            return Err(RecordError::UnknownVersion(version));
        }
        let len = r.u32()? as usize;
        if len > MAX_BODY {
            return Err(RecordError::TooLarge(len));
        }
        let mut r = R(r.take(len)?);
        let rec = Record::body(&mut r)?;
        if !r.0.is_empty() {
            return Err(RecordError::Malformed("bytes after the body"));
        }
        Ok(rec)
    }

    fn body(r: &mut R) -> Result<Record, RecordError> {
        let id = r.u64()?;
        let age_ms = r.u64()?;
        let client_ip = match r.u8()? {
            0 => None,
            4 => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(r.take(4)?).unwrap_or_default(),
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(r.take(16)?).unwrap_or_default(),
            ))),
            _ => return Err(RecordError::Malformed("bad address family")),
        };
        let vm = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(RecordError::Malformed("bad vm flag")),
        };
        let ident = match r.u8()? {
            0 => None,
            1 => Some(IdentRecord {
                repl: r.string()?,
                user: r.string()?,
                cluster: r.string()?,
                jti: r.string()?,
                exp: r.u64()? as i64,
                nbf: r.u64()? as i64,
            }),
            _ => return Err(RecordError::Malformed("bad ident flag")),
        };
        let bytes = [r.u64()?, r.u64()?];
        let end = r.u8()?;
        if end > 2 {
            return Err(RecordError::Malformed("bad end"));
        }
        let trackers = [get_tracker(r, DIRS[0])?, get_tracker(r, DIRS[1])?];
        let mut holds = [None, None];
        for h in &mut holds {
            *h = match r.u8()? {
                0 => None,
                1 => Some(r.bytes()?),
                _ => return Err(RecordError::Malformed("bad hold flag")),
            };
        }
        let live = LiveRecord {
            heard_ago_ms: [r.u32()?, r.u32()?],
            pinged_ago_ms: [r.u32()?, r.u32()?],
            data_ago_ms: r.u32()?,
            ping_due: [r.bool()?, r.bool()?],
            closing: r.bool()?,
        };
        let deadline_in_ms = match r.u8()? {
            0 => None,
            1 => Some(r.u64()?),
            _ => return Err(RecordError::Malformed("bad deadline flag")),
        };
        Ok(Record {
            id,
            age_ms,
            client_ip,
            vm,
            ident,
            bytes,
            end,
            trackers,
            holds,
            live,
            deadline_in_ms,
        })
    }
}

fn end_byte(end: End) -> Option<u8> {
    match end {
        End::Open => Some(0),
        End::ClientClose => Some(1),
        End::ConmanClose => Some(2),
        _ => None,
    }
}

// ---- the session's side ---------------------------------------------------

impl Session {
    pub fn moving(&self) -> Moving {
        self.live().map_or(Moving::No, |l| l.moving)
    }

    fn set_moving(&mut self, m: Moving) {
        if let Some(l) = self.live_mut() {
            l.moving = m;
        }
    }

    /// Relaying in plaintext, both sides open, and nothing ending that the
    /// proxy began: a session a move may start on.
    pub fn can_move(&self) -> bool {
        self.kind() == Kind::Relay
            && self.tls.is_none()
            && !self.injected_close_to_client
            && !self.injected_close_to_conman
            && end_byte(self.end).is_some()
            && [&self.client, &self.conman]
                .iter()
                .all(|sd| sd.fd >= 0 && !sd.eof && !sd.shut && !sd.closed && !sd.want_shut)
    }

    /// Begins a move: both sides stop being read. False (and nothing
    /// changes) if the session cannot move.
    pub fn handle_move_start(&mut self, env: &mut Env) -> bool {
        if self.moving() != Moving::No || !self.can_move() {
            return false;
        }
        self.set_moving(Moving::Stopping);
        for who in [Who::Client, Who::Conman] {
            self.pause_recv(env, who);
        }
        self.advance(env);
        true
    }

    fn side_quiet(sd: &Side) -> bool {
        sd.inflight == 0 && !sd.recv_armed && sd.drained() && sd.splice.is_none()
    }

    /// Asked after every input while stopping: the record once the session
    /// is at a movable point (it is then parked), or whether to wait.
    pub fn poll_export(&mut self, env: &Env) -> Export {
        if self.moving() != Moving::Stopping || !self.can_move() {
            return Export::Never;
        }
        if !Session::side_quiet(&self.client) || !Session::side_quiet(&self.conman) {
            return Export::NotYet;
        }
        let (Some(to_conman), Some(to_client)) = (self.to_conman.state(), self.to_client.state())
        else {
            return Export::Never;
        };
        let t = self.clock(env.now);
        let Some(live) = self.live().map(|l| l.to_record(t)) else {
            return Export::Never;
        };
        let holds = DIRS.map(|dir| self.hold_ref(dir).and_then(|h| h.export(env.ring)));
        let rec = Record {
            id: self.id,
            age_ms: env.now.saturating_duration_since(self.started).as_millis() as u64,
            client_ip: self.client_ip,
            vm: self.vm.as_deref().map(str::to_owned),
            ident: self.ident.as_deref().map(|i| IdentRecord {
                repl: i.repl().to_owned(),
                user: i.user().to_owned(),
                cluster: i.cluster().to_owned(),
                jti: i.jti().to_owned(),
                exp: i.exp,
                nbf: i.nbf,
            }),
            bytes: self.bytes,
            end: end_byte(self.end).unwrap_or(0),
            trackers: [to_conman, to_client],
            holds,
            live,
            deadline_in_ms: self
                .deadline
                .map(|d| d.saturating_duration_since(env.now).as_millis() as u64),
        };
        self.set_moving(Moving::Exported);
        Export::Ready(Box::new(rec))
    }

    /// The new process runs the session now: this copy gives its buffers
    /// back, leaves the counts and lets go of its descriptors (the sockets
    /// live on in the new process; nothing is said on either).
    pub fn handle_moved(&mut self, env: &mut Env) {
        debug_assert_eq!(self.moving(), Moving::Exported);
        for dir in DIRS {
            self.drop_hold(env, dir);
        }
        self.holds = None;
        for who in [Who::Client, Who::Conman] {
            let sd = self.side(who);
            if sd.fd >= 0 && !sd.closed {
                sd.closed = true;
                env.op(Op::Close { fd: sd.fd });
            }
        }
        self.set_moving(Moving::No);
        self.finished = true;
        self.deadline = None;
        self.account_buffered(env);
        if self.established {
            env.stats
                .active
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.leave_gate(env);
        tracing::debug!(session = self.id, "moved to the new process");
    }

    /// The move is off (refused, too late, the new process gone): read
    /// both sides again; the deadline comes back.
    pub fn handle_move_cancelled(&mut self, env: &mut Env) {
        if self.moving() == Moving::No {
            return;
        }
        self.set_moving(Moving::No);
        for who in [Who::Client, Who::Conman] {
            let sd = self.side(who);
            // A starved side waits for buffers, a splicing one for its
            // splice to end, as before the move.
            if !sd.starved && sd.splice.is_none() {
                sd.paused = false;
            }
            if !sd.paused {
                self.arm_recv(env, who);
            }
        }
        self.advance(env);
    }

    /// A session continued from `rec` on sockets `client` and `conman`
    /// (received with it), counted but not yet reading: the shard gives it
    /// a slot, then [`Session::handle_adopted`]. Not a phase change but a
    /// start, so it begins in `Relay` directly.
    pub fn adopt(rec: Record, client: RawFd, conman: RawFd, env: &mut Env) -> Session {
        let now = env.now;
        let started = now
            .checked_sub(Duration::from_millis(rec.age_ms))
            .unwrap_or(now);
        let mut s = Session::new(rec.id, client, rec.client_ip, started, env.cfg);
        // Moved sessions are plaintext whatever this listener speaks.
        s.tls = None;
        let t = s.clock(now);
        s.phase = Phase::Relay(Live::from_record(&rec.live, t));
        s.conman = Side::new(conman);
        // The old process may have handed it over before its first
        // liveness look: setting the options again is harmless. At that
        // look, or at once if this config does not defer them
        // (`handle_adopted`).
        s.conman.tcp_keepalive_due = super::tcp_keepalive_wanted(env.cfg);
        // Checked when the record was read.
        if let (Ok(a), Ok(b)) = (
            Tracker::from_state(Direction::ToConman, &rec.trackers[0]),
            Tracker::from_state(Direction::ToClient, &rec.trackers[1]),
        ) {
            s.to_conman = a;
            s.to_client = b;
        }
        let [h0, h1] = rec.holds;
        if h0.is_some() || h1.is_some() {
            let mut holds: Box<[FrameHold; 2]> = Box::default();
            for (dir, h) in DIRS.into_iter().zip([h0, h1]) {
                if let Some(bytes) = h {
                    holds[hold_index(dir)] = FrameHold::adopted(bytes);
                }
            }
            s.holds = Some(holds);
        }
        s.deadline = rec.deadline_in_ms.map(|d| now + Duration::from_millis(d));
        s.ident = rec.ident.map(|i| {
            Arc::new(Ident::new(&crate::token::Claims {
                repl: i.repl,
                user: i.user,
                cluster: i.cluster,
                exp: i.exp,
                nbf: i.nbf,
                jti: i.jti,
            }))
        });
        s.vm = rec.vm.map(|name| env.vms.intern(&name));
        s.bytes = rec.bytes;
        s.end = match rec.end {
            1 => End::ClientClose,
            2 => End::ConmanClose,
            _ => End::Open,
        };
        s.established = true;
        env.stats
            .active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Counted like any session, never refused: the handover must not
        // close anything. Its address's slot is taken if there is room.
        env.gate.sessions += 1;
        s.admitted = true;
        if let (Some(table), Some(ip)) = (&env.gate.per_ip, s.client_ip) {
            s.holds_ip_slot = table.admit(ip, now).is_ok();
        }
        s
    }

    /// An adopted session's first input, once the shard has given it a
    /// slot: both sides are read again.
    pub fn handle_adopted(&mut self, env: &mut Env) {
        self.tcp_keepalive_unless_deferred(env);
        for who in [Who::Client, Who::Conman] {
            self.arm_recv(env, who);
        }
        self.advance(env);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tracker(dir: Direction) -> impl Strategy<Value = TrackerState> {
        let masked = dir == Direction::ToConman;
        let frame = prop_oneof![
            // Between frames, perhaps inside a header.
            proptest::collection::vec(any::<u8>(), 0..13).prop_map(|head| (head, None, vec![])),
            // Inside a data frame.
            (
                0u8..3,
                any::<[u8; 4]>(),
                2u8..15,
                0u64..1 << 40,
                any::<u64>()
            )
                .prop_map(move |(op, key, hl, len, r)| {
                    let pos = FramePos {
                        opcode: op,
                        mask: masked.then_some(key),
                        header_len: hl,
                        len,
                        remaining: if len == 0 { 0 } else { r % (len + 1) },
                    };
                    (vec![], Some(pos), vec![])
                }),
            // Inside a control frame, with its payload so far.
            (
                8u8..11,
                any::<[u8; 4]>(),
                proptest::collection::vec(any::<u8>(), 0..=125),
                0usize..=125
            )
                .prop_map(move |(op, key, payload, cut)| {
                    let fed = cut.min(payload.len());
                    let pos = FramePos {
                        opcode: op,
                        mask: masked.then_some(key),
                        header_len: if masked { 6 } else { 2 },
                        len: payload.len() as u64,
                        remaining: (payload.len() - fed) as u64,
                    };
                    (vec![], Some(pos), payload[..fed].to_vec())
                }),
        ];
        (
            frame,
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(0u16), Just(1000u16), Just(1005u16), Just(4321u16)],
            any::<u64>(),
        )
            .prop_map(
                |((head, current, control), rsv1, in_message, close_code, frames)| TrackerState {
                    max_frame: 1 << 40,
                    allow_rsv1: rsv1,
                    head,
                    current,
                    control,
                    in_message,
                    close_code,
                    frames,
                },
            )
    }

    fn record() -> impl Strategy<Value = Record> {
        let ip = prop_oneof![
            Just(None),
            any::<[u8; 4]>().prop_map(|a| Some(IpAddr::from(a))),
            any::<[u8; 16]>().prop_map(|a| Some(IpAddr::from(a))),
        ];
        let ident = proptest::option::of(
            (
                ".{0,20}",
                ".{0,20}",
                ".{0,8}",
                ".{0,12}",
                any::<i64>(),
                any::<i64>(),
            )
                .prop_map(|(repl, user, cluster, jti, exp, nbf)| IdentRecord {
                    repl,
                    user,
                    cluster,
                    jti,
                    exp,
                    nbf,
                }),
        );
        let hold = proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300));
        let live = (
            any::<[u32; 2]>(),
            any::<[u32; 2]>(),
            any::<u32>(),
            any::<[bool; 2]>(),
            any::<bool>(),
        )
            .prop_map(|(h, p, d, due, closing)| LiveRecord {
                heard_ago_ms: h,
                pinged_ago_ms: p,
                data_ago_ms: d,
                ping_due: due,
                closing,
            });
        (
            (
                any::<u64>(),
                any::<u64>(),
                ip,
                proptest::option::of("[a-z0-9-]{0,30}"),
                ident,
            ),
            (
                any::<[u64; 2]>(),
                0u8..3,
                tracker(Direction::ToConman),
                tracker(Direction::ToClient),
            ),
            (hold.clone(), hold, live, proptest::option::of(any::<u64>())),
        )
            .prop_map(
                |((id, age_ms, client_ip, vm, ident), (bytes, end, a, b), (h0, h1, live, dl))| {
                    Record {
                        id,
                        age_ms,
                        client_ip,
                        vm,
                        ident,
                        bytes,
                        end,
                        trackers: [a, b],
                        holds: [h0, h1],
                        live,
                        deadline_in_ms: dl,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn records_round_trip(rec in record()) {
            let bytes = rec.encode();
            prop_assert_eq!(Record::decode(&bytes), Ok(rec));
        }

        #[test]
        fn every_cut_of_a_record_is_refused_and_nothing_panics(rec in record(), flip in any::<(usize, u8)>()) {
            let bytes = rec.encode();
            for n in 0..bytes.len() {
                prop_assert!(Record::decode(&bytes[..n]).is_err());
            }
            let mut bad = bytes.clone();
            let i = flip.0 % bad.len();
            bad[i] ^= flip.1 | 1;
            // Anything but a panic: a flipped payload byte may still be a
            // valid record.
            let _ = Record::decode(&bad);
        }

        /// A tracker continued from its state reads the rest of a stream
        /// exactly as the original does.
        #[test]
        fn a_tracker_continues_from_its_state(
            frames in proptest::collection::vec((0usize..4, 0usize..300), 1..12),
            cut in any::<usize>(),
        ) {
            use crate::proto::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
            let mut stream = Vec::new();
            for (kind, len) in frames {
                let (op, len) = match kind {
                    0 => (OpCode::Binary, len),
                    1 => (OpCode::Text, len),
                    2 => (OpCode::Ping, len % 126),
                    _ => (OpCode::Pong, len % 126),
                };
                let h = FrameHeader { fin: true, rsv: 0, opcode: op, mask: Some([9, 8, 7, 6]), payload_len: len as u64 };
                let mut head = [0u8; MAX_HEADER_LEN];
                let n = h.encode(&mut head);
                stream.extend_from_slice(&head[..n]);
                stream.extend((0..len).map(|i| i as u8));
            }
            let cut = cut % (stream.len() + 1);
            let cfg = crate::proto::relay::TrackerConfig { max_frame: 1 << 20, allow_rsv1: false };
            let mut whole = Tracker::new(Direction::ToConman, cfg);
            let mut first = Tracker::new(Direction::ToConman, cfg);
            let feed = |t: &mut Tracker, mut d: &[u8]| {
                let mut events = Vec::new();
                while !d.is_empty() {
                    let s = t.handle(d).unwrap();
                    if let Some(e) = s.event {
                        events.push((e, t.control_payload().to_vec()));
                    }
                    d = &d[s.consumed..];
                }
                events
            };
            let mut want = feed(&mut whole, &stream[..cut]);
            want.extend(feed(&mut whole, &stream[cut..]));
            let mut got = feed(&mut first, &stream[..cut]);
            let st = first.state().unwrap();
            let mut moved = Tracker::from_state(Direction::ToConman, &st).unwrap();
            prop_assert_eq!(moved.state(), Some(st));
            got.extend(feed(&mut moved, &stream[cut..]));
            prop_assert_eq!(got, want);
            prop_assert_eq!(moved.frames(), whole.frames());
            prop_assert!(moved.at_frame_boundary());
        }
    }

    #[test]
    fn an_unknown_version_is_refused_by_name() {
        let rec = Record {
            id: 7,
            age_ms: 1,
            client_ip: None,
            vm: None,
            ident: None,
            bytes: [0; 2],
            end: 0,
            trackers: [
                Tracker::new(
                    Direction::ToConman,
                    crate::proto::relay::TrackerConfig {
                        max_frame: 1 << 20,
                        allow_rsv1: false,
                    },
                )
                .state()
                .unwrap(),
                Tracker::new(
                    Direction::ToClient,
                    crate::proto::relay::TrackerConfig {
                        max_frame: 1 << 20,
                        allow_rsv1: false,
                    },
                )
                .state()
                .unwrap(),
            ],
            holds: [None, None],
            live: LiveRecord::default(),
            deadline_in_ms: None,
        };
        let mut bytes = rec.encode();
        assert_eq!(Record::decode(&bytes).as_ref(), Ok(&rec));
        assert_eq!(
            Record::decode_version(&bytes, VERSION + 1),
            Err(RecordError::UnknownVersion(VERSION))
        );
        bytes[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let e = Record::decode(&bytes).unwrap_err();
        assert_eq!(e, RecordError::UnknownVersion(VERSION + 1));
        assert!(e.to_string().contains("unknown"), "{e}");
        bytes[0] = b'X';
        assert_eq!(Record::decode(&bytes), Err(RecordError::BadMagic));
    }
}
