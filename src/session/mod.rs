//! One session's life as a sans-IO state machine: inputs are `handle_*`
//! calls (bytes received, bytes sent, a connect's result, a placement, a
//! token verdict, a timer), outputs are [`Op`]s the shard performs, queued
//! in [`Env::out`]; the deadline to wake it at is [`Session::poll_timeout`].
//! Nothing here makes a syscall or reads a clock: `now` comes in with every
//! input, so tests drive a session byte by byte with a simulated clock
//! (`tests.rs`).
//!
//! The session never owns memory the kernel can see. A send moves its chunks
//! out of the side's queue into [`Op::Send`]; the shard keeps them in the
//! operation's record until the completion and hands what is left back with
//! [`Session::handle_sent`]. Addresses and timeouts travel inside the ops the
//! same way.
//!
//! # Phases
//! [`Phase`] carries each phase's data; every change of phase goes through
//! [`Session::transition`], which debug-asserts that the move is in this
//! table ([`ALLOWED`]):
//!
//! | from              | to                | when                                        |
//! |-------------------|-------------------|---------------------------------------------|
//! | `ProxyHeader`     | `Head`            | the PROXY header is complete                |
//! | `ProxyHeader`     | `Closing`         | untrusted peer, bad or late header, client gone |
//! | `Head`            | `Verify`          | a WebSocket upgrade head is complete and admitted |
//! | `Head`            | `Closing`         | bad request, refused (Origin, caps), `/healthz`, timeout, client gone |
//! | `Verify`          | `Placement`       | token accepted (101 queued in client-first) |
//! | `Verify`          | `Closing`         | token rejected, client gone                 |
//! | `Placement`       | `Connecting`      | placement found                             |
//! | `Connecting`      | `ConmanHandshake` | TCP to Conman is up                         |
//! | `Connecting`      | `Backoff`         | connect failed, attempts and time left      |
//! | `ConmanHandshake` | `Backoff`         | Conman's answer failed, attempts left       |
//! | `ConmanHandshake` | `Relay`           | Conman's 101 checked                        |
//! | `Backoff`         | `Placement`       | backoff over, old socket closed             |
//! | `Placement`, `Connecting`, `ConmanHandshake`, `Backoff` | `Closing` | setup failed for good, client gone, drain, token revoked |
//! | `Relay`           | `Closing`         | Close both ways, a side lost, violation, drain, token revoked |
//!
//! `Closing` is final: queues drain, write sides shut, both sockets close,
//! then [`Session::is_finished`] lets the shard free the slot.
//!
//! In `Relay` the deadline is liveness's (`live.rs`: the proxy's Pings to a
//! silent side, dead-peer and idle timeouts) until a Close goes one way;
//! then it is the close timer's. `access.rs` writes the session's one
//! access-log line.
//!
//! # TLS
//! With `[[tls.certs]]` the client side has a TLS transport, and with a
//! `wss://` Conman URL the Conman side has one (`tls.rs`, rustls driven
//! sans-IO, both in one box): received ciphertext is decrypted before the
//! phase's handling sees it (the head parser, Conman's response parser and
//! the relay tracker work on plaintext, passed on as owned bytes), and what
//! is queued toward a TLS side is sealed into records at send time, read
//! straight from the ring buffers it came in. The client's first deadline
//! is the handshake's (`tls.handshake_timeout_ms`); the head's starts when
//! the handshake completes. Conman's handshake has
//! `conman.tls.handshake_timeout_ms`, then its 101 the connect timeout.
//! Splice is off for a session with a TLS side: its plaintext never exists
//! in the kernel.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;

use crate::config::Config;
use crate::control::wire::Found;
use crate::error::SetupError;
use crate::keys::Ident;
use crate::metrics::ShardStats;
use crate::proto::handshake::AcceptKey;
use crate::proto::relay::{Direction, Tracker, TrackerConfig};

mod access;
pub use access::SessionId;
pub mod handoff;
mod live;
mod names;
mod per_ip;
pub mod registry;
mod relay;
mod sendq;
mod setup;
mod splice;
#[cfg(test)]
mod tests;
mod tls;

pub use names::VmNames;
pub use per_ip::{Gate, PerIp, Refused};
pub use sendq::SendQ;

/// Most chunks one gathered send takes.
pub const GATHER_MAX: usize = 16;
/// Ring buffers a side may have waiting in its queue; later bytes wait in
/// the session's own memory (see `relay::forward`).
pub const RING_HOLD_MAX: usize = 4;

/// A session's two peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    Client,
    Conman,
}

impl Who {
    pub fn other(self) -> Who {
        match self {
            Who::Client => Who::Conman,
            Who::Conman => Who::Client,
        }
    }

    /// The direction of bytes received from this side.
    pub fn outbound(self) -> Direction {
        match self {
            Who::Client => Direction::ToConman,
            Who::Conman => Direction::ToClient,
        }
    }
}

/// Bytes queued toward a socket: a slice of a provided buffer (zero-copy
/// relay) or bytes the proxy wrote itself (handshakes, injected frames).
#[derive(Debug)]
pub enum Chunk {
    Buf { bid: u16, off: u32, len: u32 },
    Owned { data: Box<[u8]>, off: u32 },
}

impl Chunk {
    pub fn remaining(&self) -> usize {
        match self {
            Chunk::Buf { len, .. } => *len as usize,
            Chunk::Owned { data, off } => data.len() - *off as usize,
        }
    }

    /// Consumes `n` sent bytes; true when nothing is left.
    fn advance(&mut self, n: usize) -> bool {
        match self {
            Chunk::Buf { off, len, .. } => {
                *off += n as u32;
                *len -= n as u32;
                *len == 0
            }
            Chunk::Owned { data, off } => {
                *off += n as u32;
                *off as usize == data.len()
            }
        }
    }
}

/// The chunks of one send: one (the common case, no allocation) or a
/// gathered backlog of up to [`GATHER_MAX`].
#[derive(Debug)]
pub enum Batch {
    One(Chunk),
    Many(Vec<Chunk>),
}

impl Batch {
    pub fn chunks(&self) -> &[Chunk] {
        match self {
            Batch::One(c) => std::slice::from_ref(c),
            Batch::Many(v) => v,
        }
    }

    /// The chunks, by value; a one-chunk batch (nearly every send) costs
    /// no allocation.
    fn into_chunks(self) -> impl Iterator<Item = Chunk> {
        let (one, many) = match self {
            Batch::One(c) => (Some(c), Vec::new()),
            Batch::Many(v) => (None, v),
        };
        one.into_iter().chain(many)
    }
}

/// A pipe for splice(2): two descriptors the shard created and will close or
/// pool when the session gives it back ([`Op::ReleasePipe`]).
#[derive(Debug)]
pub struct Pipe {
    pub r: RawFd,
    pub w: RawFd,
    /// Bytes it holds at most.
    pub cap: u32,
}

