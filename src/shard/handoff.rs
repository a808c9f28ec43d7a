//! Live sessions move to the new process after a listener handover (issue
//! 13): the old process hands each relaying session's two sockets and its
//! state record (`session::handoff`) over the handover connection, the new
//! one adopts it on one of its shards, and no peer notices more than a
//! pause.
//!
//! # Who does what
//! - The handover thread of the old process, once the new one said `OK`
//!   and asked for sessions, becomes the *mover* ([`move_out`]): it tells
//!   every shard to start and sends what the shards export in batches,
//!   back to back; a second thread reads each batch's verdicts, in order,
//!   and returns them to the shards.
//! - A shard of the old process ([`Local`]) stops reading a window of its
//!   relaying sessions at a time (at most [`BATCH`] stopping or awaiting a
//!   verdict), exports each once it reaches a movable point, and on the
//!   verdict lets go of it (taken) or reads it again (refused). Sessions in
//!   setup are not moved while in setup: the shard waits for them to relay
//!   (then they move) or fail. A session
//!   that reaches no movable point within `handover.session_deadline_ms`
//!   reads again and stays: it drains here as before. Nothing is closed
//!   because of a move; the old process exits once it holds no session.
//! - The *receiver* of the new process ([`adopt_from`]) reads the batches,
//!   refuses a record it cannot read (its descriptors are closed here, the
//!   old process still has its own), and posts each session to a shard's
//!   mailbox; the shard adopts it at its next wake-up.
//!
//! # On the wire (after `OK` on the handover connection)
//! ```text
//! new → old  SESSIONS v=1\n                              (it takes sessions)
//! old → new  "EPSB" n:u32 len:u32 fds:u32   + SCM_RIGHTS: 2n fds (client, Conman, …)
//!            then len bytes: n × (paused_at_ns:u64 rec_len:u32 record)
//! new → old  "EPSV" n:u32, then n bytes: 1 adopted, 0 refused
//! old → new  "EPSB" 0 0 0                               (no more)
//! ```
//! `paused_at_ns` is CLOCK_MONOTONIC (one clock for both processes on a
//! host) when the old shard stopped reading the session; the new shard
//! records the pause when it reads again (`eval_handoff_pause_seconds`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Shard;
use crate::control::handover;
use crate::metrics::ShardStats;
use crate::session::handoff::{Export, Record, VERSION};
use crate::session::{Kind, Session, Who};

/// Sessions per message: two descriptors each, under the kernel's 253
/// per SCM_RIGHTS message. Also a shard's window of sessions stopped or
/// awaiting a verdict.
pub const BATCH: usize = 126;
const BATCH_MAGIC: &[u8; 4] = b"EPSB";
const VERDICT_MAGIC: &[u8; 4] = b"EPSV";
/// The new process's line asking for sessions.
pub const ASK: &str = "SESSIONS v=1";
/// How long the mover waits for a batch's verdicts, and the receiver for
/// the next batch.
const WIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Test-only: the new process reads records of this version instead of
/// its own, so that it refuses every record (a version mismatch, as
/// between two builds). Read once at startup; never set in production.
pub const TEST_VERSION_ENV: &str = "EVAL_PROXY_TEST_HANDOFF_VERSION";

/// CLOCK_MONOTONIC in nanoseconds: the clock both processes share.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a shard finds in its mailbox.
pub enum Mail {
    /// Old process: begin moving the relaying sessions.
    Start { deadline: Duration },
    /// Old process: the new one's answer for a session this shard exported.
    Verdict { slot: u32, gen: u16, taken: bool },
    /// New process: a session to adopt.
    Adopt {
        rec: Box<Record>,
        fds: [OwnedFd; 2],
        paused_at_ns: u64,
    },
}

/// A session exported by a shard, waiting for the mover.
struct Outgoing {
    shard: usize,
    slot: u32,
    gen: u16,
    rec: Vec<u8>,
    fds: [RawFd; 2],
    paused_at_ns: u64,
}

