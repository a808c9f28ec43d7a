//! One session's state, owned by one struct so that it stays small, explicit
//! and (later) movable to another process at a frame boundary.
//!
//! The shard feeds completions in and performs the IO this state asks for;
//! protocol decisions (what a side's EOF means, what Close to inject) are
//! made here from pure inputs.

use std::os::fd::RawFd;
use std::time::Instant;

use crate::error::{SetupError, Stage};
use crate::proto::close;
use crate::proto::relay::{Direction, Tracker};

mod sendq;
pub use sendq::SendQ;

/// Lifecycle of a session, in order. Transitions only move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Reading the client's request head.
    Head,
    /// 101 sent; waiting for the control shard to say where the repl lives.
    Placement,
    /// Dialing Conman.
    Connecting,
    /// TCP to Conman up; waiting for its 101.
    ConmanHandshake,
    /// A Conman attempt failed; waiting (with jitter) before asking for a
    /// new placement that excludes the failed VM.
    Backoff,
    /// Relaying frames both ways.
    Relay,
    /// Ending: queues drain, write sides shut, then sockets close.
    Closing,
}

/// Bytes queued toward a socket: a slice of a provided buffer (zero-copy
/// relay) or bytes the proxy wrote itself (handshakes, injected frames).
pub enum Chunk {
    Buf { bid: u16, off: u32, len: u32 },
    Owned { data: Box<[u8]>, off: u32 },
}

/// Most chunks one gathered send takes.
pub const GATHER_MAX: usize = 16;

/// Kernel-visible memory of one `sendmsg`: it must stay put until the send
/// completes, so it lives in its own allocation.
pub struct Gather {
    pub iov: [libc::iovec; GATHER_MAX],
    pub msg: libc::msghdr,
}

impl Gather {
    pub fn new() -> Box<Gather> {
        // SAFETY: iovec and msghdr are plain C structs; all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

impl Chunk {
    pub fn remaining(&self) -> usize {
        match self {
            Chunk::Buf { len, .. } => *len as usize,
            Chunk::Owned { data, off } => data.len() - *off as usize,
        }
    }
}

/// One socket of a session and everything in flight on it.
pub struct Side {
    pub fd: RawFd,
    /// io_uring operations submitted on `fd` and not yet completed; the fd
    /// is closed only when this is zero.
    pub inflight: u16,
    pub recv_armed: bool,
    /// Receiving paused (backpressure, held-bytes bound, buffer shortage).
    pub paused: bool,
    pub cancel_pending: bool,
    pub sendq: SendQ,
    pub queued: usize,
    pub sending: bool,
    /// iovecs of a gathered send in flight; allocated the first time a side
    /// has more than one chunk queued, so idle sessions never carry it.
    pub gather: Option<Box<Gather>>,
    /// The peer sent FIN (or the socket failed).
    pub eof: bool,
    /// The next receive is a single-buffer one (see `arm_recv`).
    pub probe: bool,
    /// O_NONBLOCK has been set (splice(2) needs it; io_uring does not).
    pub nonblocking: bool,
    /// This side's current data frame is being spliced to the other side.
    pub splice: Option<Box<Splice>>,
    /// We shut down our write side once the queue drained.
    pub want_shut: bool,
    pub shut: bool,
    pub closed: bool,
}

impl Side {
    pub fn new(fd: RawFd) -> Side {
        Side {
            fd,
            inflight: 0,
            recv_armed: false,
            paused: false,
            cancel_pending: false,
            sendq: SendQ::default(),
            queued: 0,
            sending: false,
            gather: None,
            eof: false,
            probe: false,
            nonblocking: false,
            splice: None,
            want_shut: false,
            shut: false,
            closed: fd < 0,
        }
    }

    pub fn push(&mut self, c: Chunk) {
        self.queued += c.remaining();
        self.sendq.push_back(c);
    }

    pub fn push_owned(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.push(Chunk::Owned {
                data: data.into_boxed_slice(),
                off: 0,
            });
        }
    }

    pub fn drained(&self) -> bool {
        self.sendq.is_empty() && !self.sending
    }
}

/// A pipe for splice(2); both ends are closed on drop.
pub struct Pipe {
    pub r: RawFd,
    pub w: RawFd,
    /// Bytes it holds at most.
    pub cap: u32,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: both ends are ours and closed only here.
        unsafe {
            libc::close(self.r);
            libc::close(self.w);
        }
    }
}

/// A side in splice mode: the payload of its current data frame goes
/// socket → pipe → the other side's socket without entering user space.
pub struct Splice {
    pub pipe: Pipe,
    /// Bytes in the pipe not yet written to the other side.
    pub in_pipe: u32,
    /// The multishot receive has ended and what it delivered is sent:
    /// bytes now flow through the pipe only.
    pub started: bool,
    /// A POLLIN on this side's socket is in flight.
    pub poll_in: bool,
    /// A POLLOUT on the other side's socket is in flight.
    pub poll_out: bool,
}

