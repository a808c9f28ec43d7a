//! The io_uring data plane: one pinned thread per core, each owning a ring,
//! a provided-buffer ring, its own SO_REUSEPORT listener and every session
//! accepted on it. Nothing here is shared with another shard but the
//! read-mostly config and the shard's own stats.
//!
//! One loop turn: submit everything queued and wait (one `io_uring_enter`),
//! pick up changed keys, config and revocations (one atomic load each; a
//! new revocation ends the sessions it matches), hand every completion to
//! its session, verify the turn's fresh tokens together, fire due timers,
//! publish recycled buffers. The ring is
//! `SINGLE_ISSUER | DEFER_TASKRUN`, so completions are produced only when
//! this thread waits: no IPIs, no task_work interrupting the loop.
//!
//! The shard makes no protocol decision: sessions ([`crate::session`]) say
//! what to do as [`Op`]s, the shard does it (`perform.rs`) and feeds the
//! results back.
//!
//! # Memory the kernel can see
//! Every buffer, iovec, msghdr, sockaddr and timespec that a pushed entry
//! points at is owned by that entry's record in the [`ops::OpTable`] from
//! the push until the entry's last completion, whatever happens to the
//! session meanwhile: a session that closes or fails cancels its
//! operations, and their memory is freed only as their completions arrive.
//! Ring buffers queued for sending belong to the send's record and go back
//! to the ring on its completion. Receives (into the ring) and polls own no
//! memory: their user_data names the session directly (`ops::Direct`), so
//! an idle session costs no record. At exit the shard cancels what is still
//! armed and waits for every record to come back before the ring goes.
//!
//! # Layout
//! - `mod.rs`: the loop, accept, wake-ups and drain, token batches.
//! - `timers.rs`: session deadlines.
//! - `ops.rs`: the operation table.
//! - `perform.rs`: a session's ops as entries and syscalls.
//! - `ctl.rs`: the socketpair to the control shard.
//! - `registry.rs`: the session registry's commands (list, close, evacuate).
//! - `handoff.rs`: live sessions moved to (or adopted from) another
//!   process after a listener handover.
//! - `pipe.rs`: splice(2) and its pipes.
//! - `listener.rs`, `bufring.rs`: the listening sockets, the buffer ring.

/// The session's view of the shard for one input: built from `Io`'s
/// fields, so the buffer ring stays borrowable beside it.
macro_rules! env {
    ($io:expr, $out:expr) => {
        crate::session::Env {
            now: $io.now,
            ring: &$io.bufs,
            ring_low: $io.ring_low(),
            more_input: $io.more_input,
            input_ends: $io.input_ends,
            cfg: &$io.cfg,
            shard: $io.shard,
            stats: &$io.stats,
            gate: &mut $io.gate,
            rng: &mut $io.rng,
            vms: &mut $io.vms,
            out: $out,
        }
    };
}

pub mod bufring;
mod ctl;
pub mod handoff;
pub mod listener;
mod ops;
mod perform;
mod pipe;
mod registry;
mod timers;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tracing::{info, warn};

use crate::config::Config;
use crate::control::drain::{self, DrainPhase, Lifecycle};
use crate::control::LocalStatic;
use crate::keys::{KeyStore, LocalKeys, VerifyCache};
use crate::log_every::LogEvery;
use crate::metrics::{Phase as Timing, ShardStats};
use crate::session::{Env, Gate, Kind, Op, PerIp, Pipe, RecvOutcome, Session, Who};
use crate::token::VerifyOptions;
use bufring::Pools;
use ctl::Ctl;
use ops::{Direct, OpTable, Rec, IGNORE};

/// How often an idle shard may hand its buffer pages back (see
/// `BufRing::trim_if_idle`).
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping shard waits for its last completions.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// No entry in the op table.
const NONE: u64 = IGNORE;
/// Connect memories kept for reuse: enough for a burst of handshakes,
/// and a storm leaves no more than this behind.
const CONNECT_POOL: usize = 256;
/// After a failed accept (no descriptor or memory left), the first wait
/// before accepting again; it doubles up to `ACCEPT_BACKOFF_MAX` while
/// accepts keep failing, so a shortage never spins the loop.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// In a plain drain, how long a listener that no longer takes new
/// connections keeps accepting the handshakes already under way (their
/// last ACK is one round trip away) before it is closed; see
/// `listener::refuse_new_connections`.
const LISTENER_LINGER: Duration = Duration::from_millis(200);

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
    /// The drain phase, read when woken.
    pub lifecycle: Arc<Lifecycle>,
    /// The config in force (replaced on SIGHUP); `cfg` and
    /// `local_placement` are its state at start.
    pub config: Arc<crate::reload::ConfigStore>,
    /// eventfd the control side writes to wake this shard.
    pub wake_fd: RawFd,
    /// The process-wide per-address limits, if any is set.
    pub per_ip: Option<Arc<PerIp>>,
    /// The revocations in force; a change wakes the shard (`wake_fd`).
    pub revocations: Arc<crate::revocations::Revocations>,
    /// The session registry's commands, read when `wake_fd` fires.
    pub registry: crate::control::registry::Inbox,
    /// Live sessions moving to or from another process (`handoff.rs`).
    pub handoff: Arc<handoff::Hub>,
}

/// A planned close: (time, slot, gen, retry hint, what for).
type PlannedClose = (Instant, u32, u16, u64, Planned);