/// What the shards, the mover and the receiver share.
pub struct Hub {
    mail: Vec<Mutex<Vec<Mail>>>,
    wake_fds: Vec<RawFd>,
    outgoing: Mutex<VecDeque<Outgoing>>,
    outgoing_ready: Condvar,
    /// Shards with nothing (more) to export: done moving, or stopped.
    done: AtomicUsize,
    /// The handover connection failed: shards start no more moves.
    aborted: AtomicBool,
    next_shard: AtomicUsize,
    /// `handover.move_sessions`, `handover.session_deadline_ms`.
    pub enabled: bool,
    deadline: Duration,
    /// The record version the receiver reads ([`TEST_VERSION_ENV`]).
    accept_version: u16,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(wake_fds: Vec<RawFd>, cfg: &crate::config::HandoverConfig) -> Hub {
        let accept_version = std::env::var(TEST_VERSION_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(VERSION);
        Hub {
            mail: wake_fds.iter().map(|_| Mutex::new(Vec::new())).collect(),
            wake_fds,
            outgoing: Mutex::new(VecDeque::new()),
            outgoing_ready: Condvar::new(),
            done: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            next_shard: AtomicUsize::new(0),
            enabled: cfg.move_sessions,
            deadline: Duration::from_millis(cfg.session_deadline_ms),
            accept_version,
        }
    }

    fn post(&self, shard: usize, m: Mail) {
        lock(&self.mail[shard]).push(m);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to the shard's eventfd,
        // open for the life of the process.
        unsafe {
            libc::write(
                self.wake_fds[shard],
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            )
        };
    }

    fn take_mail(&self, shard: usize) -> Vec<Mail> {
        std::mem::take(&mut *lock(&self.mail[shard]))
    }

    fn export(&self, o: Outgoing) {
        lock(&self.outgoing).push_back(o);
        self.outgoing_ready.notify_one();
    }

    fn shard_done(&self) {
        self.done.fetch_add(1, Ordering::AcqRel);
        let _guard = lock(&self.outgoing);
        self.outgoing_ready.notify_one();
    }

    /// Up to [`BATCH`] exported sessions, waiting a little for the first;
    /// `None` once every shard is done and nothing is left.
    fn next_batch(&self) -> Option<Vec<Outgoing>> {
        let mut q = lock(&self.outgoing);
        loop {
            if !q.is_empty() {
                let n = q.len().min(BATCH);
                return Some(q.drain(..n).collect());
            }
            if self.done.load(Ordering::Acquire) >= self.mail.len() {
                return None;
            }
            q = self
                .outgoing_ready
                .wait_timeout(q, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A shard's part in a move out.
#[derive(Default)]
pub(super) struct Local {
    /// Moving out: between `Start` and having nothing left.
    active: bool,
    reported_done: bool,
    deadline: Duration,
    /// Relaying sessions not yet asked to stop.
    candidates: Vec<(u32, u16)>,
    /// Stopped, waiting for a movable point: since when (both clocks).
    stopping: Vec<(u32, u16, Instant, u64)>,
    /// Exported, waiting for the new process's verdict.
    parked: usize,
    /// Sessions a move was tried on that stay here: never tried again.
    kept: Vec<(u32, u16)>,
    moved: u64,
    fell_back: u64,
}

impl Local {
    /// When the loop must look at the stopping sessions again (their
    /// deadlines), if any is stopping.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.stopping
            .iter()
            .map(|&(.., since, _)| since + self.deadline)
            .min()
    }
}

impl Shard {
    /// The wake-up may carry mail.
    pub(super) fn handoff_mail(&mut self) {
        for m in self.hub.take_mail(self.io.shard) {
            match m {
                Mail::Start { deadline } => self.handoff_start(deadline),
                Mail::Verdict { slot, gen, taken } => self.handoff_verdict(slot, gen, taken),
                Mail::Adopt {
                    rec,
                    fds,
                    paused_at_ns,
                } => self.handoff_adopt(*rec, fds, paused_at_ns),
            }
        }
    }

    fn handoff_start(&mut self, deadline: Duration) {
        let h = &mut self.handoff;
        if h.active || h.reported_done {
            return;
        }
        h.active = true;
        h.deadline = deadline;
        h.candidates = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| {
                let e = e.as_ref()?;
                e.s.can_move().then_some((slot as u32, e.gen))
            })
            .collect();
        info!(
            shard = self.io.shard,
            sessions = self.live,
            movable = self.handoff.candidates.len(),
            "moving sessions to the new process"
        );
    }

    /// After each loop turn while moving: stop more sessions, export the
    /// ones that reached a movable point, give up on the late ones.
    pub(super) fn handoff_turn(&mut self) {
        if !self.handoff.active {
            return;
        }
        if self.hub.aborted.load(Ordering::Acquire) {
            self.handoff.candidates.clear();
        }
        let now = self.io.now;
        while self.handoff.stopping.len() + self.handoff.parked < BATCH {
            let Some((slot, gen)) = self.handoff.candidates.pop() else {
                break;
            };
            if self.entry(slot, gen).is_none() {
                continue;
            }
            let paused_at = mono_ns();
            if self.drive(slot, |s, env, _| s.handle_move_start(env)) == Some(true) {
                self.handoff.stopping.push((slot, gen, now, paused_at));
            }
        }
        let mut i = 0;
        while i < self.handoff.stopping.len() {
            let (slot, gen, since, paused_at) = self.handoff.stopping[i];
            if self.entry(slot, gen).is_none() {
                // It ended while stopping (both peers were done with it).
                self.handoff.stopping.swap_remove(i);
                continue;
            }
            let export = self.drive(slot, |s, env, _| s.poll_export(env));
            match export {
                Some(Export::Ready(rec)) => {
                    self.handoff.stopping.swap_remove(i);
                    let Some(e) = self.entry(slot, gen) else {
                        continue;
                    };
                    let fds = [e.s.fd(Who::Client), e.s.fd(Who::Conman)];
                    self.hub.export(Outgoing {
                        shard: self.io.shard,
                        slot,
                        gen,
                        rec: rec.encode(),
                        fds,
                        paused_at_ns: paused_at,
                    });
                    self.handoff.parked += 1;
                }
                Some(Export::NotYet) if now < since + self.handoff.deadline => i += 1,
                _ => {
                    // Too late, or it began to end: it stays and reads on.
                    debug!(
                        shard = self.io.shard,
                        slot, "session stays: no movable point"
                    );
                    self.drive(slot, |s, env, _| s.handle_move_cancelled(env));
                    self.fall_back(slot, gen);
                    self.handoff.stopping.swap_remove(i);
                }
            }
        }
        let h = &self.handoff;
        if h.candidates.is_empty() && h.stopping.is_empty() && h.parked == 0 {
            // Sessions that finished their setup since the start move
            // too; while some are still in setup, wait for them.
            let mut in_setup = false;
            for (slot, e) in self.sessions.iter().enumerate() {
                let Some(e) = e else { continue };
                let key = (slot as u32, e.gen);
                if e.s.can_move() && !self.handoff.kept.contains(&key) {
                    self.handoff.candidates.push(key);
                }
                in_setup |= !matches!(e.s.kind(), Kind::Relay | Kind::Closing);
            }
            if !self.handoff.candidates.is_empty() || in_setup {
                return;
            }
            self.handoff.active = false;
            info!(
                shard = self.io.shard,
                moved = self.handoff.moved,
                stayed = self.handoff.fell_back,
                left = self.live,
                "sessions moved"
            );
            self.handoff_done();
        }
    }

    fn fall_back(&mut self, slot: u32, gen: u16) {
        self.handoff.kept.push((slot, gen));
        self.handoff.fell_back += 1;
        ShardStats::inc(&self.io.stats.handoff_fallbacks);
    }

    /// Nothing more will be exported from this shard (also said when it
    /// stops, so that the mover never waits for a shard that is gone).
    pub(super) fn handoff_done(&mut self) {
        if !std::mem::replace(&mut self.handoff.reported_done, true) {
            self.hub.shard_done();
        }
    }

    fn handoff_verdict(&mut self, slot: u32, gen: u16, taken: bool) {
        self.handoff.parked = self.handoff.parked.saturating_sub(1);
        if self.entry(slot, gen).is_none() {
            debug_assert!(false, "a parked session went away");
            return;
        }
        if taken {
            self.handoff.moved += 1;
            ShardStats::inc(&self.io.stats.handoff_moved);
            self.drive(slot, |s, env, _| s.handle_moved(env));
        } else {
            self.fall_back(slot, gen);
            self.drive(slot, |s, env, _| s.handle_move_cancelled(env));
            // A drain close that came while it was parked was ignored.
            self.plan_late_close(slot, gen);
        }
    }

    /// New process: a session from the old one gets a slot and reads on.
    fn handoff_adopt(&mut self, rec: Record, fds: [OwnedFd; 2], paused_at_ns: u64) {
        let [client, conman] = fds.map(IntoRawFd::into_raw_fd);
        let (slot, gen) = self.take_slot();
        let s = {
            let s = Session::adopt(rec, client, conman, &mut env!(self.io, &mut self.out));
            debug_assert!(self.out.is_empty());
            s
        };
        self.place(slot, gen, s);
        self.plan_late_close(slot, gen);
        self.drive(slot, |s, env, _| s.handle_adopted(env));
        ShardStats::inc(&self.io.stats.handoff_adopted);
        let pause = Duration::from_nanos(mono_ns().saturating_sub(paused_at_ns));
        self.io.stats.handoff_pause(pause);
        debug!(
            shard = self.io.shard,
            pause_us = pause.as_micros() as u64,
            "session adopted"
        );
    }
}

// ---- the old process: the mover ------------------------------------------

/// Old process, on the handover connection after `OK`: waits for the new
/// process to ask for sessions, then moves them. Returns once every shard
/// is done (or at once if the new process does not ask).
pub fn move_out(mut conn: UnixStream, hub: &Hub) {
    conn.set_read_timeout(Some(WIRE_TIMEOUT)).ok();
    match handover::read_line(&mut conn) {
        Ok(l) if l.trim_end() == ASK => {}
        Ok(l) => {
            info!(
                answer = l.trim_end(),
                "the new process takes no sessions; they drain here"
            );
            return;
        }
        Err(e) => {
            info!(err = %e, "the new process takes no sessions; they drain here");
            return;
        }
    }
    let mut reader = match conn.try_clone() {
        Ok(r) => r,
        Err(e) => {
            warn!(err = %e, "cannot read verdicts: the sessions drain here");
            return;
        }
    };
    let started = Instant::now();
    for shard in 0..hub.mail.len() {
        hub.post(
            shard,
            Mail::Start {
                deadline: hub.deadline,
            },
        );
    }
    // Batches go out back to back; their verdicts come back in order on
    // another thread, so a session exported meanwhile does not wait for
    // the previous batch's round trip.
    let pending: Mutex<(VecDeque<Sent>, bool)> = Mutex::new((VecDeque::new(), false));
    let sent_cv = Condvar::new();
    let (moved, refused, batches) = std::thread::scope(|sc| {
        let verdicts = sc.spawn(|| read_verdicts(&mut reader, hub, &pending, &sent_cv));
        while let Some(batch) = hub.next_batch() {
            let sent = Sent {
                at: Instant::now(),
                bytes: batch.iter().map(|o| o.rec.len()).sum(),
                sessions: batch
                    .iter()
                    .map(|o| (o.shard, o.slot, o.gen, o.paused_at_ns))
                    .collect(),
            };
            let ok = !hub.aborted.load(Ordering::Acquire)
                && match send_batch(&mut conn, &batch) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(err = %e, "handover connection lost: the sessions not yet moved stay here");
                        hub.aborted.store(true, Ordering::Release);
                        false
                    }
                };
            if ok {
                lock(&pending).0.push_back(sent);
                sent_cv.notify_one();
            } else {
                post_verdicts(hub, &sent, &vec![false; sent.sessions.len()]);
            }
        }
        lock(&pending).1 = true;
        sent_cv.notify_one();
        let _ = conn.write_all(&batch_head(0, 0, 0));
        verdicts.join().unwrap_or_default()
    });
    info!(
        moved,
        refused,
        batches,
        took_ms = started.elapsed().as_millis() as u64,
        "session handover finished"
    );
}

/// A batch sent, awaiting its verdicts: (shard, slot, gen, paused at) per
/// session.
struct Sent {
    at: Instant,
    bytes: usize,
    sessions: Vec<(usize, u32, u16, u64)>,
}

fn post_verdicts(hub: &Hub, sent: &Sent, verdicts: &[bool]) {
    for (&(shard, slot, gen, _), &taken) in sent.sessions.iter().zip(verdicts) {
        hub.post(shard, Mail::Verdict { slot, gen, taken });
    }
}

/// The mover's other half: each sent batch's verdicts, in order, to the
/// shards, with one log line per batch; (moved, refused, batches).
fn read_verdicts(
    conn: &mut UnixStream,
    hub: &Hub,
    pending: &Mutex<(VecDeque<Sent>, bool)>,
    sent_cv: &Condvar,
) -> (u64, u64, u64) {
    let (mut moved, mut refused, mut batches) = (0u64, 0u64, 0u64);
    loop {
        let sent = {
            let mut p = lock(pending);
            loop {
                if let Some(s) = p.0.pop_front() {
                    break s;
                }
                if p.1 {
                    return (moved, refused, batches);
                }
                p = sent_cv.wait(p).unwrap_or_else(|e| e.into_inner());
            }
        };
        let n = sent.sessions.len();
        let verdicts = if hub.aborted.load(Ordering::Acquire) {
            vec![false; n]
        } else {
            match read_verdict(conn, n) {
                Ok(v) => v,
                Err(e) => {
                    warn!(err = %e, "no verdicts from the new process: the sessions not yet moved stay here");
                    hub.aborted.store(true, Ordering::Release);
                    vec![false; n]
                }
            }
        };
        let taken = verdicts.iter().filter(|v| **v).count() as u64;
        let now = mono_ns();
        batches += 1;
        moved += taken;
        refused += n as u64 - taken;
        info!(
            batch = batches,
            sessions = n,
            moved = taken,
            stayed = n as u64 - taken,
            bytes = sent.bytes,
            round_trip_us = sent.at.elapsed().as_micros() as u64,
            max_pause_us = sent
                .sessions
                .iter()
                .map(|s| now.saturating_sub(s.3) / 1000)
                .max()
                .unwrap_or(0),
            "session batch handed over"
        );
        post_verdicts(hub, &sent, &verdicts);
    }
}

fn batch_head(n: u32, len: u32, fds: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(BATCH_MAGIC);
    h[4..8].copy_from_slice(&n.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&fds.to_le_bytes());
    h
}

/// Sends one batch: its head with the descriptors, then the records.
fn send_batch(conn: &mut UnixStream, batch: &[Outgoing]) -> io::Result<()> {
    let mut body = Vec::new();
    let mut fds = Vec::with_capacity(batch.len() * 2);
    for o in batch {
        body.extend_from_slice(&o.paused_at_ns.to_le_bytes());
        body.extend_from_slice(&(o.rec.len() as u32).to_le_bytes());
        body.extend_from_slice(&o.rec);
        fds.extend_from_slice(&o.fds);
    }
    let head = batch_head(batch.len() as u32, body.len() as u32, fds.len() as u32);
    handover::send_with_fds(conn, &head, &fds)?;
    conn.write_all(&body)
}

/// The verdicts on a batch of `n`.
fn read_verdict(conn: &mut UnixStream, n: usize) -> io::Result<Vec<bool>> {
    let mut vh = [0u8; 8];
    conn.read_exact(&mut vh)?;
    if &vh[..4] != VERDICT_MAGIC
        || u32::from_le_bytes(vh[4..8].try_into().unwrap_or_default()) as usize != n
    {
        return Err(io::Error::other("bad verdicts from the new process"));
    }
    let mut v = vec![0u8; n];
    conn.read_exact(&mut v)?;
    Ok(v.into_iter().map(|b| b == 1).collect())
}

// ---- the new process: the receiver ----------------------------------------

/// New process, on the handover connection after `OK`: asks for the old
/// process's sessions and posts each to a shard. Returns when the old
/// process has no more (or the connection ends).
pub fn adopt_from(mut conn: UnixStream, hub: &Hub) {
    if !hub.enabled {
        return;
    }
    if let Err(e) = conn.write_all(format!("{ASK}\n").as_bytes()) {
        warn!(err = %e, "cannot ask the old process for its sessions");
        return;
    }
    conn.set_read_timeout(Some(WIRE_TIMEOUT)).ok();
    let (mut adopted, mut refused) = (0u64, 0u64);
    loop {
        match receive_batch(&mut conn, hub) {
            Ok(Some((a, r))) => {
                adopted += a;
                refused += r;
            }
            Ok(None) => break,
            Err(e) => {
                warn!(err = %e, "session handover from the old process ended");
                break;
            }
        }
    }
    info!(adopted, refused, "sessions taken over from the old process");
}

/// One batch: `None` at the end mark.
fn receive_batch(conn: &mut UnixStream, hub: &Hub) -> io::Result<Option<(u64, u64)>> {
    let (head, fds) = recv_head(conn)?;
    if &head[..4] != BATCH_MAGIC {
        return Err(io::Error::other("not a session batch"));
    }
    let field =
        |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default()) as usize;
    let (n, len, nfds) = (field(4), field(8), field(12));
    if n == 0 {
        return Ok(None);
    }
    if n > BATCH
        || nfds != 2 * n
        || fds.len() != nfds
        || len > BATCH * (12 + crate::session::handoff::MAX_BODY)
    {
        return Err(io::Error::other(format!(
            "bad session batch: {n} sessions, {} descriptors",
            fds.len()
        )));
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    let mut fds = fds.into_iter();
    let mut verdicts = Vec::with_capacity(n);
    let mut adopt = Vec::with_capacity(n);
    let mut rest = &body[..];
    for _ in 0..n {
        let (Some(c), Some(m)) = (fds.next(), fds.next()) else {
            return Err(io::Error::other("descriptors missing"));
        };
        if rest.len() < 12 {
            return Err(io::Error::other("session batch truncated"));
        }
        let paused_at_ns = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let rl = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as usize;
        if rest.len() < 12 + rl {
            return Err(io::Error::other("session batch truncated"));
        }
        let rec = &rest[12..12 + rl];
        rest = &rest[12 + rl..];
        match Record::decode_version(rec, hub.accept_version) {
            Ok(rec) => {
                adopt.push(Mail::Adopt {
                    rec: Box::new(rec),
                    fds: [c, m],
                    paused_at_ns,
                });
                verdicts.push(1u8);
            }
            Err(e) => {
                // Our copies of its sockets close here; the old process
                // keeps the session on its own.
                warn!(err = %e, "session record refused; it stays in the old process");
                verdicts.push(0);
            }
        }
    }
    let mut out = Vec::with_capacity(8 + n);
    out.extend_from_slice(VERDICT_MAGIC);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&verdicts);
    // Adopted only once the old process has been told: if it cannot be,
    // it keeps them (our copies of their sockets close here).
    conn.write_all(&out)?;
    for m in adopt {
        let shard = hub.next_shard.fetch_add(1, Ordering::Relaxed) % hub.mail.len();
        hub.post(shard, m);
    }
    let a = verdicts.iter().filter(|v| **v == 1).count() as u64;
    Ok(Some((a, n as u64 - a)))
}

/// The 16-byte batch head and the descriptors that came with it.
fn recv_head(conn: &mut UnixStream) -> io::Result<([u8; 16], Vec<OwnedFd>)> {
    let mut head = [0u8; 16];
    let (n, fds) = handover::recv_fds_into(conn, &mut head)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the old process closed the handover connection",
        ));
    }
    // The rest of the head, if the first read was short.
    conn.read_exact(&mut head[n..])?;
    Ok((head, fds))
}
