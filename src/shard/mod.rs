//! The io_uring data plane: one pinned thread per core, each owning a ring,
//! a provided-buffer ring, its own SO_REUSEPORT listener and every session
//! accepted on it. Nothing here is shared with another shard but the
//! read-mostly config and the shard's own stats.
//!
//! One loop turn: submit everything queued and wait (one `io_uring_enter`),
//! handle every completion, fire due timers, publish recycled buffers. The
//! ring is `SINGLE_ISSUER | DEFER_TASKRUN`, so completions are produced only
//! when this thread waits: no IPIs, no task_work interrupting the loop.

pub mod bufring;
pub mod listener;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tracing::{debug, error, info, warn};

use crate::config::{Config, RejectWith, UpgradeMode};
use crate::control::wire::{Found, PlacementResult, ToControl, ToShard};
use crate::control::LocalStatic;
use crate::error::{SetupError, Stage};
use crate::keys::{Ident, KeyStore, LocalKeys, VerifyCache};
use crate::metrics::{CloseSide, Phase as Timing, ShardStats};
use crate::proto::close;
use crate::proto::frame::write_close;
use crate::proto::handshake::{self, accept_key, choose_protocol, new_client_key};
use crate::proto::http1::{self, Route};
use crate::proto::relay::{Direction, Event, Tracker, TrackerConfig, Violation};
use crate::session::{
    backoff, on_eof, Chunk, EofAction, Gather, Phase, Pipe, Session, Setup, Side, Splice,
    GATHER_MAX,
};
use crate::token::VerifyOptions;
use bufring::BufRing;

/// Lingering after our FIN: how long a closing session may wait for the
/// peer's FIN (or for a stuck send) before its sockets are forced shut.
const LINGER: Duration = Duration::from_secs(5);
/// How often an idle shard may hand its buffer pages back (see
/// `BufRing::trim_if_idle`).
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// After one side's Close frame, how long the other side has to answer.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(10);

/// The tracker's word for frames after a Close, which are dropped rather
/// than treated as a violation.
const DATA_AFTER_CLOSE: &str = "data_after_close";

/// What tracking one run of bytes found.
struct Scanned {
    /// Bytes that belong to valid frames (all of them without a violation).
    good: usize,
    frames: u64,
    /// Code of a Close frame completed in these bytes (1005 if it had none).
    close: Option<u16>,
    violation: Option<Violation>,
}

