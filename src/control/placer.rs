//! The control shard's decisions, sans-IO: a placement request goes in
//! ([`Placer::handle_request`]) and comes out as a reply, a Controlplane
//! request to make, or a wait for one already out; a finished Controlplane
//! request goes in ([`Placer::handle_fetch_done`]) and comes out as the
//! replies to everyone who waited. Time is a parameter; the glommio glue in
//! `service.rs` only moves bytes.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::admission::Admission;
use super::breaker::{Breaker, Permit};
use super::cache::Cache;
use super::flights::Flights;
use super::registry::Evacuations;
use super::rendezvous::Rendezvous;
use super::stats::ControlStats;
use super::wire::PlacementFailure;
use super::wire::{Found, PlacementResult, ToControl};

/// A failed Controlplane request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub reason: PlacementFailure,
    pub retry_after: Option<Duration>,
}

impl From<PlacementFailure> for Failure {
    fn from(reason: PlacementFailure) -> Self {
        Failure {
            reason,
            retry_after: None,
        }
    }
}

/// A data shard's request, waiting for its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Waiter {
    pub shard: usize,
    pub id: u64,
    /// The VMs that failed in the session's attempts.
    exclude: Vec<String>,
    /// Already asked again because the answer was a VM it excluded.
    refetched: bool,
}

/// A Controlplane request the glue must make, then report with
/// [`Placer::handle_fetch_done`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fetch {
    pub repl: String,
    pub exclude: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Reply(PlacementResult),
    Fetch(Fetch),
    /// Joined a request already in flight: the reply comes from its
    /// [`Placer::handle_fetch_done`].
    Wait,
}

/// A Controlplane answer with Conman's address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub found: Arc<Found>,
    pub ttl: Duration,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Completion {
    pub replies: Vec<(Waiter, PlacementResult)>,
    pub refetch: Option<Fetch>,
}

pub(crate) struct Dynamic {
    pub cache: Cache<Arc<Found>>,
    pub flights: Flights<Waiter>,
    pub breaker: Breaker,
}

pub(crate) enum Mode {
    Static(Rendezvous<Arc<Found>>),
    Controlplane(Dynamic),
}

pub(crate) struct Placer {
    admission: Admission,
    mode: Mode,
    stats: Arc<ControlStats>,
    /// The evacuated VMs (`POST /vms/{id}/evacuate`), and this placer's
    /// copy of them with the epoch it was taken at.
    evacuations: Arc<Evacuations>,
    evacuated_seen: u64,
    evacuated: Arc<Vec<String>>,
}

/// Milliseconds, rounded up so that "retry after" is never too early.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX - 1)
}

fn failed(reason: PlacementFailure, retry_after: Option<Duration>) -> PlacementResult {
    PlacementResult::Failed {
        reason,
        retry_after_ms: retry_after.map(ms),
    }
}

impl Placer {
    pub(crate) fn new(admission: Admission, mode: Mode, stats: Arc<ControlStats>) -> Self {
        Placer {
            admission,
            mode,
            stats,
            evacuations: Arc::default(),
            evacuated_seen: 0,
            evacuated: Arc::default(),
        }
    }

    /// Placements never name a VM in `evacuations` (see `handle_request`).
    pub(crate) fn avoiding(mut self, evacuations: Arc<Evacuations>) -> Self {
        self.evacuations = evacuations;
        self
    }