/// What the shard is asked to do. Ops naming a side act on that side's
/// socket ([`Session::fd`]).
#[derive(Debug)]
pub enum Op {
    /// Receive into a shared buffer pool (the TLS pool if `tls`, see
    /// `arm_recv`): multishot, or one buffer.
    Recv {
        who: Who,
        fd: RawFd,
        single: bool,
        tls: bool,
    },
    /// Stop that receive (from the pool it was armed on); its last
    /// completion still comes.
    CancelRecv { who: Who, tls: bool },
    /// Send these chunks, all of them (MSG_WAITALL: a short count means an
    /// error, or that io_uring stopped retrying a slow reader); they come
    /// back with [`Session::handle_sent`]. `fin`: the socket's
    /// [`Op::Close`] follows in the same submission, so the bytes may wait
    /// for it (MSG_MORE) and leave with the FIN in one segment.
    Send {
        who: Who,
        fd: RawFd,
        batch: Batch,
        fin: bool,
    },
    /// Stop that side's send in flight; its completion still comes.
    CancelSend { who: Who },
    /// Check the token of [`Session::token`]; answer with `handle_token`.
    Verify,
    /// Ask where the repl lives; answer with `handle_placement(seq, ..)`.
    Placement {
        seq: u16,
        attempt: u8,
        /// Every VM that failed in this session's attempts.
        exclude: Vec<String>,
    },
    /// Open a socket to Conman (`handle_socket`), then connect it
    /// (`handle_connected`); the session's deadline bounds it. Nagle goes
    /// off; the configured TCP keepalive and user timeout are set too if
    /// `keepalive`, else the session asks for them later with
    /// [`Op::TcpKeepalive`].
    Connect { addr: SocketAddr, keepalive: bool },
    /// Set the configured TCP keepalive and user timeout on a socket.
    TcpKeepalive { fd: RawFd },
    /// Stop the connect in flight; its completion still comes.
    CancelConnect,
    /// shutdown(2): the write side, or both (forcing pending ops to end).
    Shutdown { fd: RawFd, both: bool },
    /// close(2). Operations still in flight on the socket (a receive whose
    /// cancel was asked for just before, the side's last send) hold their
    /// own reference to it, so the FIN goes when they end.
    Close { fd: RawFd },
    /// Drop one reference to a provided buffer; the last gives it back to
    /// the ring.
    Recycle { bid: u16 },
    /// One more chunk refers to this buffer (a receive split into bytes
    /// passed on and bytes held back); each reference gets its `Recycle`.
    Retain { bid: u16 },
    /// A Conman attempt on this VM failed by the VM's doing (refused, timed
    /// out, a bad answer): placement may pass it over for a while.
    VmFailed { vm: String },
    /// Abort the connection with a RST: its stream was cut inside a frame,
    /// and a FIN would look like a clean end.
    Reset { fd: RawFd },
    /// Splice: a pipe, answered with `handle_pipe`.
    NeedPipe { from: Who },
    /// The pipe is no longer needed: pooled if `empty`, else closed.
    ReleasePipe { pipe: Pipe, empty: bool },
    /// Non-blocking splice(2) of at most `len` bytes from `from`'s socket
    /// into its pipe (`handle_spliced_in`).
    SpliceIn {
        from: Who,
        socket: RawFd,
        pipe: RawFd,
        len: usize,
    },
    /// Non-blocking splice(2) of `len` bytes from `from`'s pipe to the
    /// other side's socket (`handle_spliced_out`).
    SpliceOut {
        from: Who,
        pipe: RawFd,
        socket: RawFd,
        len: usize,
    },
    /// Wait for `socket`'s readiness: readable if it is `from` (the spliced
    /// side), writable otherwise (`handle_poll`).
    Poll { socket: Who, fd: RawFd, from: Who },
}

/// Read access to the bytes of ring buffers the session holds references
/// to: a TLS side seals the chunks queued for it, wherever they are.
pub trait RingBytes {
    /// `len` bytes at `off` of buffer `bid`, which the session holds (the
    /// kernel filled it and gets it back only at the session's `Recycle`).
    fn bytes(&self, bid: u16, off: u32, len: u32) -> &[u8];

    /// The pool `bid` belongs to is running low (as `Env::ring_low` says
    /// of the main one): what it holds is copied and the buffer given back.
    fn low(&self, _bid: u16) -> bool {
        false
    }
}

/// What a session reads and writes besides its own state: the time, the
/// config, the shard's counters and admission state, randomness and the op
/// queue. No IO.
pub struct Env<'a> {
    pub now: Instant,
    /// The shard's buffer ring, read-only.
    pub ring: &'a dyn RingBytes,
    /// The shard's provided-buffer ring is running low: received bytes are
    /// copied into the session's own memory and their buffer given back at
    /// once, so that no set of sessions can drain the ring.
    pub ring_low: bool,
    /// Another receive completion of this same socket follows in the
    /// shard's current batch. Sends wait for it: they would reach the
    /// kernel only at the next `io_uring_enter` anyway, and one send (one
    /// sealed burst of TLS records) with both receives' bytes costs the
    /// kernel and the peer's wake-ups about half what two do.
    pub more_input: bool,
    /// The completion that follows is this receive's last: it has already
    /// ended in the kernel (a FIN, an error), so stopping it needs no
    /// cancel, which would only come back with ENOENT.
    pub input_ends: bool,
    pub cfg: &'a Config,
    /// The shard's index (for logs).
    pub shard: usize,
    pub stats: &'a ShardStats,
    /// The shard's session count and the process-wide per-address table,
    /// consulted once at admission and once when the session finishes.
    pub gate: &'a mut Gate,
    pub rng: &'a mut SmallRng,
    /// The shard's VM names, shared by its sessions.
    pub vms: &'a mut VmNames,
    pub out: &'a mut VecDeque<Op>,
}

impl Env<'_> {
    fn op(&mut self, op: Op) {
        self.out.push_back(op);
    }

    /// Closes `fd`. With `quiet_peer` (the peer sent its Close frame, so it
    /// may send nothing more, RFC 6455 §5.5.1), a last send still among
    /// this input's ops (not yet given to the kernel) learns the close
    /// follows it: its bytes and the FIN then leave in one segment, which
    /// spares the peer a second packet and a second wake-up (a client's
    /// Close answer, then the FIN it waits for, §7.1.1). Not for a peer
    /// that may still be sending (one being closed on for a protocol
    /// error): bytes of its unread at the close make close(2) reset the
    /// connection, and a send held back for the FIN would be lost with it
    /// instead of being on the wire before the reset (Autobahn 3.4, 4.2.5
    /// and 5.14 then see no Close code).
    fn close_after_send(&mut self, fd: RawFd, quiet_peer: bool) {
        if quiet_peer {
            let last_send = self.out.iter_mut().rev().find_map(|op| match op {
                Op::Send { fd: f, fin, .. } if *f == fd => Some(fin),
                _ => None,
            });
            if let Some(fin) = last_send {
                *fin = true;
            }
        }
        self.op(Op::Close { fd });
    }

    /// The shard's sessions hold `limits.shard_buffer_bytes` or more in
    /// their own memory.
    fn over_budget(&self) -> bool {
        self.stats
            .buffered_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= self.cfg.limits.shard_buffer_bytes as u64
    }
}

