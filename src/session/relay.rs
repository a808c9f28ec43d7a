//! Relaying: received bytes pass through the direction's tracker and are
//! queued toward the other side unchanged; Close frames, violations and a
//! side's loss decide how the session ends.

use rand::Rng;

use super::access::End;
use super::{hold_index, Chunk, Env, Kind, Op, Phase, Session, Who, RING_HOLD_MAX};
use crate::error::{SetupError, Stage};
use crate::metrics::{CloseSide, TornFrame};
use crate::proto::close;
use crate::proto::frame::write_close;
use crate::proto::relay::Direction;
use crate::proto::relay::{Event, Tracker, Violation, ViolationKind};

/// What tracking one run of bytes found.
struct Scanned {
    /// Bytes that belong to valid frames (all of them without a violation).
    good: usize,
    frames: u64,
    /// Of `frames`, the control frames.
    controls: u64,
    /// Code of a Close frame completed in these bytes (1005 if it had none).
    close: Option<u16>,
    violation: Option<Violation>,
    /// The first `pongs` Pongs in these bytes that answer the proxy's own
    /// Pings (a Pong beyond those is relayed: the peer ignores it).
    cuts: [Cut; MAX_CUTS],
    pongs: u8,
}

/// Pongs to the proxy's Pings swallowed from one input at most. Pings go
/// to a side only after `keepalive.interval_s` of silence, so a burst of
/// their Pongs (a peer that was frozen, then answers all at once) is
/// short.
const MAX_CUTS: usize = 4;

/// Bytes of an input that are not to be passed on: `start..end`, and, if
/// `earlier`, the frame's start held from earlier inputs too.
#[derive(Clone, Copy, Debug, Default)]
struct Cut {
    start: u32,
    end: u32,
    earlier: bool,
}

/// Tracks `data`; a Pong carrying `ours` (the payload of the proxy's Pings)
/// is reported as a [`Cut`]. Only control frames cost a look.
fn scan(tracker: &mut Tracker, data: &[u8], ours: &[u8]) -> Scanned {
    let frames_before = tracker.frames();
    let boundary_before = tracker.at_frame_boundary();
    let mut off = 0usize;
    let mut close = None;
    let mut violation = None;
    let mut controls = 0;
    let mut cuts = [Cut::default(); MAX_CUTS];
    let mut pongs = 0u8;
    while off < data.len() {
        match tracker.handle(&data[off..]) {
            Ok(scan) => {
                let start = off + scan.frame_start;
                off += scan.consumed;
                match scan.event {
                    Some(Event::Close { code, .. }) => close = Some(code.unwrap_or(1005)),
                    Some(Event::Pong)
                        if usize::from(pongs) < MAX_CUTS && tracker.control_payload() == ours =>
                    {
                        // `frame_start` is 0 both for a frame that began at
                        // the input's first byte and for one that began in
                        // an earlier input; only the second case leaves the
                        // tracker inside a frame before this input.
                        let earlier = start == 0 && !boundary_before;
                        // Inputs are receive buffers or setup leftovers,
                        // far below 4 GiB.
                        cuts[usize::from(pongs)] = Cut {
                            start: start as u32,
                            end: off as u32,
                            earlier,
                        };
                        pongs += 1;
                    }
                    _ => {}
                }
                if scan.event.is_some() {
                    controls += 1;
                }
                if scan.consumed == 0 && scan.event.is_none() {
                    break;
                }
            }
            Err(v) => {
                off += tracker.bytes_valid_before_violation();
                violation = Some(v);
                break;
            }
        }
    }
    Scanned {
        good: if violation.is_some() { off } else { data.len() },
        frames: tracker.frames() - frames_before,
        controls,
        close,
        violation,
        cuts,
        pongs,
    }
}

/// Received bytes, in a ring buffer or copied.
enum Input<'a> {
    Ring { bid: u16, data: &'a [u8] },
    Owned(Vec<u8>),
}

