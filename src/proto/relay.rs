//! Per-direction frame tracker for the relay.
//!
//! Bytes pass through the proxy unchanged and in whatever chunks the kernel
//! hands over; the tracker follows frame boundaries alongside them. It keeps
//! at most one partial header (14 bytes) and one control payload (125 bytes)
//! and never allocates, so a 100 MiB frame costs a counter, not a buffer.
//!
//! Per frame it validates what RFC 6455 makes the receiver reject (mask bit
//! by direction, reserved opcodes and RSV bits, control frame rules,
//! fragmentation order, size limit, Close payload) and reports control
//! frames as [`Event`]s so the session can answer Pings, swallow the Pongs to
//! its own Pings, and see Close. Text payloads are not checked for UTF-8:
//! that is the endpoints' job.
#![forbid(unsafe_code)]

use crate::proto::close::{self, CloseError};
use crate::proto::frame::{apply_mask, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Frames from the client, which must be masked.
    ToConman,
    /// Frames from Conman, which must not be masked.
    ToClient,
}

impl Direction {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToConman => "to_conman",
            Direction::ToClient => "to_client",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Largest payload of one frame, in bytes; more is closed with 1009.
    pub max_frame: u64,
    /// permessage-deflate was negotiated, so RSV1 may start a data message.
    pub allow_rsv1: bool,
}

/// A control frame that has just ended. Its payload, unmasked, is
/// [`Tracker::control_payload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `code` is `None` for an empty Close; the reason is
    /// `control_payload()[2..]`, already checked to be UTF-8.
    Close {
        code: Option<u16>,
        reason_len: usize,
    },
    Ping,
    Pong,
}

/// What was wrong with a frame; `as_str` is the snake_case word of the
/// Close reason text and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    BadLength,
    UnmaskedFrame,
    MaskedFrame,
    ReservedOpcode,
    RsvBits,
    ControlTooLong,
    FragmentedControl,
    UnexpectedContinuation,
    ExpectedContinuation,
    /// A frame after a Close: dropped by the relay rather than fought.
    DataAfterClose,
    BadClosePayload,
    FrameTooBig,
}

impl ViolationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::BadLength => "bad_length",
            ViolationKind::UnmaskedFrame => "unmasked_frame",
            ViolationKind::MaskedFrame => "masked_frame",
            ViolationKind::ReservedOpcode => "reserved_opcode",
            ViolationKind::RsvBits => "rsv_bits",
            ViolationKind::ControlTooLong => "control_too_long",
            ViolationKind::FragmentedControl => "fragmented_control",
            ViolationKind::UnexpectedContinuation => "unexpected_continuation",
            ViolationKind::ExpectedContinuation => "expected_continuation",
            ViolationKind::DataAfterClose => "data_after_close",
            ViolationKind::BadClosePayload => "bad_close_payload",
            ViolationKind::FrameTooBig => "frame_too_big",
        }
    }
}

/// A frame the receiving endpoint would have to fail the connection for.
/// `code` (1002, 1007 or 1009) and `kind` go into the Close the proxy sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} (close code {code})", kind.as_str())]
pub struct Violation {
    pub code: u16,
    pub kind: ViolationKind,
}

impl Violation {
    const fn protocol(kind: ViolationKind) -> Violation {
        Violation {
            code: close::PROTOCOL_ERROR,
            kind,
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.kind.as_str()
    }
}

const BAD_LENGTH: Violation = Violation::protocol(ViolationKind::BadLength);
const UNMASKED_FRAME: Violation = Violation::protocol(ViolationKind::UnmaskedFrame);
const MASKED_FRAME: Violation = Violation::protocol(ViolationKind::MaskedFrame);
const RESERVED_OPCODE: Violation = Violation::protocol(ViolationKind::ReservedOpcode);
const RSV_BITS: Violation = Violation::protocol(ViolationKind::RsvBits);
const CONTROL_TOO_LONG: Violation = Violation::protocol(ViolationKind::ControlTooLong);
const FRAGMENTED_CONTROL: Violation = Violation::protocol(ViolationKind::FragmentedControl);
const UNEXPECTED_CONTINUATION: Violation =
    Violation::protocol(ViolationKind::UnexpectedContinuation);
const EXPECTED_CONTINUATION: Violation = Violation::protocol(ViolationKind::ExpectedContinuation);
const DATA_AFTER_CLOSE: Violation = Violation::protocol(ViolationKind::DataAfterClose);
const BAD_CLOSE_PAYLOAD: Violation = Violation::protocol(ViolationKind::BadClosePayload);
// RFC 6455 section 7.4.1 gives 1007 for text that is not UTF-8.
const BAD_CLOSE_UTF8: Violation = Violation {
    code: 1007,
    kind: ViolationKind::BadClosePayload,
};
const FRAME_TOO_BIG: Violation = Violation {
    code: close::TOO_BIG,
    kind: ViolationKind::FrameTooBig,
};

const RSV1: u8 = 0b100;

/// What [`Tracker::handle`] did with the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    /// Bytes of the input accounted for; less than the input only when
    /// `event` is set.
    pub consumed: usize,
    pub event: Option<Event>,
    /// Offset in this input where the frame that produced `event` began, or
    /// 0 if it began in an earlier input (see [`Tracker::pending_control_bytes`]).
    pub frame_start: usize,
}

/// A tracker's position ([`Tracker::state`]): the frame under way, a
/// header split across inputs, the message and close state. The mask phase
/// of the payload under way is `len - remaining` (mod 4), so it needs no
/// field of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerState {
    pub max_frame: u64,
    pub allow_rsv1: bool,
    /// The start of a header split across inputs (under 14 bytes).
    pub head: Vec<u8>,
    pub current: Option<FramePos>,
    /// Unmasked payload so far of the control frame under way.
    pub control: Vec<u8>,
    pub in_message: bool,
    /// 0 before a Close went this way.
    pub close_code: u16,
    pub frames: u64,
}