/// One socket of a session, as far as the machine is concerned.
pub struct Side {
    pub fd: RawFd,
    /// Operations on `fd` requested and not yet completed; the fd is closed
    /// only when this is zero.
    inflight: u16,
    recv_armed: bool,
    /// Receiving paused (backpressure, held-bytes bound, buffer shortage).
    paused: bool,
    /// Paused because the ring had no buffer (ENOBUFS): only the shard's
    /// paced retry (`handle_buffers_available`) resumes it, never
    /// backpressure easing, which would re-arm into the same shortage at
    /// once, again and again.
    starved: bool,
    cancel_pending: bool,
    /// The armed receive has ended in the kernel; its last completion is
    /// next in the shard's batch (`Env::input_ends`).
    recv_ending: bool,
    /// The socket's TCP keepalive options wait for the first liveness look
    /// (Conman's, see [`defer_tcp_keepalive`]).
    tcp_keepalive_due: bool,
    /// The armed receive is on the TLS pool.
    recv_tls: bool,
    /// The TLS pool had no buffer for this side: its next receive takes
    /// one from the main pool.
    tls_dry: bool,
    sendq: SendQ,
    /// Bytes queued plus bytes in the send in flight.
    queued: usize,
    /// The part of `queued` in the session's own memory (`Chunk::Owned`),
    /// which counts against `limits.shard_buffer_bytes`. Below `queued`,
    /// which backpressure keeps far under 4 GiB.
    owned: u32,
    /// A send is in flight (its chunks are in the op, not in `sendq`).
    sending: bool,
    /// The peer sent FIN (or the socket failed).
    eof: bool,
    /// The next receive is a single-buffer one (see `arm_recv`).
    probe: bool,
    /// This side's current data frame is being spliced to the other side.
    splice: Option<Box<splice::Splice>>,
    /// Shut down our write side once the queue drained.
    want_shut: bool,
    shut: bool,
    closed: bool,
}

impl Side {
    fn new(fd: RawFd) -> Side {
        Side {
            fd,
            inflight: 0,
            recv_armed: false,
            paused: false,
            starved: false,
            cancel_pending: false,
            recv_ending: false,
            tcp_keepalive_due: false,
            recv_tls: false,
            tls_dry: false,
            sendq: SendQ::default(),
            queued: 0,
            owned: 0,
            sending: false,
            eof: false,
            probe: false,
            splice: None,
            want_shut: false,
            shut: false,
            closed: fd < 0,
        }
    }

    fn push(&mut self, c: Chunk) {
        self.queued += c.remaining();
        if let Chunk::Owned { .. } = c {
            self.owned += c.remaining() as u32;
        }
        self.sendq.push_back(c);
    }

    /// `n` bytes of `c` were sent or dropped: they leave `owned` if they
    /// were the session's own.
    fn disown(&mut self, c: &Chunk, n: usize) {
        if let Chunk::Owned { .. } = c {
            debug_assert!(self.owned as usize >= n, "owned {} < {n}", self.owned);
            self.owned = self.owned.saturating_sub(n as u32);
        }
    }

    fn push_owned(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.push(Chunk::Owned {
                data: data.into_boxed_slice(),
                off: 0,
            });
        }
    }

    fn drained(&self) -> bool {
        self.sendq.is_empty() && !self.sending
    }

    fn done_op(&mut self) {
        debug_assert!(self.inflight > 0, "operation completed twice");
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Bytes that can never be sent leave the count.
    fn unqueue(&mut self, n: usize) {
        debug_assert!(self.queued >= n, "queued {} < {n}", self.queued);
        self.queued = self.queued.saturating_sub(n);
    }
}

/// The largest send a side may close behind (see `close_side`).
const SMALL_SEND: usize = 4096;

/// Setup state, alive from the token check until relaying starts.
pub struct Setup {
    /// When the current setup phase began (its duration is a metric).
    phase_started: Instant,
    /// The whole setup must finish by then.
    deadline: Instant,
    /// Conman attempts started so far.
    attempt: u8,
    /// Sequence number of the placement request awaiting its reply.
    seq: u16,
    /// Where the current attempt goes.
    vm: Option<Arc<Found>>,
    /// Every VM that failed in this session's attempts, so a retry never
    /// bounces back to one; at most `limits.max_attempts` entries.
    exclude: Vec<String>,
    backoff_done: bool,
    last_error: Option<SetupError>,
    expected_accept: AcceptKey,
    /// The upgrade request for Conman, sent once the connect completes.
    request: Vec<u8>,
    protocol: Option<String>,
    /// The client's own X-Forwarded-For, kept only from a trusted proxy;
    /// the client's address goes after it.
    claimed_forwarded_for: Option<String>,
    /// Upstream-first: the client still waits for its 101, with this
    /// Sec-WebSocket-Accept; its offers go to Conman as they are.
    client_accept: Option<AcceptKey>,
    offered_protocols: Vec<String>,
    offered_extensions: Option<String>,
    /// Conman's response head as it arrives.
    head: Vec<u8>,
    /// Client bytes received during setup, delivered in order once relaying.
    held: Vec<u8>,
}

impl Setup {
    /// The VM of the current attempt.
    fn vm_name(&self) -> Option<&str> {
        self.vm.as_deref().map(|f| f.vm.as_str())
    }
}

/// A complete upgrade request whose token is being checked.
pub struct Verify {
    req: crate::proto::http1::UpgradeRequest,
    /// Client bytes after the head.
    held: Vec<u8>,
}

/// Lifecycle of a session; each variant carries its own data.
pub enum Phase {
    /// `listen.proxy_protocol`: reading the PROXY header in front of the
    /// request head (the bytes so far).
    ProxyHeader(Vec<u8>),
    /// Reading the client's request head.
    Head(Vec<u8>),
    /// Head complete; the token is being checked.
    Verify(Box<Verify>),
    /// Waiting to learn where the repl lives.
    Placement(Box<Setup>),
    /// Dialing Conman.
    Connecting(Box<Setup>),
    /// TCP to Conman up; waiting for its 101.
    ConmanHandshake(Box<Setup>),
    /// A Conman attempt failed; waiting (with jitter) before asking for a
    /// new placement that excludes every VM that failed so far.
    Backoff(Box<Setup>),
    /// Relaying frames both ways; the keepalive state rides along.
    Relay(live::Live),
    /// Ending: queues drain, write sides shut, then sockets close.
    Closing,
}

/// A phase without its data, for the transition table and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    ProxyHeader,
    Head,
    Verify,
    Placement,
    Connecting,
    ConmanHandshake,
    Backoff,
    Relay,
    Closing,
}

impl Phase {
    pub fn kind(&self) -> Kind {
        match self {
            Phase::ProxyHeader(_) => Kind::ProxyHeader,
            Phase::Head(_) => Kind::Head,
            Phase::Verify(_) => Kind::Verify,
            Phase::Placement(_) => Kind::Placement,
            Phase::Connecting(_) => Kind::Connecting,
            Phase::ConmanHandshake(_) => Kind::ConmanHandshake,
            Phase::Backoff(_) => Kind::Backoff,
            Phase::Relay(_) => Kind::Relay,
            Phase::Closing => Kind::Closing,
        }
    }