impl Input<'_> {
    /// The pool this input's buffer came from is running low (see
    /// `RingBytes::low`): what it would hold is copied instead.
    fn pool_low(&self, env: &Env) -> bool {
        match self {
            Input::Ring { bid, .. } => env.ring_low || env.ring.low(*bid),
            Input::Owned(_) => env.ring_low,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Input::Ring { data, .. } => data,
            Input::Owned(v) => v,
        }
    }

    fn discard(&self, env: &mut Env) {
        if let Input::Ring { bid, .. } = self {
            env.op(Op::Recycle { bid: *bid });
        }
    }
}

/// The start of a frame not yet complete, held back from the other side
/// (`relay.hold_max`). Boxed in the session and kept once used, so a session
/// that never splits a frame across receives carries none.
#[derive(Default)]
pub struct FrameHold {
    /// Every byte of the unfinished frame so far is here (or was dropped):
    /// none has been passed on.
    holding: bool,
    bytes: usize,
    /// Slices of ring buffers, in order; at most what the side's share of
    /// the ring allows.
    ring: Vec<Chunk>,
    /// Copied bytes, after `ring`.
    tail: Vec<u8>,
}

impl FrameHold {
    /// Bytes it holds in the session's own memory.
    pub fn owned(&self) -> usize {
        self.tail.len()
    }

    /// The held bytes, copied out of the ring buffers they are in, if a
    /// frame is being held (for a handoff record).
    pub(super) fn export(&self, ring: &dyn super::RingBytes) -> Option<Vec<u8>> {
        if !self.holding {
            return None;
        }
        let mut out = Vec::with_capacity(self.bytes);
        for c in &self.ring {
            match c {
                Chunk::Buf { bid, off, len } => out.extend_from_slice(ring.bytes(*bid, *off, *len)),
                Chunk::Owned { data, off } => out.extend_from_slice(&data[*off as usize..]),
            }
        }
        out.extend_from_slice(&self.tail);
        Some(out)
    }

    /// A hold continued from a record's bytes.
    pub(super) fn adopted(bytes: Vec<u8>) -> FrameHold {
        FrameHold {
            holding: true,
            bytes: bytes.len(),
            ring: Vec::new(),
            tail: bytes,
        }
    }
}

/// How an input divides between the other side and the hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Split {
    /// Release what is held, pass on the first `now` bytes, then hold the
    /// next `hold` (the start of a frame short enough to hold).
    Pass { now: usize, hold: usize },
    /// The whole input continues the held frame.
    Keep,
    /// Nothing goes (the rest of a rejected frame).
    Drop,
}

/// Where the tracker stands after an input of `len` bytes decides how much
/// of it may go now: a frame whose payload is at most `hold_max` goes only
/// once complete; a header is held until its length is known.
pub fn hold_split(t: &Tracker, len: usize, held: usize, holding: bool, hold_max: u64) -> Split {
    let all = Split::Pass { now: len, hold: 0 };
    // A control frame (at most 131 bytes) is always held whole, whatever
    // `hold_max`: the proxy may have to swallow it (a Pong to its Ping).
    let long = t.frame_payload_len().is_some_and(|n| n > hold_max) && !t.in_control_frame();
    if t.at_frame_boundary() || long {
        return all;
    }
    let fed = t.frame_bytes_fed();
    match usize::try_from(fed) {
        Ok(fed) if fed <= len => Split::Pass {
            now: len - fed,
            hold: fed,
        },
        // Begun in an earlier input: keep holding it if all of it so far
        // is held, else its start is out already and the rest follows.
        _ if holding && (held as u64).saturating_add(len as u64) == fed => Split::Keep,
        _ => all,
    }
}

/// The side that bytes travelling in `dir` go to.
fn dir_target(dir: Direction) -> Who {
    match dir {
        Direction::ToConman => Who::Conman,
        Direction::ToClient => Who::Client,
    }
}

/// What to do when a side's stream ends without a Close frame, decided from
/// whether what was passed on toward the other side ends between frames.
#[derive(Debug, PartialEq, Eq)]
pub enum EofAction {
    /// Inject this Close toward the other side, then shut it down.
    InjectClose { code: u16, reason: String },
    /// A Close already went: end the TCP stream cleanly.
    Shutdown,
    /// Cut inside a frame too long to hold: reset the other side, since a
    /// FIN after a torn frame would look like a clean end.
    Reset,
}

