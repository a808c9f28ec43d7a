//! `storm`: what a Conman rollout does to the proxy in front of it.
//!
//! Every session is held with a light periodic echo; then one backend is
//! killed and every session it carried reconnects at once, after the
//! `retry_after_ms` of its Close (or the `Retry-After` of a refused
//! upgrade) when there is one; a failed attempt backs off with full jitter.
//! Recorded per lost session: how soon the loss was seen, the reconnect's
//! upgrade and setup latency (connect → 101 → first echo verified) and how
//! long it took to relay again; for the run: the time from the kill until
//! every session relays again, the sessions that never did, and the CPU
//! time of watched processes (the proxy) over that window.
//!
//! Each worker thread keeps a [`StormBook`] for its own sessions; the main
//! thread runs the [`Conductor`] (kill, CPU samples, when to stop); both
//! share [`StormShared`]. Times are nanoseconds of the run's common clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::config::StormShape;
use crate::report::{histogram, Percentiles, StormCpu, StormRecorder, StormReport};

const UNSET: u64 = u64::MAX;

/// Most points in the "sessions relaying over time" series.
const TIMELINE_POINTS: u64 = 400;

/// CPU time of a set of processes, all threads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    /// Time on CPU from `/proc/PID/task/*/schedstat` (nanoseconds).
    pub ns: u64,
    /// Time runnable but waiting for a CPU (same source): what other
    /// work on the machine took from the watched processes.
    pub wait_ns: u64,
    /// utime and stime from `/proc/PID/stat`, in clock ticks (the split
    /// between user space and kernel; 10 ms resolution).
    pub user_ticks: u64,
    pub sys_ticks: u64,
}

impl Cpu {
    /// Reads every pid in `pids`; a pid that is gone counts as nothing.
    pub fn of(pids: &[i32]) -> Cpu {
        let mut cpu = Cpu::default();
        for &pid in pids {
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // Fields after the parenthesised command name; utime and
                // stime are the 14th and 15th of the whole line.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<&str> = rest.split_whitespace().collect();
                cpu.user_ticks += f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                cpu.sys_ticks += f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            let (run, wait) = schedstat_ns(pid).unwrap_or((0, 0));
            cpu.ns += run;
            cpu.wait_ns += wait;
        }
        cpu
    }
}

/// Time on CPU and time waiting for one, over all threads of `pid`.
fn schedstat_ns(pid: i32) -> io::Result<(u64, u64)> {
    let (mut run, mut wait) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between listing and reading.
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut f = text
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            run += f.next().unwrap_or(0);
            wait += f.next().unwrap_or(0);
        }
    }
    Ok((run, wait))
}

/// A CPU reading and when it was taken.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ns: u64,
    cpu: Cpu,
}

#[derive(Debug, Default)]
struct Samples {
    /// Every session held.
    hold: Option<Sample>,
    /// The storm's start (just before the kill).
    start: Option<Sample>,
    /// The last time every lost session was relaying again.
    relaying: Option<Sample>,
    /// The storm declared over.
    end: Option<Sample>,
}

/// What the worker threads and the main thread share during a storm.
#[derive(Debug)]
pub struct StormShared {
    /// When the storm started (the kill, or the first loss without one).
    t0_ns: AtomicU64,
    /// Sessions lost and neither relaying again nor given up.
    pending: AtomicU64,
    /// Set by the conductor: the workers wind down.
    pub stop: AtomicBool,
    watch: Vec<i32>,
    samples: Mutex<Samples>,
}

impl StormShared {
    pub fn new(watch: Vec<i32>) -> Self {
        Self {
            t0_ns: AtomicU64::new(UNSET),
            pending: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            watch,
            samples: Mutex::new(Samples::default()),
        }
    }

    pub fn t0(&self) -> Option<u64> {
        Some(self.t0_ns.load(Ordering::Acquire)).filter(|&t| t != UNSET)
    }