pub struct Session {
    pub id: u64,
    pub gen: u16,
    pub phase: Phase,
    pub client: Side,
    pub conman: Side,
    /// Request head while reading it; Conman's response head later.
    pub head: Vec<u8>,
    /// Client bytes received during setup, delivered in order once relaying.
    pub held: Vec<u8>,
    pub to_conman: Tracker,
    pub to_client: Tracker,
    pub deadline: Option<Instant>,
    pub started: Instant,
    pub phase_started: Instant,
    /// What the token said (repl, user, cluster), for headers, logs and
    /// the registry; shared with the shard's verification cache.
    pub ident: Option<std::sync::Arc<crate::keys::Ident>>,
    /// Setup state that only exists while connecting.
    pub setup: Option<Box<Setup>>,
    /// Close frames the proxy itself queued, per side.
    pub injected_close_to_client: bool,
    pub injected_close_to_conman: bool,
    pub counted_active: bool,
    /// The request head is complete and its token waits for the end of the
    /// loop turn's batch verification.
    pub verify_pending: bool,
}

/// Setup state, alive from the 101 until relaying starts: retries, the
/// placement in use, kernel-visible memory for the connect op, and the
/// handshake to check.
pub struct Setup {
    /// The whole setup must finish by then.
    pub deadline: Instant,
    /// Conman attempts started so far.
    pub attempt: u8,
    /// The placement request awaiting its reply.
    pub request_id: u64,
    /// VM of the current attempt, and the one that failed last.
    pub vm: Option<String>,
    pub exclude: Option<String>,
    pub backoff_done: bool,
    pub last_error: Option<crate::error::SetupError>,
    pub addr: socket2::SockAddr,
    pub timeout: io_uring::types::Timespec,
    pub expected_accept: String,
    pub request: Vec<u8>,
    pub protocol: Option<String>,
    pub forwarded_for: String,
    /// Upstream-first: the client still waits for its 101, with this
    /// Sec-WebSocket-Accept; its offers go to Conman as they are.
    pub client_accept: Option<String>,
    pub offered_protocols: Vec<String>,
    pub offered_extensions: Option<String>,
}

/// Full-jitter exponential backoff before Conman attempt `attempt` (1 for
/// the first retry): uniform in `[0, min(cap, base * 2^(attempt-1))]`,
/// given a uniform `unit` in [0, 1).
pub fn backoff(attempt: u8, base_ms: u64, cap_ms: u64, unit: f64) -> std::time::Duration {
    let exp = base_ms.saturating_mul(1u64 << (attempt.saturating_sub(1)).min(20));
    let ceiling = exp.min(cap_ms) as f64;
    std::time::Duration::from_micros((ceiling * 1000.0 * unit.clamp(0.0, 1.0)) as u64)
}

impl Session {
    pub fn tracker(&mut self, dir: Direction) -> &mut Tracker {
        match dir {
            Direction::ToConman => &mut self.to_conman,
            Direction::ToClient => &mut self.to_client,
        }
    }
}

/// What to do when a side's stream ends without a Close frame, decided from
/// whether the stream toward the other side is at a frame boundary.
#[derive(Debug, PartialEq, Eq)]
pub enum EofAction {
    /// Inject this Close toward the other side, then shut it down.
    InjectClose { code: u16, reason: String },
    /// Mid-frame: a Close cannot be injected, end the TCP stream cleanly.
    Shutdown,
}

/// Source side `from` ended (FIN or error) during relay.
pub fn on_eof(from_client: bool, peer_stream_at_boundary: bool, close_already: bool) -> EofAction {
    if close_already || !peer_stream_at_boundary {
        return EofAction::Shutdown;
    }
    if from_client {
        // Conman only needs to know the client left.
        EofAction::InjectClose {
            code: close::GOING_AWAY,
            reason: close::reason_text("client_gone", "eof", None),
        }
    } else {
        let e = SetupError::new(Stage::Relay, "conman_lost");
        EofAction::InjectClose {
            code: e.close_code(),
            reason: e.close_reason(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conman_lost_at_boundary_closes_1014() {
        match on_eof(false, true, false) {
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
            on_eof(true, true, false),
            EofAction::InjectClose { code: 1001, .. }
        ));
    }

    #[test]
    fn backoff_grows_then_caps_and_stays_within_jitter() {
        use std::time::Duration;
        assert_eq!(
            backoff(1, 50, 1000, 0.999_999),
            Duration::from_micros(49_999)
        );
        assert_eq!(backoff(3, 50, 1000, 0.5), Duration::from_millis(100));
        assert_eq!(backoff(10, 50, 1000, 0.5), Duration::from_millis(500));
        assert_eq!(backoff(200, 50, 1000, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(2, 50, 1000, 0.0), Duration::ZERO);
    }

    #[test]
    fn mid_frame_or_after_close_just_shuts_down() {
        assert_eq!(on_eof(false, false, false), EofAction::Shutdown);
        assert_eq!(on_eof(true, true, true), EofAction::Shutdown);
    }
}

#[cfg(test)]
mod size {
    /// An idle session costs its struct and nothing else (no buffer), so
    /// this bound is the user-space part of the per-session memory budget.
    #[test]
    fn idle_session_stays_small() {
        let n = std::mem::size_of::<Option<super::Session>>();
        eprintln!("Session: {n} bytes");
        assert!(n <= 464, "Session grew to {n} bytes");
    }
}