fn scan(tracker: &mut Tracker, data: &[u8]) -> Scanned {
    let frames_before = tracker.frames();
    let mut off = 0usize;
    let mut close = None;
    let mut violation = None;
    while off < data.len() {
        match tracker.handle(&data[off..]) {
            Ok(scan) => {
                off += scan.consumed;
                if let Some(Event::Close { code, .. }) = scan.event {
                    close = Some(code.unwrap_or(1005));
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
        close,
        violation,
    }
}

/// Process-wide lifecycle flags, read by shards when woken.
#[derive(Default)]
pub struct Control {
    /// Stop accepting; sessions run on.
    pub draining: AtomicBool,
    /// Grace period over: Close 1001 to every session still open.
    pub grace_over: AtomicBool,
}

/// Everything a shard needs, built on the main thread.
pub struct ShardSpec {
    pub id: usize,
    pub listener: RawFd,
    pub cfg: Arc<Config>,
    pub keys: Arc<KeyStore>,
    pub stats: Arc<ShardStats>,
    /// This shard's end of its socketpair with the control shard.
    pub control_fd: RawFd,
    /// Static placement answered here, without the control shard.
    pub local_placement: Option<Arc<LocalStatic>>,
    pub control: Arc<Control>,
    /// eventfd the control side writes to wake this shard.
    pub wake_fd: RawFd,
}

// user_data: op in the low byte, then the session's generation, then slot.
const OP_ACCEPT: u8 = 1;
const OP_WAKE: u8 = 2;
const OP_RECV_CLIENT: u8 = 3;
const OP_RECV_CONMAN: u8 = 4;
const OP_SEND_CLIENT: u8 = 5;
const OP_SEND_CONMAN: u8 = 6;
const OP_CONNECT: u8 = 7;
/// Completions we only need to swallow (link timeouts, cancels).
const OP_IGNORE: u8 = 8;
const OP_CTL_RECV: u8 = 9;
const OP_CTL_SEND: u8 = 10;
/// Splice mode: readiness of the spliced side's socket (POLLIN) and of
/// the socket it is spliced to (POLLOUT).
const OP_POLL_IN_CLIENT: u8 = 11;
const OP_POLL_IN_CONMAN: u8 = 12;
const OP_POLL_OUT_CLIENT: u8 = 13;
const OP_POLL_OUT_CONMAN: u8 = 14;
/// Pipes kept for reuse per shard; more concurrent splices make their own.
const PIPE_POOL: usize = 32;

fn ud(slot: u32, gen: u16, op: u8) -> u64 {
    ((slot as u64) << 24) | ((gen as u64) << 8) | op as u64
}

fn ud_parts(u: u64) -> (u32, u16, u8) {
    ((u >> 24) as u32, (u >> 8) as u16, u as u8)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Client,
    Conman,
}

impl Who {
    fn other(self) -> Who {
        match self {
            Who::Client => Who::Conman,
            Who::Conman => Who::Client,
        }
    }
    /// The direction of bytes received from this side.
    fn outbound(self) -> Direction {
        match self {
            Who::Client => Direction::ToConman,
            Who::Conman => Direction::ToClient,
        }
    }
    fn recv_op(self) -> u8 {
        match self {
            Who::Client => OP_RECV_CLIENT,
            Who::Conman => OP_RECV_CONMAN,
        }
    }
    fn send_op(self) -> u8 {
        match self {
            Who::Client => OP_SEND_CLIENT,
            Who::Conman => OP_SEND_CONMAN,
        }
    }
    fn poll_in_op(self) -> u8 {
        match self {
            Who::Client => OP_POLL_IN_CLIENT,
            Who::Conman => OP_POLL_IN_CONMAN,
        }
    }
    fn poll_out_op(self) -> u8 {
        match self {
            Who::Client => OP_POLL_OUT_CLIENT,
            Who::Conman => OP_POLL_OUT_CONMAN,
        }
    }
}

/// The side bytes come from, the side they go to, and the tracker of that
/// direction, borrowed together.
fn split(s: &mut Session, from: Who) -> (&mut Side, &mut Side, &mut Tracker) {
    match from {
        Who::Client => (&mut s.client, &mut s.conman, &mut s.to_conman),
        Who::Conman => (&mut s.conman, &mut s.client, &mut s.to_client),
    }
}

/// splice(2) between a socket and a pipe, never blocking; bytes moved or
/// the errno.
fn splice_nb(fd_in: RawFd, fd_out: RawFd, len: usize) -> Result<usize, i32> {
    // SAFETY: plain descriptors, no user memory involved.
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(n as usize)
    }
}

fn new_pipe(size: u32) -> io::Result<Pipe> {
    let mut fds = [0; 2];
    // SAFETY: fds is two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pipe = Pipe {
        r: fds[0],
        w: fds[1],
        cap: 65536,
    };
    // SAFETY: our pipe. A refusal (fs.pipe-max-size) keeps the default size.
    let got = unsafe { libc::fcntl(pipe.w, libc::F_SETPIPE_SZ, size as libc::c_int) };
    let got = if got > 0 {
        got
    } else {
        // SAFETY: as above.
        unsafe { libc::fcntl(pipe.w, libc::F_GETPIPE_SZ) }
    };
    if got > 0 {
        pipe.cap = got as u32;
    }
    Ok(pipe)
}

fn set_nonblocking(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: our socket; FIONBIO takes a pointer to an int.
    unsafe { libc::ioctl(fd, libc::FIONBIO, &on) };
}

fn side(s: &mut Session, who: Who) -> &mut Side {
    match who {
        Who::Client => &mut s.client,
        Who::Conman => &mut s.conman,
    }
}

/// The socket to the control shard: placement requests out, replies in.
struct Ctl {
    fd: RawFd,
    inbuf: Vec<u8>,
    /// Encoded requests not yet handed to the kernel.
    out: Vec<u8>,
    /// Bytes of the send in flight (stable until it completes).
    sending: Vec<u8>,
    sent: usize,
    send_in_flight: bool,
    recv_armed: bool,
    /// The control shard went away: placements fail fast.
    dead: bool,
    next_req: u16,
}

/// The ring, buffers and timers: everything but the sessions, so that a
/// session and the IO state can be borrowed at the same time.
struct Io {
    ring: IoUring,
    bufs: BufRing,
    stats: Arc<ShardStats>,
    cfg: Arc<Config>,
    keys: LocalKeys,
    verify_cache: VerifyCache,
    verify: VerifyOptions,
    ctl: Ctl,
    local_placement: Option<Arc<LocalStatic>>,
    timers: BinaryHeap<Reverse<(Instant, u32, u16)>>,
    rng: SmallRng,
    now: Instant,
    now_unix: i64,
    shard: usize,
    next_session: u64,
    last_trim: Instant,
    /// Sessions whose receive stopped for want of buffers (ENOBUFS).
    starved: Vec<(u32, u16, Who)>,
    /// Empty pipes from finished splices.
    pipes: Vec<Pipe>,
    /// Sessions whose token is verified at the end of this loop turn.
    verify_queue: Vec<(u32, u16)>,
}

pub struct Shard {
    io: Io,
    sessions: Vec<Option<Session>>,
    free: Vec<u32>,
    gens: Vec<u16>,
    live: usize,
    listener: RawFd,
    accepting: bool,
    wake_fd: RawFd,
    wake_buf: Box<u64>,
    control: Arc<Control>,
    grace_done: bool,
}

impl Shard {
    pub fn new(spec: ShardSpec) -> io::Result<Shard> {
        let cfg = spec.cfg;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(16384)
            .build(4096)?;
        let bufs = BufRing::new(&ring, cfg.buffers.count as u16, cfg.buffers.size)?;
        let verify = VerifyOptions {
            leeway_s: cfg.token.leeway_s,
            cluster: cfg.token.cluster.clone(),
        };
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(io::Error::other)?;
        Ok(Shard {
            io: Io {
                ring,
                bufs,
                stats: spec.stats,
                keys: LocalKeys::new(spec.keys),
                verify_cache: VerifyCache::new(4096),
                verify,
                local_placement: spec.local_placement,
                ctl: Ctl {
                    fd: spec.control_fd,
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    sending: Vec::new(),
                    sent: 0,
                    send_in_flight: false,
                    recv_armed: false,
                    dead: false,
                    next_req: 0,
                },
                timers: BinaryHeap::new(),
                rng: SmallRng::from_seed(seed),
                now: Instant::now(),
                now_unix: 0,
                shard: spec.id,
                next_session: 0,
                last_trim: Instant::now(),
                starved: Vec::new(),
                pipes: Vec::new(),
                verify_queue: Vec::new(),
                cfg,
            },
            sessions: Vec::new(),
            free: Vec::new(),
            gens: Vec::new(),
            live: 0,
            listener: spec.listener,
            accepting: true,
            wake_fd: spec.wake_fd,
            wake_buf: Box::new(0),
            control: spec.control,
            grace_done: false,
        })
    }

    /// Runs until drained: not accepting and no session left.
    pub fn run(mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        self.io.arm_ctl_recv();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            self.io.bufs.publish();
            let mut timeout = self
                .io
                .timers
                .peek()
                .map(|Reverse((t, _, _))| t.saturating_duration_since(Instant::now()));
            if self.io.bufs.dirty() {
                // Wake once more after traffic stops, to trim the pool.
                timeout = Some(timeout.map_or(TRIM_EVERY, |t| t.min(TRIM_EVERY)));
            }
            if self.io.cfg.listen.busy_poll_us > 0 {
                self.busy_poll(timeout);
            }
            let r = match timeout {
                Some(d) => {
                    let ts = types::Timespec::from(d);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.io.ring.submitter().submit_with_args(1, &args)
                }
                None => self.io.ring.submit_and_wait(1),
            };
            if let Err(e) = r {
                match e.raw_os_error() {
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                    _ => return Err(e),
                }
            }
            self.io.now = Instant::now();
            self.io.keys.refresh();
            self.io.now_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            cqes.clear();
            cqes.extend(
                self.io
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(u, res, flags) in &cqes {
                self.complete(u, res, flags);
            }
            self.verify_batch();
            self.fire_timers();
            self.retry_starved();
            if self.io.now.duration_since(self.io.last_trim) >= TRIM_EVERY {
                self.io.last_trim = self.io.now;
                self.io.bufs.trim_if_idle();
            }
            if !self.accepting && self.live == 0 {
                break;
            }
        }
        info!(
            shard = self.io.shard,
            accepted = self.io.stats.accepted.load(Ordering::Relaxed),
            "shard stopped"
        );
        self.io.bufs.unregister(&self.io.ring);
        // SAFETY: our end of the control socketpair; the ring is idle. The
        // control shard sees EOF and ends once every shard is gone.
        unsafe { libc::close(self.io.ctl.fd) };
        Ok(())
    }

    fn arm_accept(&mut self) {
        self.io.push(
            opcode::AcceptMulti::new(types::Fd(self.listener))
                .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
                .build()
                .user_data(ud(0, 0, OP_ACCEPT)),
        );
    }

    fn arm_wake(&mut self) {
        let p = &mut *self.wake_buf as *mut u64 as *mut u8;
        self.io.push(
            opcode::Read::new(types::Fd(self.wake_fd), p, 8)
                .build()
                .user_data(ud(0, 0, OP_WAKE)),
        );
    }

    fn complete(&mut self, u: u64, res: i32, flags: u32) {
        let (slot, gen, op) = ud_parts(u);
        match op {
            OP_ACCEPT => self.on_accept(res, flags),
            OP_WAKE => self.on_wake(res),
            OP_IGNORE => {}
            OP_CTL_SEND => self.io.on_ctl_send(res),
            OP_CTL_RECV => self.on_ctl_recv(res, flags),
            _ => {
                let Some(Some(s)) = self.sessions.get_mut(slot as usize) else {
                    return;
                };
                if s.gen != gen {
                    return;
                }
                let io = &mut self.io;
                match op {
                    OP_RECV_CLIENT => io.on_recv(slot, s, Who::Client, res, flags),
                    OP_RECV_CONMAN => io.on_recv(slot, s, Who::Conman, res, flags),
                    OP_SEND_CLIENT => io.on_send(slot, s, Who::Client, res),
                    OP_SEND_CONMAN => io.on_send(slot, s, Who::Conman, res),
                    OP_CONNECT => io.on_connect(slot, s, res),
                    OP_POLL_IN_CLIENT => io.on_poll(slot, s, Who::Client, Who::Client),
                    OP_POLL_IN_CONMAN => io.on_poll(slot, s, Who::Conman, Who::Conman),
                    // POLLOUT on a socket serves the splice *to* it.
                    OP_POLL_OUT_CLIENT => io.on_poll(slot, s, Who::Client, Who::Conman),
                    OP_POLL_OUT_CONMAN => io.on_poll(slot, s, Who::Conman, Who::Client),
                    _ => {}
                }
                self.progress(slot);
            }
        }
    }

    fn on_ctl_recv(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.io.ctl.recv_armed = false;
        }
        if res > 0 {
            if let Some(bid) = cqueue::buffer_select(flags) {
                self.io.bufs.taken(bid);
                let data = self.io.bufs.slice(bid, 0, res as u32);
                self.io.ctl.inbuf.extend_from_slice(data);
                self.io.bufs.recycle(bid);
            }
            loop {
                match ToShard::decode(&self.io.ctl.inbuf) {
                    Ok(Some((msg, used))) => {
                        self.io.ctl.inbuf.drain(..used);
                        let ToShard::Placement { id, result } = msg;
                        self.dispatch_placement(id, result);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error!(shard = self.io.shard, err = %e, "bad message from the control shard");
                        self.control_lost();
                        return;
                    }
                }
            }
            if !self.io.ctl.recv_armed {
                self.io.arm_ctl_recv();
            }
            return;
        }
        match -res {
            libc::ENOBUFS => {
                ShardStats::inc(&self.io.stats.buffer_exhausted);
                if !self.io.ctl.recv_armed {
                    self.io.arm_ctl_recv();
                }
            }
            _ => {
                if self.accepting {
                    error!(
                        shard = self.io.shard,
                        err = res,
                        "control shard connection lost"
                    );
                }
                self.control_lost();
            }
        }
    }

    fn dispatch_placement(&mut self, id: u64, result: PlacementResult) {
        let slot = (id >> 32) as u32;
        let gen = (id >> 16) as u16;
        let Some(Some(s)) = self.sessions.get_mut(slot as usize) else {
            return;
        };
        let current = s.setup.as_ref().is_some_and(|st| st.request_id == id);
        if s.gen != gen || s.phase != Phase::Placement || !current {
            return;
        }
        self.io.on_placement(slot, s, result);
        self.progress(slot);
    }

    /// Without the control shard no placement can be had: fail the
    /// sessions waiting for one, and every later one, fast.
    fn control_lost(&mut self) {
        self.io.ctl.dead = true;
        for slot in 0..self.sessions.len() {
            if let Some(s) = self.sessions[slot].as_mut() {
                if s.phase == Phase::Placement {
                    let e = SetupError::new(Stage::Controlplane, "control_unavailable");
                    self.io.fail_setup(slot as u32, s, e);
                    self.progress(slot as u32);
                }
            }
        }
    }

    fn on_wake(&mut self, res: i32) {
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
            warn!(shard = self.io.shard, err = res, "wake eventfd read failed");
        }
        if self.control.draining.load(Ordering::Acquire) && self.accepting {
            self.accepting = false;
            // Closing the listener drops connections still in its accept
            // queue; SO_REUSEPORT peers (or the new process) take new ones.
            // Cancel first so the multishot accept releases its file ref.
            self.io.push(
                opcode::AsyncCancel::new(ud(0, 0, OP_ACCEPT))
                    .build()
                    .user_data(ud(0, 0, OP_IGNORE)),
            );
            info!(shard = self.io.shard, live = self.live, "draining");
        }
        if self.control.grace_over.load(Ordering::Acquire) && !self.grace_done {
            self.grace_done = true;
            for slot in 0..self.sessions.len() {
                if let Some(s) = self.sessions[slot].as_mut() {
                    self.io.end_session(
                        slot as u32,
                        s,
                        close::GOING_AWAY,
                        "stage=drain;reason=grace_over",
                    );
                    self.progress(slot as u32);
                }
            }
        }
        self.arm_wake();
    }

    fn on_accept(&mut self, res: i32, flags: u32) {
        if res < 0 {
            if res == -libc::ECANCELED {
                // SAFETY: our listener; the accept op that used it is done.
                unsafe { libc::close(self.listener) };
                return;
            }
            // EMFILE / ENFILE / ENOBUFS: the multishot accept ends; re-arm
            // so a transient shortage does not stop the shard for good.
            warn!(shard = self.io.shard, err = res, "accept failed");
        } else {
            ShardStats::inc(&self.io.stats.accepted);
            self.new_session(res);
        }
        if !cqueue::more(flags) && self.accepting {
            self.arm_accept();
        }
    }

    fn new_session(&mut self, fd: RawFd) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.sessions.push(None);
                self.gens.push(0);
                (self.sessions.len() - 1) as u32
            }
        };
        let gen = self.gens[slot as usize].wrapping_add(1);
        self.gens[slot as usize] = gen;
        let io = &mut self.io;
        io.next_session += 1;
        let tcfg = |allow_rsv1| TrackerConfig {
            max_frame: io.cfg.limits.max_frame,
            allow_rsv1,
        };
        let mut s = Session {
            id: ((io.shard as u64) << 48) | io.next_session,
            gen,
            phase: Phase::Head,
            client: Side::new(fd),
            conman: Side::new(-1),
            head: Vec::new(),
            held: Vec::new(),
            to_conman: Tracker::new(Direction::ToConman, tcfg(false)),
            to_client: Tracker::new(Direction::ToClient, tcfg(false)),
            deadline: None,
            started: io.now,
            phase_started: io.now,
            ident: None,
            setup: None,
            injected_close_to_client: false,
            injected_close_to_conman: false,
            counted_active: false,
            verify_pending: false,
        };
        let deadline = io.now + io.cfg.header_timeout();
        io.set_deadline(slot, &mut s, deadline);
        io.arm_recv(slot, &mut s, Who::Client);
        self.sessions[slot as usize] = Some(s);
        self.live += 1;
    }

    /// Submits, then polls the ring without sleeping until a completion
    /// arrives or `listen.busy_poll_us` (or the next timer) has passed.
    /// Task work (DEFER_TASKRUN) runs only inside `io_uring_enter` with
    /// GETEVENTS, so each poll is one non-blocking enter.
    fn busy_poll(&mut self, timeout: Option<Duration>) {
        let budget = Duration::from_micros(u64::from(self.io.cfg.listen.busy_poll_us));
        let budget = timeout.map_or(budget, |t| t.min(budget));
        let start = Instant::now();
        loop {
            let to_submit = self.io.ring.submission().len();
            // SAFETY: no signal mask; the ring is ours.
            let r = unsafe {
                self.io.ring.submitter().enter::<libc::sigset_t>(
                    to_submit as u32,
                    0,
                    1, // IORING_ENTER_GETEVENTS
                    None,
                )
            };
            if r.is_err() || !self.io.ring.completion().is_empty() || start.elapsed() >= budget {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Verifies the fresh tokens queued during this loop turn together and
    /// lets each of their sessions go on.
    fn verify_batch(&mut self) {
        if self.io.verify_queue.is_empty() {
            return;
        }
        let queue = std::mem::take(&mut self.io.verify_queue);
        let mut reqs = Vec::with_capacity(queue.len());
        for &(slot, gen) in &queue {
            let Some(Some(s)) = self.sessions.get_mut(slot as usize) else {
                continue;
            };
            if s.gen != gen || !s.verify_pending || s.phase != Phase::Head {
                continue;
            }
            s.verify_pending = false;
            if let Some((req, head_len)) = self.io.pending_request(s) {
                reqs.push((slot, req, head_len));
            }
        }
        let t0 = Instant::now();
        let tokens: Vec<&str> = reqs
            .iter()
            .map(|(_, r, _)| r.token.as_deref().unwrap_or(""))
            .collect();
        let io = &mut self.io;
        let results = io
            .verify_cache
            .verify_uncached(&io.keys, &tokens, io.now_unix, &io.verify);
        drop(tokens);
        let each = t0.elapsed() / reqs.len().max(1) as u32;
        for ((slot, req, head_len), claims) in reqs.into_iter().zip(results) {
            let Some(s) = self.sessions[slot as usize].as_mut() else {
                continue;
            };
            self.io.stats.setup_duration(Timing::Token, each);
            self.io
                .admit(slot, s, req, head_len, claims.map_err(|e| e.as_str()));
            self.progress(slot);
        }
    }

    fn fire_timers(&mut self) {
        while let Some(&Reverse((t, slot, gen))) = self.io.timers.peek() {
            if t > self.io.now {
                break;
            }
            self.io.timers.pop();
            let Some(Some(s)) = self.sessions.get_mut(slot as usize) else {
                continue;
            };
            if s.gen != gen {
                continue;
            }
            match s.deadline {
                None => continue,
                Some(d) if d > self.io.now => {
                    // Moved later since this entry was pushed (see
                    // `set_deadline`): wait on for the real one.
                    self.io.timers.push(Reverse((d, slot, gen)));
                    continue;
                }
                Some(_) => {}
            }
            s.deadline = None;
            self.io.on_deadline(slot, s);
            self.progress(slot);
        }
        let cap = self.io.timers.capacity();
        if cap > 1024 && self.io.timers.len() < cap / 8 {
            // A storm of handshakes is over: don't keep its peak.
            self.io.timers.shrink_to(cap / 4);
        }
    }

    fn retry_starved(&mut self) {
        if self.io.starved.is_empty() || self.io.bufs.available() < 8 {
            return;
        }
        let starved = std::mem::take(&mut self.io.starved);
        for (slot, gen, who) in starved {
            let Some(Some(s)) = self.sessions.get_mut(slot as usize) else {
                continue;
            };
            if s.gen != gen {
                continue;
            }
            let sd = side(s, who);
            if sd.paused && !sd.recv_armed && !sd.eof && !sd.closed {
                sd.paused = false;
                self.io.arm_recv(slot, s, who);
            }
        }
    }

    /// Moves a session forward after any event: sends, backpressure,
    /// shutdowns, closes, and finally freeing the slot.
    fn progress(&mut self, slot: u32) {
        let Some(s) = self.sessions[slot as usize].as_mut() else {
            return;
        };
        let io = &mut self.io;
        for who in [Who::Client, Who::Conman] {
            io.start_splice(slot, s, who);
        }
        for who in [Who::Client, Who::Conman] {
            io.kick_send(slot, s, who);
        }
        if s.phase == Phase::Relay {
            for who in [Who::Client, Who::Conman] {
                io.backpressure(slot, s, who);
            }
        }
        if s.phase == Phase::Backoff {
            // The failed attempt's socket goes once nothing is in flight on
            // it; the retry starts once that and the backoff are both done.
            if s.conman.fd >= 0 && s.conman.inflight == 0 {
                // SAFETY: our socket, no operation in flight.
                unsafe { libc::close(s.conman.fd) };
                s.conman = Side::new(-1);
            }
            let ready = s.setup.as_ref().is_some_and(|st| st.backoff_done);
            if ready && s.conman.fd < 0 {
                io.request_placement(slot, s);
            }
        }
        if s.phase == Phase::Closing {
            for who in [Who::Client, Who::Conman] {
                io.close_side(slot, s, who);
            }
            if s.client.closed && s.conman.closed {
                if s.counted_active {
                    io.stats.active.fetch_sub(1, Ordering::Relaxed);
                }
                debug!(session = s.id, "session ended");
                self.sessions[slot as usize] = None;
                self.free.push(slot);
                self.live -= 1;
            }
        }
    }
}

impl Io {
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every pointer in our entries refers to memory owned by a
        // session (or the shard) that outlives the operation: sessions are
        // freed only when no operation on their sockets is in flight.
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                let _ = self.ring.submit();
            }
        }
    }

    /// Invariant: while `s.deadline` is `Some(d)`, the heap holds an entry
    /// for this session at or before `d`. Setup moves a deadline later at
    /// every stage, so each session normally has one entry, re-pushed when
    /// it fires early, instead of one per stage lingering until its time.
    fn set_deadline(&mut self, slot: u32, s: &mut Session, t: Instant) {
        let covered = s.deadline.is_some_and(|d| d <= t);
        s.deadline = Some(t);
        if !covered {
            self.timers.push(Reverse((t, slot, s.gen)));
        }
    }

    fn arm_recv(&mut self, slot: u32, s: &mut Session, who: Who) {
        let gen = s.gen;
        let sd = side(s, who);
        // In splice mode the bytes are read by splice(2), not into buffers.
        if sd.recv_armed || sd.fd < 0 || sd.eof || sd.splice.is_some() {
            return;
        }
        sd.recv_armed = true;
        sd.inflight += 1;
        let fd = sd.fd;
        let entry = if std::mem::take(&mut sd.probe) {
            // Right after a spliced frame the next one is likely long too:
            // take one buffer (its header) instead of a multishot receive,
            // which would copy up to 32 buffers of payload before a cancel
            // could stop it.
            opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), self.cfg.buffers.size)
                .buf_group(bufring::BGID)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            opcode::RecvMulti::new(types::Fd(fd), bufring::BGID).build()
        };
        self.push(entry.user_data(ud(slot, gen, who.recv_op())));
    }

    /// Stops a side's multishot receive (it cannot be paused otherwise).
    fn pause_recv(&mut self, slot: u32, s: &mut Session, who: Who) {
        let gen = s.gen;
        let sd = side(s, who);
        sd.paused = true;
        if sd.recv_armed && !sd.cancel_pending {
            sd.cancel_pending = true;
            self.push(
                opcode::AsyncCancel::new(ud(slot, gen, who.recv_op()))
                    .build()
                    .user_data(ud(slot, gen, OP_IGNORE)),
            );
        }
    }

    fn resume_recv(&mut self, slot: u32, s: &mut Session, who: Who) {
        let sd = side(s, who);
        if sd.paused {
            sd.paused = false;
            self.arm_recv(slot, s, who);
        }
    }

    fn backpressure(&mut self, slot: u32, s: &mut Session, src: Who) {
        let limit = self.cfg.limits.send_queue_bytes;
        let queued = side(s, src.other()).queued;
        let sd = side(s, src);
        if queued > limit && !sd.paused {
            ShardStats::inc(&self.stats.backpressure_pauses);
            self.pause_recv(slot, s, src);
        } else if queued <= limit / 2 && sd.paused && !sd.recv_armed {
            self.resume_recv(slot, s, src);
        }
    }

    fn kick_send(&mut self, slot: u32, s: &mut Session, who: Who) {
        let gen = s.gen;
        let sd = side(s, who);
        if sd.sending || sd.fd < 0 || sd.shut || sd.closed {
            return;
        }
        // The conman socket is not writable before its connect completes.
        if who == Who::Conman && matches!(s.phase, Phase::Head | Phase::Connecting) {
            return;
        }
        // A frame is being spliced to this side: what is queued (an
        // injected Close, say) follows it.
        if side(s, who.other())
            .splice
            .as_ref()
            .is_some_and(|sp| sp.started)
        {
            return;
        }
        let sd = side(s, who);
        let chunk_ptr = |bufs: &BufRing, c: &Chunk| -> (*mut u8, usize) {
            match c {
                // SAFETY: within the buffer; we own it until recycled.
                Chunk::Buf { bid, off, len } => (
                    unsafe { bufs.buf_ptr(*bid).add(*off as usize) },
                    *len as usize,
                ),
                Chunk::Owned { data, off } => (
                    data[*off as usize..].as_ptr() as *mut u8,
                    data.len() - *off as usize,
                ),
            }
        };
        let entry = match sd.sendq.len() {
            0 => return,
            1 => {
                let (ptr, len) = chunk_ptr(&self.bufs, sd.sendq.front().expect("one chunk"));
                opcode::Send::new(types::Fd(sd.fd), ptr, len as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            n => {
                // A backlog (bulk transfer, slow peer): one sendmsg for up
                // to GATHER_MAX chunks instead of a send per buffer.
                let g = sd.gather.get_or_insert_with(Gather::new);
                let n = n.min(GATHER_MAX);
                for (i, c) in sd.sendq.iter().take(n).enumerate() {
                    let (ptr, len) = chunk_ptr(&self.bufs, c);
                    g.iov[i] = libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: len,
                    };
                }
                g.msg.msg_iov = g.iov.as_mut_ptr();
                g.msg.msg_iovlen = n;
                opcode::SendMsg::new(types::Fd(sd.fd), &g.msg)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
            }
        };
        sd.sending = true;
        sd.inflight += 1;
        self.push(entry.user_data(ud(slot, gen, who.send_op())));
    }

    /// After a buffer from `from` was relayed: if a long data frame is under
    /// way, stop the buffered receive so its payload can be spliced.
    fn maybe_splice(&mut self, slot: u32, s: &mut Session, from: Who) {
        let min = self.cfg.buffers.splice_min;
        let (src, _, tracker) = split(s, from);
        if min == 0 || src.splice.is_some() || src.eof || tracker.data_payload_remaining() < min {
            return;
        }
        let pipe = match self.pipes.pop() {
            Some(p) => p,
            None => match new_pipe(self.cfg.buffers.pipe_size) {
                Ok(p) => p,
                Err(e) => {
                    // Out of descriptors, say: copying still works.
                    debug!(session = s.id, err = %e, "no pipe for splice");
                    return;
                }
            },
        };
        src.splice = Some(Box::new(Splice {
            pipe,
            in_pipe: 0,
            started: false,
            poll_in: false,
            poll_out: false,
        }));
        self.pause_recv(slot, s, from);
    }

    /// Splicing begins once the multishot receive has ended (all it took is
    /// tracked) and everything queued before is sent, so bytes stay in order.
    fn start_splice(&mut self, slot: u32, s: &mut Session, from: Who) {
        let (src, dst, _) = split(s, from);
        let Some(sp) = src.splice.as_mut() else {
            return;
        };
        if sp.started || src.recv_armed || !(dst.drained() || dst.shut || dst.closed) {
            return;
        }
        sp.started = true;
        for sd in [&mut *src, &mut *dst] {
            if !sd.nonblocking && sd.fd >= 0 {
                set_nonblocking(sd.fd);
                sd.nonblocking = true;
            }
        }
        self.pump(slot, s, from);
    }

    /// A POLLIN on `socket_of` (its own splice) or a POLLOUT on it (the
    /// splice from the other side) completed.
    fn on_poll(&mut self, slot: u32, s: &mut Session, socket_of: Who, from: Who) {
        side(s, socket_of).inflight -= 1;
        if let Some(sp) = side(s, from).splice.as_mut() {
            if socket_of == from {
                sp.poll_in = false;
            } else {
                sp.poll_out = false;
            }
        }
        self.pump(slot, s, from);
    }

    /// Moves the current frame's payload from `from` through its pipe to the
    /// other side until a socket would block, the frame ends, or a side goes.
    fn pump(&mut self, slot: u32, s: &mut Session, from: Who) {
        let (gen, id) = (s.gen, s.id);
        let dir = from.outbound();
        // Whether the source may have bytes: true until a splice from it
        // comes back short.
        let mut readable = true;
        loop {
            let relaying = s.phase == Phase::Relay;
            let (src, dst, tracker) = split(s, from);
            let Some(sp) = src.splice.as_mut() else {
                return;
            };
            if !sp.started || sp.poll_in || sp.poll_out {
                return;
            }
            if dst.shut || dst.closed || dst.fd < 0 {
                // Nobody left to deliver to; the closing path reads on.
                self.end_splice(slot, s, from, false);
                return;
            }
            let remaining = tracker.data_payload_remaining();
            // Fill the pipe while the source has bytes, then write it out
            // in one go: fewer, larger sends wake the receiver less often.
            let filling =
                readable && remaining > 0 && relaying && !src.eof && sp.in_pipe < sp.pipe.cap;
            if sp.in_pipe > 0 && !filling {
                let res = splice_nb(sp.pipe.r, dst.fd, sp.in_pipe as usize);
                if let Ok(n) = res {
                    sp.in_pipe -= n as u32;
                }
                match res {
                    Ok(_) if sp.in_pipe == 0 => continue,
                    // Short write or none: its socket buffer is full.
                    Ok(_) | Err(libc::EAGAIN) => {
                        sp.poll_out = true;
                        dst.inflight += 1;
                        let fd = dst.fd;
                        self.push_poll(
                            fd,
                            libc::POLLOUT,
                            ud(slot, gen, from.other().poll_out_op()),
                        );
                        return;
                    }
                    Err(err) => {
                        debug!(session = id, err, "splice to peer failed");
                        src.splice = None;
                        self.send_failed(slot, s, from.other());
                        self.end_splice(slot, s, from, false);
                        return;
                    }
                }
            }
            if sp.in_pipe == 0 && (remaining == 0 || src.eof || !relaying) {
                // The frame is through (or the session is ending): back to
                // buffered receives, which see the next header.
                let lost = src.eof;
                self.end_splice(slot, s, from, remaining == 0);
                if lost {
                    // Reported only now that the pipe has been delivered.
                    self.on_side_lost(slot, s, from);
                }
                return;
            }
            if !readable {
                sp.poll_in = true;
                src.inflight += 1;
                let fd = src.fd;
                self.push_poll(fd, libc::POLLIN, ud(slot, gen, from.poll_in_op()));
                return;
            }
            let want = remaining.min(u64::from(sp.pipe.cap - sp.in_pipe)) as usize;
            match splice_nb(src.fd, sp.pipe.w, want) {
                Ok(0) => {
                    // FIN inside the frame. The pipe may still hold bytes
                    // (it is refilled before a partial write is retried):
                    // they go out first, then the loss is handled above.
                    src.eof = true;
                    readable = false;
                }
                Ok(n) => {
                    readable = n == want;
                    sp.in_pipe += n as u32;
                    let frames = tracker.frames();
                    tracker.skip_payload(n as u64);
                    let frames = tracker.frames() - frames;
                    self.stats.add_bytes(dir, n as u64, frames);
                    self.stats
                        .spliced_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(libc::EAGAIN) => readable = false,
                Err(err) => {
                    debug!(session = id, err, "splice from peer failed");
                    // As for a FIN: what was read is still delivered.
                    src.eof = true;
                    readable = false;
                }
            }
        }
    }

    /// Leaves splice mode: an empty pipe goes back to the pool (one still
    /// holding bytes nobody will read is closed) and buffered receives
    /// resume, single-buffer first if `probe`.
    fn end_splice(&mut self, slot: u32, s: &mut Session, from: Who, probe: bool) {
        let src = side(s, from);
        if let Some(sp) = src.splice.take() {
            if sp.in_pipe == 0 && self.pipes.len() < PIPE_POOL {
                self.pipes.push(sp.pipe);
            }
        }
        src.paused = false;
        src.probe = probe;
        self.arm_recv(slot, s, from);
    }

    fn push_poll(&mut self, fd: RawFd, events: libc::c_short, user_data: u64) {
        self.push(
            opcode::PollAdd::new(types::Fd(fd), events as u32)
                .build()
                .user_data(user_data),
        );
    }

    /// Drops what is queued for a side, giving ring buffers back.
    fn discard_queued(&mut self, s: &mut Session, who: Who) {
        let sd = side(s, who);
        for c in sd.sendq.drain() {
            if let Chunk::Buf { bid, .. } = c {
                self.bufs.recycle(bid);
            }
        }
        sd.queued = 0;
    }

    /// Writing to `who` failed: the peer is gone, and what is queued for it
    /// can never be sent.
    fn send_failed(&mut self, slot: u32, s: &mut Session, who: Who) {
        self.discard_queued(s, who);
        let sd = side(s, who);
        sd.eof = true;
        sd.shut = true;
        self.on_side_lost(slot, s, who);
    }

    fn on_send(&mut self, slot: u32, s: &mut Session, who: Who, res: i32) {
        let sd = side(s, who);
        sd.inflight -= 1;
        sd.sending = false;
        if res == -libc::EAGAIN {
            // The socket is O_NONBLOCK (splice mode) and io_uring gave up
            // retrying: nothing was sent, the next kick sends it again.
            return;
        }
        if res < 0 {
            debug!(session = s.id, err = res, "send failed");
            self.send_failed(slot, s, who);
            return;
        }
        let mut n = res as usize;
        sd.queued -= n;
        // A (gathered) send may cover several chunks and end inside one.
        while n > 0 {
            let Some(front) = sd.sendq.front_mut() else {
                break;
            };
            let take = n.min(front.remaining());
            n -= take;
            let done = match front {
                Chunk::Buf { off, len, .. } => {
                    *off += take as u32;
                    *len -= take as u32;
                    *len == 0
                }
                Chunk::Owned { data, off } => {
                    *off += take as u32;
                    *off as usize == data.len()
                }
            };
            if !done {
                break;
            }
            if let Some(Chunk::Buf { bid, .. }) = sd.sendq.pop_front() {
                self.bufs.recycle(bid);
            }
        }
        if sd.sendq.is_empty() {
            // The backlog is over; an idle session keeps no iovec array.
            sd.gather = None;
        }
    }

    fn on_recv(&mut self, slot: u32, s: &mut Session, who: Who, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if !more {
            let sd = side(s, who);
            sd.recv_armed = false;
            sd.inflight -= 1;
            sd.cancel_pending = false;
        }
        if res <= 0 {
            match -res {
                libc::ENOBUFS => {
                    ShardStats::inc(&self.stats.buffer_exhausted);
                    side(s, who).paused = true;
                    self.starved.push((slot, s.gen, who));
                }
                libc::ECANCELED | libc::EAGAIN => {
                    // EAGAIN: an O_NONBLOCK socket (splice mode) with
                    // nothing to read; the receive is simply re-armed.
                    let sd = side(s, who);
                    if !more && !sd.paused && !sd.eof && !sd.closed {
                        self.arm_recv(slot, s, who);
                    }
                }
                _ => {
                    // FIN (0) or a socket error: this side sends no more.
                    side(s, who).eof = true;
                    self.on_side_lost(slot, s, who);
                }
            }
            return;
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            warn!(session = s.id, "receive completion without a buffer");
            return;
        };
        self.bufs.taken(bid);
        self.on_data(slot, s, who, bid, res as u32);
        // A multishot receive may end on its own (or a cancel may land after
        // a resume): re-arm unless the side is meant to be quiet.
        let sd = side(s, who);
        if !more && !sd.paused && !sd.eof && !sd.closed {
            self.arm_recv(slot, s, who);
        }
    }

    fn on_data(&mut self, slot: u32, s: &mut Session, who: Who, bid: u16, len: u32) {
        match s.phase {
            Phase::Head if who == Who::Client => {
                s.head.extend_from_slice(self.bufs.slice(bid, 0, len));
                self.bufs.recycle(bid);
                if !s.verify_pending {
                    self.on_head(slot, s);
                }
            }
            Phase::Placement | Phase::Connecting | Phase::ConmanHandshake | Phase::Backoff
                if who == Who::Client =>
            {
                s.held.extend_from_slice(self.bufs.slice(bid, 0, len));
                self.bufs.recycle(bid);
                if s.held.len() >= self.cfg.limits.held_bytes {
                    self.pause_recv(slot, s, Who::Client);
                }
            }
            Phase::ConmanHandshake => {
                s.head.extend_from_slice(self.bufs.slice(bid, 0, len));
                self.bufs.recycle(bid);
                self.on_conman_head(slot, s);
            }
            Phase::Relay => self.relay(slot, s, who, bid, len),
            _ => {
                // Closing (or input we no longer want): drain and discard so
                // the socket can end with a FIN rather than a reset.
                // Conman's answer to the client's Close still reaches the
                // client, unless the proxy already closed toward it.
                let wanted =
                    s.phase == Phase::Closing && who == Who::Conman && !s.injected_close_to_client;
                let dest = side(s, who.other());
                if wanted && !dest.shut && !dest.closed {
                    self.forward(s, who, bid, len);
                } else {
                    self.bufs.recycle(bid);
                }
            }
        }
    }

    /// Queues a received buffer toward the other side after tracking it.
    fn forward(&mut self, s: &mut Session, from: Who, bid: u16, len: u32) {
        let dir = from.outbound();
        if s.tracker(dir).close_seen() {
            // RFC 6455 5.5.1: nothing follows a Close; ignore what does.
            self.bufs.recycle(bid);
            return;
        }
        let scanned = scan(s.tracker(dir), self.bufs.slice(bid, 0, len));
        self.account(from, &scanned);
        let dest = side(s, from.other());
        if scanned.good > 0 && !dest.shut && !dest.closed {
            dest.push(Chunk::Buf {
                bid,
                off: 0,
                len: scanned.good as u32,
            });
        } else {
            self.bufs.recycle(bid);
        }
        self.after_scan(s, from, &scanned);
    }

    fn account(&mut self, from: Who, scanned: &Scanned) {
        self.stats
            .add_bytes(from.outbound(), scanned.good as u64, scanned.frames);
        if let Some(code) = scanned.close {
            let side_label = match from {
                Who::Client => CloseSide::Client,
                Who::Conman => CloseSide::Conman,
            };
            self.stats.close_code(side_label, code);
        }
    }

    fn after_scan(&mut self, s: &mut Session, from: Who, scanned: &Scanned) {
        match scanned.violation {
            // A peer may race data against its own Close: drop it quietly.
            Some(v) if v.reason == DATA_AFTER_CLOSE => {}
            Some(v) => {
                debug!(
                    session = s.id,
                    code = v.code,
                    reason = v.reason,
                    "protocol violation"
                );
                self.on_violation(s, from, v.code, v.reason);
            }
            None => {}
        }
    }

    fn relay(&mut self, slot: u32, s: &mut Session, from: Who, bid: u16, len: u32) {
        self.forward(s, from, bid, len);
        if s.phase != Phase::Relay {
            return;
        }
        self.maybe_splice(slot, s, from);
        let both_closed = s.to_conman.close_seen() && s.to_client.close_seen();
        if both_closed {
            // The close handshake is complete: end the TCP streams once
            // both Close frames are out.
            self.begin_closing(slot, s);
        } else if (s.to_conman.close_seen() || s.to_client.close_seen()) && s.deadline.is_none() {
            let t = self.now + CLOSE_HANDSHAKE;
            self.set_deadline(slot, s, t);
        }
    }

    fn on_violation(&mut self, s: &mut Session, from: Who, code: u16, reason: &'static str) {
        // The violating side gets the protocol close code; the other side
        // learns its peer is gone. Neither hears of the other's bytes again.
        let text = close::reason_text("relay", reason, None);
        match from {
            Who::Client => {
                self.inject_close(s, Who::Client, code, &text);
                self.inject_close(
                    s,
                    Who::Conman,
                    close::GOING_AWAY,
                    "stage=client_gone;reason=protocol_error",
                );
            }
            Who::Conman => {
                self.inject_close(s, Who::Conman, code, &text);
                let e = SetupError::new(Stage::Relay, "conman_protocol_error");
                self.inject_close(s, Who::Client, e.close_code(), &e.close_reason());
            }
        }
        side(s, from).eof = true;
        s.phase = Phase::Closing;
        s.client.want_shut = true;
        s.conman.want_shut = true;
    }

    /// Queues a Close frame toward `to` if its stream is at a frame boundary
    /// and it has not had one; otherwise only its TCP stream will end.
    fn inject_close(&mut self, s: &mut Session, to: Who, code: u16, reason: &str) {
        let (tracker_ok, already, mask) = match to {
            Who::Client => (
                s.to_client.at_frame_boundary(),
                s.injected_close_to_client || s.to_client.close_seen(),
                None,
            ),
            Who::Conman => (
                s.to_conman.at_frame_boundary(),
                s.injected_close_to_conman || s.to_conman.close_seen(),
                Some(self.rng.gen::<[u8; 4]>()),
            ),
        };
        let sd = side(s, to);
        if !tracker_ok || already || sd.fd < 0 || sd.shut || sd.closed {
            return;
        }
        let mut frame = Vec::with_capacity(4 + reason.len() + 8);
        write_close(&mut frame, code, reason, mask);
        sd.push_owned(frame);
        match to {
            Who::Client => {
                s.injected_close_to_client = true;
                self.stats.close_code(CloseSide::ProxyToClient, code);
            }
            Who::Conman => {
                s.injected_close_to_conman = true;
                self.stats.close_code(CloseSide::ProxyToConman, code);
            }
        }
    }

    fn begin_closing(&mut self, slot: u32, s: &mut Session) {
        if s.phase == Phase::Closing {
            return;
        }
        s.phase = Phase::Closing;
        s.client.want_shut = true;
        s.conman.want_shut = true;
        let t = self.now + LINGER;
        self.set_deadline(slot, s, t);
    }

    /// Ends a session from the proxy's side with a Close to both peers.
    fn end_session(&mut self, slot: u32, s: &mut Session, code: u16, reason: &str) {
        if s.phase == Phase::Relay {
            self.inject_close(s, Who::Client, code, reason);
            self.inject_close(s, Who::Conman, close::GOING_AWAY, reason);
        }
        self.begin_closing(slot, s);
    }

    /// A side stopped sending (FIN, reset, failed send).
    fn on_side_lost(&mut self, slot: u32, s: &mut Session, who: Who) {
        match s.phase {
            Phase::Head => {
                // Nothing was promised yet: just go.
                self.begin_closing(slot, s);
            }
            Phase::Placement | Phase::Connecting | Phase::ConmanHandshake | Phase::Backoff
                if who == Who::Client =>
            {
                self.fail_setup(slot, s, SetupError::new(Stage::ClientGone, "eof"));
            }
            Phase::Connecting | Phase::ConmanHandshake => {
                let e = SetupError::new(Stage::ConmanHandshake, "eof");
                self.retry_or_fail(slot, s, e);
            }
            // An abandoned attempt's socket ending changes nothing.
            Phase::Placement | Phase::Backoff => {}
            Phase::Relay => {
                let dir = who.outbound();
                let close_already = match who {
                    Who::Client => s.to_conman.close_seen(),
                    Who::Conman => s.to_client.close_seen(),
                };
                let at_boundary = s.tracker(dir).at_frame_boundary();
                match on_eof(who == Who::Client, at_boundary, close_already) {
                    EofAction::InjectClose { code, reason } => {
                        self.inject_close(s, who.other(), code, &reason);
                    }
                    EofAction::Shutdown => {}
                }
                if who == Who::Conman && !close_already {
                    debug!(session = s.id, "conman lost mid-session");
                }
                self.begin_closing(slot, s);
            }
            Phase::Closing => {}
        }
    }

    fn on_deadline(&mut self, slot: u32, s: &mut Session) {
        match s.phase {
            Phase::Head => {
                self.stats
                    .setup_failure(Stage::Request, "header_timeout", true);
                let mut out = Vec::new();
                http1::write_status(&mut out, 408, "request head not received in time");
                self.stats.http_response(408);
                s.client.push_owned(out);
                self.begin_closing(slot, s);
            }
            Phase::Placement | Phase::Connecting | Phase::ConmanHandshake | Phase::Backoff => {
                let st = s.setup.as_mut().expect("setup state");
                let overall = self.now >= st.deadline;
                let stage = match s.phase {
                    Phase::Placement => Stage::Controlplane,
                    Phase::Connecting => Stage::ConmanConnect,
                    _ => Stage::ConmanHandshake,
                };
                if s.phase == Phase::Backoff && !overall {
                    st.backoff_done = true;
                } else if overall {
                    let e = match (s.phase, st.last_error) {
                        // Out of time while waiting to retry: the failure
                        // that caused the wait is the one to report.
                        (Phase::Backoff, Some(e)) => e,
                        _ => SetupError::new(stage, "timeout"),
                    };
                    self.fail_setup(slot, s, e);
                } else {
                    // One attempt's handshake took too long; others may not.
                    self.retry_or_fail(slot, s, SetupError::new(stage, "timeout"));
                }
            }
            Phase::Relay => {
                // A Close went one way and no answer came back.
                self.begin_closing(slot, s);
            }
            Phase::Closing => {
                // Peers that neither read nor close: force both sockets
                // down so every pending operation completes.
                for who in [Who::Client, Who::Conman] {
                    let sd = side(s, who);
                    if sd.fd >= 0 && !sd.closed {
                        // SAFETY: our socket.
                        unsafe { libc::shutdown(sd.fd, libc::SHUT_RDWR) };
                        sd.shut = true;
                        sd.eof = true;
                    }
                }
            }
        }
    }

    fn close_side(&mut self, slot: u32, s: &mut Session, who: Who) {
        let sd = side(s, who);
        if sd.closed {
            return;
        }
        if sd.want_shut && !sd.shut && sd.drained() {
            // SAFETY: our socket.
            unsafe { libc::shutdown(sd.fd, libc::SHUT_WR) };
            sd.shut = true;
        }
        let sd = side(s, who);
        if sd.shut && sd.eof {
            if sd.recv_armed {
                self.pause_recv(slot, s, who);
            }
            if side(s, who).inflight == 0 {
                self.discard_queued(s, who);
                let sd = side(s, who);
                // SAFETY: no operation on it is in flight.
                unsafe { libc::close(sd.fd) };
                sd.closed = true;
            }
        }
        if s.deadline.is_none() {
            let t = self.now + LINGER;
            self.set_deadline(slot, s, t);
        }
    }

    fn on_head(&mut self, slot: u32, s: &mut Session) {
        let parsed = http1::parse_request(&s.head, &self.head_limits());
        let (route, head_len) = match parsed {
            Ok(None) => return,
            Ok(Some(r)) => r,
            Err(e) => {
                let status = e.status();
                if status != 404 {
                    ShardStats::inc(&self.stats.attempts);
                    self.stats.setup_failure(Stage::Request, e.as_str(), true);
                }
                debug!(session = s.id, status, reason = e.reason(), "bad request");
                let mut out = Vec::new();
                http1::write_error(&mut out, &e);
                self.stats.http_response(status);
                s.client.push_owned(out);
                self.begin_closing(slot, s);
                return;
            }
        };
        let req = match route {
            Route::Healthz => {
                let mut out = Vec::new();
                http1::write_healthz(&mut out);
                self.stats.http_response(200);
                s.client.push_owned(out);
                self.begin_closing(slot, s);
                return;
            }
            Route::WebSocket(req) => req,
        };
        let t0 = Instant::now();
        let claims = match req.token.as_deref() {
            None => Err("missing"),
            Some(t) => match self
                .verify_cache
                .cached(&self.keys, t, self.now_unix, &self.verify)
            {
                Some(hit) => hit.map_err(|e| e.as_str()),
                None if self.cfg.token.batch_verify => {
                    // Verified with the loop turn's other fresh tokens.
                    s.verify_pending = true;
                    self.verify_queue.push((slot, s.gen));
                    return;
                }
                None => self
                    .verify_cache
                    .verify_fresh(&self.keys, t, self.now_unix, &self.verify)
                    .map_err(|e| e.as_str()),
            },
        };
        self.stats.setup_duration(Timing::Token, t0.elapsed());
        self.admit(slot, s, req, head_len, claims);
    }

    fn head_limits(&self) -> http1::Limits {
        http1::Limits {
            max_request_line: self.cfg.limits.max_request_line,
            max_head: self.cfg.limits.max_head,
            max_headers: self.cfg.limits.max_headers,
        }
    }

    /// The request head parsed again after its token was batch-verified.
    fn pending_request(&self, s: &Session) -> Option<(http1::UpgradeRequest, usize)> {
        match http1::parse_request(&s.head, &self.head_limits()) {
            Ok(Some((Route::WebSocket(req), head_len))) => Some((req, head_len)),
            _ => None,
        }
    }

    /// Goes on with a WebSocket upgrade whose token has been checked.
    fn admit(
        &mut self,
        slot: u32,
        s: &mut Session,
        req: http1::UpgradeRequest,
        head_len: usize,
        claims: Result<Arc<Ident>, &'static str>,
    ) {
        ShardStats::inc(&self.stats.attempts);
        s.held = s.head.split_off(head_len);
        s.head = Vec::new();
        let accept = accept_key(&req.key);
        let claims = match claims {
            Ok(c) => c,
            Err(reason) => {
                self.stats.setup_failure(Stage::Token, reason, true);
                debug!(session = s.id, reason, "token rejected");
                let mut out = Vec::new();
                match self.cfg.token.reject_with {
                    RejectWith::Http => {
                        http1::write_status(&mut out, 401, &format!("token rejected: {reason}"));
                        self.stats.http_response(401);
                    }
                    RejectWith::Close => {
                        http1::write_switching_protocols(&mut out, &accept, None, None);
                        let e = SetupError::new(Stage::Token, reason);
                        write_close(&mut out, e.close_code(), &e.close_reason(), None);
                        self.stats
                            .close_code(CloseSide::ProxyToClient, e.close_code());
                        s.injected_close_to_client = true;
                    }
                }
                s.client.push_owned(out);
                s.held.clear();
                self.begin_closing(slot, s);
                return;
            }
        };
        let upstream_first = self.cfg.websocket.mode == UpgradeMode::UpstreamFirst;
        let protocol = if upstream_first {
            None
        } else {
            let p = choose_protocol(&req.protocols, &self.cfg.websocket.subprotocols)
                .map(str::to_owned);
            let mut out = Vec::new();
            http1::write_switching_protocols(&mut out, &accept, p.as_deref(), None);
            s.client.push_owned(out);
            p
        };
        let client_ip = listener::peer_ip(s.client.fd);
        let forwarded_for = match (req.x_forwarded_for, client_ip) {
            (Some(prev), Some(ip)) => format!("{prev}, {ip}"),
            (None, Some(ip)) => ip.to_string(),
            (Some(prev), None) => prev,
            (None, None) => String::new(),
        };
        s.ident = Some(claims);
        s.setup = Some(Box::new(Setup {
            deadline: self.now + Duration::from_millis(self.cfg.limits.setup_timeout_ms),
            attempt: 0,
            request_id: 0,
            vm: None,
            exclude: None,
            backoff_done: false,
            last_error: None,
            addr: socket2::SockAddr::from(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            timeout: types::Timespec::from(Duration::from_millis(
                self.cfg.limits.connect_timeout_ms,
            )),
            expected_accept: String::new(),
            request: Vec::new(),
            protocol,
            forwarded_for,
            client_accept: upstream_first.then_some(accept),
            offered_protocols: if upstream_first {
                req.protocols
            } else {
                Vec::new()
            },
            offered_extensions: if upstream_first { req.extensions } else { None },
        }));
        s.phase_started = self.now;
        self.request_placement(slot, s);
        if s.held.len() >= self.cfg.limits.held_bytes {
            self.pause_recv(slot, s, Who::Client);
        }
    }

    fn arm_ctl_recv(&mut self) {
        if self.ctl.recv_armed || self.ctl.dead {
            return;
        }
        self.ctl.recv_armed = true;
        let fd = self.ctl.fd;
        self.push(
            opcode::RecvMulti::new(types::Fd(fd), bufring::BGID)
                .build()
                .user_data(ud(0, 0, OP_CTL_RECV)),
        );
    }

    fn ctl_kick(&mut self) {
        let c = &mut self.ctl;
        if c.send_in_flight || c.dead {
            return;
        }
        if c.sending.is_empty() {
            if c.out.is_empty() {
                return;
            }
            std::mem::swap(&mut c.sending, &mut c.out);
            c.sent = 0;
        }
        c.send_in_flight = true;
        let (fd, ptr, len) = (c.fd, c.sending[c.sent..].as_ptr(), c.sending.len() - c.sent);
        self.push(
            opcode::Send::new(types::Fd(fd), ptr, len as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(ud(0, 0, OP_CTL_SEND)),
        );
    }

    fn on_ctl_send(&mut self, res: i32) {
        self.ctl.send_in_flight = false;
        if res < 0 {
            // The receive side notices the loss and fails waiting sessions.
            warn!(
                shard = self.shard,
                err = res,
                "send to the control shard failed"
            );
            self.ctl.dead = true;
            return;
        }
        self.ctl.sent += res as usize;
        if self.ctl.sent >= self.ctl.sending.len() {
            self.ctl.sending.clear();
            self.ctl.sent = 0;
        }
        self.ctl_kick();
    }

    /// Asks the control shard where the session's repl lives (again, after
    /// a failed attempt: excluding the VM that failed).
    fn request_placement(&mut self, slot: u32, s: &mut Session) {
        if let Some(local) = self.local_placement.clone() {
            let (Some(st), Some(ident)) = (s.setup.as_ref(), s.ident.as_ref()) else {
                return;
            };
            let result = local.pick(ident.repl(), st.exclude.as_deref());
            s.phase = Phase::Placement;
            s.phase_started = self.now;
            self.on_placement(slot, s, result);
            return;
        }
        if self.ctl.dead {
            let e = SetupError::new(Stage::Controlplane, "control_unavailable");
            self.fail_setup(slot, s, e);
            return;
        }
        let Some(st) = s.setup.as_mut() else {
            return;
        };
        let deadline = st.deadline;
        self.ctl.next_req = self.ctl.next_req.wrapping_add(1);
        let id = ((slot as u64) << 32) | ((s.gen as u64) << 16) | self.ctl.next_req as u64;
        st.request_id = id;
        st.backoff_done = false;
        let ident = s.ident.as_ref().expect("identity before placement");
        ToControl::Placement {
            id,
            repl: ident.repl().to_owned(),
            cluster: ident.cluster().to_owned(),
            attempt: st.attempt,
            exclude: st.exclude.clone(),
        }
        .encode(&mut self.ctl.out);
        s.phase = Phase::Placement;
        s.phase_started = self.now;
        self.set_deadline(slot, s, deadline);
        self.ctl_kick();
    }

    fn on_placement(&mut self, slot: u32, s: &mut Session, result: PlacementResult) {
        self.stats
            .setup_duration(Timing::Controlplane, self.now - s.phase_started);
        match result {
            PlacementResult::Found(found) => self.connect(slot, s, found),
            PlacementResult::Failed {
                reason,
                retry_after_ms,
            } => {
                let mut e = SetupError::new(Stage::Controlplane, reason.as_str());
                e.retry_after_ms = retry_after_ms;
                self.fail_setup(slot, s, e);
            }
        }
    }

    fn connect(&mut self, slot: u32, s: &mut Session, found: Found) {
        let fd = match listener::conman_socket(&found.addr) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(session = s.id, err = %e, "cannot create conman socket");
                self.fail_setup(slot, s, SetupError::new(Stage::ConmanConnect, "socket"));
                return;
            }
        };
        let key = new_client_key(self.rng.gen());
        let session_hex = format!("{:016x}", s.id);
        let ident = s.ident.as_ref().expect("identity before connect");
        let st = s.setup.as_mut().expect("setup state");
        let mut request = Vec::with_capacity(512);
        let protocols: Vec<String> = if st.client_accept.is_some() {
            st.offered_protocols.clone()
        } else {
            st.protocol.iter().cloned().collect()
        };
        let mut extra: Vec<(&str, &str)> = vec![
            ("X-Eval-Session", &session_hex),
            ("X-Repl-Id", ident.repl()),
            ("X-User", ident.user()),
        ];
        if !st.forwarded_for.is_empty() {
            extra.push(("X-Forwarded-For", &st.forwarded_for));
        }
        handshake::write_client_request(
            &mut request,
            &found.host,
            &found.path,
            &key,
            &protocols,
            st.offered_extensions.as_deref(),
            &extra,
        );
        st.expected_accept = accept_key(&key);
        st.request = request;
        st.addr = socket2::SockAddr::from(found.addr);
        st.vm = Some(found.vm);
        st.attempt = st.attempt.saturating_add(1);
        let deadline = st.deadline;
        s.conman = Side::new(fd);
        s.phase = Phase::Connecting;
        s.phase_started = self.now;
        self.set_deadline(slot, s, deadline);
        let st = s.setup.as_ref().expect("setup state");
        let connect = opcode::Connect::new(types::Fd(fd), st.addr.as_ptr(), st.addr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(ud(slot, s.gen, OP_CONNECT));
        let timeout = opcode::LinkTimeout::new(&st.timeout)
            .build()
            .user_data(ud(slot, s.gen, OP_IGNORE));
        s.conman.inflight += 1;
        // Both entries must land in the same submission for the link to
        // hold: make room first.
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 {
            let _ = self.ring.submit();
        }
        self.push(connect);
        self.push(timeout);
    }

    /// A Conman attempt failed: back off and try another VM while the setup
    /// deadline allows, else fail the session with this error.
    fn retry_or_fail(&mut self, slot: u32, s: &mut Session, err: SetupError) {
        self.stats.attempt_failure(err.stage, err.reason);
        let limits = &self.cfg.limits;
        let (max, base, cap) = (
            limits.max_attempts,
            limits.retry_base_ms,
            limits.retry_cap_ms,
        );
        let unit: f64 = self.rng.gen();
        let st = s.setup.as_mut().expect("setup state");
        st.last_error = Some(err);
        let delay = backoff(st.attempt, base, cap, unit);
        if st.attempt >= max || self.now + delay >= st.deadline {
            self.fail_setup(slot, s, err);
            return;
        }
        debug!(session = s.id, vm = ?st.vm, stage = err.stage.as_str(), reason = err.reason, attempt = st.attempt, "conman attempt failed, retrying");
        st.exclude = st.vm.take();
        st.backoff_done = false;
        self.drop_conman(slot, s);
        s.phase = Phase::Backoff;
        s.phase_started = self.now;
        let t = self.now + delay;
        self.set_deadline(slot, s, t);
    }

    /// Abandons the current Conman socket: nothing more is sent or read on
    /// it; it is closed once its operations complete.
    fn drop_conman(&mut self, slot: u32, s: &mut Session) {
        s.conman.sendq.clear();
        s.conman.queued = 0;
        if s.conman.fd < 0 {
            return;
        }
        s.conman.eof = true;
        s.conman.shut = true;
        if s.conman.recv_armed {
            self.pause_recv(slot, s, Who::Conman);
        }
        if s.phase == Phase::Connecting && s.conman.inflight > 0 {
            self.push(
                opcode::AsyncCancel::new(ud(slot, s.gen, OP_CONNECT))
                    .build()
                    .user_data(ud(slot, s.gen, OP_IGNORE)),
            );
        }
    }

    fn on_connect(&mut self, slot: u32, s: &mut Session, res: i32) {
        s.conman.inflight -= 1;
        if s.phase != Phase::Connecting {
            return;
        }
        if res < 0 {
            let reason = match -res {
                libc::ECONNREFUSED => "refused",
                libc::ECANCELED | libc::ETIMEDOUT => "timeout",
                libc::ENETUNREACH | libc::EHOSTUNREACH => "unreachable",
                libc::ECONNRESET => "reset",
                _ => "error",
            };
            self.retry_or_fail(slot, s, SetupError::new(Stage::ConmanConnect, reason));
            return;
        }
        self.stats
            .setup_duration(Timing::ConmanDial, self.now - s.phase_started);
        s.phase = Phase::ConmanHandshake;
        s.phase_started = self.now;
        // Each attempt's handshake gets the connect timeout too, so a Conman
        // that stalls before its 101 does not eat the whole setup deadline.
        let st = s.setup.as_ref().expect("setup state");
        let t = st
            .deadline
            .min(self.now + Duration::from_millis(self.cfg.limits.connect_timeout_ms));
        self.set_deadline(slot, s, t);
        let request = std::mem::take(&mut s.setup.as_mut().expect("setup state").request);
        s.conman.push_owned(request);
        s.head.clear();
        self.arm_recv(slot, s, Who::Conman);
    }

    fn on_conman_head(&mut self, slot: u32, s: &mut Session) {
        let st = s.setup.as_ref().expect("setup state");
        let parsed = handshake::parse_client_response(
            &s.head,
            &st.expected_accept,
            self.cfg.limits.max_head,
        );
        let (resp, head_len) = match parsed {
            Ok(None) => return,
            Ok(Some(r)) => r,
            Err(e) => {
                self.retry_or_fail(slot, s, SetupError::new(Stage::ConmanHandshake, e.as_str()));
                return;
            }
        };
        if let Some(accept) = st.client_accept.clone() {
            // Upstream-first: Conman's choices become the client's answer.
            let offered = |p: &String| st.offered_protocols.iter().any(|o| o == p);
            if resp.protocol.as_ref().is_some_and(|p| !offered(p)) {
                let e = SetupError::new(Stage::ConmanHandshake, "unoffered_protocol");
                self.retry_or_fail(slot, s, e);
                return;
            }
            let deflate = resp
                .extensions
                .as_deref()
                .is_some_and(|e| e.to_ascii_lowercase().contains("permessage-deflate"));
            let mut out = Vec::new();
            http1::write_switching_protocols(
                &mut out,
                &accept,
                resp.protocol.as_deref(),
                resp.extensions.as_deref(),
            );
            s.client.push_owned(out);
            if deflate {
                // Compressed messages carry RSV1; nothing was tracked yet.
                let cfg = TrackerConfig {
                    max_frame: self.cfg.limits.max_frame,
                    allow_rsv1: true,
                };
                s.to_conman = Tracker::new(Direction::ToConman, cfg);
                s.to_client = Tracker::new(Direction::ToClient, cfg);
            }
        }
        self.stats
            .setup_duration(Timing::ConmanUpgrade, self.now - s.phase_started);
        self.stats
            .setup_duration(Timing::Total, self.now - s.started);
        s.setup = None;
        s.phase = Phase::Relay;
        s.deadline = None;
        s.counted_active = true;
        ShardStats::inc(&self.stats.established);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let early = s.head.split_off(head_len);
        s.head = Vec::new();
        // Frames Conman sent right behind its 101, then the client's held
        // frames: both pass through their trackers like any other bytes.
        self.forward_owned(s, Who::Conman, early);
        let held = std::mem::take(&mut s.held);
        self.forward_owned(s, Who::Client, held);
        if s.phase == Phase::Relay {
            self.resume_recv(slot, s, Who::Client);
            let sd = &mut s.client;
            if !sd.recv_armed && !sd.paused {
                self.arm_recv(slot, s, Who::Client);
            }
        }
    }

    /// Like `forward`, for bytes the proxy had to copy (setup leftovers).
    fn forward_owned(&mut self, s: &mut Session, from: Who, mut data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let scanned = scan(s.tracker(from.outbound()), &data);
        self.account(from, &scanned);
        data.truncate(scanned.good);
        side(s, from.other()).push_owned(data);
        self.after_scan(s, from, &scanned);
    }

    fn fail_setup(&mut self, slot: u32, s: &mut Session, err: SetupError) {
        self.stats.setup_failure(err.stage, err.reason, false);
        let (repl, user) = s.ident.as_ref().map_or(("", ""), |i| (i.repl(), i.user()));
        info!(
            session = s.id,
            repl,
            user,
            stage = err.stage.as_str(),
            reason = err.reason,
            "session setup failed"
        );
        let before_101 = s
            .setup
            .as_ref()
            .is_some_and(|st| st.client_accept.is_some());
        if err.stage == Stage::ClientGone {
            // Nobody to tell.
        } else if before_101 {
            // Upstream-first: no 101 yet, so an HTTP status says it.
            let status = match err.stage {
                Stage::Controlplane => 503,
                _ => 502,
            };
            let mut out = Vec::new();
            http1::write_status(&mut out, status, &err.close_reason());
            if let (Some(ms), Some(at)) = (
                err.retry_after_ms,
                out.windows(4).position(|w| w == b"\r\n\r\n"),
            ) {
                let hdr = format!("\r\nRetry-After: {}", ms.div_ceil(1000));
                out.splice(at..at, hdr.into_bytes());
            }
            self.stats.http_response(status);
            s.client.push_owned(out);
        } else {
            let mut frame = Vec::new();
            write_close(&mut frame, err.close_code(), &err.close_reason(), None);
            s.client.push_owned(frame);
            self.stats
                .close_code(CloseSide::ProxyToClient, err.close_code());
        }
        // Nothing Conman sends from here on is for the client.
        s.injected_close_to_client = true;
        s.held.clear();
        if s.phase == Phase::ConmanHandshake {
            // Connected: Closing shuts our write side and reads to Conman's
            // FIN, so its socket ends without a reset.
            s.conman.sendq.clear();
            s.conman.queued = 0;
        } else {
            self.drop_conman(slot, s);
        }
        s.setup = None;
        s.deadline = None;
        self.begin_closing(slot, s);
    }
}
