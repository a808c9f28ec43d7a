//! One load thread: a mio (epoll) loop over its share of the connections,
//! driving them through setup, the workload of the chosen mode, drain and
//! close. Threads share nothing but a start barrier and progress counters.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::client::{Conn, ConnError, Dial, Outcome, Phase, Readiness};
use crate::config::{Mode, RunConfig};
use crate::net::SourceAddrs;
use crate::report::{Recorder, ThreadResult};
use crate::storm::{StormBook, StormShared};
use crate::wire::Payloads;

/// Counters the threads bump as they go; `run` reads them for the progress
/// bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub messages: AtomicU64,
    pub handshakes: AtomicU64,
    pub established: AtomicU64,
    pub errors: AtomicU64,
}

/// What the worker threads share.
pub struct Shared {
    pub cfg: RunConfig,
    pub payloads: Payloads,
    pub barrier: Barrier,
    pub progress: Progress,
    /// The zero of every thread's nanosecond clock.
    pub epoch: Instant,
    /// `storm`: the start, sessions still down, the stop flag.
    pub storm: StormShared,
}

/// What a thread tells `run`.
pub enum Msg {
    /// `idle`: this thread holds this many verified sessions.
    Ready(u64),
    Done(Box<ThreadResult>),
}

const TIMER: Token = Token(usize::MAX - 1);

/// Big enough that a bulk echo arrives in a few reads; one per thread.
const RX_BUF: usize = 256 * 1024;

/// How often deadlines (connect, echo, close, end of run) are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(20);

/// Held idle sessions have no deadlines; scanning them is only for the
/// record (a peer's Close or a ping is handled when it arrives).
const IDLE_HOUSEKEEPING: Duration = Duration::from_secs(1);

/// A storm's held sessions have echo and setup deadlines of seconds; its
/// echoes and reconnects are timed by their own schedule, not by this.
const STORM_HOUSEKEEPING: Duration = Duration::from_millis(100);

/// A peer that echoed our Close gets this long to close TCP (the echo of
/// the Close itself gets `--timeout`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-thread detail lines on stderr; the report counts the rest.
const MAX_PRINTED_ERRORS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunPhase {
    /// Opening this thread's connections (fixed-connection modes).
    Setup,
    /// Running the workload (holding, for `idle`).
    Running,
    /// No new messages; waiting for outstanding echoes.
    Draining,
    /// Close handshakes under way.
    Closing,
    Done,
}

struct Slot {
    conn: Conn,
    /// Counted in `Worker::settling` until the upgrade (or, for `idle` and
    /// `storm`, the verification echo) is done.
    settling: bool,
    /// `storm`: the first echo is verified; losing it now is a lost session.
    relaying: bool,
}

/// xorshift64*: enough randomness for schedules, sizes and handshake keys.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u32
    }

    /// Exponentially distributed gap with the given mean: Poisson arrivals.
    fn exp_ns(&mut self, mean_ns: f64) -> u64 {
        let u = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        (-u.ln() * mean_ns) as u64
    }
}

/// A timerfd, for open-loop sends finer than epoll's millisecond timeout.
struct Timer {
    fd: OwnedFd,
    /// When it is set to fire, on the worker's clock.
    armed_ns: Option<u64>,
}

impl Timer {
    fn new(poll: &Poll) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        poll.registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), TIMER, Interest::READABLE)?;
        Ok(Self { fd, armed_ns: None })
    }

    /// Fires at `at_ns` (clock time `now_ns` now). Rearming also resets the
    /// expiry count, so the fd never needs reading.
    fn arm(&mut self, at_ns: u64, now_ns: u64) -> io::Result<()> {
        let after = at_ns.saturating_sub(now_ns).max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (after / 1_000_000_000) as libc::time_t,
                tv_nsec: (after % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: the fd is a timerfd we own; `spec` is valid for the call.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_ns = Some(at_ns);
        Ok(())
    }
}

