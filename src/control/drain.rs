//! Drain and upgrade as one documented phase enum (pingora's
//! `ExecutionPhase`), owned by the control shard: the sans-IO [`Drain`]
//! machine decides when each phase starts, with `now` passed in;
//! [`Lifecycle`] publishes the phase to the data shards (an atomic they
//! read when woken), the admin listener (`/readyz`, `/metrics`) and the
//! signal handler, and takes their drain requests; [`Driver::run`], a task
//! on the control shard's executor, feeds the machine its timeouts and
//! logs the progress.
//!
//! | phase      | `/readyz` | shards                                         | until                                   |
//! |------------|-----------|------------------------------------------------|-----------------------------------------|
//! | `Running`  | 200       | accept                                         | SIGTERM, SIGINT, `POST /drain`, handover |
//! | `NotReady` | 503       | accept (load balancers see the 503 first)      | `drain.readiness_delay_s` (0 after a handover) |
//! | `Draining` | 503       | stop accepting, take what is queued, close the listener; sessions run on | `drain.grace_s` from the start, or a second signal |
//! | `Closing`  | 503       | close the rest idle-first, spread over `drain.close_spread_s` (1012 to the client, 1001 to Conman) | the last session ends |
//! | `Done`     | –         | stopped                                        | the process exits 0                     |
//!
//! # Closing a listener without losing a connection
//! In a plain drain nobody will serve the port any more. A shard that
//! leaves `NotReady` first attaches a socket filter that drops new SYNs
//! (`listener::refuse_new_connections`) and keeps accepting for 200 ms,
//! the round trip in which handshakes already under way complete; then it
//! cancels its multishot accept, accepts whatever the kernel has queued
//! (until `EAGAIN`) and closes the socket. Nothing can join the queue after
//! the filter, so the close resets nothing (closing straight away would
//! reset what completed between the last `accept` and the `close`, which
//! the drain test caught). A client whose SYN was dropped sends it again
//! about a second later and is refused then (RST to the SYN), or served by
//! another listener of the group. After a handover the socket lives on in
//! the new process (it holds a descriptor of the same socket), so ours
//! gets no filter and just stops accepting.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::info;

use crate::metrics::ShardStats;

/// The process's lifecycle; each phase only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum DrainPhase {
    /// Serving and ready.
    Running = 0,
    /// `/readyz` is 503; the shards still accept.
    NotReady = 1,
    /// No new connections; live sessions run on.
    Draining = 2,
    /// The grace period is over: the rest are being closed, spread out.
    Closing = 3,
    /// Every session has ended.
    Done = 4,
}

impl DrainPhase {
    fn from_u8(v: u8) -> DrainPhase {
        match v {
            0 => DrainPhase::Running,
            1 => DrainPhase::NotReady,
            2 => DrainPhase::Draining,
            3 => DrainPhase::Closing,
            _ => DrainPhase::Done,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DrainPhase::Running => "running",
            DrainPhase::NotReady => "not_ready",
            DrainPhase::Draining => "draining",
            DrainPhase::Closing => "closing",
            DrainPhase::Done => "done",
        }
    }
}

/// What asked for a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM, SIGINT, `POST /drain`: the first one starts a drain, a
    /// later signal ends the grace period at once.
    Drain,
    /// A new process took the listening sockets over and is ready: it
    /// serves them already, so no readiness delay.
    HandedOver,
}

#[derive(Clone, Copy, Debug)]
pub struct DrainTimes {
    pub readiness_delay: Duration,
    pub grace: Duration,
    pub close_spread: Duration,
}

/// The drain decisions, sans-IO: inputs are `handle_*` with `now`, the
/// next deadline is [`Drain::poll_timeout`].
#[derive(Debug)]
pub struct Drain {
    phase: DrainPhase,
    times: DrainTimes,
    started: Option<Instant>,
    /// When the current phase ends by itself.
    deadline: Option<Instant>,
}

impl Drain {
    pub fn new(times: DrainTimes) -> Drain {
        Drain {
            phase: DrainPhase::Running,
            times,
            started: None,
            deadline: None,
        }
    }