/// Where the frame under way stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramePos {
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: u8,
    pub len: u64,
    pub remaining: u64,
}

/// The frame whose payload is streaming past.
#[derive(Clone, Copy, Debug)]
struct Current {
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    header_len: u8,
    /// Payload length from the header.
    len: u64,
    remaining: u64,
}

/// A control payload's buffer, by malloc(3) and a fill. A zeroed
/// allocation is calloc(3), which glibc serves past its per-thread cache,
/// and every session that closes takes two of these. The fill value is
/// opaque to the optimiser, which would otherwise make the pair a calloc.
fn control_buf() -> Box<[u8; MAX_CONTROL_PAYLOAD]> {
    let mut v = Vec::with_capacity(MAX_CONTROL_PAYLOAD);
    v.resize(MAX_CONTROL_PAYLOAD, std::hint::black_box(0));
    v.into_boxed_slice()
        .try_into()
        .expect("the vector has the array's length")
}

#[derive(Debug)]
pub struct Tracker {
    dir: Direction,
    // `TrackerConfig`'s fields, flat: the struct would pad its bool to 8
    // bytes, twice per session.
    max_frame: u64,
    allow_rsv1: bool,
    /// Start of a header split across inputs.
    head: [u8; MAX_HEADER_LEN],
    head_len: u8,
    /// `Some` from the end of a frame's header to the end of its payload.
    current: Option<Current>,
    /// Unmasked payload of the control frame in progress or last completed;
    /// allocated at the first control frame, so a session that never sees
    /// one (most idle ones) does not carry 125 bytes per direction.
    control: Option<Box<[u8; MAX_CONTROL_PAYLOAD]>>,
    control_len: u8,
    /// Inside a fragmented Text/Binary message.
    in_message: bool,
    /// Code of the Close that went this way (1005 if it had none); 0
    /// before one did.
    close_code: u16,
    frames: u64,
    failed: Option<Violation>,
    valid_before_violation: u32,
    /// The rejected frame began in an earlier input, so part of it may
    /// already be forwarded.
    failed_mid_frame: bool,
}

impl Tracker {
    pub fn new(dir: Direction, cfg: TrackerConfig) -> Self {
        Tracker {
            dir,
            max_frame: cfg.max_frame,
            allow_rsv1: cfg.allow_rsv1,
            head: [0; MAX_HEADER_LEN],
            head_len: 0,
            current: None,
            control: None,
            control_len: 0,
            in_message: false,
            close_code: 0,
            frames: 0,
            failed: None,
            valid_before_violation: 0,
            failed_mid_frame: false,
        }
    }

    /// Feeds the next bytes of this direction's stream.
    ///
    /// Returns once all of `data` is consumed, or right after a control
    /// frame ends (`Scan::event`); the caller then feeds
    /// `data[scan.consumed..]`. On `Err`, the first
    /// [`bytes_valid_before_violation`](Self::bytes_valid_before_violation)
    /// bytes of `data` belong to valid frames and may still be forwarded;
    /// every later call returns the same violation.
    pub fn handle(&mut self, data: &[u8]) -> Result<Scan, Violation> {
        if let Some(violation) = self.failed {
            self.valid_before_violation = 0;
            return Err(violation);
        }
        let mut pos = 0;
        // `None` while the current frame began in an earlier input.
        let mut frame_start = None;
        while pos < data.len() {
            let mut cur = match self.current {
                Some(cur) => cur,
                None => {
                    if self.head_len == 0 {
                        frame_start = Some(pos);
                    }
                    let had = usize::from(self.head_len);
                    let (header, header_len) = match self.take_header(&data[pos..]) {
                        Ok(Some(parsed)) => parsed,
                        Ok(None) => break,
                        Err(violation) => return Err(self.fail(violation, frame_start)),
                    };
                    pos += header_len - had;
                    match self.start_frame(&header, header_len) {
                        Ok(cur) => cur,
                        Err(violation) => return Err(self.fail(violation, frame_start)),
                    }
                }
            };

            // Bounded by a usize, so the cast back is exact.
            let take = cur.remaining.min((data.len() - pos) as u64) as usize;
            if cur.opcode.is_control() {
                // check() bounded control payloads to MAX_CONTROL_PAYLOAD.
                let buf = self.control.get_or_insert_with(control_buf);
                let at = usize::from(self.control_len);
                let into = &mut buf[at..at + take];
                into.copy_from_slice(&data[pos..pos + take]);
                if let Some(key) = cur.mask {
                    apply_mask(into, key, at);
                }
                // At most MAX_CONTROL_PAYLOAD (125) in all.
                self.control_len += take as u8;
            }
            pos += take;
            cur.remaining -= take as u64;
            if cur.remaining > 0 {
                self.current = Some(cur);
                continue;
            }
            self.current = None;
            match self.finish_frame(cur.opcode) {
                Ok(None) => {}
                Ok(Some(event)) => return Ok(scan(pos, Some(event), frame_start.unwrap_or(0))),
                Err(violation) => return Err(self.fail(violation, frame_start)),
            }
        }
        // An incomplete header is kept in `self.head`, so all of `data` is used.
        Ok(scan(data.len(), None, 0))
    }

    /// After `handle` returned `Err`: how many leading bytes of that input
    /// belong to complete, valid frames.
    pub fn bytes_valid_before_violation(&self) -> usize {
        self.valid_before_violation as usize
    }

    /// Unmasked payload of the control frame behind the last event. Read it
    /// before feeding more bytes: the next control frame reuses the space.
    pub fn control_payload(&self) -> &[u8] {
        match &self.control {
            Some(buf) => &buf[..usize::from(self.control_len)],
            None => &[],
        }
    }