    fn sample(&self, at_ns: u64) -> Sample {
        Sample {
            at_ns,
            cpu: Cpu::of(&self.watch),
        }
    }

    fn record(&self, at_ns: u64, which: impl FnOnce(&mut Samples) -> &mut Option<Sample>) {
        let sample = self.sample(at_ns);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        *which(&mut samples) = Some(sample);
    }

    /// Starts the storm at `now` unless it has started; true if this call
    /// started it (and took the start sample).
    fn start(&self, now: u64) -> bool {
        // The sample comes first so that it precedes the kill.
        let sample = self.sample(now);
        let started = self
            .t0_ns
            .compare_exchange(UNSET, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if started {
            let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            samples.start = Some(sample);
        }
        started
    }

    fn one_down(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// A lost session is settled (relaying again, or given up); true if it
    /// was the last one.
    fn one_settled(&self) -> bool {
        self.pending.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }
}

/// The main thread's part: holds, kills, decides when the storm is over.
#[derive(Debug)]
pub struct Conductor {
    shape: StormShape,
    held_ns: Option<u64>,
    settled: bool,
    stopped: bool,
}

impl Conductor {
    pub fn new(shape: StormShape) -> Self {
        Self {
            shape,
            held_ns: None,
            settled: false,
            stopped: false,
        }
    }

    /// Every session is held: the CPU baseline starts.
    pub fn on_holding(&mut self, shared: &StormShared, now: u64) {
        self.held_ns = Some(now);
        shared.record(now, |s| &mut s.hold);
    }

    /// Called often (every 10 ms or so). Returns a line to print on stdout
    /// once the kill is done.
    pub fn tick(&mut self, shared: &StormShared, now: u64) -> io::Result<Option<String>> {
        let Some(held) = self.held_ns else {
            return Ok(None);
        };
        let mut line = None;
        let settle_end = held + ns(self.shape.settle);
        if !self.settled && now >= settle_end {
            self.settled = true;
            if let Some(pid) = self.shape.kill_pid {
                shared.start(now);
                // SAFETY: plain syscall on a pid the user named.
                if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("killing {pid}: {e}")));
                }
                line = Some(format!("killed {pid}"));
            }
        }
        if self.stopped || !self.settled {
            return Ok(line);
        }
        let over = match shared.t0() {
            Some(t0) => {
                let quiet = shared.pending() == 0 && now >= t0 + ns(self.shape.observe);
                quiet || now >= t0 + ns(self.shape.timeout)
            }
            None => now >= settle_end + ns(self.shape.timeout),
        };
        if over {
            self.stopped = true;
            shared.record(now, |s| &mut s.end);
            shared.stop.store(true, Ordering::Release);
        }
        Ok(line)
    }
}

fn ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One session of a worker, across its connections.
#[derive(Debug, Clone, Copy, Default)]
struct Session {
    /// The worker's slot of its latest connection.
    slot: Option<usize>,
    /// When it was lost, while it is not relaying again.
    down_since: Option<u64>,
    /// Failed reconnect attempts since then.
    failures: u32,
    /// Gave up: failed for good.
    failed: bool,
}

/// A worker's view of the storm: its sessions' states, when each must
/// reconnect or echo next, and its records.
#[derive(Debug)]
pub struct StormBook {
    shape: StormShape,
    sessions: Vec<Session>,
    /// (due, session) of reconnects to start.
    reconnects: BinaryHeap<Reverse<(u64, u32)>>,
    /// (due, session) of periodic echoes.
    echoes: BinaryHeap<Reverse<(u64, u32)>>,
    rec: StormRecorder,
}

impl StormBook {
    pub fn new(shape: StormShape, sessions: usize) -> Self {
        Self {
            shape,
            sessions: vec![Session::default(); sessions],
            reconnects: BinaryHeap::new(),
            echoes: BinaryHeap::new(),
            rec: StormRecorder::default(),
        }
    }