/// What a planned close is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Planned {
    /// The drain's grace period is over.
    Drain,
    /// The session's VM is being evacuated (unless restored meanwhile).
    Evacuate,
}

/// A live session and the user_data of its connect, which may need a
/// cancel (its receives and polls are named by `ops::Direct`).
struct Entry {
    s: Session,
    gen: u16,
    /// The connect in flight, or `NONE`.
    connect: u64,
    /// Each side's send in flight (client, Conman), or `NONE`: a side
    /// closed while its last send is under way can still stop it.
    sends: [u64; 2],
}

/// The ring, buffers and timers: everything but the sessions, so that a
/// session and the IO state can be borrowed at the same time.
struct Io {
    ring: IoUring,
    bufs: Pools,
    ops: OpTable,
    /// Record-less operations in flight (`ops::Direct`).
    direct_inflight: usize,
    /// The completion being handled is followed by another of the same
    /// receive in this batch (`Env::more_input`).
    more_input: bool,
    /// That next completion is the receive's last (`Env::input_ends`).
    input_ends: bool,
    stats: Arc<ShardStats>,
    gate: Gate,
    cfg: Arc<Config>,
    keys: LocalKeys,
    verify_cache: VerifyCache,
    verify: VerifyOptions,
    /// This shard's copy of the revocations: checked after every token
    /// verification (cached ones too).
    revoked: crate::revocations::LocalRevocations,
    ctl: Ctl,
    local_placement: Option<Arc<LocalStatic>>,
    /// The evacuated VMs, as of the last wake-up (see `registry.rs`).
    evacuated: Arc<Vec<String>>,
    timers: timers::Timers,
    rng: SmallRng,
    vms: crate::session::VmNames,
    now: Instant,
    now_unix: i64,
    shard: usize,
    last_trim: Instant,
    /// Sessions whose receive stopped for want of buffers (ENOBUFS).
    starved: Vec<(u32, u16, Who)>,
    /// Pacing of their retries: the next round, and the pause after it.
    starved_next: Instant,
    starved_pause: Duration,
    /// Receives the last round re-armed, and the ENOBUFS count then.
    starved_retried: u64,
    starved_seen: u64,
    /// Empty pipes from finished splices.
    pipes: Vec<Pipe>,
    /// iovec arrays of finished gathered sends.
    #[allow(clippy::vec_box)]
    // pooled allocations for send records, whose pointers must stay put
    gathers: Vec<Box<ops::Gather>>,
    /// Memory of finished connects, at most [`CONNECT_POOL`].
    #[allow(clippy::vec_box)]
    connects: Vec<Box<ops::ConnectMem>>,
    /// Sessions whose token is verified at the end of this loop turn.
    verify_queue: Vec<(u32, u16)>,
    /// Connects asked to stop: cancelled again every turn until their
    /// completion comes. A cancel submitted in the very turn its connect
    /// went in finds nothing (the connect still waits behind its linked
    /// socket options, where no cancel looks) and is lost.
    cancelling: Vec<u64>,
    /// Warnings that can repeat fast: failed accepts, failed sockets.
    accept_warn: LogEvery,
    socket_warn: LogEvery,
    /// The ring sets socket options (IORING_OP_URING_CMD setsockopt, Linux
    /// 6.7): a Conman socket's options go in the ring, not a syscall each.
    ring_sockopts: bool,
}

pub struct Shard {
    io: Io,
    /// Ops a session asked for, performed in order (reused). Beside `io`,
    /// not in it, so a session's input borrows both without moving it.
    out: VecDeque<Op>,
    sessions: Vec<Option<Entry>>,
    free: Vec<u32>,
    gens: Vec<u16>,
    live: usize,
    listener: RawFd,
    accept_ud: u64,
    /// Accepting is armed or meant to be (the multishot accept may be
    /// waiting for a retry after a failure).
    accepting: bool,
    /// The listening socket is still ours to close (see
    /// `release_listener`); the shard runs until it is closed.
    listener_open: bool,
    /// Accept again at this time (after a failure), and the wait after the
    /// next failure.
    accept_retry: Option<Instant>,
    accept_backoff: Duration,
    /// The listener refuses new connections; stop accepting at this time.
    accept_stop: Option<Instant>,
    wake_fd: RawFd,
    lifecycle: Arc<Lifecycle>,
    config: Arc<crate::reload::ConfigStore>,
    /// The config store's epoch this shard runs with.
    config_epoch: u64,
    /// The drain reached `Closing` and this shard planned its closes.
    closing_planned: bool,
    /// Planned closes, earliest first.
    closes: BinaryHeap<Reverse<PlannedClose>>,
    inbox: crate::control::registry::Inbox,
    /// The evacuations' epoch `io.evacuated` was taken at.
    evacuated_seen: u64,
    hub: Arc<handoff::Hub>,
    handoff: handoff::Local,
}