/// Side `from` ended (FIN or error, or silence past `keepalive.timeout_s`
/// if `timed_out`) during relay.
pub fn on_eof(
    from: Who,
    peer_stream_at_boundary: bool,
    close_already: bool,
    timed_out: bool,
) -> EofAction {
    if close_already {
        return EofAction::Shutdown;
    }
    if !peer_stream_at_boundary {
        return EofAction::Reset;
    }
    let (code, reason) = Session::lost_close(from, timed_out);
    EofAction::InjectClose { code, reason }
}

impl Session {
    /// Received bytes, by phase.
    pub(super) fn on_data(&mut self, env: &mut Env, who: Who, bid: u16, data: &[u8]) {
        match (self.kind(), who) {
            (Kind::ProxyHeader, Who::Client) => {
                env.op(Op::Recycle { bid });
                self.on_proxy_bytes(env, data);
            }
            (Kind::Head, Who::Client) => {
                env.op(Op::Recycle { bid });
                self.on_head_bytes(env, data);
            }
            (
                Kind::Verify
                | Kind::Placement
                | Kind::Connecting
                | Kind::ConmanHandshake
                | Kind::Backoff,
                Who::Client,
            ) => {
                env.op(Op::Recycle { bid });
                self.hold(env, data);
            }
            (Kind::ConmanHandshake, Who::Conman) => {
                env.op(Op::Recycle { bid });
                self.on_conman_head(env, data);
            }
            (Kind::Relay, _) => self.relay(env, who, bid, data),
            _ => {
                // Closing (or input we no longer want): drain and discard so
                // the socket can end with a FIN rather than a reset.
                // Conman's answer to the client's Close still reaches the
                // client, unless the proxy already closed toward it.
                let wanted = self.kind() == Kind::Closing && who == Who::Conman;
                if wanted && self.deliverable(Who::Client) {
                    self.forward(env, who, bid, data);
                } else {
                    env.op(Op::Recycle { bid });
                }
            }
        }
    }

    /// Queues a received buffer toward the other side after tracking it.
    fn forward(&mut self, env: &mut Env, from: Who, bid: u16, data: &[u8]) {
        self.pass_on(env, from, Input::Ring { bid, data });
    }

    /// Like `forward`, for bytes the proxy had to copy (setup leftovers).
    pub(super) fn forward_owned(&mut self, env: &mut Env, from: Who, data: Vec<u8>) {
        if !data.is_empty() {
            self.pass_on(env, from, Input::Owned(data));
        }
    }