    pub fn phase(&self) -> DrainPhase {
        self.phase
    }

    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn handle_request(&mut self, now: Instant, req: Request) {
        match (self.phase, req) {
            (DrainPhase::Running, Request::Drain) => {
                self.started = Some(now);
                self.phase = DrainPhase::NotReady;
                self.deadline = Some(now + self.times.readiness_delay);
                // With no delay, Draining starts now: readiness and the
                // listeners then change together, as configured.
                self.handle_timeout(now);
            }
            (DrainPhase::Running | DrainPhase::NotReady, Request::HandedOver) => {
                self.started.get_or_insert(now);
                self.phase = DrainPhase::NotReady;
                self.deadline = Some(now);
                self.handle_timeout(now);
            }
            // A second signal: the operator will not wait for the grace.
            (DrainPhase::NotReady | DrainPhase::Draining, Request::Drain) => {
                self.phase = DrainPhase::Closing;
                self.deadline = None;
            }
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(d) = self.deadline.filter(|d| *d <= now) else {
            return;
        };
        match self.phase {
            DrainPhase::NotReady => {
                self.phase = DrainPhase::Draining;
                let start = self.started.unwrap_or(d);
                self.deadline = Some((start + self.times.grace).max(d));
            }
            DrainPhase::Draining => {
                self.phase = DrainPhase::Closing;
                self.deadline = None;
            }
            _ => self.deadline = None,
        }
    }

    /// Every shard has stopped: nothing is left to drain.
    pub fn handle_all_stopped(&mut self) {
        self.phase = DrainPhase::Done;
        self.deadline = None;
    }
}

/// One session's place in the closing order: `idle_since` is when it last
/// received anything; `key` names it for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open<K> {
    pub key: K,
    pub idle_since: Instant,
}

/// A planned close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedClose<K> {
    pub at: Instant,
    pub key: K,
    /// The hint sent in the Close reason: when the client should come
    /// back, itself spread so that reconnects do not line up either.
    pub retry_after_ms: u64,
}

/// Largest `retry_after_ms` hint; the closes themselves already spread the
/// reconnects, the hint only breaks up what lands in the same instant.
pub const RETRY_AFTER_MAX_MS: u64 = 5_000;

/// Orders the open sessions idle-longest first and spreads their closes
/// over `[now, now + spread)`: session `i` of `n` closes at a uniformly
/// random point of the `i`-th of `n` equal slices (stratified jitter), so
/// the rate is even over the window, nobody can predict the instant, and
/// the order by idleness holds. Pure: randomness comes from `rng`.
pub fn plan_closes<K: Copy>(
    now: Instant,
    spread: Duration,
    mut open: Vec<Open<K>>,
    rng: &mut impl Rng,
) -> Vec<PlannedClose<K>> {
    open.sort_by_key(|o| o.idle_since);
    let n = open.len().max(1) as f64;
    let retry_max = RETRY_AFTER_MAX_MS.min(spread.as_millis() as u64);
    open.into_iter()
        .enumerate()
        .map(|(i, o)| PlannedClose {
            at: now + spread.mul_f64((i as f64 + rng.gen::<f64>()) / n),
            key: o.key,
            retry_after_ms: if retry_max == 0 {
                0
            } else {
                rng.gen_range(0..=retry_max)
            },
        })
        .collect()
}

/// Writes a byte to each shard's eventfd, so it reads the phase.
pub struct Wakers {
    pub fds: Vec<i32>,
}