    /// Schedules every session's periodic echo, the first one `offset(s)`
    /// (a fraction of the period) from now, so they do not come in step.
    pub fn start_echoes(&mut self, now: u64, mut offset: impl FnMut() -> f64) {
        let every = ns(self.shape.echo_every);
        for s in 0..self.sessions.len() {
            let due = now + (offset() * every as f64) as u64;
            self.echoes.push(Reverse((due, s as u32)));
        }
    }

    /// The next periodic echo due by `now`; it is rescheduled one period on.
    pub fn due_echo(&mut self, now: u64) -> Option<usize> {
        let &Reverse((due, s)) = self.echoes.peek()?;
        if due > now {
            return None;
        }
        self.echoes.pop();
        let next =
            due.max(now.saturating_sub(ns(self.shape.echo_every))) + ns(self.shape.echo_every);
        self.echoes.push(Reverse((next, s)));
        Some(s as usize)
    }

    /// The next session due to reconnect by `now`.
    pub fn due_reconnect(&mut self, now: u64) -> Option<usize> {
        loop {
            let &Reverse((due, s)) = self.reconnects.peek()?;
            if due > now {
                return None;
            }
            self.reconnects.pop();
            // One that gave up meanwhile stays down.
            if self.is_down(s as usize) {
                self.rec.reconnects += 1;
                return Some(s as usize);
            }
        }
    }

    /// The earliest time something is due.
    pub fn next_due(&self) -> Option<u64> {
        let a = self.echoes.peek().map(|r| r.0 .0);
        let b = self.reconnects.peek().map(|r| r.0 .0);
        a.into_iter().chain(b).min()
    }

    pub fn set_slot(&mut self, s: usize, slot: usize) {
        self.sessions[s].slot = Some(slot);
    }

    /// The slot of the session's latest connection; it may since have
    /// been given to another connection.
    pub fn slot(&self, s: usize) -> Option<usize> {
        self.sessions[s].slot
    }

    pub fn is_down(&self, s: usize) -> bool {
        self.sessions[s].down_since.is_some()
    }

    /// A relaying session was lost (`kind` names how).
    pub fn lost(
        &mut self,
        s: usize,
        kind: &str,
        retry_after_ms: Option<u64>,
        now: u64,
        shared: &StormShared,
    ) {
        if self.shape.kill_pid.is_none() {
            shared.start(now);
        }
        match shared.t0() {
            Some(t0) if now >= t0 => {
                self.rec.detect_ns.saturating_record((now - t0).max(1));
            }
            _ => self.rec.lost_before_start += 1,
        }
        *self.rec.lost.entry(kind.to_owned()).or_insert(0) += 1;
        self.rec.loss_at.push(now);
        self.sessions[s] = Session {
            slot: None,
            down_since: Some(now),
            failures: 0,
            failed: false,
        };
        shared.one_down();
        let wait = retry_after_ms.map_or(0, |ms| ms * 1_000_000);
        if wait > 0 {
            self.rec.retry_after_waits += 1;
        }
        self.reconnects.push(Reverse((now + wait, s as u32)));
    }

    /// A reconnect attempt failed before relaying. `unit` in [0, 1) is the
    /// backoff's jitter.
    pub fn attempt_failed(
        &mut self,
        s: usize,
        kind: &str,
        retry_after_ms: Option<u64>,
        now: u64,
        unit: f64,
        shared: &StormShared,
    ) {
        *self
            .rec
            .attempt_failures
            .entry(kind.to_owned())
            .or_insert(0) += 1;
        let session = &mut self.sessions[s];
        let Some(since) = session.down_since else {
            return;
        };
        session.failures += 1;
        if now.saturating_sub(since) >= ns(self.shape.give_up) {
            session.failed = true;
            session.down_since = None;
            self.rec.gave_up += 1;
            shared.one_settled();
            return;
        }
        let exp = self
            .shape
            .retry_base
            .saturating_mul(1 << (session.failures - 1).min(20));
        let backoff = (unit * ns(exp.min(self.shape.retry_cap)) as f64) as u64;
        let hint = retry_after_ms.map_or(0, |ms| ms * 1_000_000);
        if hint > backoff {
            self.rec.retry_after_waits += 1;
        }
        self.reconnects
            .push(Reverse((now + backoff.max(hint), s as u32)));
    }