impl Shard {
    pub fn new(spec: ShardSpec) -> io::Result<Shard> {
        let cfg = spec.cfg;
        let mut ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(16384)
            .build(4096)?;
        let ring_sockopts = ring_sets_sockopts(&mut ring);
        let bufs = Pools::new(&ring, &cfg.buffers)?;
        // Here rather than where the listener is made, so that a listener
        // however obtained (bound, or handed over) gives its client sockets
        // the configured keepalive.
        listener::set_keepalive_fd(spec.listener, &cfg.keepalive)?;
        listener::set_defer_accept_fd(spec.listener, cfg.listen.defer_accept_s)?;
        // Likewise: accepted sockets inherit the listener's congestion
        // control.
        if let Some(cc) = &cfg.listen.tcp_congestion {
            listener::set_congestion_fd(spec.listener, cc)?;
        }
        let verify = VerifyOptions {
            leeway_s: cfg.token.leeway_s,
            cluster: cfg.token.cluster.clone(),
        };
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(io::Error::other)?;
        Ok(Shard {
            out: VecDeque::new(),
            io: Io {
                ring,
                bufs,
                ops: OpTable::default(),
                direct_inflight: 0,
                more_input: false,
                input_ends: false,
                stats: spec.stats,
                gate: Gate {
                    sessions: 0,
                    per_ip: spec.per_ip,
                },
                keys: LocalKeys::new(spec.keys),
                verify_cache: VerifyCache::new(4096),
                verify,
                revoked: crate::revocations::LocalRevocations::new(spec.revocations),
                local_placement: spec.local_placement,
                evacuated: Arc::default(),
                ctl: Ctl::new(spec.control_fd),
                timers: timers::Timers::default(),
                rng: SmallRng::from_seed(seed),
                vms: Default::default(),
                now: Instant::now(),
                now_unix: 0,
                shard: spec.id,
                last_trim: Instant::now(),
                starved: Vec::new(),
                starved_next: Instant::now(),
                starved_pause: Duration::ZERO,
                starved_retried: 0,
                starved_seen: 0,
                pipes: Vec::new(),
                gathers: Vec::new(),
                connects: Vec::new(),
                verify_queue: Vec::new(),
                cancelling: Vec::new(),
                accept_warn: LogEvery::default(),
                socket_warn: LogEvery::default(),
                ring_sockopts,
                cfg,
            },
            sessions: Vec::new(),
            free: Vec::new(),
            gens: Vec::new(),
            live: 0,
            listener: spec.listener,
            accept_ud: NONE,
            accepting: true,
            listener_open: true,
            accept_retry: None,
            accept_stop: None,
            accept_backoff: ACCEPT_BACKOFF_MIN,
            wake_fd: spec.wake_fd,
            lifecycle: spec.lifecycle,
            config_epoch: spec.config.epoch(),
            config: spec.config,
            closing_planned: false,
            closes: BinaryHeap::new(),
            inbox: spec.registry,
            evacuated_seen: 0,
            hub: spec.handoff,
            handoff: handoff::Local::default(),
        })
    }