    pub(crate) fn handle_request(&mut self, shard: usize, req: ToControl, now: Instant) -> Action {
        let ToControl::Placement {
            id,
            repl,
            cluster,
            attempt,
            mut exclude,
        } = req;
        // Evacuated VMs are excluded like failed ones: the Controlplane
        // gets one `exclude=VM` per VM, and a cached placement naming one is
        // dropped. Unlike a failed VM, one is never used: static placement
        // skips it even when it is the only VM, and a Controlplane answer
        // that names it anyway is refused (see `handle_fetch_done`).
        self.evacuations
            .refresh(&mut self.evacuated_seen, &mut self.evacuated);
        for vm in self.evacuated.iter() {
            if !exclude.contains(vm) {
                exclude.push(vm.clone());
            }
        }
        let evacuated = &self.evacuated;
        if attempt == 0 {
            if let Err(r) = self.admission.admit(&repl, &cluster, now) {
                self.stats.add_rejection(r.scope);
                return Action::Reply(failed(PlacementFailure::Admission, r.retry_after));
            }
        }
        let d = match &mut self.mode {
            Mode::Static(ring) => {
                let picked = ring
                    .pick(&repl, &exclude)
                    .filter(|(vm, _)| !evacuated.iter().any(|e| e == vm));
                return Action::Reply(match picked {
                    Some((_, found)) => PlacementResult::Found(found.clone()),
                    None => failed(PlacementFailure::NoCapacity, None),
                });
            }
            Mode::Controlplane(d) => d,
        };
        let stats = &self.stats;
        // A cached placement naming any VM the session saw fail is not
        // served: the Controlplane is asked again, excluding them all.
        if d.cache
            .get(&repl, now)
            .is_some_and(|f| exclude.contains(&f.vm))
        {
            d.cache.remove(&repl);
        }
        if let Some(found) = d.cache.get(&repl, now) {
            stats.cache_hits.fetch_add(1, Relaxed);
            return Action::Reply(PlacementResult::Found(found.clone()));
        }
        stats.cache_misses.fetch_add(1, Relaxed);
        let waiter = Waiter {
            shard,
            id,
            exclude: exclude.clone(),
            refetched: false,
        };
        let Err(waiter) = d.flights.join(&repl, waiter) else {
            stats.coalesced.fetch_add(1, Relaxed);
            return Action::Wait;
        };
        let permit = d.breaker.check(now);
        stats.breaker_state.store(d.breaker.gauge() as u64, Relaxed);
        match permit {
            Permit::Reject { retry_after } => {
                stats.add_error(PlacementFailure::CircuitOpen, 1);
                Action::Reply(failed(PlacementFailure::CircuitOpen, Some(retry_after)))
            }
            Permit::Allow | Permit::Probe => {
                d.flights.start(&repl, vec![waiter]);
                Action::Fetch(Fetch { repl, exclude })
            }
        }
    }