    /// Everything fed so far ends exactly at a frame end, so a frame the
    /// proxy writes now lands between frames.
    ///
    /// After a violation: whether the forwarded bytes end at a frame end once
    /// the valid prefix is out, that is, whether a Close can still follow
    /// them. False when the rejected frame began in an earlier input.
    pub fn at_frame_boundary(&self) -> bool {
        if self.failed.is_some() {
            return !self.failed_mid_frame;
        }
        self.current.is_none() && self.head_len == 0
    }

    /// At a frame boundary and not inside a fragmented data message.
    pub fn at_message_boundary(&self) -> bool {
        self.at_frame_boundary() && !self.in_message
    }

    pub fn close_seen(&self) -> bool {
        self.close_code != 0
    }

    /// The code of the Close that went this way (1005 for one without).
    pub fn close_code(&self) -> Option<u16> {
        (self.close_code != 0).then_some(self.close_code)
    }

    /// Frames completed so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Payload bytes still to come in the data frame under way; 0 at a
    /// frame boundary, inside a header or a control frame, and after a
    /// violation. These bytes need no inspection, so they may bypass
    /// [`handle`](Self::handle) (see [`skip_payload`](Self::skip_payload)).
    pub fn data_payload_remaining(&self) -> u64 {
        match self.current {
            Some(cur) if !cur.opcode.is_control() && self.failed.is_none() => cur.remaining,
            _ => 0,
        }
    }

    /// Accounts for `n` payload bytes of the current data frame that went
    /// past without being fed (spliced). `n` must not exceed
    /// [`data_payload_remaining`](Self::data_payload_remaining).
    pub fn skip_payload(&mut self, n: u64) {
        assert!(
            n <= self.data_payload_remaining(),
            "skipped past the data frame"
        );
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        cur.remaining -= n;
        if cur.remaining == 0 {
            let opcode = cur.opcode;
            self.current = None;
            // A data frame's end reports nothing and cannot fail.
            let _ = self.finish_frame(opcode);
        }
    }

    /// Bytes fed so far of the frame not yet complete (a partial header,
    /// or a header and part of its payload); 0 at a frame boundary. Not
    /// meaningful after a violation (see `at_frame_boundary`).
    pub fn frame_bytes_fed(&self) -> u64 {
        match self.current {
            Some(cur) => u64::from(cur.header_len) + (cur.len - cur.remaining),
            None => u64::from(self.head_len),
        }
    }

    /// The frame under way is a control frame (its header is complete).
    pub fn in_control_frame(&self) -> bool {
        self.current.is_some_and(|cur| cur.opcode.is_control())
    }

    /// Payload length of the frame under way, once its header is complete.
    pub fn frame_payload_len(&self) -> Option<u64> {
        self.current.map(|cur| cur.len)
    }

    /// Bytes already fed of an unfinished frame that is, or may yet turn out
    /// to be, a control frame: a partial header, or a control frame's header
    /// and payload so far. A caller that wants to swallow a control frame
    /// (the Pong to its own Ping) holds these back instead of forwarding
    /// them; 0 at a frame boundary and inside a data frame.
    pub fn pending_control_bytes(&self) -> usize {
        match self.current {
            None => usize::from(self.head_len),
            Some(cur) if cur.opcode.is_control() => {
                usize::from(cur.header_len) + usize::from(self.control_len)
            }
            Some(_) => 0,
        }
    }

    /// The tracker's position, to continue it elsewhere (a live session
    /// handed to a new process, `session::handoff`); `None` after a
    /// violation, which nothing continues.
    pub fn state(&self) -> Option<TrackerState> {
        if self.failed.is_some() {
            return None;
        }
        let current = self.current.map(|c| FramePos {
            opcode: c.opcode.bits(),
            mask: c.mask,
            header_len: c.header_len,
            len: c.len,
            remaining: c.remaining,
        });
        // The control payload matters only while its frame is under way;
        // a completed one was read at its event.
        let control = if self.in_control_frame() {
            self.control_payload().to_vec()
        } else {
            Vec::new()
        };
        Some(TrackerState {
            max_frame: self.max_frame,
            allow_rsv1: self.allow_rsv1,
            head: self.head[..usize::from(self.head_len)].to_vec(),
            current,
            control,
            in_message: self.in_message,
            close_code: self.close_code,
            frames: self.frames,
        })
    }