impl Wakers {
    pub fn wake_all(&self) {
        for &fd in &self.fds {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to an eventfd we own
            // for the life of the process.
            unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

/// The phase as the rest of the process sees it, and the way in for drain
/// requests. Only the driver thread moves the machine on its own.
pub struct Lifecycle {
    phase: AtomicU8,
    /// The listening sockets were handed to a new process: shards close
    /// theirs without accepting what is queued (the new process does).
    handed_over: AtomicBool,
    /// The admin listener went to the new process with the others: this
    /// one stops serving it.
    admin_stopped: AtomicBool,
    /// Copies of the listening sockets kept for a handover; closed when
    /// the shards stop accepting, since a copy nobody accepts on would keep
    /// the port listening with connects queued and never served.
    spares: Mutex<Option<Spares>>,
    machine: Mutex<Drain>,
    /// A byte written here wakes the driver after a request: its end of
    /// the pair is `driver_end` until [`Lifecycle::driver`] takes it.
    poke: UnixStream,
    driver_end: Mutex<Option<OwnedFd>>,
    wakers: Wakers,
}

impl Lifecycle {
    pub fn new(times: DrainTimes, wakers: Wakers) -> io::Result<Lifecycle> {
        let (poke, driver_end) = UnixStream::pair()?;
        // A full buffer means the driver has a wake-up pending already.
        poke.set_nonblocking(true)?;
        Ok(Lifecycle {
            phase: AtomicU8::new(DrainPhase::Running as u8),
            handed_over: AtomicBool::new(false),
            admin_stopped: AtomicBool::new(false),
            spares: Mutex::new(None),
            machine: Mutex::new(Drain::new(times)),
            poke,
            driver_end: Mutex::new(Some(OwnedFd::from(driver_end))),
            wakers,
        })
    }

    /// The task that drives the machine (once: later calls get `None`).
    pub fn driver(self: &Arc<Self>, stats: Vec<Arc<ShardStats>>) -> Option<Driver> {
        let end = self
            .driver_end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(Driver {
            lc: self.clone(),
            stats,
            end,
        })
    }

    fn poke(&self) {
        let _ = (&self.poke).write(&[1]);
    }

    pub fn phase(&self) -> DrainPhase {
        DrainPhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn ready(&self) -> bool {
        self.phase() == DrainPhase::Running
    }

    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// A reloaded config's drain settings, for the transitions to come.
    pub fn set_times(&self, times: DrainTimes) {
        self.machine.lock().unwrap_or_else(|p| p.into_inner()).times = times;
        self.poke();
    }

    pub fn stop_admin(&self) {
        self.admin_stopped.store(true, Ordering::Release);
    }

    pub fn admin_stopped(&self) -> bool {
        self.admin_stopped.load(Ordering::Acquire)
    }

    /// Keeps copies of the listening sockets for a handover (see `spares`).
    pub fn keep_spares(&self, spares: Spares) {
        if self.phase() < DrainPhase::Draining {
            *self.spares.lock().unwrap_or_else(|p| p.into_inner()) = Some(spares);
        }
    }

    /// Runs `f` on the spare sockets while they cannot be closed; `None`
    /// once the shards have stopped accepting.
    pub fn with_spares<R>(&self, f: impl FnOnce(&Spares) -> R) -> Option<R> {
        self.spares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(f)
    }

    pub fn request(&self, req: Request) {
        if req == Request::HandedOver {
            self.handed_over.store(true, Ordering::Release);
        }
        let mut m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.phase();
        m.handle_request(Instant::now(), req);
        self.publish(before, &m);
        drop(m);
        self.poke();
    }

    /// Every shard has stopped.
    pub fn all_stopped(&self) {
        let mut m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.phase();
        m.handle_all_stopped();
        self.publish(before, &m);
    }

    fn publish(&self, before: DrainPhase, m: &Drain) {
        let now = m.phase();
        if now == before {
            return;
        }
        if now >= DrainPhase::Draining {
            drop(self.spares.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
        self.phase.store(now as u8, Ordering::Release);
        if before == DrainPhase::Running && !self.handed_over() {
            // After a handover the new process is the service's main one:
            // it must not look as if the service were stopping.
            super::systemd::notify("STOPPING=1");
        }
        info!(
            from = before.as_str(),
            to = now.as_str(),
            handed_over = self.handed_over(),
            "drain phase"
        );
        self.wakers.wake_all();
    }
}

/// Copies of the process's listening sockets: one per shard, and the
/// admin listener's.
pub struct Spares {
    pub listeners: Vec<OwnedFd>,
    pub admin: Option<OwnedFd>,
}

/// How often a drain logs its progress.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// Sessions still open across the shards.
pub fn sessions_left(stats: &[Arc<ShardStats>]) -> u64 {
    stats.iter().map(|s| s.live.load(Ordering::Relaxed)).sum()
}

/// Moves the drain machine on at its deadlines and logs one progress line
/// a minute while a drain runs: a task on the control shard's executor
/// (see [`crate::control::spawn_with_drain`]), woken by its timer or by a
/// request. It ends with the executor, once every data shard has stopped.
pub struct Driver {
    lc: Arc<Lifecycle>,
    stats: Vec<Arc<ShardStats>>,
    end: OwnedFd,
}

impl Driver {
    pub async fn run(self) {
        use futures_lite::io::AsyncReadExt;
        // SAFETY: the descriptor is owned (moved out of its OwnedFd) and
        // handed to exactly one stream, which closes it.
        let mut pokes = unsafe { glommio::net::UnixStream::from_raw_fd(self.end.into_raw_fd()) };
        let mut buf = [0u8; 64];
        let mut next_progress: Option<Instant> = None;
        loop {
            let wake = {
                let mut m = self.lc.machine.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let before = m.phase();
                m.handle_timeout(now);
                self.lc.publish(before, &m);
                let phase = m.phase();
                if phase == DrainPhase::Done {
                    return;
                }
                if phase >= DrainPhase::NotReady {
                    let due = *next_progress.get_or_insert(now + PROGRESS_EVERY);
                    if due <= now {
                        next_progress = Some(now + PROGRESS_EVERY);
                        info!(
                            phase = phase.as_str(),
                            sessions_left = sessions_left(&self.stats),
                            draining_for_s = m.started().map_or(0, |s| (now - s).as_secs()),
                            "drain progress"
                        );
                    }
                }
                [m.poll_timeout(), next_progress]
                    .into_iter()
                    .flatten()
                    .min()
            };
            let timer = async {
                match wake {
                    Some(t) => {
                        glommio::timer::sleep(t.saturating_duration_since(Instant::now())).await
                    }
                    None => std::future::pending().await,
                }
                true
            };
            let poked = async { matches!(pokes.read(&mut buf).await, Ok(n) if n > 0) };
            // A closed or failed poke socket: the process is going away.
            if !futures_lite::future::or(poked, timer).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn times() -> DrainTimes {
        DrainTimes {
            readiness_delay: Duration::from_secs(10),
            grace: Duration::from_secs(100),
            close_spread: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_drain_walks_the_phases_in_order_at_their_times() {
        let t0 = Instant::now();
        let mut d = Drain::new(times());
        assert_eq!(d.phase(), DrainPhase::Running);
        assert_eq!(d.poll_timeout(), None);
        d.handle_request(t0, Request::Drain);
        assert_eq!(d.phase(), DrainPhase::NotReady);
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        d.handle_timeout(t0 + Duration::from_secs(9));
        assert_eq!(d.phase(), DrainPhase::NotReady, "not before the delay");
        d.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(d.phase(), DrainPhase::Draining);
        // The grace counts from the drain's start, not from Draining.
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(100)));
        d.handle_timeout(t0 + Duration::from_secs(100));
        assert_eq!(d.phase(), DrainPhase::Closing);
        assert_eq!(d.poll_timeout(), None);
        d.handle_all_stopped();
        assert_eq!(d.phase(), DrainPhase::Done);
    }

    #[test]
    fn a_repeated_request_skips_the_grace_and_a_zero_delay_still_flips_readiness_first() {
        let t0 = Instant::now();
        let mut d = Drain::new(DrainTimes {
            readiness_delay: Duration::ZERO,
            ..times()
        });
        d.handle_request(t0, Request::Drain);
        assert_eq!(d.phase(), DrainPhase::Draining);
        d.handle_request(t0, Request::Drain);
        assert_eq!(d.phase(), DrainPhase::Closing);
        d.handle_request(t0, Request::Drain);
        assert_eq!(d.phase(), DrainPhase::Closing);
    }

    #[test]
    fn a_handover_stops_accepting_at_once_but_keeps_the_grace() {
        let t0 = Instant::now();
        let mut d = Drain::new(times());
        d.handle_request(t0, Request::HandedOver);
        assert_eq!(d.phase(), DrainPhase::Draining);
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn the_longest_idle_close_first_and_the_closes_cover_the_window_evenly() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(7);
        let open: Vec<Open<u32>> = (0..1000u32)
            .map(|k| Open {
                key: k,
                // Key 0 has been idle the longest.
                idle_since: t0 - Duration::from_secs(1000) + Duration::from_secs(k as u64),
            })
            .rev()
            .collect();
        let spread = Duration::from_secs(60);
        let plan = plan_closes(t0, spread, open, &mut rng);
        assert_eq!(plan.len(), 1000);
        // Idle order, and times never go backwards.
        assert!(plan
            .windows(2)
            .all(|w| w[0].key < w[1].key && w[0].at <= w[1].at));
        assert!(plan.iter().all(|p| p.at >= t0 && p.at < t0 + spread));
        // Each tenth of the window holds about a tenth of the closes.
        for tenth in 0..10u32 {
            let lo = t0 + spread * tenth / 10;
            let hi = t0 + spread * (tenth + 1) / 10;
            let n = plan.iter().filter(|p| p.at >= lo && p.at < hi).count();
            assert!((95..=105).contains(&n), "tenth {tenth}: {n}");
        }
        let hints: Vec<u64> = plan.iter().map(|p| p.retry_after_ms).collect();
        assert!(hints.iter().all(|&h| h <= RETRY_AFTER_MAX_MS));
        let distinct: std::collections::BTreeSet<_> = hints.iter().collect();
        assert!(distinct.len() > 500, "hints are spread too");
    }

    #[test]
    fn a_zero_spread_closes_everyone_now_without_a_hint() {
        let t0 = Instant::now();
        let open = vec![Open {
            key: (),
            idle_since: t0,
        }];
        let plan = plan_closes(t0, Duration::ZERO, open, &mut SmallRng::seed_from_u64(1));
        assert_eq!(plan[0].at, t0);
        assert_eq!(plan[0].retry_after_ms, 0);
    }
}