pub struct Worker<'a> {
    index: usize,
    cfg: &'a RunConfig,
    shared: &'a Shared,
    poll: Poll,
    events: Events,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    live: usize,
    src: SourceAddrs,
    epoch: Instant,
    rxbuf: Box<[u8]>,
    payloads: &'a Payloads,
    rec: Recorder,
    errors: BTreeMap<String, u64>,
    printed: usize,
    rng: Rng,
    phase: RunPhase,
    /// Global ids of this thread's connections (fixed-connection modes).
    conn_ids: Vec<u32>,
    next_to_open: usize,
    /// Connections still in setup.
    settling: usize,
    attempts: u64,
    /// Handshake mode: cycles to start after this event batch.
    to_start: usize,
    next_cycle_id: u32,
    /// Request paths minted ahead (`--premint`), used before minting more.
    preminted: VecDeque<String>,
    /// Messages this thread may still issue (`--messages`).
    budget: Option<u64>,
    /// Open-loop schedule: (due, slot, message number of that connection).
    schedule: BinaryHeap<Reverse<(u64, usize, u64)>>,
    timer: Option<Timer>,
    /// Slots with newly issued messages to flush.
    dirty: Vec<usize>,
    start_ns: u64,
    end_ns: Option<u64>,
    run_end_ns: Option<u64>,
    next_housekeeping_ns: u64,
    reported: (u64, u64, u64, u64),
    /// `storm`: this thread's sessions across reconnects.
    storm: Option<StormBook>,
}