    fn setup(&self) -> Option<&Setup> {
        match self {
            Phase::Placement(s)
            | Phase::Connecting(s)
            | Phase::ConmanHandshake(s)
            | Phase::Backoff(s) => Some(s),
            _ => None,
        }
    }

    fn setup_mut(&mut self) -> Option<&mut Setup> {
        match self {
            Phase::Placement(s)
            | Phase::Connecting(s)
            | Phase::ConmanHandshake(s)
            | Phase::Backoff(s) => Some(s),
            _ => None,
        }
    }
}

/// Every allowed change of phase (the module doc's table).
pub const ALLOWED: &[(Kind, Kind)] = &[
    (Kind::ProxyHeader, Kind::Head),
    (Kind::ProxyHeader, Kind::Closing),
    (Kind::Head, Kind::Verify),
    (Kind::Head, Kind::Closing),
    (Kind::Verify, Kind::Placement),
    (Kind::Verify, Kind::Closing),
    (Kind::Placement, Kind::Connecting),
    (Kind::Placement, Kind::Closing),
    (Kind::Connecting, Kind::ConmanHandshake),
    (Kind::Connecting, Kind::Backoff),
    (Kind::Connecting, Kind::Closing),
    (Kind::ConmanHandshake, Kind::Backoff),
    (Kind::ConmanHandshake, Kind::Relay),
    (Kind::ConmanHandshake, Kind::Closing),
    (Kind::Backoff, Kind::Placement),
    (Kind::Backoff, Kind::Closing),
    (Kind::Relay, Kind::Closing),
];

pub struct Session {
    pub id: u64,
    phase: Phase,
    client: Side,
    conman: Side,
    to_conman: Tracker,
    to_client: Tracker,
    /// The start of a frame not yet complete, per direction.
    /// (Both in one box, allocated at the first frame split across
    /// receives: a session that never splits one carries a pointer.)
    holds: Option<Box<[relay::FrameHold; 2]>>,
    deadline: Option<Instant>,
    started: Instant,
    /// What the token said (repl, user, cluster), for headers, logs and
    /// the registry; shared with the shard's verification cache.
    ident: Option<Arc<Ident>>,
    /// Close frames the proxy itself queued, per side.
    injected_close_to_client: bool,
    injected_close_to_conman: bool,
    /// What this session adds to the shard's `buffered_bytes` right now.
    /// u32: backpressure keeps it to a few send queues (and the room it
    /// leaves pays for the `tls` pointer within the size budget).
    buffered: u32,
    /// Bytes relayed from the client and from Conman.
    bytes: [u64; 2],
    /// The VM relayed to.
    vm: Option<Arc<str>>,
    /// Close codes the proxy itself sent to the client and to Conman (0:
    /// none), and what ended the relay: for the access log.
    proxy_close: [u16; 2],
    end: access::End,
    /// Counted in `eval_sessions_active` (it reached Relay).
    established: bool,
    finished: bool,
    /// The client: the TCP peer, or the source a trusted PROXY header
    /// named. Per-address limits, X-Forwarded-For and logs use it.
    client_ip: Option<IpAddr>,
    /// Counted in the shard's admitted sessions ([`Gate::sessions`]) and,
    /// if `holds_ip_slot`, in `client_ip`'s entry of the per-address table,
    /// until it finishes.
    admitted: bool,
    holds_ip_slot: bool,
    /// The transports of the sides that speak TLS (`None`: both
    /// plaintext). Boxed: a plaintext session carries a pointer.
    tls: Option<Box<tls::Tls>>,
}

/// Whether a Conman socket's TCP keepalive options (SO_KEEPALIVE, its
/// idle time, interval and count, TCP_USER_TIMEOUT: five setsockopt(2)
/// calls) can wait for the session's first liveness look, which comes at
/// most `keepalive.interval_s` into the relay: when that is sooner than
/// the keepalive idle time and the user timeout, setting them then changes
/// nothing for the session (the user timeout is measured from the first
/// unacknowledged send, whenever it is set), and a session that ends
/// sooner (a reconnect storm is made of them) never pays for them.
pub fn defer_tcp_keepalive(cfg: &Config) -> bool {
    let k = &cfg.keepalive;
    let look = k.interval();
    !look.is_zero()
        && tcp_keepalive_wanted(cfg)
        && (!k.tcp_keepalive || look < Duration::from_secs(k.tcp_keepidle_s.into()))
        && (k.tcp_user_timeout_ms == 0
            || look < Duration::from_millis(k.tcp_user_timeout_ms.into()))
}

/// Whether the config asks for any TCP keepalive option at all.
fn tcp_keepalive_wanted(cfg: &Config) -> bool {
    cfg.keepalive.tcp_keepalive || cfg.keepalive.tcp_user_timeout_ms > 0
}

impl Session {
    /// The Conman socket's TCP keepalive options still wait for a liveness
    /// look that the config in force no longer brings soon enough (it was
    /// reloaded since the connect, or the session comes from another
    /// process whose config deferred them): they go now.
    pub(crate) fn tcp_keepalive_unless_deferred(&mut self, env: &mut Env) {
        if self.conman.tcp_keepalive_due && !defer_tcp_keepalive(env.cfg) {
            self.conman.tcp_keepalive_due = false;
            if tcp_keepalive_wanted(env.cfg) {
                self.conman_tcp_keepalive(env);
            }
        }
    }

    /// Sets the Conman socket's TCP keepalive options, if it is open.
    pub(crate) fn conman_tcp_keepalive(&mut self, env: &mut Env) {
        if self.conman.fd >= 0 && !self.conman.closed {
            env.op(Op::TcpKeepalive { fd: self.conman.fd });
        }
    }
}

impl Session {
    /// A session for an accepted client socket from `peer`;
    /// [`Session::start`] has it read the PROXY header or the head.
    pub fn new(
        id: u64,
        client_fd: RawFd,
        peer: Option<IpAddr>,
        now: Instant,
        cfg: &Config,
    ) -> Session {
        let tcfg = TrackerConfig {
            max_frame: cfg.limits.max_frame,
            allow_rsv1: false,
        };
        Session {
            id,
            phase: if cfg.listen.proxy_protocol {
                Phase::ProxyHeader(Vec::new())
            } else {
                Phase::Head(Vec::new())
            },
            client: Side::new(client_fd),
            conman: Side::new(-1),
            to_conman: Tracker::new(Direction::ToConman, tcfg),
            to_client: Tracker::new(Direction::ToClient, tcfg),
            holds: None,
            deadline: Some(now + cfg.first_timeout()),
            started: now,
            ident: None,
            injected_close_to_client: false,
            injected_close_to_conman: false,
            buffered: 0,
            bytes: [0; 2],
            vm: None,
            proxy_close: [0; 2],
            end: access::End::Open,
            established: false,
            finished: false,
            client_ip: peer,
            admitted: false,
            holds_ip_slot: false,
            // A failure here (a config that rustls refuses, which loading
            // already ruled out) is caught in `start`.
            tls: cfg
                .tls
                .server
                .as_ref()
                .and_then(|c| tls::Transport::server(c).ok())
                .map(|t| {
                    Box::new(tls::Tls {
                        client: Some(t),
                        conman: None,
                    })
                }),
        }
    }