    /// A reconnect reached 101 after `ns_since_connect`.
    pub fn upgraded(&mut self, s: usize, ns_since_connect: u64) {
        if self.is_down(s) {
            self.rec
                .upgrade_ns
                .saturating_record(ns_since_connect.max(1));
        }
    }

    /// A session's connection verified its first echo.
    pub fn relaying(&mut self, s: usize, connect_started: u64, now: u64, shared: &StormShared) {
        let Some(since) = self.sessions[s].down_since.take() else {
            return;
        };
        self.sessions[s].failures = 0;
        self.rec.recovered += 1;
        self.rec
            .setup_ns
            .saturating_record(now.saturating_sub(connect_started).max(1));
        self.rec
            .recovery_ns
            .saturating_record(now.saturating_sub(since).max(1));
        self.rec.recovered_at.push(now);
        if shared.one_settled() && shared.t0().is_some() {
            shared.record(now, |s| &mut s.relaying);
        }
    }

    /// The run is over: sessions still down have failed.
    pub fn finish(mut self) -> StormRecorder {
        self.rec.still_down = self
            .sessions
            .iter()
            .filter(|s| s.down_since.is_some())
            .count() as u64;
        self.rec
    }
}

/// Merges the threads' records into the report's storm section.
pub fn report(
    shape: &StormShape,
    sessions: usize,
    threads: &[&StormRecorder],
    shared: &StormShared,
) -> StormReport {
    let mut lost = BTreeMap::new();
    let mut attempt_failures = BTreeMap::new();
    let (mut detect, mut upgrade, mut setup, mut recovery) =
        (histogram(), histogram(), histogram(), histogram());
    let mut loss_at = Vec::new();
    let mut recovered_at = Vec::new();
    let mut sum = StormRecorder::default();
    for t in threads {
        for (k, n) in &t.lost {
            *lost.entry(k.clone()).or_insert(0) += n;
        }
        for (k, n) in &t.attempt_failures {
            *attempt_failures.entry(k.clone()).or_insert(0) += n;
        }
        // Same bounds everywhere, so adding cannot fail.
        detect.add(&t.detect_ns).ok();
        upgrade.add(&t.upgrade_ns).ok();
        setup.add(&t.setup_ns).ok();
        recovery.add(&t.recovery_ns).ok();
        loss_at.extend_from_slice(&t.loss_at);
        recovered_at.extend_from_slice(&t.recovered_at);
        sum.lost_before_start += t.lost_before_start;
        sum.reconnects += t.reconnects;
        sum.retry_after_waits += t.retry_after_waits;
        sum.recovered += t.recovered;
        sum.gave_up += t.gave_up;
        sum.still_down += t.still_down;
    }
    loss_at.sort_unstable();
    recovered_at.sort_unstable();
    let samples = shared.samples.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = shared.t0();
    let failed = sum.gave_up + sum.still_down;
    let lost_total = loss_at.len() as u64;
    let all_relaying_ms = match (t0, recovered_at.last()) {
        (Some(t0), Some(&last)) if failed == 0 => Some(ms(last.saturating_sub(t0))),
        (Some(_), None) if failed == 0 && lost_total == 0 => Some(0.0),
        _ => None,
    };
    let (step_ms, relaying) = match (t0, samples.end) {
        (Some(t0), Some(end)) => timeline(sessions as u64, t0, end.at_ns, &loss_at, &recovered_at),
        _ => (0.0, Vec::new()),
    };
    let cpu = cpu_report(&samples, sum.reconnects);
    StormReport {
        sessions,
        started_by: match (t0, shape.kill_pid) {
            (None, _) => "nothing",
            (Some(_), Some(_)) => "kill",
            (Some(_), None) => "first_loss",
        },
        killed_pid: shape.kill_pid,
        lost: lost_total,
        lost_by: lost,
        lost_before_start: sum.lost_before_start,
        reconnects: sum.reconnects,
        attempt_failures,
        retry_after_waits: sum.retry_after_waits,
        recovered: sum.recovered,
        failed_sessions: failed,
        all_relaying_ms,
        detect_us: Percentiles::of(&detect),
        upgrade_us: Percentiles::of(&upgrade),
        setup_us: Percentiles::of(&setup),
        recovery_us: Percentiles::of(&recovery),
        cpu,
        timeline_step_ms: step_ms,
        relaying,
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 10_000.0).round() / 100.0
}