impl<'a> Worker<'a> {
    pub fn new(index: usize, shared: &'a Shared) -> io::Result<Self> {
        let cfg = &shared.cfg;
        let threads = cfg.threads;
        let conn_ids = match cfg.mode {
            Mode::Handshake => Vec::new(),
            _ => (index..cfg.conns)
                .step_by(threads)
                .map(|g| g as u32)
                .collect(),
        };
        let budget = cfg.messages.map(|m| {
            let t = threads as u64;
            m / t + u64::from((index as u64) < m % t)
        });
        let storm =
            (cfg.mode == Mode::Storm).then(|| StormBook::new(cfg.storm.clone(), conn_ids.len()));
        let poll = Poll::new()?;
        let timer = match cfg.mode {
            Mode::Rate | Mode::Mixed => Some(Timer::new(&poll)?),
            _ => None,
        };
        Ok(Self {
            index,
            cfg,
            shared,
            poll,
            events: Events::with_capacity(1024),
            slots: Vec::with_capacity(conn_ids.len()),
            free: Vec::new(),
            live: 0,
            src: SourceAddrs::new(cfg.target, index, cfg.spread),
            epoch: shared.epoch,
            rxbuf: vec![0u8; RX_BUF].into_boxed_slice(),
            payloads: &shared.payloads,
            rec: Recorder::default(),
            errors: BTreeMap::new(),
            printed: 0,
            rng: Rng((0x853c_49e6_748f_ea9b ^ ((index as u64 + 1) << 32)) | 1),
            phase: RunPhase::Setup,
            conn_ids,
            next_to_open: 0,
            settling: 0,
            attempts: 0,
            to_start: 0,
            next_cycle_id: index as u32,
            preminted: VecDeque::new(),
            budget,
            schedule: BinaryHeap::new(),
            timer,
            dirty: Vec::new(),
            start_ns: 0,
            end_ns: None,
            run_end_ns: None,
            next_housekeeping_ns: 0,
            reported: (0, 0, 0, 0),
            storm,
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn run(mut self, tx: &Sender<Msg>) -> ThreadResult {
        if let Err(e) = self.event_loop(tx) {
            self.count_error("worker", &format!("thread {}: {e}", self.index));
        }
        let end = self.end_ns.unwrap_or_else(|| self.now());
        ThreadResult {
            rec: self.rec,
            errors: self.errors,
            elapsed: Duration::from_nanos(end.saturating_sub(self.start_ns)),
            storm: self.storm.map(|book| Box::new(book.finish())),
        }
    }

    fn event_loop(&mut self, tx: &Sender<Msg>) -> io::Result<()> {
        let mut events = Events::with_capacity(0);
        loop {
            let now = self.now();
            if now >= self.next_housekeeping_ns {
                self.housekeeping(now, tx);
                let every = match (self.cfg.mode, self.phase) {
                    (Mode::Idle, RunPhase::Running) => IDLE_HOUSEKEEPING,
                    (Mode::Storm, RunPhase::Running) => STORM_HOUSEKEEPING,
                    _ => HOUSEKEEPING,
                };
                self.next_housekeeping_ns = now + every.as_nanos() as u64;
            }
            if self.phase == RunPhase::Done {
                self.publish_progress();
                return Ok(());
            }
            self.start_pending(now);
            let timeout = self.poll_timeout(now);
            std::mem::swap(&mut events, &mut self.events);
            let polled = self.poll.poll(&mut events, Some(timeout));
            std::mem::swap(&mut events, &mut self.events);
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            std::mem::swap(&mut events, &mut self.events);
            for event in events.iter() {
                if event.token() == TIMER {
                    continue;
                }
                let ev = Readiness {
                    readable: event.is_readable(),
                    writable: event.is_writable(),
                    read_closed: event.is_read_closed() || event.is_error(),
                };
                self.on_event(event.token().0, ev);
            }
            std::mem::swap(&mut events, &mut self.events);
            if self.timer.is_some() && self.phase == RunPhase::Running {
                self.issue_due()?;
            }
            if self.storm.is_some() && self.phase == RunPhase::Running {
                self.storm_due();
            }
            self.flush_dirty();
            self.publish_progress();
        }
    }

    fn poll_timeout(&self, now: u64) -> Duration {
        let mut wait = self.next_housekeeping_ns.saturating_sub(now);
        if let (Some(end), RunPhase::Running) = (self.run_end_ns, self.phase) {
            wait = wait.min(end.saturating_sub(now));
        }
        if let (Some(book), RunPhase::Running) = (&self.storm, self.phase) {
            if let Some(due) = book.next_due() {
                // epoll counts whole milliseconds; round up, never spin.
                let left = due.saturating_sub(now).div_ceil(1_000_000) * 1_000_000;
                wait = wait.min(left);
            }
        }
        Duration::from_nanos(wait)
    }

    // ---- connections -------------------------------------------------------

    fn open(&mut self, id: u32, settling: bool, now: u64) {
        if let Err(e) = self.try_open(id, settling, now) {
            self.count_error(&e.kind(), &format!("conn {id}: {e}"));
            if self.cfg.mode == Mode::Handshake && self.phase == RunPhase::Running {
                self.to_start += 1;
            }
        }
    }

    /// Starts connecting `id`; returns its slot.
    fn try_open(&mut self, id: u32, settling: bool, now: u64) -> Result<usize, ConnError> {
        let path = match self.preminted.pop_front() {
            Some(path) => path,
            None => self.cfg.paths.path(id, self.attempts),
        };
        self.attempts += 1;
        let key = {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
            k[8..].copy_from_slice(&self.rng.next_u64().to_le_bytes());
            k
        };
        let capacity = match self.cfg.mode {
            Mode::Echo | Mode::Bulk => self.cfg.pipeline,
            _ => 1,
        };
        let dial = Dial {
            target: self.cfg.target,
            source: self.src.next_addr(),
            host: &self.cfg.host,
            path: &path,
            key_random: key,
            tls: self.cfg.tls.as_ref(),
        };
        let mut conn = Conn::connect(id, &dial, capacity, now)?;
        let index = self.free.pop().unwrap_or(self.slots.len());
        if let Err(e) = self.poll.registry().register(
            conn.source(),
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(index);
            return Err(ConnError::Io(e));
        }
        if index == self.slots.len() {
            self.slots.push(None);
        }
        self.slots[index] = Some(Slot {
            conn,
            settling,
            relaying: false,
        });
        self.live += 1;
        if settling {
            self.settling += 1;
        }
        if let Some(book) = &mut self.storm {
            book.set_slot((id as usize - self.index) / self.cfg.threads, index);
        }
        Ok(index)
    }

    /// Starts connects: during setup up to `max_connecting` at a time, and
    /// in handshake mode the cycles whose predecessors ended.
    fn start_pending(&mut self, now: u64) {
        if self.phase == RunPhase::Setup {
            while self.next_to_open < self.conn_ids.len() && self.settling < self.cfg.max_connecting
            {
                let id = self.conn_ids[self.next_to_open];
                self.next_to_open += 1;
                self.open(id, true, now);
            }
        }
        while self.to_start > 0 {
            self.to_start -= 1;
            let id = self.next_cycle_id;
            self.next_cycle_id = self.next_cycle_id.wrapping_add(self.cfg.threads as u32);
            self.open(id, false, now);
        }
    }

    fn on_event(&mut self, index: usize, ev: Readiness) {
        let now = self.now();
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            return;
        };
        let result = slot
            .conn
            .on_event(ev, &mut self.rxbuf, self.payloads, &mut self.rec, now);
        match result {
            Ok(outcome) => self.after(index, outcome, now),
            Err(e) => self.fail(index, &e),
        }
    }

    /// The workload's reaction to what an event did to a connection.
    fn after(&mut self, index: usize, outcome: Outcome, now: u64) {
        let mode = self.cfg.mode;
        let running = self.phase == RunPhase::Running;
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            return;
        };
        let conn = &mut slot.conn;
        if outcome.opened {
            self.rec
                .upgrade_ns
                .saturating_record(now.saturating_sub(conn.connect_started_ns).max(1));
            self.rec.established += 1;
            match mode {
                Mode::Idle | Mode::Handshake | Mode::Storm => conn.issue(self.cfg.size, now),
                _ => {}
            }
            if let (Some(book), true) = (&mut self.storm, running) {
                let s = (conn.id as usize - self.index) / self.cfg.threads;
                book.upgraded(s, now.saturating_sub(conn.connect_started_ns));
            }
            if slot.settling && mode != Mode::Idle && mode != Mode::Storm {
                slot.settling = false;
                self.settling -= 1;
            }
        }
        if outcome.echoes > 0 {
            match mode {
                Mode::Echo | Mode::Bulk if running => {
                    for _ in 0..outcome.echoes {
                        if !take_budget(&mut self.budget) {
                            break;
                        }
                        conn.issue(self.cfg.size, now);
                    }
                }
                Mode::Idle | Mode::Storm if slot.settling => {
                    let session = now.saturating_sub(conn.connect_started_ns).max(1);
                    self.rec.session_ns.saturating_record(session);
                    slot.settling = false;
                    slot.relaying = true;
                    self.settling -= 1;
                }
                Mode::Storm if !slot.relaying => {
                    slot.relaying = true;
                    let s = (conn.id as usize - self.index) / self.cfg.threads;
                    if let Some(book) = &mut self.storm {
                        book.relaying(s, conn.connect_started_ns, now, &self.shared.storm);
                    }
                }
                Mode::Handshake => {
                    let session = now.saturating_sub(conn.connect_started_ns).max(1);
                    self.rec.session_ns.saturating_record(session);
                    conn.start_close(now);
                }
                _ => {}
            }
        }
        if outcome.finished {
            if mode == Mode::Handshake {
                self.rec.handshakes += 1;
            }
            self.remove(index);
            if mode == Mode::Handshake && running {
                self.to_start += 1;
            }
            return;
        }
        if outcome.opened || outcome.echoes > 0 {
            let payloads = self.payloads;
            if let Some(Some(slot)) = self.slots.get_mut(index) {
                if let Err(e) = slot.conn.flush(payloads) {
                    self.fail(index, &e);
                }
            }
        }
    }

    fn fail(&mut self, index: usize, e: &ConnError) {
        if self.storm.is_some() && self.phase == RunPhase::Running {
            self.storm_fail(index, e);
            return;
        }
        let id = self.slots[index].as_ref().map_or(0, |s| s.conn.id);
        self.count_error(&e.kind(), &format!("conn {id}: {e}"));
        self.remove(index);
        if self.cfg.mode == Mode::Handshake && self.phase == RunPhase::Running {
            self.to_start += 1;
        }
    }

    /// Drops a connection. Closing the socket takes it out of the epoll set,
    /// and its slot is reused only by `start_pending`, after this batch of
    /// events, so a stale event of this batch finds the slot empty.
    fn remove(&mut self, index: usize) {
        if let Some(slot) = self.slots[index].take() {
            if slot.settling {
                self.settling -= 1;
            }
            self.live -= 1;
            self.free.push(index);
        }
    }

    // ---- storm -------------------------------------------------------------

    /// A storm's connection ended: a relaying session is lost and
    /// reconnects; a reconnect attempt that failed retries after a backoff.
    /// Only wrong bytes are errors.
    fn storm_fail(&mut self, index: usize, e: &ConnError) {
        let now = self.now();
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        let (id, relaying) = (slot.conn.id, slot.relaying);
        if let ConnError::PeerClose(..) = e {
            slot.conn.answer_close();
        }
        if e.is_verification() {
            self.count_error(&e.kind(), &format!("conn {id}: {e}"));
        }
        self.remove(index);
        let s = (id as usize - self.index) / self.cfg.threads;
        let unit = self.rng.unit();
        let Some(book) = &mut self.storm else {
            return;
        };
        let shared = &self.shared.storm;
        if relaying {
            book.lost(s, &e.kind(), e.retry_after_ms(), now, shared);
        } else {
            book.attempt_failed(s, &e.kind(), e.retry_after_ms(), now, unit, shared);
        }
    }

    /// Issues the periodic echoes and starts the reconnects that are due.
    fn storm_due(&mut self) {
        let now = self.now();
        let size = self.cfg.size;
        while let Some(s) = self.storm.as_mut().and_then(|b| b.due_echo(now)) {
            let id = self.conn_ids[s];
            let Some(i) = self.storm.as_ref().and_then(|b| b.slot(s)) else {
                continue;
            };
            let Some(Some(slot)) = self.slots.get_mut(i) else {
                continue;
            };
            // The slot may since hold another session's connection; one
            // echo at a time (a slow one is caught by its deadline).
            let conn = &mut slot.conn;
            if conn.id == id && slot.relaying && conn.phase == Phase::Open && conn.inflight() == 0 {
                conn.issue(size, now);
                self.dirty.push(i);
            }
        }
        while let Some(s) = self.storm.as_mut().and_then(|b| b.due_reconnect(now)) {
            let id = self.conn_ids[s];
            if let Err(e) = self.try_open(id, false, now) {
                let unit = self.rng.unit();
                if let Some(book) = &mut self.storm {
                    book.attempt_failed(s, &e.kind(), None, now, unit, &self.shared.storm);
                }
            }
        }
    }

    fn count_error(&mut self, kind: &str, detail: &str) {
        *self.errors.entry(kind.to_owned()).or_insert(0) += 1;
        if self.printed < MAX_PRINTED_ERRORS {
            self.printed += 1;
            eprintln!("eval-loadgen: {detail}");
        }
    }

    // ---- phases ------------------------------------------------------------

    fn housekeeping(&mut self, now: u64, tx: &Sender<Msg>) {
        self.check_deadlines(now);
        match self.phase {
            RunPhase::Setup if self.next_to_open == self.conn_ids.len() && self.settling == 0 => {
                self.setup_done(tx);
            }
            RunPhase::Running => {
                let over = self.run_end_ns.is_some_and(|end| now >= end)
                    || self.shared.storm.stop.load(Ordering::Acquire);
                let spent = self.budget == Some(0) && self.all_drained();
                // A storm's sessions may all be down at once, about to reconnect.
                let deserted =
                    self.live == 0 && !matches!(self.cfg.mode, Mode::Handshake | Mode::Storm);
                if over || spent || deserted {
                    self.phase = RunPhase::Draining;
                    self.schedule.clear();
                }
            }
            _ => {}
        }
        if self.phase == RunPhase::Draining && self.all_drained() {
            if self.end_ns.is_none() {
                self.end_ns = Some(now);
            }
            self.phase = RunPhase::Closing;
            for index in 0..self.slots.len() {
                if let Some(slot) = &mut self.slots[index] {
                    if slot.conn.phase == Phase::Open {
                        slot.conn.start_close(now);
                        if let Err(e) = slot.conn.flush(self.payloads) {
                            self.fail(index, &e);
                        }
                    } else {
                        self.remove(index);
                    }
                }
            }
        }
        if self.phase == RunPhase::Closing && self.live == 0 {
            self.phase = RunPhase::Done;
        }
    }

    fn all_drained(&self) -> bool {
        match self.cfg.mode {
            // Cycles in progress finish on their own (bounded by timeouts).
            Mode::Handshake => self.live == 0,
            _ => self.slots.iter().flatten().all(|s| s.conn.inflight() == 0),
        }
    }

    fn setup_done(&mut self, tx: &Sender<Msg>) {
        let cfg = self.cfg;
        if matches!(cfg.mode, Mode::Idle | Mode::Storm) {
            // The main thread prints `holding N` once every thread is here.
            tx.send(Msg::Ready(self.live as u64)).ok();
        } else {
            if cfg.mode == Mode::Handshake && cfg.paths.mints_per_attempt() {
                let t = cfg.threads;
                let share = cfg.premint / t + usize::from(self.index < cfg.premint % t);
                self.preminted = (0..share)
                    .map(|k| {
                        // The ids the cycles will use, so repls differ too.
                        let id = (self.index + k * t) as u32;
                        self.attempts += 1;
                        cfg.paths.path(id, self.attempts)
                    })
                    .collect();
            }
            self.publish_progress();
            self.shared.barrier.wait();
        }
        let now = self.now();
        self.start_ns = now;
        let run_for = match cfg.mode {
            Mode::Idle => cfg.hold,
            _ => cfg.duration,
        };
        self.run_end_ns = run_for.map(|d| now + d.as_nanos() as u64);
        self.phase = RunPhase::Running;
        match cfg.mode {
            Mode::Echo | Mode::Bulk => {
                for index in 0..self.slots.len() {
                    let Some(slot) = &mut self.slots[index] else {
                        continue;
                    };
                    for _ in 0..cfg.pipeline {
                        if !take_budget(&mut self.budget) {
                            break;
                        }
                        slot.conn.issue(cfg.size, now);
                    }
                    self.dirty.push(index);
                }
            }
            Mode::Rate | Mode::Mixed => {
                let end = self.run_end_ns.unwrap_or(u64::MAX);
                for index in 0..self.slots.len() {
                    let Some(slot) = &self.slots[index] else {
                        continue;
                    };
                    let due = match cfg.mode {
                        Mode::Rate => now + rate_offset_ns(cfg, slot.conn.id, 0),
                        _ => now + self.rng.exp_ns(1e9 / cfg.mixed.key_rate),
                    };
                    if due < end {
                        self.schedule.push(Reverse((due, index, 0)));
                    }
                }
            }
            Mode::Handshake => self.to_start = self.conn_share(),
            Mode::Storm => {
                let rng = &mut self.rng;
                if let Some(book) = &mut self.storm {
                    book.start_echoes(now, || rng.unit());
                }
            }
            Mode::Idle => {}
        }
    }

    /// This thread's share of `--workers` in handshake mode.
    fn conn_share(&self) -> usize {
        let t = self.cfg.threads;
        self.cfg.conns / t + usize::from(self.index < self.cfg.conns % t)
    }

    fn check_deadlines(&mut self, now: u64) {
        let connect_timeout = self.cfg.connect_timeout.as_nanos() as u64;
        let echo_timeout = self.cfg.echo_timeout.as_nanos() as u64;
        let close_timeout = CLOSE_TIMEOUT.as_nanos() as u64;
        for index in 0..self.slots.len() {
            let Some(slot) = &self.slots[index] else {
                continue;
            };
            let conn = &slot.conn;
            let expired = match conn.phase {
                Phase::Connecting if now > conn.phase_started_ns + connect_timeout => {
                    Some(ConnError::Timeout("connect"))
                }
                Phase::Upgrading if now > conn.phase_started_ns + connect_timeout => {
                    Some(ConnError::Timeout("upgrade"))
                }
                Phase::Open => conn
                    .oldest_ns()
                    .filter(|at| now > at + echo_timeout)
                    .map(|_| ConnError::Timeout("echo")),
                Phase::Closing { reply_seen } if now > conn.phase_started_ns + close_timeout => {
                    if reply_seen {
                        // The close handshake is done; the peer merely kept TCP open.
                        self.after(
                            index,
                            Outcome {
                                finished: true,
                                ..Outcome::default()
                            },
                            now,
                        );
                        None
                    } else if now > conn.phase_started_ns + echo_timeout.max(close_timeout) {
                        // Our Close's answer is an echo through the proxy and
                        // Conman: it gets the echo deadline, not the TCP grace.
                        Some(ConnError::Timeout("close"))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some(e) = expired {
                self.fail(index, &e);
            }
        }
    }

    // ---- open loop ---------------------------------------------------------

    /// Issues every scheduled message that is due, stamped with the time it
    /// was due rather than the time it went out (coordinated omission).
    fn issue_due(&mut self) -> io::Result<()> {
        let now = self.now();
        let end = self.run_end_ns.unwrap_or(u64::MAX);
        while let Some(&Reverse((due, index, n))) = self.schedule.peek() {
            if due > now {
                break;
            }
            self.schedule.pop();
            let size = match self.cfg.mode {
                Mode::Mixed => self.mixed_size(),
                _ => self.cfg.size,
            };
            let Some(Some(slot)) = self.slots.get_mut(index) else {
                continue;
            };
            slot.conn.issue(size, due);
            self.dirty.push(index);
            let next = match self.cfg.mode {
                Mode::Mixed => due + self.rng.exp_ns(1e9 / self.cfg.mixed.key_rate),
                _ => self.start_ns + rate_offset_ns(self.cfg, slot.conn.id, n + 1),
            };
            if next < end {
                self.schedule.push(Reverse((next, index, n + 1)));
            }
        }
        let Some(timer) = &mut self.timer else {
            return Ok(());
        };
        if let Some(&Reverse((due, _, _))) = self.schedule.peek() {
            // Coalesce: at most one wake-up per tick.
            let at = due.max(now + self.cfg.tick.as_nanos() as u64);
            let stale = timer
                .armed_ns
                .is_none_or(|armed| armed <= now || armed > at);
            if stale {
                timer.arm(at, now)?;
            }
        }
        Ok(())
    }

    fn mixed_size(&mut self) -> u32 {
        let m = &self.cfg.mixed;
        if self.rng.between(1, m.burst_every) == 1 {
            self.rng.between(m.burst_min, m.burst_max)
        } else {
            self.rng.between(1, m.key_max)
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(index) = self.dirty.pop() {
            if let Some(Some(slot)) = self.slots.get_mut(index) {
                if let Err(e) = slot.conn.flush(self.payloads) {
                    self.fail(index, &e);
                }
            }
        }
    }

    fn publish_progress(&mut self) {
        let errors: u64 = self.errors.values().sum();
        let now = (
            self.rec.messages,
            self.rec.handshakes,
            self.rec.established,
            errors,
        );
        let p = &self.shared.progress;
        p.messages
            .fetch_add(now.0 - self.reported.0, Ordering::Relaxed);
        p.handshakes
            .fetch_add(now.1 - self.reported.1, Ordering::Relaxed);
        p.established
            .fetch_add(now.2 - self.reported.2, Ordering::Relaxed);
        p.errors
            .fetch_add(now.3 - self.reported.3, Ordering::Relaxed);
        self.reported = now;
    }
}

fn take_budget(budget: &mut Option<u64>) -> bool {
    match budget {
        None => true,
        Some(0) => false,
        Some(left) => {
            *left -= 1;
            true
        }
    }
}

/// Rate mode: message `n` of connection `g` is due `(g + n·N) / R` seconds
/// after the start, so the N connections take turns at exactly R msg/s.
fn rate_offset_ns(cfg: &RunConfig, conn: u32, n: u64) -> u64 {
    let slot = u64::from(conn) + n * cfg.conns as u64;
    (slot as f64 * 1e9 / cfg.rate) as u64
}