    /// Since when neither peer has sent anything, for a drain to close the
    /// longest idle first: the keepalive clock's last word from either side
    /// (a session still in setup counts from its start). Pongs to the
    /// proxy's own Pings count too, so among sessions silent for longer
    /// than `keepalive.interval_s` the order is only roughly theirs.
    pub fn idle_since(&self) -> Instant {
        let ms = self.live().map_or(0, live::Live::last_heard);
        self.started + Duration::from_millis(u64::from(ms))
    }

    pub fn start(&mut self, env: &mut Env) {
        // Anyone may claim any client in a PROXY header: only the load
        // balancers we were told about may send one.
        if self.kind() == Kind::ProxyHeader && !env.cfg.listen.trusts(self.client_ip) {
            self.refuse_connection(env, "proxy_untrusted");
            self.advance(env);
            return;
        }
        if env.cfg.tls.server.is_some() && !self.speaks_tls(Who::Client) {
            self.refuse_connection(env, "tls_setup");
            self.advance(env);
            return;
        }
        self.arm_recv(env, Who::Client);
    }

    pub fn kind(&self) -> Kind {
        self.phase.kind()
    }

    pub fn fd(&self, who: Who) -> RawFd {
        self.side_ref(who).fd
    }

    pub fn ident(&self) -> Option<&Arc<Ident>> {
        self.ident.as_ref()
    }

    /// The VM of the Conman the session relays to.
    pub fn vm(&self) -> Option<&str> {
        self.vm.as_deref()
    }

    /// The token to check while in `Verify`.
    pub fn token(&self) -> Option<&str> {
        match &self.phase {
            Phase::Verify(v) => v.req.token.as_deref(),
            _ => None,
        }
    }