    /// Tracks received bytes and queues toward the other side every byte
    /// that may go now: complete frames, and the part of a frame longer
    /// than `relay.hold_max` received so far. The start of a shorter frame
    /// waits in the direction's [`FrameHold`] until its last byte is in,
    /// and then leaves with it in one gathered send.
    fn pass_on(&mut self, env: &mut Env, from: Who, mut input: Input) {
        let dir = from.outbound();
        let to = from.other();
        if self.tracker(dir).close_seen() {
            // RFC 6455 5.5.1: nothing follows a Close; ignore what does.
            input.discard(env);
            return;
        }
        let data = input.bytes();
        let ours = super::live::ping_payload(self.id);
        let scanned = scan(self.tracker(dir), data, &ours);
        account(env, from, &scanned);
        self.bytes[hold_index(dir)] += scanned.good as u64;
        if scanned.close.is_some() {
            self.ended(match from {
                Who::Client => End::ClientClose,
                Who::Conman => End::ConmanClose,
            });
        }
        if env.cfg.limits.idle_timeout_s > 0.0
            && (scanned.frames > scanned.controls
                || self.tracker_ref(dir).data_payload_remaining() > 0)
        {
            self.note_data(env.now);
        }
        let len = data.len();
        let split = if scanned.violation.is_some() {
            if self.tracker(dir).at_frame_boundary() {
                // The bad frame began in this input: what precedes it is
                // whole frames, including the end of any frame held.
                Split::Pass {
                    now: scanned.good,
                    hold: 0,
                }
            } else {
                // It began earlier: its start is held (and dropped here, so
                // the other side's stream still ends between frames) or
                // already streamed.
                self.drop_hold(env, dir);
                Split::Drop
            }
        } else {
            let hold = self.hold_ref(dir);
            hold_split(
                self.tracker_ref(dir),
                len,
                hold.map_or(0, |h| h.bytes),
                hold.is_some_and(|h| h.holding),
                env.cfg.relay.hold_max,
            )
        };
        if !self.deliverable(to) {
            self.drop_hold(env, dir);
            input.discard(env);
            self.after_scan(env, from, &scanned);
            return;
        }
        // A Ping waiting for a frame boundary toward `to` (rare: checked
        // by one flag).
        let ping_due = self.live().is_some_and(|l| l.ping_due(to))
            && scanned.violation.is_none()
            && self.ping_still_wanted(env, to);
        let mut refs = 0u8;
        match split {
            Split::Drop => {}
            Split::Keep => {
                self.hold_more(env, dir, &input, 0..len, &mut refs);
                if ping_due {
                    // What is queued for `to` ends before the held frame.
                    self.inject_ping(env, to);
                }
            }
            Split::Pass { now, hold } => {
                // The proxy's Pongs complete in these bytes; the first one's
                // start may be held from earlier inputs (control frames
                // always are).
                let cuts = &scanned.cuts[..usize::from(scanned.pongs)];
                let n_cuts = cuts
                    .iter()
                    .take_while(|c| c.end as usize <= now && (!c.earlier || self.holding(dir)))
                    .count();
                let cuts = &cuts[..n_cuts];
                if cuts.first().is_some_and(|c| c.earlier) {
                    self.drop_hold(env, dir);
                }
                self.release_hold(dir);
                let ping_at = if ping_due {
                    let t = self.tracker_ref(dir);
                    super::live::ping_offset(
                        t.at_frame_boundary(),
                        t.frame_bytes_fed(),
                        now,
                        hold,
                        len,
                    )
                } else {
                    None
                };
                if cuts.is_empty() && ping_at.is_none() {
                    self.queue_input(env, to, &mut input, 0..now, &mut refs);
                } else {
                    let mut from_off = 0;
                    for c in cuts {
                        self.queue_input(
                            env,
                            to,
                            &mut input,
                            from_off..c.start as usize,
                            &mut refs,
                        );
                        from_off = c.end as usize;
                        env.stats.keepalive_pong();
                    }
                    // The last boundary is at or after the last Pong's end.
                    let p = ping_at.unwrap_or(now).max(from_off);
                    self.queue_input(env, to, &mut input, from_off..p, &mut refs);
                    if ping_at.is_some() {
                        self.inject_ping(env, to);
                    }
                    self.queue_input(env, to, &mut input, p..now, &mut refs);
                }
                if hold > 0 {
                    self.hold_more(env, dir, &input, now..now + hold, &mut refs);
                }
            }
        }
        if let Input::Ring { bid, .. } = input {
            // The receive gave the session one reference.
            if refs == 0 {
                env.op(Op::Recycle { bid });
            }
            for _ in 1..refs {
                env.op(Op::Retain { bid });
            }
        }
        self.after_scan(env, from, &scanned);
    }

    /// Queues `range` of the input toward `to`: as a slice of its ring
    /// buffer while the side's share of the ring allows, else copied.
    fn queue_input(
        &mut self,
        env: &mut Env,
        to: Who,
        input: &mut Input,
        range: std::ops::Range<usize>,
        refs: &mut u8,
    ) {
        if range.is_empty() {
            return;
        }
        let low = input.pool_low(env);
        let ring_ok = !low && self.side_ref(to).sendq.len() < RING_HOLD_MAX;
        let dest = self.side(to);
        match input {
            Input::Ring { bid, .. } if ring_ok => {
                *refs += 1;
                dest.push(Chunk::Buf {
                    bid: *bid,
                    off: range.start as u32,
                    len: range.len() as u32,
                });
            }
            // A peer that does not read keeps what is queued for it: in
            // the session's own memory (bounded by backpressure), never in
            // the shard's shared ring, which every session needs to
            // receive anything.
            // Owned bytes (decrypted from TLS, setup leftovers) that go
            // whole move as they are: decryption was their only copy.
            Input::Owned(v) if range == (0..v.len()) => dest.push_owned(std::mem::take(v)),
            _ => dest.push_owned(input.bytes()[range].to_vec()),
        }
    }