    /// A tracker continuing at `st`, which came from another process:
    /// checked as strictly as a header would be, so a forged or corrupt
    /// state is refused rather than trusted.
    pub fn from_state(dir: Direction, st: &TrackerState) -> Result<Tracker, &'static str> {
        let mut t = Tracker::new(
            dir,
            TrackerConfig {
                max_frame: st.max_frame,
                allow_rsv1: st.allow_rsv1,
            },
        );
        if st.head.len() >= MAX_HEADER_LEN {
            return Err("partial header too long");
        }
        if !st.head.is_empty() && st.current.is_some() {
            return Err("partial header inside a frame");
        }
        if st.close_code != 0 && st.close_code != 1005 && !close::is_valid_code(st.close_code) {
            return Err("bad close code");
        }
        t.head[..st.head.len()].copy_from_slice(&st.head);
        t.head_len = st.head.len() as u8;
        t.in_message = st.in_message;
        t.close_code = st.close_code;
        t.frames = st.frames;
        if let Some(c) = st.current {
            let opcode = OpCode::from_bits(c.opcode);
            if c.opcode > 0x0f || matches!(opcode, OpCode::Reserved(_)) {
                return Err("bad opcode");
            }
            if !(2..=MAX_HEADER_LEN as u8).contains(&c.header_len) {
                return Err("bad header length");
            }
            if c.remaining > c.len || c.len > st.max_frame {
                return Err("bad frame length");
            }
            if c.mask.is_some() != (dir == Direction::ToConman) {
                return Err("mask does not match the direction");
            }
            if opcode.is_control() {
                let fed = c.len - c.remaining;
                if c.len > MAX_CONTROL_PAYLOAD as u64 || st.control.len() as u64 != fed {
                    return Err("bad control frame");
                }
                let mut buf = control_buf();
                buf[..st.control.len()].copy_from_slice(&st.control);
                t.control = Some(buf);
                t.control_len = st.control.len() as u8;
            } else if !st.control.is_empty() {
                return Err("control payload in a data frame");
            }
            t.current = Some(Current {
                opcode,
                mask: c.mask,
                header_len: c.header_len,
                len: c.len,
                remaining: c.remaining,
            });
        } else if !st.control.is_empty() {
            return Err("control payload between frames");
        }
        Ok(t)
    }

    /// Completes the header that starts with `self.head[..self.head_len]`
    /// and continues at `data`; returns it with its whole length. Keeps a
    /// partial header in `self.head`.
    fn take_header(&mut self, data: &[u8]) -> Result<Option<(FrameHeader, usize)>, Violation> {
        if self.head_len == 0 {
            // Common case: the whole header is in this input, no copy.
            if let Some(parsed) = FrameHeader::parse(data).map_err(|_| BAD_LENGTH)? {
                return Ok(Some(parsed));
            }
        }
        let had = usize::from(self.head_len);
        let add = (MAX_HEADER_LEN - had).min(data.len());
        self.head[had..had + add].copy_from_slice(&data[..add]);
        match FrameHeader::parse(&self.head[..had + add]).map_err(|_| BAD_LENGTH)? {
            Some(parsed) => {
                self.head_len = 0;
                Ok(Some(parsed))
            }
            None => {
                // A full MAX_HEADER_LEN always parses, so `add` was all of `data`.
                self.head_len = (had + add) as u8;
                Ok(None)
            }
        }
    }

    /// Checks a complete header and begins its frame.
    fn start_frame(
        &mut self,
        header: &FrameHeader,
        header_len: usize,
    ) -> Result<Current, Violation> {
        self.check(header)?;
        if header.opcode.is_control() {
            self.control_len = 0;
        } else {
            // Later headers are only checked once this frame has ended, so
            // the message state can move on already.
            self.in_message = !header.fin;
        }
        Ok(Current {
            opcode: header.opcode,
            mask: header.mask,
            header_len: header_len as u8,
            len: header.payload_len,
            remaining: header.payload_len,
        })
    }

    fn check(&self, header: &FrameHeader) -> Result<(), Violation> {
        if self.close_seen() {
            return Err(DATA_AFTER_CLOSE);
        }
        if let OpCode::Reserved(_) = header.opcode {
            return Err(RESERVED_OPCODE);
        }
        match (self.dir, header.mask) {
            (Direction::ToConman, None) => return Err(UNMASKED_FRAME),
            (Direction::ToClient, Some(_)) => return Err(MASKED_FRAME),
            _ => {}
        }
        let rsv1_allowed = self.allow_rsv1
            && matches!(header.opcode, OpCode::Text | OpCode::Binary)
            && !self.in_message;
        if header.rsv & !RSV1 != 0 || (header.rsv & RSV1 != 0 && !rsv1_allowed) {
            return Err(RSV_BITS);
        }
        if header.opcode.is_control() {
            if header.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(CONTROL_TOO_LONG);
            }
            if !header.fin {
                return Err(FRAGMENTED_CONTROL);
            }
        } else {
            match (header.opcode, self.in_message) {
                (OpCode::Continuation, false) => return Err(UNEXPECTED_CONTINUATION),
                (OpCode::Text | OpCode::Binary, true) => return Err(EXPECTED_CONTINUATION),
                _ => {}
            }
        }
        if header.payload_len > self.max_frame {
            return Err(FRAME_TOO_BIG);
        }
        Ok(())
    }

    /// Ends a frame whose payload is all in; reports control frames.
    fn finish_frame(&mut self, opcode: OpCode) -> Result<Option<Event>, Violation> {
        let event = match opcode {
            OpCode::Ping => Some(Event::Ping),
            OpCode::Pong => Some(Event::Pong),
            OpCode::Close => {
                let code = match close::parse_close_payload(self.control_payload()) {
                    Ok(parsed) => parsed.map(|(code, _)| code),
                    Err(CloseError::InvalidUtf8) => return Err(BAD_CLOSE_UTF8),
                    Err(CloseError::Truncated | CloseError::InvalidCode(_)) => {
                        return Err(BAD_CLOSE_PAYLOAD)
                    }
                };
                self.close_code = code.unwrap_or(1005);
                Some(Event::Close {
                    code,
                    reason_len: usize::from(self.control_len).saturating_sub(2),
                })
            }
            _ => None,
        };
        self.frames += 1;
        Ok(event)
    }

    /// Records a violation by the frame that began at `frame_start` in the
    /// current input (`None`: in an earlier one).
    fn fail(&mut self, violation: Violation, frame_start: Option<usize>) -> Violation {
        self.failed = Some(violation);
        // Inputs are receive buffers or setup leftovers, far below 4 GiB.
        self.valid_before_violation = frame_start.unwrap_or(0) as u32;
        self.failed_mid_frame = frame_start.is_none();
        violation
    }
}