    /// When the shard must call [`Session::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A parked session waits for its move's verdict, not a timer.
        if self.moving() == handoff::Moving::Exported {
            return None;
        }
        self.deadline
    }

    /// Both sockets are closed and nothing is in flight: free the slot.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The one way to change phase: `next` builds the new phase from the
    /// old one (moving its data), and the move must be in [`ALLOWED`].
    fn transition(&mut self, now: Instant, next: impl FnOnce(Phase) -> Phase) {
        let old = std::mem::replace(&mut self.phase, Phase::Closing);
        let from = old.kind();
        self.phase = next(old);
        let to = self.phase.kind();
        debug_assert!(
            ALLOWED.contains(&(from, to)),
            "session {}: {from:?} -> {to:?} is not allowed",
            self.id
        );
        #[cfg(test)]
        tests::trail(from, to);
        if let Some(st) = self.phase.setup_mut() {
            st.phase_started = now;
        }
    }

    /// How long the current setup phase has lasted.
    fn in_phase(&self, now: Instant) -> Duration {
        self.phase
            .setup()
            .map_or(Duration::ZERO, |st| now - st.phase_started)
    }

    /// Moves the setup state from one setup phase to the next.
    fn step(&mut self, now: Instant, to: fn(Box<Setup>) -> Phase) {
        self.transition(now, |old| match old {
            Phase::Placement(s)
            | Phase::Connecting(s)
            | Phase::ConmanHandshake(s)
            | Phase::Backoff(s) => to(s),
            // Not a setup phase: the same kind again fails the assertion.
            other => other,
        });
    }

    fn side(&mut self, who: Who) -> &mut Side {
        match who {
            Who::Client => &mut self.client,
            Who::Conman => &mut self.conman,
        }
    }

    fn side_ref(&self, who: Who) -> &Side {
        match who {
            Who::Client => &self.client,
            Who::Conman => &self.conman,
        }
    }

    fn tracker(&mut self, dir: Direction) -> &mut Tracker {
        match dir {
            Direction::ToConman => &mut self.to_conman,
            Direction::ToClient => &mut self.to_client,
        }
    }

    fn tracker_ref(&self, dir: Direction) -> &Tracker {
        match dir {
            Direction::ToConman => &self.to_conman,
            Direction::ToClient => &self.to_client,
        }
    }

    /// The hold of `dir`, allocated if need be.
    fn hold_mut(&mut self, dir: Direction) -> &mut relay::FrameHold {
        &mut self.holds.get_or_insert_with(Box::default)[hold_index(dir)]
    }

    fn hold_ref(&self, dir: Direction) -> Option<&relay::FrameHold> {
        self.holds.as_deref().map(|h| &h[hold_index(dir)])
    }

    /// The side bytes come from, the side they go to, and the tracker of
    /// that direction, borrowed together.
    fn split(&mut self, from: Who) -> (&mut Side, &mut Side, &mut Tracker) {
        match from {
            Who::Client => (&mut self.client, &mut self.conman, &mut self.to_conman),
            Who::Conman => (&mut self.conman, &mut self.client, &mut self.to_client),
        }
    }

    fn set_deadline(&mut self, t: Instant) {
        self.deadline = Some(t);
    }

    // ---- receiving ------------------------------------------------------

    fn arm_recv(&mut self, env: &mut Env, who: Who) {
        // A session on its way to a new process reads nothing more.
        if self.moving() != handoff::Moving::No {
            return;
        }
        let sd = self.side(who);
        // In splice mode the bytes are read by splice(2), not into buffers.
        if sd.recv_armed || sd.fd < 0 || sd.eof || sd.closed || sd.splice.is_some() {
            return;
        }
        sd.recv_armed = true;
        sd.inflight += 1;
        // Right after a spliced frame the next one is likely long too: take
        // one buffer (its header) instead of a multishot receive, which
        // would copy up to 32 buffers of payload before a cancel could stop
        // it.
        // With the ring low or past the shard's buffer budget, one buffer at
        // a time: a multishot receive can take dozens of buffers in one go
        // (emptying the ring others wait on) and deliver them before a pause
        // takes effect, each copied into memory the budget is meant to bound.
        let single = std::mem::take(&mut sd.probe) || env.ring_low || env.over_budget();
        let fd = sd.fd;
        // A session whose client (or Conman) speaks TLS receives into the
        // TLS pool's larger buffers (see `shard::bufring`), both sides:
        // ciphertext is copied out by decryption at once, and plaintext
        // toward a TLS side is sealed in bursts, so larger receives make
        // fewer, larger sends and fewer window updates. Unless that pool
        // just ran dry: then one receive takes a main buffer.
        let tls = (self.speaks_tls(Who::Client) || self.speaks_tls(Who::Conman))
            && !std::mem::take(&mut self.side(who).tls_dry);
        self.side(who).recv_tls = tls;
        env.op(Op::Recv {
            who,
            fd,
            single,
            tls,
        });
    }

    /// A receive ended without data (`more` false: its last completion):
    /// armed again unless the side is meant to be quiet.
    fn rearm_unless_quiet(&mut self, env: &mut Env, who: Who, more: bool) {
        let sd = self.side_ref(who);
        if !more && !sd.paused && !sd.eof && !sd.closed {
            self.arm_recv(env, who);
        }
    }

    /// Stops a side's multishot receive (it cannot be paused otherwise).
    fn pause_recv(&mut self, env: &mut Env, who: Who) {
        let sd = self.side(who);
        sd.paused = true;
        if sd.recv_armed && !sd.cancel_pending && !sd.recv_ending {
            sd.cancel_pending = true;
            let tls = sd.recv_tls;
            env.op(Op::CancelRecv { who, tls });
        }
    }

    fn resume_recv(&mut self, env: &mut Env, who: Who) {
        let sd = self.side(who);
        if sd.paused {
            sd.paused = false;
            self.arm_recv(env, who);
        }
    }

    /// The ring had no buffer for this side: it waits for
    /// [`Session::handle_buffers_available`].
    pub fn starved(&self, who: Who) -> bool {
        let sd = self.side_ref(who);
        sd.starved && !sd.recv_armed && !sd.eof && !sd.closed
    }

    /// Buffers are back after a shortage: a starved side reads again.
    pub fn handle_buffers_available(&mut self, env: &mut Env, who: Who) {
        if self.starved(who) {
            let sd = self.side(who);
            sd.starved = false;
            sd.paused = false;
            // One buffer: the ring has only just recovered.
            sd.probe = true;
            self.arm_recv(env, who);
            self.advance(env);
        }
    }

    /// A receive completed: `data` with its buffer id, or `res` ≤ 0 (FIN or
    /// -errno). `more` is false on a receive's last completion.
    pub fn handle_recv(
        &mut self,
        env: &mut Env,
        who: Who,
        res: i32,
        more: bool,
        data: Option<(u16, &[u8])>,
    ) -> RecvOutcome {
        let mut outcome = RecvOutcome::Ok;
        if !more {
            let sd = self.side(who);
            sd.recv_armed = false;
            sd.done_op();
            sd.cancel_pending = false;
            sd.recv_ending = false;
        } else if env.input_ends {
            self.side(who).recv_ending = true;
        }
        match data {
            Some((bid, bytes)) if res > 0 => {
                self.note_heard(env.now, who);
                if self.speaks_tls(who) {
                    self.on_tls_data(env, who, bid, bytes);
                } else {
                    self.on_data(env, who, bid, bytes);
                }
                // A multishot receive may end on its own (or a cancel may
                // land after a resume), and a single-shot one always does:
                // re-arm unless the side is meant to be quiet, which
                // backpressure decides first (what was just queued may be
                // one buffer too many).
                let sd = self.side(who);
                if !more && !sd.paused && !sd.eof && !sd.closed {
                    if self.kind() == Kind::Relay {
                        self.backpressure(env, who);
                    }
                    if !self.side(who).paused {
                        self.arm_recv(env, who);
                    }
                }
            }
            Some((bid, _)) => env.op(Op::Recycle { bid }),
            None => match -res {
                libc::ENOBUFS if self.side_ref(who).recv_tls => {
                    // The small TLS pool ran dry (many TLS sides received
                    // in one turn): one buffer from the main pool, at once,
                    // rather than waiting out a shortage of the main pool.
                    env.stats
                        .tls_pool_exhausted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let sd = self.side(who);
                    sd.tls_dry = true;
                    sd.probe = true;
                    self.rearm_unless_quiet(env, who, more);
                }
                libc::ENOBUFS => {
                    env.stats
                        .buffer_exhausted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let sd = self.side(who);
                    sd.paused = true;
                    sd.starved = true;
                    outcome = RecvOutcome::Starved;
                }
                libc::ECANCELED | libc::EAGAIN => {
                    // EAGAIN: an O_NONBLOCK socket (splice mode) with
                    // nothing to read; the receive is simply re-armed.
                    self.rearm_unless_quiet(env, who, more);
                }
                _ => {
                    // FIN (0) or a socket error: this side sends no more.
                    if who == Who::Client {
                        self.tls_eof(env);
                    }
                    self.side(who).eof = true;
                    self.on_side_lost(env, who);
                }
            },
        }
        self.advance(env);
        outcome
    }

    // ---- sending --------------------------------------------------------

    fn kick_send(&mut self, env: &mut Env, who: Who) {
        let conman_writable = !matches!(
            self.kind(),
            Kind::ProxyHeader | Kind::Head | Kind::Verify | Kind::Connecting
        );
        if self.speaks_tls(who) {
            // The Conman socket is not writable before its connect completes.
            if who == Who::Client || conman_writable {
                self.kick_send_tls(env, who);
            }
            return;
        }
        // A frame is being spliced to this side: what is queued (an
        // injected Close, say) follows it.
        let spliced_to = self
            .side_ref(who.other())
            .splice
            .as_ref()
            .is_some_and(|sp| sp.started);
        let sd = self.side(who);
        if sd.sending || sd.fd < 0 || sd.shut || sd.closed || sd.sendq.is_empty() || spliced_to {
            return;
        }
        // The Conman socket is not writable before its connect completes.
        if who == Who::Conman && !conman_writable {
            return;
        }
        let batch = if sd.sendq.len() == 1 {
            match sd.sendq.pop_front() {
                Some(c) => Batch::One(c),
                None => return,
            }
        } else {
            // A backlog (bulk transfer, slow peer): one sendmsg for up to
            // GATHER_MAX chunks instead of a send per buffer.
            let n = sd.sendq.len().min(GATHER_MAX);
            Batch::Many((0..n).filter_map(|_| sd.sendq.pop_front()).collect())
        };
        sd.sending = true;
        sd.inflight += 1;
        let fd = sd.fd;
        env.op(Op::Send {
            who,
            fd,
            batch,
            fin: false,
        });
    }

    /// A send completed with `res` (bytes or -errno); `batch` is what it
    /// carried, back from the shard's operation record.
    pub fn handle_sent(&mut self, env: &mut Env, who: Who, res: i32, batch: Batch) {
        let sd = self.side(who);
        sd.done_op();
        sd.sending = false;
        let mut chunks = batch.into_chunks();
        if res == -libc::EAGAIN && !sd.closed {
            // io_uring gave up retrying (the socket is O_NONBLOCK, and a
            // slow reader kept it full): nothing was sent, the next kick
            // sends it again. On a side closed behind this send nothing
            // can: the chunks go as with an error, below.
            requeue_front(sd, chunks.collect());
            self.requeued_records(who);
        } else if res < 0 {
            let unsent: usize = chunks
                .map(|c| {
                    sd.disown(&c, c.remaining());
                    if let Chunk::Buf { bid, .. } = c {
                        env.op(Op::Recycle { bid });
                    }
                    c.remaining()
                })
                .sum();
            sd.unqueue(unsent);
            tracing::debug!(session = self.id, err = res, "send failed");
            self.send_failed(env, who);
        } else {
            let mut n = res as usize;
            sd.unqueue(n);
            let mut rest = Vec::new();
            for mut c in chunks.by_ref() {
                let take = n.min(c.remaining());
                n -= take;
                sd.disown(&c, take);
                if c.advance(take) {
                    if let Chunk::Buf { bid, .. } = c {
                        env.op(Op::Recycle { bid });
                    }
                } else {
                    rest.push(c);
                }
            }
            if !rest.is_empty() {
                if sd.shut || sd.closed {
                    // Nobody will send them any more.
                    for c in rest {
                        sd.unqueue(c.remaining());
                        sd.disown(&c, c.remaining());
                        if let Chunk::Buf { bid, .. } = c {
                            env.op(Op::Recycle { bid });
                        }
                    }
                } else {
                    requeue_front(sd, rest);
                    self.requeued_records(who);
                }
            }
        }
        self.advance(env);
    }

    /// Drops what is queued for a side, giving ring buffers back.
    fn discard_queued(&mut self, env: &mut Env, who: Who) {
        self.drop_hold(env, who.other().outbound());
        let sd = self.side(who);
        let mut n = 0;
        let mut owned = 0;
        for c in sd.sendq.drain() {
            n += c.remaining();
            match c {
                Chunk::Buf { bid, .. } => env.op(Op::Recycle { bid }),
                Chunk::Owned { .. } => owned += c.remaining(),
            }
        }
        sd.unqueue(n);
        debug_assert!(sd.owned as usize >= owned);
        sd.owned = sd.owned.saturating_sub(owned as u32);
        if let Some(t) = self.tls_side(who) {
            t.cipher_front = false;
        }
    }

    /// Writing to `who` failed: the peer is gone, and what is queued for it
    /// can never be sent.
    fn send_failed(&mut self, env: &mut Env, who: Who) {
        self.discard_queued(env, who);
        let sd = self.side(who);
        sd.eof = true;
        sd.shut = true;
        self.on_side_lost(env, who);
    }

    // ---- moving forward -------------------------------------------------

    /// After any input: splices to start, sends to kick, backpressure, the
    /// retry after a backoff, and the closing sequence.
    fn advance(&mut self, env: &mut Env) {
        self.account_buffered(env);
        for who in [Who::Client, Who::Conman] {
            self.start_splice(env, who);
        }
        if !env.more_input {
            for who in [Who::Client, Who::Conman] {
                self.kick_send(env, who);
            }
        }
        match self.kind() {
            Kind::Relay => {
                for who in [Who::Client, Who::Conman] {
                    self.backpressure(env, who);
                }
            }
            Kind::Backoff => self.retry_when_ready(env),
            Kind::Closing => {
                for who in [Who::Client, Who::Conman] {
                    self.close_side(env, who);
                }
                // A side closes with its cancelled receive still to
                // complete (`close_side`); the session waits for it.
                let idle = |sd: &Side| sd.closed && sd.inflight == 0;
                if idle(&self.client) && idle(&self.conman) && !self.finished {
                    self.finished = true;
                    self.account_buffered(env);
                    debug_assert_eq!(self.buffered, 0, "session {} ends holding bytes", self.id);
                    self.deadline = None;
                    if self.established {
                        env.stats
                            .active
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.leave_gate(env);
                    if self.established {
                        self.log_ended(env);
                    }
                }
            }
            _ => {}
        }
    }

    /// Brings the shard's `buffered_bytes` up to date with what this
    /// session holds in its own memory, once per input.
    fn account_buffered(&mut self, env: &mut Env) {
        use std::sync::atomic::Ordering::Relaxed;
        let held: usize = self
            .holds
            .as_deref()
            .map_or(0, |h| h.iter().map(relay::FrameHold::owned).sum());
        let now = self.client.owned as usize + self.conman.owned as usize + held;
        // Saturating keeps the shard's count consistent (it moves by what
        // was added) even in the case backpressure rules out.
        let now = u32::try_from(now).unwrap_or(u32::MAX);
        if now > self.buffered {
            env.stats
                .buffered_bytes
                .fetch_add((now - self.buffered) as u64, Relaxed);
        } else if now < self.buffered {
            env.stats
                .buffered_bytes
                .fetch_sub((self.buffered - now) as u64, Relaxed);
        }
        self.buffered = now;
    }

    /// Stops reading `src` while its peer has more than
    /// `limits.send_queue_bytes` queued, or, once the shard's sessions hold
    /// `limits.shard_buffer_bytes` in their own memory, while its peer has
    /// anything queued at all (it is not keeping up): then a session costs
    /// at most the buffer it last received, memory stops growing, and every
    /// paused side resumes by its own peer's sends, with no wake-up from
    /// outside. Sessions whose peers keep up still move, a buffer at a time.
    fn backpressure(&mut self, env: &mut Env, src: Who) {
        use std::sync::atomic::Ordering::Relaxed;
        let limit = env.cfg.limits.send_queue_bytes;
        let over_budget = env.over_budget();
        let dest = self.side_ref(src.other());
        let (queued, budget_bound) = (dest.queued, over_budget && dest.queued > 0);
        let sd = self.side(src);
        if (queued > limit || budget_bound) && !sd.paused {
            let counter = if queued > limit {
                &env.stats.backpressure_pauses
            } else {
                &env.stats.budget_pauses
            };
            counter.fetch_add(1, Relaxed);
            self.pause_recv(env, src);
        } else if queued <= limit / 2
            && !budget_bound
            && sd.paused
            && !sd.starved
            && !sd.recv_armed
            && sd.splice.is_none()
        {
            self.resume_recv(env, src);
        }
    }

    fn begin_closing(&mut self, env: &mut Env) {
        if self.kind() == Kind::Closing {
            return;
        }
        self.transition(env.now, |_| Phase::Closing);
        self.client.want_shut = true;
        self.conman.want_shut = true;
        self.set_deadline(env.now + Duration::from_millis(env.cfg.limits.linger_ms));
    }

    fn close_side(&mut self, env: &mut Env, who: Who) {
        if self.side_ref(who).closed {
            return;
        }
        // A peer that sent FIN, or a complete Close frame (after which it
        // must send nothing, RFC 6455 §5.5.1), has nothing left for us to
        // read, so close(2) alone sends our FIN after what is queued and no
        // RST: no shutdown(2) first, and no waiting for its FIN. Any other
        // peer may still be sending, and closing on unread bytes would
        // reset the connection and lose our last frames: shut down our
        // side and read until its FIN (bounded by `limits.linger_ms`).
        let closed_by_peer = match who {
            Who::Client => self.to_conman.close_seen(),
            Who::Conman => self.to_client.close_seen(),
        };
        let finished = self.side_ref(who).eof || closed_by_peer;
        self.close_notify(env, who);
        // The other side's splice writes to this socket straight from its
        // pipe, past the send queue: what it still owes goes first.
        let owed = self
            .side(who.other())
            .splice
            .as_ref()
            .is_some_and(|sp| sp.owes_peer());
        // A finished peer gets no shutdown(2): close(2) sends our FIN, and
        // a send still in flight holds the socket until it is done, so our
        // FIN follows it without waiting for it here. Only a small one:
        // MSG_WAITALL (`Op::Send`) makes the kernel retry a short send, but
        // it gives up after many rounds of a slow reader, and then the rest
        // could not be sent any more; a Close frame goes whole as soon as
        // the socket is writable at all. Only on a plain side: over TLS the
        // close_notify still has to follow that send.
        let plain = !self.speaks_tls(who);
        let sd = self.side(who);
        let last_send_small = plain && sd.sending && sd.queued <= SMALL_SEND;
        let flushed = sd.sendq.is_empty() && (!sd.sending || (finished && last_send_small));
        if sd.want_shut && !sd.shut && flushed && !owed {
            sd.shut = true;
            if !finished {
                env.op(Op::Shutdown {
                    fd: sd.fd,
                    both: false,
                });
            }
        }
        if sd.shut && finished {
            if sd.recv_armed {
                self.pause_recv(env, who);
            }
            // Neither that send nor the receive being cancelled need end
            // first: the cancel goes in the same submission, ahead of the
            // close, and each holds the socket only until it completes.
            // Waiting for them cost loop turns before the FIN, which the
            // peer (a client, after a close handshake) waits for.
            let sd = self.side(who);
            let ending = u16::from(sd.sending) + u16::from(sd.recv_armed && sd.cancel_pending);
            if sd.inflight == ending && sd.splice.is_none() && !owed {
                self.discard_queued(env, who);
                let sd = self.side(who);
                sd.closed = true;
                env.close_after_send(sd.fd, closed_by_peer);
            }
        }
        if self.deadline.is_none() {
            self.set_deadline(env.now + Duration::from_millis(env.cfg.limits.linger_ms));
        }
    }

    /// The deadline passed (`now` ≥ [`Session::poll_timeout`]).
    pub fn handle_timeout(&mut self, env: &mut Env) {
        match self.deadline {
            Some(d) if d <= env.now => self.deadline = None,
            _ => return,
        }
        match self.kind() {
            Kind::ProxyHeader => self.refuse_connection(env, "proxy_header_timeout"),
            // A token check is answered within the loop turn it started in,
            // so this is only a head that was too slow.
            Kind::Head | Kind::Verify => {
                if self.tls_handshaking(Who::Client) {
                    self.tls_failed(env, "tls_handshake_timeout", true);
                } else {
                    self.head_timeout(env)
                }
            }
            Kind::Placement | Kind::Connecting | Kind::ConmanHandshake | Kind::Backoff => {
                self.setup_timeout(env)
            }
            // A Close went one way and no answer came back; or it is time
            // to look at liveness.
            Kind::Relay => {
                if self.live().is_some_and(|l| l.closing) {
                    self.begin_closing(env);
                } else {
                    self.check_liveness(env);
                }
            }
            Kind::Closing => {
                // Peers that neither read nor close: force both sockets
                // down so every pending operation completes. A side closed
                // with operations in flight has no fd left to shut down:
                // its send (a peer that stopped reading) and its receive
                // (should the first cancel have missed it) are cancelled.
                for who in [Who::Client, Who::Conman] {
                    let sd = self.side(who);
                    if sd.fd >= 0 && !sd.closed {
                        sd.shut = true;
                        sd.eof = true;
                        env.op(Op::Shutdown {
                            fd: sd.fd,
                            both: true,
                        });
                    } else if sd.closed {
                        if sd.sending {
                            env.op(Op::CancelSend { who });
                        }
                        if sd.recv_armed {
                            let tls = sd.recv_tls;
                            env.op(Op::CancelRecv { who, tls });
                        }
                    }
                }
                if self.client.inflight + self.conman.inflight > 0 {
                    self.set_deadline(env.now + Duration::from_millis(env.cfg.limits.linger_ms));
                }
            }
        }
        self.advance(env);
    }

    /// The drain's closing phase reached this session (its time comes from
    /// `control::drain::plan_closes`): Close 1012 to the client, telling it
    /// to come back after `retry_after_ms` (on another proxy, or the new
    /// process), 1001 to Conman. A session still being set up fails with
    /// the same reason; one that has not been promised anything yet (no
    /// 101) just ends.
    pub fn handle_drain_close(&mut self, env: &mut Env, retry_after_ms: u64) {
        match self.moving() {
            // Its record is with the new process, which may be running it.
            handoff::Moving::Exported => return,
            handoff::Moving::Stopping => self.handle_move_cancelled(env),
            handoff::Moving::No => {}
        }
        self.ended(access::End::Proxy);
        let err = SetupError {
            stage: crate::error::Stage::Drain,
            reason: "restart",
            retry_after_ms: Some(retry_after_ms),
        };
        match self.kind() {
            Kind::Relay => self.end_session(env, err.close_code(), &err.close_reason()),
            Kind::Placement | Kind::Connecting | Kind::ConmanHandshake | Kind::Backoff => {
                self.fail_setup(env, err)
            }
            Kind::ProxyHeader | Kind::Head | Kind::Verify => self.begin_closing(env),
            Kind::Closing => {}
        }
        self.advance(env);
    }

    /// Whether `set` revokes this session's token at `now_unix`: a
    /// session past its token check and not already ending.
    pub fn revoked_by(&self, set: &crate::token::revoke::RevokeSet, now_unix: i64) -> bool {
        self.kind() != Kind::Closing
            && self
                .ident
                .as_ref()
                .is_some_and(|i| i.revoked_in(set, now_unix))
    }

    /// A revocation matched the token ([`Session::revoked_by`]): Close
    /// 1008 (`stage=token;reason=revoked`) to the client and 1001 to
    /// Conman; a session still being set up fails with the same reason.
    pub fn handle_revoked(&mut self, env: &mut Env) {
        use crate::token::TokenError;
        let err = SetupError::new(crate::error::Stage::Token, TokenError::Revoked.as_str());
        match self.kind() {
            Kind::Relay => {
                ShardStats::inc(&env.stats.revoked_closes);
                self.end_session(env, err.close_code(), &err.close_reason());
            }
            Kind::Placement | Kind::Connecting | Kind::ConmanHandshake | Kind::Backoff => {
                ShardStats::inc(&env.stats.revoked_closes);
                // Like a token refused as revoked: not the proxy's failure.
                ShardStats::inc(&env.stats.client_fault);
                self.fail_setup(env, err);
            }
            // No token accepted yet (its check sees the revocation), or
            // ending anyway.
            Kind::ProxyHeader | Kind::Head | Kind::Verify | Kind::Closing => {}
        }
        self.advance(env);
    }
}

/// What a receive completion left the shard to do.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvOutcome {
    Ok,
    /// The ring ran out of buffers: retry this side when some are back.
    Starved,
}

fn hold_index(dir: Direction) -> usize {
    match dir {
        Direction::ToConman => 0,
        Direction::ToClient => 1,
    }
}

fn requeue_front(sd: &mut Side, chunks: Vec<Chunk>) {
    let mut q = SendQ::default();
    for c in chunks {
        q.push_back(c);
    }
    for c in sd.sendq.drain() {
        q.push_back(c);
    }
    sd.sendq = q;
}

/// Full-jitter exponential backoff before Conman attempt `attempt` (1 for
/// the first retry): uniform in `[0, min(cap, base * 2^(attempt-1))]`,
/// given a uniform `unit` in [0, 1).
pub fn backoff(attempt: u8, base_ms: u64, cap_ms: u64, unit: f64) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << (attempt.saturating_sub(1)).min(20));
    let ceiling = exp.min(cap_ms) as f64;
    Duration::from_micros((ceiling * 1000.0 * unit.clamp(0.0, 1.0)) as u64)
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