    /// Adds `range` of the input to the frame held in direction `dir`: as a
    /// slice of its ring buffer while the side's share of the ring allows,
    /// else copied (after the first copy, always, to keep the order).
    fn hold_more(
        &mut self,
        env: &mut Env,
        dir: Direction,
        input: &Input,
        range: std::ops::Range<usize>,
        refs: &mut u8,
    ) {
        let to = dir_target(dir);
        let queued = self.side_ref(to).sendq.len();
        let hold = self.hold_mut(dir);
        hold.holding = true;
        hold.bytes += range.len();
        let low = input.pool_low(env);
        let ring_ok = !low && hold.tail.is_empty() && queued + hold.ring.len() < RING_HOLD_MAX;
        match input {
            Input::Ring { bid, .. } if ring_ok => {
                *refs += 1;
                hold.ring.push(Chunk::Buf {
                    bid: *bid,
                    off: range.start as u32,
                    len: range.len() as u32,
                });
            }
            _ => hold.tail.extend_from_slice(&input.bytes()[range]),
        }
    }

    /// The held frame is complete (or long enough to stream): it joins the
    /// send queue, ahead of what follows it.
    fn release_hold(&mut self, dir: Direction) {
        if !self.holding(dir) {
            return;
        }
        let hold = self.hold_mut(dir);
        hold.holding = false;
        hold.bytes = 0;
        let ring = std::mem::take(&mut hold.ring);
        let tail = std::mem::take(&mut hold.tail);
        let dest = self.side(dir_target(dir));
        for c in ring {
            dest.push(c);
        }
        dest.push_owned(tail);
    }

    /// Gives up the bytes of the frame held in `dir` (its source is gone,
    /// broke the protocol, or its destination was closed). `holding` stays
    /// set: the other side's stream still ends between frames.
    pub(super) fn drop_hold(&mut self, env: &mut Env, dir: Direction) -> bool {
        if self.holds.is_none() {
            return false;
        }
        let hold = self.hold_mut(dir);
        let had = hold.bytes > 0;
        for c in hold.ring.drain(..) {
            if let Chunk::Buf { bid, .. } = c {
                env.op(Op::Recycle { bid });
            }
        }
        hold.tail = Vec::new();
        hold.bytes = 0;
        had
    }

    /// The frame under way in `dir` is being held back.
    pub(super) fn holding(&self, dir: Direction) -> bool {
        self.hold_ref(dir).is_some_and(|h| h.holding)
    }

    /// Everything passed on toward the destination of `dir` ends between
    /// two frames, so a Close may follow it.
    pub(super) fn passed_at_boundary(&self, dir: Direction) -> bool {
        self.tracker_ref(dir).at_frame_boundary() || self.holding(dir)
    }

    /// Bytes may still be queued toward `to`: its socket is writable and
    /// the proxy has not sent it a Close, after which nothing may follow
    /// (RFC 6455 5.5.1), whatever was received or held before.
    pub(super) fn deliverable(&self, to: Who) -> bool {
        let closed_by_proxy = match to {
            Who::Client => self.injected_close_to_client,
            Who::Conman => self.injected_close_to_conman,
        };
        let sd = self.side_ref(to);
        !closed_by_proxy && !sd.shut && !sd.closed
    }

    fn after_scan(&mut self, env: &mut Env, from: Who, scanned: &Scanned) {
        match scanned.violation {
            // A peer may race data against its own Close: drop it quietly.
            Some(v) if v.kind == ViolationKind::DataAfterClose => {}
            Some(v) => {
                tracing::debug!(
                    session = self.id,
                    code = v.code,
                    reason = v.as_str(),
                    "protocol violation"
                );
                self.on_violation(env, from, v);
            }
            None => {}
        }
    }

    fn relay(&mut self, env: &mut Env, from: Who, bid: u16, data: &[u8]) {
        self.forward(env, from, bid, data);
        if self.kind() != Kind::Relay {
            return;
        }
        self.maybe_splice(env, from);
        self.close_progress(env);
    }