fn scan(consumed: usize, event: Option<Event>, frame_start: usize) -> Scan {
    Scan {
        consumed,
        event,
        frame_start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::write_control;
    use proptest::prelude::*;
    use rstest::rstest;
    use std::collections::BTreeSet;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const MAX_FRAME: u64 = 1 << 20;

    fn cfg(allow_rsv1: bool) -> TrackerConfig {
        TrackerConfig {
            max_frame: MAX_FRAME,
            allow_rsv1,
        }
    }

    fn key_for(dir: Direction) -> Option<[u8; 4]> {
        match dir {
            Direction::ToConman => Some(KEY),
            Direction::ToClient => None,
        }
    }

    /// A whole frame as a peer would send it.
    fn frame(fin: bool, rsv: u8, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let header = FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = header.encode(&mut head);
        let mut out = head[..n].to_vec();
        out.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut out[n..], key, 0);
        }
        out
    }

    fn data(dir: Direction, fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        frame(fin, 0, opcode, payload, key_for(dir))
    }

    fn control(dir: Direction, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_control(&mut out, opcode, payload, key_for(dir));
        out
    }

    /// An event with the unmasked control payload it came with.
    type Report = (Event, Vec<u8>);
    type Seen = Vec<Report>;
    type Control = (OpCode, Vec<u8>);

    /// Feeds `bytes` in one input, looping over events. On a violation,
    /// returns it with the absolute count of valid bytes before it.
    fn feed(tracker: &mut Tracker, bytes: &[u8]) -> Result<Seen, (Violation, usize)> {
        let mut seen = Vec::new();
        let mut at = 0;
        loop {
            match tracker.handle(&bytes[at..]) {
                Ok(scan) => {
                    at += scan.consumed;
                    if let Some(event) = scan.event {
                        seen.push((event, tracker.control_payload().to_vec()));
                    }
                    if at == bytes.len() {
                        return Ok(seen);
                    }
                }
                Err(v) => return Err((v, at + tracker.bytes_valid_before_violation())),
            }
        }
    }

    fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    const C: Direction = Direction::ToConman;
    const S: Direction = Direction::ToClient;

    #[rstest]
    #[case::unmasked_to_conman(C, false, vec![], frame(true, 0, OpCode::Binary, b"x", None), 1002, "unmasked_frame")]
    #[case::masked_to_client(S, false, vec![], frame(true, 0, OpCode::Binary, b"x", Some(KEY)), 1002, "masked_frame")]
    #[case::unmasked_ping_to_conman(C, false, vec![], frame(true, 0, OpCode::Ping, b"", None), 1002, "unmasked_frame")]
    #[case::reserved_data_opcode(S, false, vec![], frame(true, 0, OpCode::Reserved(3), b"", None), 1002, "reserved_opcode")]
    #[case::reserved_control_opcode(C, false, vec![], frame(true, 0, OpCode::Reserved(11), b"", Some(KEY)), 1002, "reserved_opcode")]
    #[case::control_too_long(S, false, vec![], frame(true, 0, OpCode::Ping, &[0; 126], None), 1002, "control_too_long")]
    #[case::fragmented_control(C, false, vec![], frame(false, 0, OpCode::Pong, b"", Some(KEY)), 1002, "fragmented_control")]
    #[case::rsv1_without_deflate(S, false, vec![], frame(true, 0b100, OpCode::Text, b"", None), 1002, "rsv_bits")]
    #[case::rsv2(S, true, vec![], frame(true, 0b010, OpCode::Binary, b"", None), 1002, "rsv_bits")]
    #[case::rsv3(C, true, vec![], frame(true, 0b001, OpCode::Binary, b"", Some(KEY)), 1002, "rsv_bits")]
    #[case::rsv1_on_control(S, true, vec![], frame(true, 0b100, OpCode::Ping, b"", None), 1002, "rsv_bits")]
    #[case::rsv1_on_continuation(
        S, true,
        vec![frame(false, 0b100, OpCode::Text, b"a", None)],
        frame(true, 0b100, OpCode::Continuation, b"b", None),
        1002, "rsv_bits"
    )]
    #[case::frame_too_big(S, false, vec![data(S, true, OpCode::Text, b"ok")], vec![0x82, 127, 0, 0, 0, 0, 0, 0x10, 0, 1], 1009, "frame_too_big")]
    #[case::length_msb_set(S, false, vec![], vec![0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], 1002, "bad_length")]
    #[case::close_one_byte(C, false, vec![], frame(true, 0, OpCode::Close, &[3], Some(KEY)), 1002, "bad_close_payload")]
    #[case::close_code_1005(S, false, vec![], frame(true, 0, OpCode::Close, &[0x03, 0xed], None), 1002, "bad_close_payload")]
    #[case::close_code_999(S, false, vec![], frame(true, 0, OpCode::Close, &[0x03, 0xe7], None), 1002, "bad_close_payload")]
    #[case::close_reason_not_utf8(C, false, vec![], frame(true, 0, OpCode::Close, &[0x03, 0xe8, 0xc0, 0x80], Some(KEY)), 1007, "bad_close_payload")]
    #[case::unexpected_continuation(S, false, vec![data(S, true, OpCode::Text, b"done")], data(S, true, OpCode::Continuation, b"x"), 1002, "unexpected_continuation")]
    #[case::expected_continuation(
        C, false,
        vec![data(C, false, OpCode::Text, b"part"), control(C, OpCode::Ping, b"p")],
        data(C, true, OpCode::Binary, b"new"),
        1002, "expected_continuation"
    )]
    #[case::data_after_close(
        S, false,
        vec![control(S, OpCode::Close, &[0x03, 0xe8])],
        control(S, OpCode::Ping, b""),
        1002, "data_after_close"
    )]
    fn violations(
        #[case] dir: Direction,
        #[case] allow_rsv1: bool,
        #[case] valid: Vec<Vec<u8>>,
        #[case] bad: Vec<u8>,
        #[case] code: u16,
        #[case] reason: &str,
    ) {
        let valid = concat(&valid);
        let mut stream = valid.clone();
        stream.extend_from_slice(&bad);
        stream.extend_from_slice(&data(dir, true, OpCode::Binary, b"after"));

        for split in [None, Some(valid.len() + 1)] {
            let mut tracker = Tracker::new(dir, cfg(allow_rsv1));
            let result = match split {
                None => feed(&mut tracker, &stream),
                // The bad frame's first byte arrives with the valid prefix.
                Some(at) => feed(&mut tracker, &stream[..at])
                    .map_err(|(v, _)| (v, usize::MAX))
                    .and_then(|_| feed(&mut tracker, &stream[at..]).map_err(|(v, n)| (v, n + at))),
            };
            let (violation, valid_len) = result.expect_err("stream must be rejected");
            assert_eq!((violation.code, violation.as_str()), (code, reason));
            let expected_valid = match split {
                None => valid.len(),
                // The bad frame began in the earlier input.
                Some(at) => at,
            };
            assert_eq!(valid_len, expected_valid);
            // A Close can follow the valid prefix unless part of the bad
            // frame went out with an earlier input.
            assert_eq!(tracker.at_frame_boundary(), split.is_none());
            assert_eq!(tracker.handle(b"more"), Err(violation), "violations stick");
            assert_eq!(tracker.bytes_valid_before_violation(), 0);
        }
    }

    proptest! {
        /// Skipping a data frame's payload leaves the tracker exactly where
        /// feeding the same bytes would: same boundary, same frame count,
        /// and the next frame is checked as usual.
        #[test]
        fn skip_payload_equals_feeding(
            payload_len in 1usize..5000,
            split in 0usize..5000,
            dir in prop_oneof![Just(Direction::ToConman), Just(Direction::ToClient)],
        ) {
            let split = split.min(payload_len);
            let payload = vec![7u8; payload_len];
            let first = data(dir, true, OpCode::Binary, &payload);
            let next = data(dir, true, OpCode::Text, b"hi");
            let header_len = first.len() - payload_len;
            let mut fed = Tracker::new(dir, cfg(false));
            fed.handle(&first).unwrap();
            let mut skipped = Tracker::new(dir, cfg(false));
            skipped.handle(&first[..header_len + split]).unwrap();
            prop_assert_eq!(skipped.data_payload_remaining(), (payload_len - split) as u64);
            skipped.skip_payload((payload_len - split) as u64);
            prop_assert_eq!(skipped.data_payload_remaining(), 0);
            prop_assert!(skipped.at_frame_boundary());
            prop_assert_eq!(skipped.frames(), fed.frames());
            prop_assert!(skipped.handle(&next).is_ok());
            prop_assert_eq!(skipped.frames(), 2);
        }
    }

    #[test]
    fn control_frames_are_never_skippable() {
        let dir = Direction::ToClient;
        let ping = control(dir, OpCode::Ping, b"12345");
        let mut t = Tracker::new(dir, cfg(false));
        t.handle(&ping[..3]).unwrap();
        assert_eq!(t.data_payload_remaining(), 0);
    }

    #[test]
    fn rsv1_starts_a_message_when_deflate_is_negotiated() {
        let stream = concat(&[
            frame(false, 0b100, OpCode::Text, b"a", Some(KEY)),
            frame(true, 0, OpCode::Continuation, b"b", Some(KEY)),
            frame(true, 0b100, OpCode::Binary, b"c", Some(KEY)),
        ]);
        let mut tracker = Tracker::new(C, cfg(true));
        assert_eq!(feed(&mut tracker, &stream), Ok(vec![]));
        assert_eq!(tracker.frames(), 3);
    }

    #[test]
    fn frame_of_exactly_max_frame_is_accepted() {
        let mut tracker = Tracker::new(S, cfg(false));
        let head = [0x82, 127, 0, 0, 0, 0, 0, 0x10, 0, 0];
        assert!(tracker.handle(&head).is_ok());
        assert!(!tracker.at_frame_boundary());
    }

    #[rstest]
    #[case::ping(OpCode::Ping, b"hello".as_slice(), Event::Ping)]
    #[case::empty_ping(OpCode::Ping, b"".as_slice(), Event::Ping)]
    #[case::pong(OpCode::Pong, [7u8; 125].as_slice(), Event::Pong)]
    #[case::close_empty(OpCode::Close, b"".as_slice(), Event::Close { code: None, reason_len: 0 })]
    #[case::close_code(OpCode::Close, b"\x03\xe8".as_slice(), Event::Close { code: Some(1000), reason_len: 0 })]
    #[case::close_reason(OpCode::Close, b"\x0f\xa0bye \xc3\xa9".as_slice(), Event::Close { code: Some(4000), reason_len: 6 })]
    fn control_events(
        #[case] opcode: OpCode,
        #[case] payload: &[u8],
        #[case] expected: Event,
        #[values(Direction::ToConman, Direction::ToClient)] dir: Direction,
    ) {
        let before = data(dir, true, OpCode::Binary, b"lead");
        let ctl = control(dir, opcode, payload);
        let after = data(dir, true, OpCode::Text, b"");
        let stream = concat(&[before.clone(), ctl.clone(), after.clone()]);
        let mut tracker = Tracker::new(dir, cfg(false));

        let scan = tracker.handle(&stream).unwrap();
        assert_eq!(scan.event, Some(expected));
        assert_eq!(scan.frame_start, before.len());
        assert_eq!(scan.consumed, before.len() + ctl.len());
        assert_eq!(tracker.control_payload(), payload, "unmasked copy");
        assert!(tracker.at_frame_boundary());
        assert_eq!(tracker.close_seen(), opcode == OpCode::Close);

        let rest = tracker.handle(&stream[scan.consumed..]);
        if opcode == OpCode::Close {
            assert_eq!(rest, Err(DATA_AFTER_CLOSE));
        } else {
            assert_eq!(rest.unwrap(), scan_of(after.len(), None, 0));
            assert_eq!(tracker.frames(), 3);
        }
    }

    fn scan_of(consumed: usize, event: Option<Event>, frame_start: usize) -> Scan {
        Scan {
            consumed,
            event,
            frame_start,
        }
    }

    #[test]
    fn control_frame_split_across_inputs_reports_start_zero() {
        let ping = control(C, OpCode::Ping, b"abcdefgh");
        let mut tracker = Tracker::new(C, cfg(false));
        assert_eq!(tracker.handle(&ping[..1]), Ok(scan_of(1, None, 0)));
        assert_eq!(tracker.pending_control_bytes(), 1);
        assert_eq!(tracker.handle(&ping[1..9]), Ok(scan_of(8, None, 0)));
        assert_eq!(tracker.pending_control_bytes(), 9);
        assert!(!tracker.at_frame_boundary());
        let scan = tracker.handle(&ping[9..]).unwrap();
        assert_eq!(scan, scan_of(ping.len() - 9, Some(Event::Ping), 0));
        assert_eq!(tracker.control_payload(), b"abcdefgh");
        assert_eq!(tracker.pending_control_bytes(), 0);
    }

    #[test]
    fn data_frame_payload_is_not_pending_control() {
        let mut tracker = Tracker::new(S, cfg(false));
        tracker
            .handle(&data(S, true, OpCode::Binary, &[0; 50])[..20])
            .unwrap();
        assert_eq!(tracker.pending_control_bytes(), 0);
        assert!(!tracker.at_frame_boundary());
    }

    #[test]
    fn message_boundary_follows_fragmentation() {
        let mut tracker = Tracker::new(S, cfg(false));
        assert!(tracker.at_message_boundary());
        feed(&mut tracker, &data(S, false, OpCode::Text, b"a")).unwrap();
        assert!(tracker.at_frame_boundary());
        assert!(!tracker.at_message_boundary());
        feed(&mut tracker, &control(S, OpCode::Ping, b"")).unwrap();
        assert!(!tracker.at_message_boundary());
        feed(&mut tracker, &data(S, false, OpCode::Continuation, b"b")).unwrap();
        assert!(!tracker.at_message_boundary());
        let last = data(S, true, OpCode::Continuation, b"c");
        tracker.handle(&last[..2]).unwrap();
        assert!(!tracker.at_message_boundary(), "inside the last fragment");
        tracker.handle(&last[2..]).unwrap();
        assert!(tracker.at_message_boundary());
        assert_eq!(tracker.frames(), 4);
    }

    #[test]
    fn hundred_mib_frame_streams_through_small_chunks() {
        const LEN: u64 = 100 << 20;
        let mut tracker = Tracker::new(
            S,
            TrackerConfig {
                max_frame: LEN,
                allow_rsv1: false,
            },
        );
        let mut head = [0u8; MAX_HEADER_LEN];
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: OpCode::Binary,
            mask: None,
            payload_len: LEN,
        };
        let n = header.encode(&mut head);
        tracker.handle(&head[..n]).unwrap();
        let chunk = [0u8; 16 << 10];
        for _ in 0..LEN / chunk.len() as u64 {
            assert!(!tracker.at_frame_boundary());
            assert_eq!(tracker.handle(&chunk).unwrap().consumed, chunk.len());
        }
        assert!(tracker.at_frame_boundary());
        assert_eq!(tracker.frames(), 1);
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        let mut stream = vec![0x82, 126, 0, 3, 1, 2, 3];
        stream.extend_from_slice(&[0x89, 127, 0, 0, 0, 0, 0, 0, 0, 2, 9, 9]);
        let mut tracker = Tracker::new(S, cfg(false));
        let scan = tracker.handle(&stream).unwrap();
        assert_eq!(scan, scan_of(stream.len(), Some(Event::Ping), 7));
        assert_eq!(tracker.pending_control_bytes(), 0);
        assert_eq!(tracker.control_payload(), [9, 9]);
    }

    #[test]
    fn direction_labels() {
        assert_eq!(Direction::ToConman.as_str(), "to_conman");
        assert_eq!(Direction::ToClient.as_str(), "to_client");
    }

    // ---- property tests: valid streams fed in arbitrary chunks ----

    #[derive(Clone, Debug)]
    struct Message {
        text: bool,
        rsv1: bool,
        /// Payload length of each fragment, and a control frame sent after it.
        fragments: Vec<(usize, Option<Control>)>,
    }

    #[derive(Clone, Debug)]
    struct Stream {
        dir: Direction,
        allow_rsv1: bool,
        messages: Vec<Message>,
        close: Option<Option<(u16, String)>>,
        key_seed: u32,
    }

    /// The bytes of a stream and what the tracker must report.
    struct Expected {
        bytes: Vec<u8>,
        /// (start, end, event and unmasked payload) per frame.
        frames: Vec<(usize, usize, Option<Report>)>,
        frame_ends: BTreeSet<usize>,
        message_ends: BTreeSet<usize>,
    }

    impl Stream {
        fn encode(&self) -> Expected {
            let mut out = Expected {
                bytes: Vec::new(),
                frames: Vec::new(),
                frame_ends: BTreeSet::from([0]),
                message_ends: BTreeSet::from([0]),
            };
            let push = |out: &mut Expected, fin, rsv, opcode, payload: &[u8], open: bool| {
                let key = match self.dir {
                    Direction::ToConman => {
                        let n = self.key_seed.wrapping_mul(out.frames.len() as u32 + 1);
                        Some(n.rotate_left(7).to_le_bytes())
                    }
                    Direction::ToClient => None,
                };
                let start = out.bytes.len();
                out.bytes.extend(frame(fin, rsv, opcode, payload, key));
                let end = out.bytes.len();
                let event = match opcode {
                    OpCode::Ping => Some(Event::Ping),
                    OpCode::Pong => Some(Event::Pong),
                    OpCode::Close => Some(Event::Close {
                        code: close::parse_close_payload(payload).unwrap().map(|(c, _)| c),
                        reason_len: payload.len().saturating_sub(2),
                    }),
                    _ => None,
                };
                out.frames
                    .push((start, end, event.map(|e| (e, payload.to_vec()))));
                out.frame_ends.insert(end);
                if !open {
                    out.message_ends.insert(end);
                }
            };
            for m in &self.messages {
                let last = m.fragments.len() - 1;
                for (i, (len, ctl)) in m.fragments.iter().enumerate() {
                    let opcode = match (i, m.text) {
                        (0, true) => OpCode::Text,
                        (0, false) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    let rsv = if i == 0 && m.rsv1 && self.allow_rsv1 {
                        RSV1
                    } else {
                        0
                    };
                    let payload: Vec<u8> = (0..*len).map(|b| (b * 31 + 7) as u8).collect();
                    push(&mut out, i == last, rsv, opcode, &payload, i != last);
                    if let Some((op, p)) = ctl {
                        push(&mut out, true, 0, *op, p, i != last);
                    }
                }
            }
            if let Some(close) = &self.close {
                let mut payload = Vec::new();
                if let Some((code, reason)) = close {
                    payload.extend_from_slice(&code.to_be_bytes());
                    payload.extend_from_slice(reason.as_bytes());
                }
                push(&mut out, true, 0, OpCode::Close, &payload, false);
            }
            out
        }
    }

    fn any_control() -> impl Strategy<Value = Control> {
        (
            prop_oneof![Just(OpCode::Ping), Just(OpCode::Pong)],
            prop::collection::vec(any::<u8>(), 0..=MAX_CONTROL_PAYLOAD),
        )
    }

    fn any_stream(max_len: usize, max_messages: usize) -> impl Strategy<Value = Stream> {
        // Weighted so every length encoding (7, 16 and 64 bits) shows up.
        let len = prop_oneof![
            4 => 0..126usize.min(max_len),
            2 => 0..max_len,
            1 => max_len.saturating_sub(5000)..max_len,
        ];
        let message = (
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec((len, prop::option::weighted(0.3, any_control())), 1..4),
        )
            .prop_map(|(text, rsv1, fragments)| Message {
                text,
                rsv1,
                fragments,
            });
        let code = prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999];
        let close = prop::option::of(prop::option::of((code, "[a-z é€]{0,40}")));
        (
            prop_oneof![Just(Direction::ToConman), Just(Direction::ToClient)],
            any::<bool>(),
            prop::collection::vec(message, 0..max_messages),
            close,
            any::<u32>(),
        )
            .prop_map(|(dir, allow_rsv1, messages, close, key_seed)| Stream {
                dir,
                allow_rsv1,
                messages,
                close,
                key_seed,
            })
    }

    /// Feeds the stream cut into inputs of the given lengths (the last one
    /// repeats) and checks every report against `expected`.
    fn check(stream: &Stream, expected: &Expected, cuts: &[usize]) -> Result<(), TestCaseError> {
        let bytes = &expected.bytes;
        let mut tracker = Tracker::new(
            stream.dir,
            TrackerConfig {
                max_frame: 70_000,
                allow_rsv1: stream.allow_rsv1,
            },
        );
        let mut seen = Vec::new();
        let mut off = 0;
        let mut cut = cuts
            .iter()
            .chain(std::iter::repeat(cuts.last().unwrap_or(&1)));
        while off < bytes.len() {
            let input = &bytes[off..(off + *cut.next().unwrap_or(&1)).min(bytes.len())];
            let mut at = 0;
            while at < input.len() {
                let scan = tracker
                    .handle(&input[at..])
                    .map_err(|v| TestCaseError::fail(format!("{v} at {}", off + at)))?;
                let base = off + at;
                at += scan.consumed;
                let pos = off + at;
                prop_assert_eq!(
                    tracker.at_frame_boundary(),
                    expected.frame_ends.contains(&pos)
                );
                prop_assert_eq!(
                    tracker.at_message_boundary(),
                    expected.message_ends.contains(&pos)
                );
                match scan.event {
                    Some(event) => {
                        let (start, _, _) = expected
                            .frames
                            .iter()
                            .find(|(_, end, _)| *end == pos)
                            .ok_or_else(|| TestCaseError::fail("event not at a frame end"))?;
                        let frame_start = start.checked_sub(base).unwrap_or(0);
                        prop_assert_eq!(scan.frame_start, frame_start);
                        seen.push((event, tracker.control_payload().to_vec()));
                    }
                    None => prop_assert_eq!(at, input.len()),
                }
            }
            off += input.len();
        }
        let events: Vec<_> = expected.frames.iter().filter_map(|f| f.2.clone()).collect();
        prop_assert_eq!(seen, events);
        prop_assert_eq!(tracker.frames(), expected.frames.len() as u64);
        prop_assert!(tracker.at_frame_boundary());
        prop_assert!(tracker.at_message_boundary());
        prop_assert_eq!(tracker.close_seen(), stream.close.is_some());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn valid_streams_in_random_chunks(
            stream in any_stream(70_000, 6),
            cuts in prop::collection::vec(1usize..20_000, 1..16),
        ) {
            let expected = stream.encode();
            check(&stream, &expected, &cuts)?;
            check(&stream, &expected, &[expected.bytes.len().max(1)])?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn small_streams_split_at_every_offset(stream in any_stream(300, 3)) {
            let expected = stream.encode();
            let len = expected.bytes.len();
            for split in 1..len {
                check(&stream, &expected, &[split, len])?;
            }
            check(&stream, &expected, &[1])?;
        }
    }
}