    /// Runs until drained: not accepting and no session left.
    pub fn run(mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        self.io.arm_ctl_recv();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        // A phase (or evacuation) published before the wake-up read was armed.
        self.on_phase();
        self.on_commands();
        while self.listener_open || self.live > 0 {
            let mut timeout = self
                .io
                .timers
                .next()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if self.io.bufs.dirty() {
                // Wake once more after traffic stops, to trim the pool.
                timeout = Some(timeout.map_or(TRIM_EVERY, |t| t.min(TRIM_EVERY)));
            }
            for t in self.accept_retry.iter().chain(&self.accept_stop) {
                let d = t.saturating_duration_since(Instant::now());
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
            if let Some(t) = self
                .closes
                .peek()
                .map(|Reverse((t, ..))| *t)
                .into_iter()
                .chain(self.handoff.next_deadline())
                .min()
            {
                let d = t.saturating_duration_since(Instant::now());
                timeout = Some(timeout.map_or(d, |x| x.min(d)));
            }
            if !self.io.starved.is_empty() {
                let d = self
                    .io
                    .starved_next
                    .saturating_duration_since(Instant::now());
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
            if let Err(e) = self.io.wait(timeout, &mut cqes) {
                // Operations are in flight: their memory must outlive them.
                self.io.finish(&mut cqes);
                return Err(e);
            }
            self.io.keys.refresh();
            self.refresh_config();
            self.io.now_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            if self.io.revoked.refresh() {
                self.close_revoked();
            }
            for (i, &(u, res, flags)) in cqes.iter().enumerate() {
                // A multishot receive's completions often come in a run:
                // the session's sends wait for the run's last (`Env::more_input`).
                let next = cqes.get(i + 1).filter(|n| {
                    res > 0 && n.0 == u && matches!(Direct::parse(u), Some((Direct::Recv(..), ..)))
                });
                self.io.more_input = next.is_some();
                self.io.input_ends = next.is_some_and(|n| !io_uring::cqueue::more(n.2));
                self.complete(u, res, flags);
            }
            self.io.more_input = false;
            self.io.input_ends = false;
            if std::mem::take(&mut self.io.ctl.lost) {
                self.control_lost();
            }
            self.io.cancel_again();
            self.verify_batch();
            self.fire_timers();
            self.fire_closes();
            self.handoff_turn();
            self.retry_starved();
            if self.accept_stop.is_some_and(|t| t <= self.io.now) {
                self.stop_accepting();
            }
            if self.accept_retry.is_some_and(|t| t <= self.io.now) {
                self.accept_retry = None;
                if self.accepting {
                    self.arm_accept();
                } else {
                    self.release_listener();
                }
            }
            if self.io.now.duration_since(self.io.last_trim) >= TRIM_EVERY {
                self.io.last_trim = self.io.now;
                if self.io.bufs.trim_if_idle() {
                    // The same moment suits the heap: a burst of setups
                    // leaves freed memory between the sessions that stay,
                    // which glibc keeps resident (its top-of-heap trim never
                    // reaches it). 4,000 idle sessions on one shard held
                    // 2.4 KiB of RSS each without this, 1.4 with it.
                    #[cfg(target_env = "gnu")]
                    // SAFETY: malloc_trim takes no pointer; it only locks
                    // and walks glibc's own arenas.
                    unsafe {
                        libc::malloc_trim(0)
                    };
                }
            }
        }
        self.handoff_done();
        info!(
            shard = self.io.shard,
            accepted = self.io.stats.accepted.load(Ordering::Relaxed),
            "shard stopped"
        );
        self.io.finish(&mut cqes);
        // SAFETY: our end of the control socketpair. Anything still in
        // flight on it holds its own reference to the file. The control
        // shard sees EOF and ends once every shard is gone.
        unsafe { libc::close(self.io.ctl.fd) };
        Ok(())
    }

    /// Picks up a reloaded config: one relaxed load per turn, the lock
    /// only when it moved. New sessions (and the live ones' later reads)
    /// see it.
    fn refresh_config(&mut self) {
        let epoch = self.config.epoch();
        if epoch == self.config_epoch {
            return;
        }
        self.config_epoch = epoch;
        let loaded = self.config.current();
        self.io.verify = VerifyOptions {
            leeway_s: loaded.cfg.token.leeway_s,
            cluster: loaded.cfg.token.cluster.clone(),
        };
        self.io.cfg = loaded.cfg;
        self.io.local_placement = loaded.local_placement;
    }

    fn arm_accept(&mut self) {
        let ud = self.io.ops.insert(Rec::Accept);
        self.accept_ud = ud;
        // SAFETY: no pointer (no peer address is asked for).
        unsafe {
            self.io.push(
                opcode::AcceptMulti::new(types::Fd(self.listener))
                    .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
                    .build()
                    .user_data(ud),
            )
        };
    }

    fn arm_wake(&mut self) {
        let mut buf = Box::new(0u64);
        let p = &mut *buf as *mut u64 as *mut u8;
        let ud = self.io.ops.insert(Rec::Wake { buf });
        // SAFETY: `p` is the boxed u64 the record owns until the read
        // completes.
        unsafe {
            self.io.push(
                opcode::Read::new(types::Fd(self.wake_fd), p, 8)
                    .build()
                    .user_data(ud),
            )
        };
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        if ud == IGNORE {
            return;
        }
        let more = cqueue::more(flags);
        if let Some((op, slot, gen)) = Direct::parse(ud) {
            if !more {
                self.io.direct_inflight -= 1;
            }
            match op {
                Direct::Recv(who, tls) => self.on_recv(slot, gen, who, tls, res, flags),
                Direct::Poll { socket, from } => {
                    if self.entry(slot, gen).is_some() {
                        self.drive(slot, |s, env, _| s.handle_poll(env, socket, from));
                    }
                }
            }
            return;
        }
        let rec = if more {
            match self.io.ops.get(ud) {
                Some(Rec::Accept) => return self.on_accept(res, true),
                Some(Rec::CtlRecv) => return self.on_ctl_recv(res, flags),
                _ => self.io.ops.remove(ud),
            }
        } else {
            self.io.ops.remove(ud)
        };
        let Some(rec) = rec else {
            debug_assert!(false, "completion without a record");
            return;
        };
        match rec {
            Rec::Accept => {
                self.accept_ud = NONE;
                self.on_accept(res, false);
            }
            Rec::Wake { .. } => self.on_wake(res),
            Rec::CtlRecv => {
                self.io.ctl.recv_armed = false;
                self.on_ctl_recv(res, flags);
            }
            Rec::CtlSend { buf, off } => self.io.on_ctl_send(res, buf, off),
            Rec::Send {
                slot,
                gen,
                who,
                batch,
                gather,
            } => {
                if let Some(g) = gather {
                    self.io.gathers.push(g);
                }
                if let Some(e) = self.entry(slot, gen) {
                    e.sends[who as usize] = NONE;
                    self.drive(slot, |s, env, _| s.handle_sent(env, who, res, batch));
                } else {
                    debug_assert!(false, "send completed after its session");
                    self.io.recycle_batch(batch);
                }
            }
            Rec::Connect { slot, gen, mem } => {
                if self.io.connects.len() < CONNECT_POOL {
                    self.io.connects.push(mem);
                }
                if let Some(e) = self.entry(slot, gen) {
                    e.connect = NONE;
                    self.drive(slot, |s, env, _| s.handle_connected(env, res));
                }
            }
        }
    }

    fn entry(&mut self, slot: u32, gen: u16) -> Option<&mut Entry> {
        self.sessions
            .get_mut(slot as usize)?
            .as_mut()
            .filter(|e| e.gen == gen)
    }

    /// Feeds one input to a session, performs the ops it asks for, keeps
    /// its timer, and frees its slot once it has finished.
    fn drive<R>(
        &mut self,
        slot: u32,
        input: impl FnOnce(&mut Session, &mut Env, &Pools) -> R,
    ) -> Option<R> {
        let io = &mut self.io;
        let e = self.sessions.get_mut(slot as usize)?.as_mut()?;
        // Every line logged for this input carries the session's ids. A
        // debug span: with the usual `info` filter it is never built, so
        // the data path pays one check of the level.
        let span = tracing::debug_span!(
            "session",
            id = %crate::session::SessionId(e.s.id),
            shard = io.shard,
            repl = e.s.ident().map_or("", |i| i.repl()),
            user = e.s.ident().map_or("", |i| i.user()),
            vm = e.s.vm().unwrap_or(""),
        );
        let _in_session = span.enter();
        let out = &mut self.out;
        let r = {
            let mut env = env!(io, out);
            input(&mut e.s, &mut env, &io.bufs)
        };
        while let Some(op) = out.pop_front() {
            io.perform(slot, e, op, out);
        }
        if e.s.is_finished() {
            debug_assert!(e.connect == NONE);
            io.timers.set(slot, None);
            self.sessions[slot as usize] = None;
            self.free.push(slot);
            self.live -= 1;
            self.io
                .stats
                .live
                .store(self.live as u64, Ordering::Relaxed);
        } else {
            // One comparison when the deadline did not move.
            io.timers.set(slot, e.s.poll_timeout());
        }
        Some(r)
    }

    fn on_recv(&mut self, slot: u32, gen: u16, who: Who, tls: bool, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = if res > 0 {
            cqueue::buffer_select(flags).map(|b| self.io.bufs.pool(tls).global(b))
        } else {
            None
        };
        if let Some(bid) = bid {
            self.io.bufs.taken(bid);
        }
        if self.entry(slot, gen).is_none() {
            debug_assert!(false, "receive completed after its session");
            if let Some(bid) = bid {
                self.io.bufs.recycle(bid);
            }
            return;
        }
        let outcome = self.drive(slot, |s, env, bufs| {
            let data = bid.map(|bid| (bid, bufs.slice(bid, 0, res as u32)));
            if res > 0 && data.is_none() {
                warn!(session = s.id, "receive completion without a buffer");
            }
            s.handle_recv(env, who, res, more, data)
        });
        if outcome == Some(RecvOutcome::Starved) {
            self.io.starved.push((slot, gen, who));
        }
    }

    fn on_ctl_recv(&mut self, res: i32, flags: u32) {
        match self.io.ctl_received(res, flags) {
            Ok(replies) => {
                for (id, result) in replies {
                    let slot = (id >> 32) as u32;
                    let gen = (id >> 16) as u16;
                    let seq = id as u16;
                    if self.entry(slot, gen).is_some() {
                        self.drive(slot, |s, env, _| s.handle_placement(env, seq, result));
                    }
                }
            }
            Err(()) => self.control_lost(),
        }
        self.io.arm_ctl_recv();
    }

    /// Without the control shard no placement can be had: fail the
    /// sessions waiting for one, and every later one, fast.
    fn control_lost(&mut self) {
        if self.accepting && !self.io.ctl.dead {
            warn!(shard = self.io.shard, "control shard connection lost");
        }
        self.io.ctl.dead = true;
        for slot in 0..self.sessions.len() as u32 {
            self.drive(slot, |s, env, _| s.handle_control_lost(env));
        }
    }

    fn on_wake(&mut self, res: i32) {
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN && res != -libc::ECANCELED {
            warn!(shard = self.io.shard, err = res, "wake eventfd read failed");
        }
        self.on_phase();
        self.on_commands();
        self.handoff_mail();
        self.arm_wake();
    }

    /// Acts on the drain phase (see `control::drain`): past `NotReady`,
    /// stop accepting; at `Closing`, plan this shard's closes.
    fn on_phase(&mut self) {
        let phase = self.lifecycle.phase();
        if phase >= DrainPhase::Draining && self.accepting && self.accept_stop.is_none() {
            // After a handover the socket is the new process's too: it must
            // keep taking connections, so ours just stops accepting.
            let linger = !self.lifecycle.handed_over()
                && match listener::refuse_new_connections(self.listener) {
                    Ok(()) => true,
                    Err(err) => {
                        warn!(shard = self.io.shard, %err, "cannot make the listener refuse new connections; closing it now");
                        false
                    }
                };
            if linger {
                self.accept_stop = Some(self.io.now + LISTENER_LINGER);
            } else {
                self.stop_accepting();
            }
        }
        if phase >= DrainPhase::Closing && !self.closing_planned {
            self.closing_planned = true;
            let open: Vec<_> = self
                .sessions
                .iter()
                .enumerate()
                .filter_map(|(slot, e)| {
                    let e = e.as_ref()?;
                    Some(drain::Open {
                        key: (slot as u32, e.gen),
                        idle_since: e.s.idle_since(),
                    })
                })
                .collect();
            let spread = self.io.cfg.drain.close_spread();
            info!(
                shard = self.io.shard,
                sessions = open.len(),
                spread_ms = spread.as_millis() as u64,
                "closing the remaining sessions, idle first"
            );
            for c in drain::plan_closes(self.io.now, spread, open, &mut self.io.rng) {
                let (slot, gen) = c.key;
                self.closes
                    .push(Reverse((c.at, slot, gen, c.retry_after_ms, Planned::Drain)));
            }
        }
    }

    /// Closes whose planned time has come.
    fn fire_closes(&mut self) {
        while let Some(&Reverse((at, slot, gen, hint, why))) = self.closes.peek() {
            if at > self.io.now {
                break;
            }
            self.closes.pop();
            if self.entry(slot, gen).is_none() {
                continue;
            }
            match why {
                Planned::Drain => self.drive(slot, |s, env, _| s.handle_drain_close(env, hint)),
                Planned::Evacuate => {
                    let evacuated = self.io.evacuated.clone();
                    self.drive(slot, |s, env, _| s.handle_evacuate(env, &evacuated, hint))
                }
            };
        }
    }

    fn stop_accepting(&mut self) {
        self.accept_stop = None;
        if !self.accepting {
            return;
        }
        self.accepting = false;
        info!(shard = self.io.shard, live = self.live, "stopping accepts");
        if self.accept_ud != NONE {
            // Its last completion (ECANCELED, after any accepts that
            // raced the cancel) releases the listener.
            self.io.cancel(self.accept_ud);
        } else if self.accept_retry.is_none() {
            self.release_listener();
        }
        // With a retry pending, the retry releases it.
    }

    /// No accept is armed any more: take what the kernel has queued, then
    /// close the listening socket (see `control::drain`, "Closing a
    /// listener without losing a connection"). After a handover the new
    /// process holds the same socket and accepts from the same queue, so
    /// ours just closes.
    fn release_listener(&mut self) {
        if !self.listener_open {
            return;
        }
        self.listener_open = false;
        let mut taken = 0u64;
        if !self.lifecycle.handed_over() {
            let (queued, err) = listener::take_queued(self.listener);
            if let Some(err) = err {
                warn!(
                    shard = self.io.shard,
                    %err,
                    "accept of a queued connection failed while closing the listener"
                );
            }
            for fd in queued {
                ShardStats::inc(&self.io.stats.accepted);
                taken += 1;
                self.new_session(fd);
            }
        }
        // SAFETY: our listener; no accept is armed on it and the loop above
        // is done with it.
        unsafe { libc::close(self.listener) };
        info!(
            shard = self.io.shard,
            queued_taken = taken,
            handed_over = self.lifecycle.handed_over(),
            live = self.live,
            "listener closed"
        );
    }

    fn on_accept(&mut self, res: i32, more: bool) {
        if res == -libc::ECANCELED {
            self.release_listener();
            return;
        }
        if res < 0 {
            // EMFILE / ENFILE / ENOBUFS / ENOMEM: the multishot accept has
            // ended. Connections wait in the listen queue while the shard
            // backs off, rather than the loop spinning on the same error.
            ShardStats::inc(&self.io.stats.accept_errors);
            if let Some(held_back) = self.io.accept_warn.check(self.io.now) {
                warn!(
                    shard = self.io.shard,
                    err = res,
                    held_back,
                    retry_in_ms = self.accept_backoff.as_millis() as u64,
                    "accept failed"
                );
            }
            if !more && !self.accepting {
                self.release_listener();
            } else if !more {
                self.accept_retry = Some(self.io.now + self.accept_backoff);
                self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            return;
        }
        ShardStats::inc(&self.io.stats.accepted);
        self.accept_backoff = ACCEPT_BACKOFF_MIN;
        self.new_session(res);
        if !more && self.accepting {
            self.arm_accept();
        } else if !more {
            self.release_listener();
        }
    }

    /// A free slot and its new generation.
    fn take_slot(&mut self) -> (u32, u16) {
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
        (slot, gen)
    }

    /// Puts a new session in its slot: counted, its first deadline armed.
    fn place(&mut self, slot: u32, gen: u16, s: Session) {
        self.io.timers.set(slot, s.poll_timeout());
        self.sessions[slot as usize] = Some(Entry {
            s,
            gen,
            connect: NONE,
            sends: [NONE; 2],
        });
        self.live += 1;
        self.io
            .stats
            .live
            .store(self.live as u64, Ordering::Relaxed);
    }

    fn new_session(&mut self, fd: RawFd) {
        let (slot, gen) = self.take_slot();
        // X-Eval-Session: random, so ids stay unique across restarts and
        // across every proxy of the fleet (64 bits: no coordination).
        let id = self.io.rng.gen::<u64>();
        let peer = listener::peer_ip(fd);
        let s = Session::new(id, fd, peer, self.io.now, &self.io.cfg);
        self.place(slot, gen, s);
        self.plan_late_close(slot, gen);
        self.drive(slot, |s, env, _| s.start(env));
    }

    /// A session that arrived after the drain's closes were planned
    /// (accepted from the queue, or adopted from an older process) is
    /// closed like the rest, at a random point of the window.
    fn plan_late_close(&mut self, slot: u32, gen: u16) {
        if self.closing_planned {
            let spread = self.io.cfg.drain.close_spread();
            let at = self.io.now + spread.mul_f64(self.io.rng.gen::<f64>());
            let hint = self.io.rng.gen_range(0..=drain::RETRY_AFTER_MAX_MS);
            self.closes
                .push(Reverse((at, slot, gen, hint, Planned::Drain)));
        }
    }

    /// Verifies the fresh tokens queued during this loop turn together and
    /// lets each of their sessions go on.
    fn verify_batch(&mut self) {
        if self.io.verify_queue.is_empty() {
            return;
        }
        let queue = std::mem::take(&mut self.io.verify_queue);
        let mut waiting = Vec::with_capacity(queue.len());
        let mut tokens = Vec::with_capacity(queue.len());
        for &(slot, gen) in &queue {
            let Some(Some(e)) = self.sessions.get(slot as usize) else {
                continue;
            };
            if e.gen == gen && e.s.kind() == Kind::Verify {
                waiting.push(slot);
                tokens.push(e.s.token().unwrap_or(""));
            }
        }
        let t0 = Instant::now();
        let io = &mut self.io;
        let results = io
            .verify_cache
            .verify_uncached(&io.keys, &tokens, io.now_unix, &io.verify);
        drop(tokens);
        let each = t0.elapsed() / waiting.len().max(1) as u32;
        for (slot, verdict) in waiting.into_iter().zip(results) {
            self.io.stats.setup_duration(Timing::Token, each);
            let verdict = self.io.unless_revoked(verdict);
            self.drive(slot, |s, env, _| s.handle_token(env, verdict));
        }
    }

    /// The revocations changed: the sessions whose token they revoke end
    /// (each session decides whether it matches, and how it ends).
    fn close_revoked(&mut self) {
        let (set, now) = (self.io.revoked.get(), self.io.now_unix);
        let hit: Vec<u32> = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| e.as_ref()?.s.revoked_by(set, now).then_some(slot as u32))
            .collect();
        if !hit.is_empty() {
            info!(
                shard = self.io.shard,
                sessions = hit.len(),
                "closing revoked sessions"
            );
        }
        for slot in hit {
            self.drive(slot, |s, env, _| s.handle_revoked(env));
        }
    }

    fn fire_timers(&mut self) {
        let now = self.io.now;
        while let Some(slot) = self.io.timers.pop_due(now) {
            let Some(e) = self.sessions.get(slot as usize).and_then(Option::as_ref) else {
                debug_assert!(false, "a timer outlived its session");
                continue;
            };
            match e.s.poll_timeout() {
                // `drive` arms the deadline the handler leaves.
                Some(d) if d <= now => {
                    self.drive(slot, |s, env, _| s.handle_timeout(env));
                }
                d => self.io.timers.set(slot, d),
            }
        }
        self.io.timers.shrink();
    }

    fn retry_starved(&mut self) {
        // Wait until the ring is out of its low state (or has a few buffers,
        // for small rings): retrying on every freed buffer would be a loop
        // of receives failing with ENOBUFS.
        if self.io.bufs.available() < (self.io.cfg.buffers.count / 4).max(8) {
            return;
        }
        if std::mem::take(&mut self.io.ctl.starved) {
            self.io.arm_ctl_recv();
        }
        if self.io.starved.is_empty() || self.io.now < self.io.starved_next {
            return;
        }
        // Paced: when at least half the receives of the last round ran dry
        // again, the next round waits twice as long (up to 8 ms); else half
        // as long. A long shortage is then a slow path, not a loop of
        // receives failing with ENOBUFS.
        let io = &mut self.io;
        let seen = io.stats.buffer_exhausted.load(Ordering::Relaxed);
        let failed = seen - io.starved_seen;
        io.starved_pause = if io.starved_retried > 0 && failed * 2 >= io.starved_retried {
            (io.starved_pause * 2).clamp(Duration::from_micros(250), Duration::from_millis(8))
        } else {
            io.starved_pause / 2
        };
        io.starved_next = io.now + io.starved_pause;
        // At most half of what is free goes to re-armed receives per round.
        let n = (self.io.bufs.available() as usize / 2).min(self.io.starved.len());
        let starved: Vec<_> = self.io.starved.drain(..n).collect();
        self.io.starved_retried = n as u64;
        self.io.starved_seen = seen;
        for (slot, gen, who) in starved {
            if self.entry(slot, gen).is_some() {
                self.drive(slot, |s, env, _| s.handle_buffers_available(env, who));
            }
        }
    }
}

impl Io {
    /// A token's verdict with the revocations applied: a valid token that
    /// a revocation matches is refused as `revoked`.
    fn unless_revoked(
        &self,
        verdict: Result<Arc<crate::keys::Ident>, crate::token::TokenError>,
    ) -> Result<Arc<crate::keys::Ident>, &'static str> {
        match verdict {
            Ok(i) if i.revoked_in(self.revoked.get(), self.now_unix) => {
                Err(crate::token::TokenError::Revoked.as_str())
            }
            other => other.map_err(|e| e.as_str()),
        }
    }

    /// Under a quarter of the ring left: sessions copy what they must hold
    /// (see `Env::ring_low`).
    fn ring_low(&self) -> bool {
        self.bufs.main.low()
    }

    /// Queues `e` for the next `io_uring_enter` (submitting what is queued
    /// first if the submission queue is full).
    ///
    /// # Safety
    /// Every pointer in `e` must refer to memory that stays valid, and is
    /// not moved or reused, until the entry's last completion arrives:
    /// memory owned by the entry's record in `self.ops`, by the provided
    /// buffer ring, or, for an entry without a record, by the record of an
    /// entry it is hard-linked before (which cannot complete first).
    unsafe fn push(&mut self, e: squeue::Entry) {
        // SAFETY: the caller vouches for the pointers in `e` (see above).
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                let _ = self.ring.submit();
            }
        }
    }

    fn cancel(&mut self, target: u64) {
        // SAFETY: a cancel points at no memory; it names its target by
        // user_data only.
        unsafe { self.push(opcode::AsyncCancel::new(target).build().user_data(IGNORE)) };
    }

    /// Cancels `connect` now and again every turn until it completes (see
    /// `cancelling`).
    fn cancel_connect(&mut self, connect: u64) {
        self.cancel(connect);
        self.cancelling.push(connect);
    }

    fn cancel_again(&mut self) {
        if self.cancelling.is_empty() {
            return;
        }
        let mut list = std::mem::take(&mut self.cancelling);
        // A record still present is a connect not yet completed: its slot
        // is reused only after the completion, and a reused slot carries a
        // new generation, so a stale user_data never matches.
        list.retain(|&ud| self.ops.get(ud).is_some());
        for &ud in &list {
            self.cancel(ud);
        }
        self.cancelling = list;
    }

    /// One `io_uring_enter`: submit what is queued and wait for at least one
    /// completion or the timeout; then collect the completions.
    fn wait(
        &mut self,
        timeout: Option<Duration>,
        cqes: &mut Vec<(u64, i32, u32)>,
    ) -> io::Result<()> {
        self.bufs.publish();
        if self.cfg.listen.busy_poll_us > 0 {
            self.busy_poll(timeout);
        }
        let r = match timeout {
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        if let Err(e) = r {
            match e.raw_os_error() {
                // EAGAIN: the kernel could not allocate requests for now;
                // collect what completed and try again next turn, rather
                // than end the shard and every session on it.
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => return Err(e),
            }
        }
        self.now = Instant::now();
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        Ok(())
    }

    /// Submits, then polls the ring without sleeping until a completion
    /// arrives or `listen.busy_poll_us` (or the next timer) has passed.
    /// Task work (DEFER_TASKRUN) runs only inside `io_uring_enter` with
    /// GETEVENTS, so each poll is one non-blocking enter.
    fn busy_poll(&mut self, timeout: Option<Duration>) {
        let budget = Duration::from_micros(u64::from(self.cfg.listen.busy_poll_us));
        let budget = timeout.map_or(budget, |t| t.min(budget));
        let start = Instant::now();
        loop {
            let to_submit = self.ring.submission().len();
            // SAFETY: no signal mask; the ring is ours.
            let r = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    to_submit as u32,
                    0,
                    1, // IORING_ENTER_GETEVENTS
                    None,
                )
            };
            if r.is_err() || !self.ring.completion().is_empty() || start.elapsed() >= budget {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// The shard is stopping: cancel what is still armed (the wake-up read,
    /// the control receive) and take every completion back, so that no
    /// record's memory is freed while the kernel may still use it.
    fn finish(&mut self, cqes: &mut Vec<(u64, i32, u32)>) {
        let deadline = Instant::now() + EXIT_WAIT;
        while !self.ops.is_empty() || self.direct_inflight > 0 {
            // Every round: a request that was not yet cancellable (a connect
            // behind its linked socket options) is by the next one.
            // SAFETY: cancelling every request of the ring touches no memory
            // of ours; each cancelled request still completes with its record.
            unsafe {
                self.push(
                    opcode::AsyncCancel2::new(types::CancelBuilder::any())
                        .build()
                        .user_data(IGNORE),
                )
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait(Some(left), cqes).is_err() {
                break;
            }
            for &(ud, _, flags) in cqes.iter() {
                if ud == IGNORE || cqueue::more(flags) {
                    continue;
                }
                if Direct::parse(ud).is_some() {
                    self.direct_inflight -= 1;
                } else if let Some(Rec::Send { batch, .. }) = self.ops.remove(ud) {
                    self.recycle_batch(batch);
                }
            }
        }
        if !self.ops.is_empty() || self.direct_inflight > 0 {
            // Leak rather than free memory the kernel may still touch: the
            // records and the buffer ring they point into.
            warn!(
                shard = self.shard,
                left = self.ops.len(),
                "operations still in flight at exit"
            );
            std::mem::forget(std::mem::take(&mut self.ops));
            self.bufs.leak();
            return;
        }
        self.bufs.unregister(&self.ring);
    }
}

/// Whether `ring` sets socket options the way a Conman connect uses them (a
/// hard-linked, success-skipping setsockopt entry before the next entry):
/// tried once, on a socket of its own, before the ring serves anyone.
/// Kernels before 6.7 fail the entry; then options go by setsockopt(2).
fn ring_sets_sockopts(ring: &mut IoUring) -> bool {
    let Ok(s) = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    ) else {
        return false;
    };
    // Static, so that it outlives the entry whatever happens to the wait.
    static ONE: libc::c_int = 1;
    let set = opcode::SetSockOpt::new(
        types::Fd(std::os::fd::AsRawFd::as_raw_fd(&s)),
        libc::IPPROTO_TCP as u32,
        libc::TCP_NODELAY as u32,
        (&ONE as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as u32,
    )
    .build()
    .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
    .user_data(1);
    let nop = opcode::Nop::new().build().user_data(2);
    // SAFETY: the only memory the entries refer to is the static ONE.
    unsafe {
        let mut sq = ring.submission();
        if sq.push(&set).is_err() || sq.push(&nop).is_err() {
            return false;
        }
    }
    let mut ok = true;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // The ring cannot be trusted with options then. Both entries
            // refer to nothing but ONE, so they may complete whenever: a
            // completion without a record is dropped (release builds) in
            // the loop. A fresh ring's enter fails this way only when the
            // process is out of memory.
            Err(_) => return false,
        }
        let mut done = false;
        for c in ring.completion() {
            match c.user_data() {
                1 => ok = false,
                2 => done = true,
                _ => {}
            }
        }
        if done {
            break;
        }
    }
    ok && s.nodelay().unwrap_or(false)
}