/// Sessions relaying at each step from the storm's start to its end.
fn timeline(
    sessions: u64,
    t0: u64,
    end: u64,
    loss_at: &[u64],
    recovered_at: &[u64],
) -> (f64, Vec<u64>) {
    let span = end.saturating_sub(t0).max(1);
    // Steps of 1, 2 or 5 × 10^k ms, at most TIMELINE_POINTS of them.
    let mut step: u64 = 1_000_000;
    for k in [1, 2, 5].iter().cycle().zip(0u32..) {
        let candidate = *k.0 * 1_000_000 * 10u64.pow(k.1 / 3);
        if span / candidate < TIMELINE_POINTS {
            step = candidate;
            break;
        }
    }
    let points = span / step + 1;
    let (mut li, mut ri) = (0, 0);
    let mut out = Vec::with_capacity(points as usize + 1);
    for i in 0..points {
        let at = t0 + i * step;
        while li < loss_at.len() && loss_at[li] <= at {
            li += 1;
        }
        while ri < recovered_at.len() && recovered_at[ri] <= at {
            ri += 1;
        }
        out.push((sessions + ri as u64).saturating_sub(li as u64));
    }
    (step as f64 / 1e6, out)
}

fn cpu_report(samples: &Samples, reconnects: u64) -> Option<StormCpu> {
    let (hold, start) = (samples.hold?, samples.start?);
    let stop = samples.relaying.or(samples.end)?;
    let secs = |a: &Sample, b: &Sample| b.at_ns.saturating_sub(a.at_ns) as f64 / 1e9;
    let cpu_ms = |a: &Sample, b: &Sample| b.cpu.ns.saturating_sub(a.cpu.ns) as f64 / 1e6;
    let tick_ms = 1000.0 / clock_ticks_per_s();
    let baseline_s = secs(&hold, &start);
    let baseline_ms = cpu_ms(&hold, &start);
    let storm_s = secs(&start, &stop);
    let storm_ms = cpu_ms(&start, &stop);
    let rate = if baseline_s > 0.0 {
        baseline_ms / baseline_s
    } else {
        0.0
    };
    let above = storm_ms - rate * storm_s;
    Some(StormCpu {
        baseline_s,
        baseline_cpu_ms: baseline_ms,
        storm_s,
        storm_cpu_ms: storm_ms,
        storm_user_ms: stop.cpu.user_ticks.saturating_sub(start.cpu.user_ticks) as f64 * tick_ms,
        storm_sys_ms: stop.cpu.sys_ticks.saturating_sub(start.cpu.sys_ticks) as f64 * tick_ms,
        storm_wait_ms: stop.cpu.wait_ns.saturating_sub(start.cpu.wait_ns) as f64 / 1e6,
        above_baseline_ms: above,
        per_reconnect_us: (reconnects > 0).then(|| above * 1000.0 / reconnects as f64),
    })
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn shape() -> StormShape {
        StormShape {
            kill_pid: None,
            settle: Duration::from_secs(1),
            observe: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            echo_every: Duration::from_secs(1),
            retry_base: Duration::from_millis(100),
            retry_cap: Duration::from_secs(2),
            give_up: Duration::from_secs(5),
            watch_pids: Vec::new(),
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_loss_reconnects_at_once_or_after_the_hint_and_recovers() {
        let shared = StormShared::new(Vec::new());
        let mut book = StormBook::new(shape(), 2);
        book.lost(0, "close_1014", None, 100 * MS, &shared);
        assert_eq!(
            shared.t0(),
            Some(100 * MS),
            "the first loss starts the storm"
        );
        book.lost(1, "close_1013", Some(250), 101 * MS, &shared);
        assert_eq!(shared.pending(), 2);
        assert_eq!(book.due_reconnect(100 * MS), Some(0));
        assert_eq!(book.due_reconnect(350 * MS), None, "the hint is honoured");
        assert_eq!(book.due_reconnect(351 * MS), Some(1));
        book.relaying(0, 120 * MS, 130 * MS, &shared);
        // A failed attempt waits its backoff (full jitter: 0.5 of 100 ms).
        book.attempt_failed(1, "http_502", None, 360 * MS, 0.5, &shared);
        assert_eq!(book.due_reconnect(409 * MS), None);
        assert_eq!(book.due_reconnect(410 * MS), Some(1));
        book.relaying(1, 410 * MS, 420 * MS, &shared);
        assert_eq!(shared.pending(), 0);
        let rec = book.finish();
        let r = report(&shape(), 2, &[&rec], &shared);
        assert_eq!(r.lost, 2);
        assert_eq!(r.recovered, 2);
        assert_eq!(r.failed_sessions, 0);
        assert_eq!(r.reconnects, 3);
        assert_eq!(r.retry_after_waits, 1);
        assert_eq!(r.all_relaying_ms, Some(320.0));
        assert_eq!(r.attempt_failures["http_502"], 1);
    }

    #[test]
    fn a_session_down_past_give_up_has_failed() {
        let shared = StormShared::new(Vec::new());
        let mut book = StormBook::new(shape(), 1);
        book.lost(0, "eof_without_close", None, 0, &shared);
        assert_eq!(book.due_reconnect(0), Some(0));
        book.attempt_failed(0, "connect_refused", None, 6_000 * MS, 0.0, &shared);
        assert_eq!(shared.pending(), 0);
        assert_eq!(
            book.due_reconnect(u64::MAX - 1),
            None,
            "none after giving up"
        );
        let r = report(&shape(), 1, &[&book.finish()], &shared);
        assert_eq!(r.failed_sessions, 1);
        assert_eq!(r.all_relaying_ms, None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let shared = StormShared::new(Vec::new());
        let mut book = StormBook::new(shape(), 1);
        book.lost(0, "x", None, 0, &shared);
        book.due_reconnect(0);
        let mut now = 0;
        for (n, want_ms) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1600), (6, 2000)] {
            // unit just under 1: the whole window.
            book.attempt_failed(0, "x", None, now, 0.999_999, &shared);
            let due = book.next_due().expect("scheduled");
            assert!(due.abs_diff(now + want_ms * MS) < MS, "attempt {n}");
            now = due;
            book.due_reconnect(now);
        }
    }

    #[test]
    fn timeline_counts_relaying_sessions() {
        let (step, points) = timeline(10, 0, 30 * MS, &[MS, 2 * MS, 3 * MS], &[20 * MS]);
        assert_eq!(step, 1.0);
        assert_eq!(points[0], 10);
        assert_eq!(points[3], 7);
        assert_eq!(points[19], 7);
        assert_eq!(points[20], 8);
        let (step, points) = timeline(1, 0, 10_000 * MS, &[], &[]);
        assert_eq!(step, 50.0);
        assert_eq!(points.len(), 201);
    }

    #[test]
    fn cpu_of_this_process_moves() {
        let me = std::process::id() as i32;
        let a = Cpu::of(&[me]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = Cpu::of(&[me]);
        assert!(b.ns > a.ns, "{a:?} {b:?}");
        assert_eq!(Cpu::of(&[i32::MAX]), Cpu::default(), "a pid that is gone");
    }
}