    /// After bytes were relayed: a Close seen both ways ends the session
    /// once both are out; a Close seen one way gives the other side
    /// `limits.close_timeout_ms` to answer. Also run for the bytes held
    /// during setup, which may carry a Close of their own.
    pub(super) fn close_progress(&mut self, env: &mut Env) {
        let both_closed = self.to_conman.close_seen() && self.to_client.close_seen();
        if both_closed {
            // The close handshake is complete: end the TCP streams once
            // both Close frames are out.
            self.begin_closing(env);
        } else if self.to_conman.close_seen() || self.to_client.close_seen() {
            // The close timer takes the deadline over from liveness.
            let first = match self.live_mut() {
                Some(l) => !std::mem::replace(&mut l.closing, true),
                None => self.deadline.is_none(),
            };
            if first {
                self.set_deadline(
                    env.now + std::time::Duration::from_millis(env.cfg.limits.close_timeout_ms),
                );
            }
        }
    }

    fn on_violation(&mut self, env: &mut Env, from: Who, v: Violation) {
        // The violating side gets the protocol close code; the other side
        // learns its peer is gone. Neither hears of the other's bytes again.
        self.ended(match from {
            Who::Client => End::ClientViolation,
            Who::Conman => End::ConmanViolation,
        });
        let text = close::reason_text("relay", v.as_str(), None);
        match from {
            Who::Client => {
                self.inject_close(env, Who::Client, v.code, &text);
                self.inject_close(
                    env,
                    Who::Conman,
                    close::GOING_AWAY,
                    "stage=client_gone;reason=protocol_error",
                );
            }
            Who::Conman => {
                self.inject_close(env, Who::Conman, v.code, &text);
                let e = SetupError::new(Stage::Relay, "conman_protocol_error");
                self.inject_close(env, Who::Client, e.close_code(), &e.close_reason());
            }
        }
        self.side(from).eof = true;
        self.transition(env.now, |_| Phase::Closing);
        self.client.want_shut = true;
        self.conman.want_shut = true;
    }

    /// Queues a Close frame toward `to` if its stream is at a frame boundary
    /// and it has not had one; otherwise only its TCP stream will end.
    fn inject_close(&mut self, env: &mut Env, to: Who, code: u16, reason: &str) {
        let dir = to.other().outbound();
        let at_boundary = self.passed_at_boundary(dir);
        let (already, mask) = match to {
            Who::Client => (
                self.injected_close_to_client || self.to_client.close_seen(),
                None,
            ),
            Who::Conman => (
                self.injected_close_to_conman || self.to_conman.close_seen(),
                Some(env.rng.gen::<[u8; 4]>()),
            ),
        };
        let sd = self.side_ref(to);
        if !at_boundary || already || sd.fd < 0 || sd.shut || sd.closed {
            return;
        }
        // The held start of a frame can never be completed after a Close.
        self.drop_hold(env, dir);
        let sd = self.side(to);
        let mut frame = Vec::with_capacity(4 + reason.len() + 8);
        write_close(&mut frame, code, reason, mask);
        sd.push_owned(frame);
        self.note_proxy_close(to, code);
        match to {
            Who::Client => {
                self.injected_close_to_client = true;
                env.stats.close_code(CloseSide::ProxyToClient, code);
            }
            Who::Conman => {
                self.injected_close_to_conman = true;
                env.stats.close_code(CloseSide::ProxyToConman, code);
            }
        }
    }

    /// Aborts `who`'s connection with a RST; nothing queued for it is sent.
    pub(super) fn reset_side(&mut self, env: &mut Env, who: Who) {
        self.discard_queued(env, who);
        let sd = self.side(who);
        if sd.fd < 0 || sd.closed {
            return;
        }
        sd.shut = true;
        sd.eof = true;
        env.op(Op::Reset { fd: sd.fd });
    }

    /// Ends a session from the proxy's side with a Close to both peers.
    pub(super) fn end_session(&mut self, env: &mut Env, code: u16, reason: &str) {
        self.ended(End::Proxy);
        if self.kind() == Kind::Relay {
            self.inject_close(env, Who::Client, code, reason);
            self.inject_close(env, Who::Conman, close::GOING_AWAY, reason);
        }
        self.begin_closing(env);
    }

    /// A side stopped sending (FIN, reset, failed send).
    pub(super) fn on_side_lost(&mut self, env: &mut Env, who: Who) {
        self.side_lost_as(env, who, false);
    }