    pub(crate) fn handle_fetch_done(
        &mut self,
        repl: &str,
        outcome: Result<Placement, Failure>,
        now: Instant,
    ) -> Completion {
        let Mode::Controlplane(d) = &mut self.mode else {
            return Completion::default();
        };
        let stats = &self.stats;
        let waiters = d.flights.finish(repl);
        let mut done = Completion::default();
        match outcome {
            Ok(p) => {
                d.breaker.on_success();
                let evacuated = self.evacuated.contains(&p.found.vm);
                match now.checked_add(p.ttl) {
                    Some(expires) if !evacuated => {
                        d.cache.insert(repl, p.found.clone(), expires, now)
                    }
                    _ => d.cache.remove(repl),
                }
                let mut again = Vec::new();
                for mut w in waiters {
                    // Joined a flight that was not told about its failed
                    // VMs, and got one of them: ask once more, excluding
                    // them.
                    if !w.refetched && w.exclude.contains(&p.found.vm) {
                        w.refetched = true;
                        again.push(w);
                    } else if evacuated {
                        // Asked again and still given an evacuated VM: a
                        // Controlplane that ignores `exclude`. The session
                        // fails (1013) rather than land there.
                        stats.add_error(PlacementFailure::NoCapacity, 1);
                        done.replies
                            .push((w, failed(PlacementFailure::NoCapacity, None)));
                    } else {
                        done.replies
                            .push((w, PlacementResult::Found(p.found.clone())));
                    }
                }
                if !again.is_empty() {
                    // Every such waiter's failed VMs, so that no one of
                    // them is sent back to a VM it saw fail.
                    let mut exclude: Vec<String> = Vec::new();
                    for vm in again.iter().flat_map(|w| &w.exclude) {
                        if !exclude.contains(vm) {
                            exclude.push(vm.clone());
                        }
                    }
                    done.refetch = Some(Fetch {
                        repl: repl.to_owned(),
                        exclude,
                    });
                    d.flights.start(repl, again);
                }
            }
            Err(f) => {
                // A 404 is the Controlplane working as it should.
                if f.reason == PlacementFailure::UnknownRepl {
                    d.breaker.on_success();
                } else {
                    d.breaker.on_failure(now);
                }
                stats.add_error(f.reason, waiters.len() as u64);
                done.replies = waiters
                    .into_iter()
                    .map(|w| (w, failed(f.reason, f.retry_after)))
                    .collect();
            }
        }
        stats.breaker_state.store(d.breaker.gauge() as u64, Relaxed);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Bucket;

    const MS: Duration = Duration::from_millis(1);

    fn found(vm: &str) -> Arc<Found> {
        Arc::new(Found {
            vm: vm.into(),
            addr: "127.0.0.1:7000".parse().unwrap(),
            host: "127.0.0.1:7000".into(),
            path: "/".into(),
            tls: None,
        })
    }

    fn placement(vm: &str, ttl_ms: u64) -> Result<Placement, Failure> {
        Ok(Placement {
            found: found(vm),
            ttl: Duration::from_millis(ttl_ms),
        })
    }

    fn vms(list: &[&str]) -> Vec<String> {
        list.iter().map(|&vm| vm.to_owned()).collect()
    }

    fn req(id: u64, repl: &str, attempt: u8, exclude: &[&str]) -> ToControl {
        ToControl::Placement {
            id,
            repl: repl.into(),
            cluster: "c".into(),
            attempt,
            exclude: vms(exclude),
        }
    }

    fn fetch(repl: &str, exclude: &[&str]) -> Action {
        Action::Fetch(Fetch {
            repl: repl.into(),
            exclude: vms(exclude),
        })
    }

    fn dynamic(admission: Admission) -> (Placer, Arc<ControlStats>) {
        let stats = Arc::new(ControlStats::default());
        let mode = Mode::Controlplane(Dynamic {
            cache: Cache::new(100),
            flights: Flights::new(),
            breaker: Breaker::new(2, 200 * MS, 50 * MS),
        });
        (Placer::new(admission, mode, stats.clone()), stats)
    }

    fn no_admission() -> Admission {
        Admission::new(None, None, 16)
    }

    fn found_ids(c: &Completion) -> Vec<u64> {
        c.replies
            .iter()
            .filter(|(_, r)| matches!(r, PlacementResult::Found(_)))
            .map(|(w, _)| w.id)
            .collect()
    }

    #[test]
    fn miss_fetches_then_cache_serves_until_ttl() {
        let t0 = Instant::now();
        let (mut p, stats) = dynamic(no_admission());
        assert_eq!(
            p.handle_request(0, req(1, "r", 0, &[]), t0),
            fetch("r", &[])
        );
        let c = p.handle_fetch_done("r", placement("vm-1", 100), t0);
        assert_eq!(found_ids(&c), [1]);
        assert_eq!(c.refetch, None);
        assert_eq!(
            p.handle_request(1, req(2, "r", 0, &[]), t0 + 99 * MS),
            Action::Reply(PlacementResult::Found(found("vm-1")))
        );
        assert_eq!(
            p.handle_request(1, req(3, "r", 0, &[]), t0 + 100 * MS),
            fetch("r", &[])
        );
        assert_eq!(stats.cache_hits.load(Relaxed), 1);
        assert_eq!(stats.cache_misses.load(Relaxed), 2);
    }

    #[test]
    fn concurrent_requests_share_one_fetch() {
        let t0 = Instant::now();
        let (mut p, stats) = dynamic(no_admission());
        assert_eq!(
            p.handle_request(0, req(0, "r", 0, &[]), t0),
            fetch("r", &[])
        );
        for id in 1..100 {
            assert_eq!(
                p.handle_request(id as usize % 4, req(id, "r", 0, &[]), t0),
                Action::Wait
            );
        }
        let c = p.handle_fetch_done("r", placement("vm-1", 1000), t0);
        assert_eq!(found_ids(&c), (0..100).collect::<Vec<_>>());
        assert_eq!(c.replies[7].0.shard, 3);
        assert_eq!(stats.coalesced.load(Relaxed), 99);
    }

    #[test]
    fn exclude_of_the_cached_vm_invalidates_and_asks_with_exclude() {
        let t0 = Instant::now();
        let (mut p, _) = dynamic(no_admission());
        p.handle_request(0, req(1, "r", 0, &[]), t0);
        p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        // Excluding some other VM still hits.
        assert!(matches!(
            p.handle_request(0, req(2, "r", 1, &["vm-9"]), t0),
            Action::Reply(PlacementResult::Found(_))
        ));
        assert_eq!(
            p.handle_request(0, req(3, "r", 1, &["vm-1"]), t0),
            fetch("r", &["vm-1"])
        );
        let c = p.handle_fetch_done("r", placement("vm-2", 10_000), t0);
        assert_eq!(
            c.replies,
            [(
                c.replies[0].0.clone(),
                PlacementResult::Found(found("vm-2"))
            )]
        );
        assert_eq!(
            p.handle_request(0, req(4, "r", 0, &[]), t0),
            Action::Reply(PlacementResult::Found(found("vm-2")))
        );
    }

    #[test]
    fn waiter_that_excluded_the_answer_is_asked_for_again_once() {
        let t0 = Instant::now();
        let (mut p, _) = dynamic(no_admission());
        assert_eq!(
            p.handle_request(0, req(1, "r", 0, &[]), t0),
            fetch("r", &[])
        );
        assert_eq!(
            p.handle_request(0, req(2, "r", 1, &["vm-1"]), t0),
            Action::Wait
        );
        let c = p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        assert_eq!(found_ids(&c), [1]);
        assert_eq!(
            c.refetch,
            Some(Fetch {
                repl: "r".into(),
                exclude: vms(&["vm-1"])
            })
        );
        // Joining the refetch works like any flight.
        assert_eq!(
            p.handle_request(0, req(3, "r", 1, &["vm-1"]), t0),
            Action::Wait
        );
        // A Controlplane that ignores `exclude` does not loop us forever.
        let c = p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        assert_eq!(found_ids(&c), [2]);
        assert!(c.refetch.is_some(), "3 has not been asked for yet");
        let c = p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        assert_eq!(found_ids(&c), [3]);
        assert_eq!(c.refetch, None);
    }

    #[test]
    fn any_excluded_vm_invalidates_the_cache_and_every_one_is_asked_to_skip() {
        let t0 = Instant::now();
        let (mut p, _) = dynamic(no_admission());
        p.handle_request(0, req(1, "r", 0, &[]), t0);
        p.handle_fetch_done("r", placement("vm-2", 10_000), t0);
        // Two failed VMs, neither of them the cached one: still a hit.
        assert_eq!(
            p.handle_request(0, req(2, "r", 2, &["vm-1", "vm-3"]), t0),
            Action::Reply(PlacementResult::Found(found("vm-2")))
        );
        // The cached VM second in the list: not served, and the fetch
        // carries the whole list.
        assert_eq!(
            p.handle_request(0, req(3, "r", 2, &["vm-1", "vm-2"]), t0),
            fetch("r", &["vm-1", "vm-2"])
        );
        // Waiters with other lists join; one that got a VM it excluded is
        // asked for again with every such waiter's VMs excluded.
        assert_eq!(
            p.handle_request(0, req(4, "r", 1, &["vm-3"]), t0),
            Action::Wait
        );
        assert_eq!(
            p.handle_request(0, req(5, "r", 2, &["vm-4", "vm-3"]), t0),
            Action::Wait
        );
        assert_eq!(
            p.handle_request(0, req(6, "r", 1, &["vm-4"]), t0),
            Action::Wait
        );
        let c = p.handle_fetch_done("r", placement("vm-3", 10_000), t0);
        assert_eq!(found_ids(&c), [3, 6]);
        assert_eq!(
            c.refetch,
            Some(Fetch {
                repl: "r".into(),
                exclude: vms(&["vm-3", "vm-4"])
            })
        );
        let c = p.handle_fetch_done("r", placement("vm-5", 10_000), t0);
        assert_eq!(found_ids(&c), [4, 5]);
        assert_eq!(c.refetch, None);
    }

    #[test]
    fn failures_reach_every_waiter_and_open_the_breaker() {
        let t0 = Instant::now();
        let (mut p, stats) = dynamic(no_admission());
        let timeout = Failure::from(PlacementFailure::Timeout);
        p.handle_request(0, req(1, "r", 0, &[]), t0);
        p.handle_request(0, req(2, "r", 0, &[]), t0);
        let c = p.handle_fetch_done("r", Err(timeout), t0);
        assert_eq!(c.replies.len(), 2);
        assert!(c.replies.iter().all(|(_, r)| *r
            == PlacementResult::Failed {
                reason: PlacementFailure::Timeout,
                retry_after_ms: None
            }));
        assert_eq!(stats.errors(PlacementFailure::Timeout), 2);
        // Second consecutive failure opens it (threshold 2).
        assert_eq!(
            p.handle_request(0, req(3, "s", 0, &[]), t0),
            fetch("s", &[])
        );
        p.handle_fetch_done("s", Err(Failure::from(PlacementFailure::Unavailable)), t0);
        assert_eq!(stats.breaker_state.load(Relaxed), 1);
        assert_eq!(
            p.handle_request(0, req(4, "t", 0, &[]), t0 + 50 * MS),
            Action::Reply(PlacementResult::Failed {
                reason: PlacementFailure::CircuitOpen,
                retry_after_ms: Some(150)
            })
        );
        // Half-open: one probe, the rest fail fast.
        let t1 = t0 + 200 * MS;
        assert_eq!(
            p.handle_request(0, req(5, "t", 0, &[]), t1),
            fetch("t", &[])
        );
        assert_eq!(stats.breaker_state.load(Relaxed), 2);
        assert!(matches!(
            p.handle_request(0, req(6, "u", 0, &[]), t1),
            Action::Reply(PlacementResult::Failed { .. })
        ));
        // The probe's own repl joins the probe instead.
        assert_eq!(p.handle_request(0, req(7, "t", 0, &[]), t1), Action::Wait);
        let c = p.handle_fetch_done("t", placement("vm-1", 1000), t1);
        assert_eq!(found_ids(&c), [5, 7]);
        assert_eq!(stats.breaker_state.load(Relaxed), 0);
        assert_eq!(
            p.handle_request(0, req(8, "u", 0, &[]), t1),
            fetch("u", &[])
        );
    }

    #[test]
    fn unknown_repl_is_not_a_controlplane_failure() {
        let t0 = Instant::now();
        let (mut p, stats) = dynamic(no_admission());
        for i in 0..5 {
            p.handle_request(0, req(i, "unknown", 0, &[]), t0);
            let c = p.handle_fetch_done(
                "unknown",
                Err(Failure::from(PlacementFailure::UnknownRepl)),
                t0,
            );
            assert_eq!(c.replies.len(), 1);
        }
        assert_eq!(stats.breaker_state.load(Relaxed), 0);
        assert_eq!(stats.errors(PlacementFailure::UnknownRepl), 5);
    }

    #[test]
    fn no_capacity_passes_retry_after_on() {
        let t0 = Instant::now();
        let (mut p, _) = dynamic(no_admission());
        p.handle_request(0, req(1, "r", 0, &[]), t0);
        let f = Failure {
            reason: PlacementFailure::NoCapacity,
            retry_after: Some(Duration::from_secs(2)),
        };
        let c = p.handle_fetch_done("r", Err(f), t0);
        assert_eq!(
            c.replies[0].1,
            PlacementResult::Failed {
                reason: PlacementFailure::NoCapacity,
                retry_after_ms: Some(2000)
            }
        );
    }

    #[test]
    fn admission_applies_to_new_sessions_only() {
        let t0 = Instant::now();
        let admission = Admission::new(
            Some(Bucket {
                rate_per_s: 2.0,
                burst: 1.0,
            }),
            None,
            16,
        );
        let (mut p, stats) = dynamic(admission);
        assert_eq!(
            p.handle_request(0, req(1, "r", 0, &[]), t0),
            fetch("r", &[])
        );
        assert_eq!(
            p.handle_request(0, req(2, "r", 0, &[]), t0),
            Action::Reply(PlacementResult::Failed {
                reason: PlacementFailure::Admission,
                retry_after_ms: Some(500)
            })
        );
        assert_eq!(p.handle_request(0, req(3, "r", 1, &[]), t0), Action::Wait);
        assert_eq!(stats.errors(PlacementFailure::Admission), 1);
    }

    #[test]
    fn static_mode_hashes_and_skips_excluded() {
        let t0 = Instant::now();
        let ring = Rendezvous::new(
            vec![
                ("vm-a".into(), found("vm-a")),
                ("vm-b".into(), found("vm-b")),
            ],
            [],
        )
        .unwrap();
        let stats = Arc::new(ControlStats::default());
        let mut p = Placer::new(no_admission(), Mode::Static(ring), stats);
        let Action::Reply(PlacementResult::Found(first)) =
            p.handle_request(0, req(1, "r", 0, &[]), t0)
        else {
            panic!("static mode answers at once")
        };
        let Action::Reply(PlacementResult::Found(second)) =
            p.handle_request(0, req(2, "r", 1, &[&first.vm]), t0)
        else {
            panic!("static mode answers at once")
        };
        assert_ne!(first.vm, second.vm);
        assert_eq!(
            p.handle_request(0, req(3, "r", 2, &[&first.vm, &second.vm]), t0),
            Action::Reply(failed(PlacementFailure::NoCapacity, None))
        );
    }

    #[test]
    fn an_evacuated_vm_is_excluded_uncached_and_never_given_out() {
        let t0 = Instant::now();
        let (p, stats) = dynamic(no_admission());
        let evac = Arc::new(Evacuations::default());
        let mut p = p.avoiding(evac.clone());
        p.handle_request(0, req(1, "r", 0, &[]), t0);
        p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        evac.add("vm-1").unwrap();
        // The cached placement names it: asked again, excluding it.
        assert_eq!(
            p.handle_request(0, req(2, "r", 0, &[]), t0),
            fetch("r", &["vm-1"])
        );
        // A Controlplane that ignores the exclude gets one more chance ...
        let c = p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        assert!(c.replies.is_empty());
        assert_eq!(
            c.refetch,
            Some(Fetch {
                repl: "r".into(),
                exclude: vms(&["vm-1"])
            })
        );
        // ... and then the session is refused rather than sent there.
        let c = p.handle_fetch_done("r", placement("vm-1", 10_000), t0);
        assert_eq!(c.replies[0].1, failed(PlacementFailure::NoCapacity, None));
        assert_eq!(stats.errors(PlacementFailure::NoCapacity), 1);
        // Nothing naming it was cached.
        assert_eq!(
            p.handle_request(0, req(3, "r", 0, &[]), t0),
            fetch("r", &["vm-1"])
        );
        let c = p.handle_fetch_done("r", placement("vm-2", 10_000), t0);
        assert_eq!(found_ids(&c), [3]);
        // Restored: excluded no more, and the cache serves again.
        evac.remove("vm-1");
        assert_eq!(
            p.handle_request(0, req(4, "r", 0, &[]), t0),
            Action::Reply(PlacementResult::Found(found("vm-2")))
        );
    }

    #[test]
    fn static_mode_never_gives_an_evacuated_vm_even_the_only_one() {
        let t0 = Instant::now();
        let ring = Rendezvous::new(vec![("vm-a".into(), found("vm-a"))], []).unwrap();
        let evac = Arc::new(Evacuations::default());
        let stats = Arc::new(ControlStats::default());
        let mut p = Placer::new(no_admission(), Mode::Static(ring), stats).avoiding(evac.clone());
        assert!(matches!(
            p.handle_request(0, req(1, "r", 0, &[]), t0),
            Action::Reply(PlacementResult::Found(_))
        ));
        evac.add("vm-a").unwrap();
        assert_eq!(
            p.handle_request(0, req(2, "r", 0, &[]), t0),
            Action::Reply(failed(PlacementFailure::NoCapacity, None))
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(ms(Duration::from_micros(1)), 1);
        assert_eq!(ms(Duration::from_millis(3)), 3);
        assert_eq!(ms(Duration::ZERO), 0);
    }
}