    /// A side stopped sending, or (`timed_out`) was silent too long.
    pub(super) fn side_lost_as(&mut self, env: &mut Env, who: Who, timed_out: bool) {
        match (self.kind(), who) {
            // Nothing was promised yet: just go.
            (Kind::ProxyHeader | Kind::Head | Kind::Verify, _) => self.begin_closing(env),
            (
                Kind::Placement | Kind::Connecting | Kind::ConmanHandshake | Kind::Backoff,
                Who::Client,
            ) => self.fail_setup(env, SetupError::new(Stage::ClientGone, "eof")),
            (Kind::Connecting | Kind::ConmanHandshake, Who::Conman) => {
                let stage = if self.tls_handshaking(Who::Conman) {
                    Stage::ConmanTls
                } else {
                    Stage::ConmanHandshake
                };
                self.retry_or_fail(env, SetupError::new(stage, "eof"));
            }
            // An abandoned attempt's socket ending changes nothing.
            (Kind::Placement | Kind::Backoff, Who::Conman) => {}
            (Kind::Relay, _) => {
                self.ended(match (who, timed_out) {
                    (Who::Client, false) => End::ClientGone,
                    (Who::Conman, false) => End::ConmanLost,
                    (Who::Client, true) => End::ClientTimeout,
                    (Who::Conman, true) => End::ConmanTimeout,
                });
                let close_already = match who {
                    Who::Client => self.to_conman.close_seen(),
                    Who::Conman => self.to_client.close_seen(),
                };
                let dir = who.outbound();
                let at_boundary = self.passed_at_boundary(dir);
                if self.drop_hold(env, dir) {
                    env.stats.torn_frame(dir, TornFrame::Held);
                }
                match on_eof(who, at_boundary, close_already, timed_out) {
                    EofAction::InjectClose { code, reason } => {
                        self.inject_close(env, who.other(), code, &reason);
                    }
                    EofAction::Shutdown => {}
                    EofAction::Reset => {
                        env.stats.torn_frame(dir, TornFrame::Reset);
                        self.reset_side(env, who.other());
                    }
                }
                if who == Who::Conman && !close_already && !timed_out {
                    tracing::debug!(session = self.id, "conman lost mid-session");
                }
                self.begin_closing(env);
            }
            (Kind::Closing, _) => {}
        }
    }
}

fn account(env: &mut Env, from: Who, scanned: &Scanned) {
    env.stats
        .add_bytes(from.outbound(), scanned.good as u64, scanned.frames);
    if let Some(code) = scanned.close {
        let side_label = match from {
            Who::Client => CloseSide::Client,
            Who::Conman => CloseSide::Conman,
        };
        env.stats.close_code(side_label, code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conman_lost_at_boundary_closes_1014() {
        match on_eof(Who::Conman, true, false, false) {
            EofAction::InjectClose { code, reason } => {
                assert_eq!(code, 1014);
                assert_eq!(reason, "stage=relay;reason=conman_lost");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_gone_tells_conman_1001() {
        assert!(matches!(
            on_eof(Who::Client, true, false, false),
            EofAction::InjectClose { code: 1001, .. }
        ));
        match on_eof(Who::Client, true, false, true) {
            EofAction::InjectClose { code, reason } => {
                assert_eq!(code, 1001);
                assert_eq!(reason, "stage=relay;reason=client_timeout");
            }
            other => panic!("{other:?}"),
        }
        match on_eof(Who::Conman, true, false, true) {
            EofAction::InjectClose { code, reason } => {
                assert_eq!(code, 1014);
                assert_eq!(reason, "stage=relay;reason=conman_timeout");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn after_close_shuts_down_and_mid_frame_resets() {
        for timed_out in [false, true] {
            assert_eq!(
                on_eof(Who::Client, true, true, timed_out),
                EofAction::Shutdown
            );
            assert_eq!(
                on_eof(Who::Conman, false, true, timed_out),
                EofAction::Shutdown
            );
            assert_eq!(
                on_eof(Who::Conman, false, false, timed_out),
                EofAction::Reset
            );
            assert_eq!(
                on_eof(Who::Client, false, false, timed_out),
                EofAction::Reset
            );
        }
    }
}
