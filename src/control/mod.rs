//! The control shard: placement (static rendezvous hashing, or the
//! Controlplane client with cache, one request per repl and a circuit
//! breaker) and admission control, serving every data shard over a
//! socketpair.
//!
//! # Layout
//! - [`wire`]: the messages on each shard's socketpair (sans-IO).
//! - `placer`: every decision, sans-IO: admission, cache, single flight,
//!   breaker, static hashing; built from `admission`, `cache`, `flights`,
//!   `breaker`, `rendezvous`.
//! - `reason`, `stats`: why a placement failed, and the counters (by
//!   reason) the placer writes and `/metrics` reads; neither depends on
//!   `placer`.
//! - [`http`], `url`: the Controlplane contract and its HTTP/1.1 framing,
//!   sans-IO.
//! - `client`, `service`: the thin glommio glue (sockets, timers, tasks).
//! - `revsync`: the revocation sync with the Controlplane (a poll and the
//!   forwards, every `controlplane.revocations_poll_ms`).
//! - [`Clock`]: where the glue reads `now`; tests move a [`ManualClock`].
//! - [`drain`]: the process's drain phases (sans-IO machine, the closing
//!   planner, the thread that drives them).
//! - [`handover`]: listening sockets passed to a new binary (SCM_RIGHTS).
//! - [`registry`]: the session registry's mailboxes into the data shards,
//!   and the evacuated VMs placement avoids.
//! - [`systemd`]: `sd_notify` readiness and main pid.
//!
//! One thread runs a glommio `LocalExecutor`; traffic is light (a request
//! per new session at most), so one core's share is plenty.
//!
//! # Host names
//! Conman and Controlplane URLs may name hosts. Static-mode VMs are resolved
//! once, in [`spawn`]. A Controlplane base URL with a name is resolved for
//! each new connection, and a Conman host name in a Controlplane answer for
//! each answer, on glommio's blocking thread pool (one thread), never on
//! the executor; the resolved address is cached with the placement. IP
//! literals skip the resolver.
//!
//! # Locked memory
//! glommio refuses to start when `RLIMIT_MEMLOCK` is below 512 KiB (it
//! registers its IO buffers with io_uring). [`spawn`] raises the soft limit
//! to 512 KiB when it is lower (and the hard limit too when the process may,
//! e.g. as root) and asks glommio for the smallest IO buffer area (64 KiB),
//! which the control shard does not use. Without `CAP_IPC_LOCK` (not root)
//! io_uring's locked memory is charged to the user across all its
//! processes: one executor fits in 512 KiB, but a test binary running a
//! dozen control shards at once needs about 2 MiB (the usual 8 MiB default
//! is plenty). Root is never limited.

mod admission;
mod breaker;
mod cache;
mod client;
mod clock;
pub mod drain;
mod flights;
pub mod handover;
pub mod http;
mod placer;
pub mod registry;
mod rendezvous;
mod revsync;
mod service;
mod stats;
pub mod systemd;
mod url;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use admission::Scope;
pub(crate) use admission::TokenBucket;
pub use clock::{Clock, ManualClock};
pub use placer::Failure;
pub use stats::*;
pub use wire::PlacementFailure;

use admission::{Admission, MAX_BUCKETS};
use breaker::Breaker;
use cache::Cache;
use client::Client;
use flights::Flights;
use placer::{Dynamic, Mode, Placer};
use rendezvous::Rendezvous;
use service::ShardSocket;
use wire::{Found, PlacementResult};

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub mode: PlacementMode,
    pub admission: AdmissionConfig,
}

#[derive(Debug, Clone)]
pub enum PlacementMode {
    /// Rendezvous hashing of the repl id over `vms` (vm id, `ws://` Conman
    /// URL); `repls` pins a repl to a vm id. Excluded VMs are skipped (the
    /// repl's next VM by hash), except the only VM of a one-VM list.
    Static {
        vms: Vec<(String, String)>,
        repls: Vec<(String, String)>,
    },
    Controlplane(ControlplaneConfig),
}

#[derive(Debug, Clone)]
pub struct ControlplaneConfig {
    /// `http://host:port[/prefix]` base URLs, tried in turn when one cannot
    /// be reached or times out.
    pub urls: Vec<String>,
    /// Per request and URL: a placement can take up to `urls.len()` times
    /// this when URLs time out one after another, which the data shard's
    /// setup deadline must allow for.
    pub request_timeout: Duration,
    /// Keep-alive connections per URL, which is also the most requests
    /// open to one URL at once.
    pub max_connections: usize,
    pub cache_max_entries: usize,
    /// Consecutive failures (timeouts, unreachable, 503, bad answers; not
    /// 404) that open the breaker.
    pub breaker_failures: u32,
    /// Then one probe request; its success closes the breaker, its failure
    /// opens it again for as long.
    pub breaker_open_for: Duration,
    /// Revocation sync period (`revsync`); zero: off.
    pub revocations_poll: Duration,
}

/// Token buckets for new sessions (`attempt == 0`); retries are never
/// refused, so a session admitted once is not turned away mid-setup.
#[derive(Debug, Clone, Default)]
pub struct AdmissionConfig {
    pub per_repl: Option<Bucket>,
    pub per_cluster: Option<Bucket>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub rate_per_s: f64,
    /// At least 1: a bucket that cannot hold a whole token admits no one.
    pub burst: f64,
}

/// glommio's IO buffer area; the control shard does no file IO, so the
/// smallest glommio accepts.
const IO_MEMORY: usize = 64 * 1024;
/// Keeps `now + open_for` far from overflow; longer would be a typo.
const MAX_OPEN_FOR: Duration = Duration::from_secs(24 * 3600);
/// glommio's own startup check (`Reactor::new`).
const MIN_MEMLOCK: u64 = 512 * 1024;

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.into())
}

fn check_bucket(name: &str, b: &Option<Bucket>) -> std::io::Result<()> {
    match b {
        Some(b) if !(b.burst >= 1.0 && b.burst.is_finite()) => {
            Err(invalid(format!("admission.{name}: burst must be ≥ 1")))
        }
        Some(b) if !(b.rate_per_s >= 0.0 && b.rate_per_s.is_finite()) => {
            Err(invalid(format!("admission.{name}: rate must be ≥ 0")))
        }
        _ => Ok(()),
    }
}

/// Resolves static VMs (at startup: blocking is fine) into a ring.
fn resolve_static(
    vms: Vec<(String, String)>,
    repls: Vec<(String, String)>,
) -> std::io::Result<Rendezvous<Arc<Found>>> {
    if vms.is_empty() {
        return Err(invalid("static placement: no VMs"));
    }
    let mut resolved = Vec::with_capacity(vms.len());
    for (vm, u) in vms {
        let parsed = url::parse_ws(&u).map_err(|e| invalid(format!("VM {vm}: {u}: {e}")))?;
        let addr: SocketAddr = (parsed.host.as_str(), parsed.port)
            .to_socket_addrs()
            .map_err(|e| invalid(format!("VM {vm}: cannot resolve {}: {e}", parsed.host)))?
            .next()
            .ok_or_else(|| invalid(format!("VM {vm}: {} has no address", parsed.host)))?;
        let found = Found {
            vm: vm.clone(),
            addr,
            host: parsed.host_header(),
            tls: parsed.tls.then(|| parsed.host.clone()),
            path: parsed.path,
        };
        resolved.push((vm, Arc::new(found)));
    }
    Rendezvous::new(resolved, repls)
        .map_err(|vm| invalid(format!("static placement: repl pinned to unknown VM {vm}")))
}

/// Static placement a data shard can answer itself: a pure function of the
/// repl id, so the round trip to the control shard buys nothing. Only
/// offered when no admission limit needs the control shard's global view.
pub struct LocalStatic {
    vms: Rendezvous<Arc<Found>>,
    /// Passive health shared by every shard: per VM, until when (ms since
    /// `epoch`) a failed attempt keeps it out of new placements.
    down_until: Vec<(String, AtomicU64)>,
    epoch: Instant,
}

impl LocalStatic {
    pub fn for_config(cfg: &ControlConfig) -> std::io::Result<Option<LocalStatic>> {
        let admission = cfg.admission.per_repl.is_some() || cfg.admission.per_cluster.is_some();
        match &cfg.mode {
            PlacementMode::Static { vms, repls } if !admission => Ok(Some(LocalStatic {
                down_until: vms
                    .iter()
                    .map(|(id, _)| (id.clone(), AtomicU64::new(0)))
                    .collect(),
                vms: resolve_static(vms.clone(), repls.clone())?,
                epoch: Instant::now(),
            })),
            _ => Ok(None),
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// `exclude`: every VM that failed in the session's attempts. VMs that
    /// failed any session's attempt within `placement.fail_timeout_ms` are
    /// passed over too (nginx's `max_fails=1 fail_timeout`), unless that
    /// leaves none: then they get their chance again. An `evacuated` VM is
    /// never picked, not even the only one: no VM is better than it.
    pub fn pick(
        &self,
        repl: &str,
        exclude: &[String],
        evacuated: &[String],
        now: Instant,
    ) -> PlacementResult {
        let now = self.ms(now);
        let down = || {
            self.down_until
                .iter()
                .filter(|(_, until)| until.load(Ordering::Relaxed) > now)
        };
        let picked = if down().next().is_none() && evacuated.is_empty() {
            self.vms.pick(repl, exclude)
        } else {
            let mut base = exclude.to_vec();
            base.extend_from_slice(evacuated);
            let mut skip = base.clone();
            skip.extend(down().map(|(id, _)| id.clone()));
            self.vms
                .pick(repl, &skip)
                .or_else(|| self.vms.pick(repl, &base))
                .filter(|(id, _)| !evacuated.iter().any(|e| e == id))
        };
        match picked {
            Some((_, found)) => PlacementResult::Found(found.clone()),
            None => PlacementResult::Failed {
                reason: PlacementFailure::NoCapacity,
                retry_after_ms: None,
            },
        }
    }

    /// An attempt on `vm` failed (connect or Conman's handshake): new
    /// placements avoid it until `now + timeout`.
    pub fn mark_down(&self, vm: &str, now: Instant, timeout: Duration) {
        if let Some((_, until)) = self.down_until.iter().find(|(id, _)| id == vm) {
            until.fetch_max(self.ms(now + timeout), Ordering::Relaxed);
        }
    }
}

/// What the thread builds its `!Send` parts from.
enum Prepared {
    Static(Rendezvous<Arc<Found>>),
    Controlplane(ControlplaneConfig, Vec<url::Url>),
}

fn prepare(mode: PlacementMode) -> std::io::Result<Prepared> {
    match mode {
        PlacementMode::Static { vms, repls } => Ok(Prepared::Static(resolve_static(vms, repls)?)),
        PlacementMode::Controlplane(cp) => {
            if cp.urls.is_empty() {
                return Err(invalid("controlplane: no URLs"));
            }
            if cp.request_timeout.is_zero() {
                return Err(invalid("controlplane: request timeout must be > 0"));
            }
            if cp.breaker_open_for > MAX_OPEN_FOR {
                return Err(invalid("controlplane: breaker_open_for must be ≤ 1 day"));
            }
            if cp.breaker_failures == 0 {
                return Err(invalid("controlplane: breaker_failures must be ≥ 1"));
            }
            let urls = cp
                .urls
                .iter()
                .map(|u| {
                    url::parse_http(u).map_err(|e| invalid(format!("controlplane URL {u}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Prepared::Controlplane(cp, urls))
        }
    }
}

/// glommio needs [`MIN_MEMLOCK`]; raise what the process may.
fn ensure_memlock() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur >= MIN_MEMLOCK
    {
        return;
    }
    let want = libc::rlimit {
        rlim_cur: MIN_MEMLOCK,
        rlim_max: lim.rlim_max.max(MIN_MEMLOCK),
    };
    // SAFETY: setrlimit reads the struct we own. Raising the hard limit
    // needs CAP_SYS_RESOURCE; without it, fail and let glommio's own check
    // report the limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) } != 0 {
        tracing::warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "RLIMIT_MEMLOCK below 512 KiB and cannot be raised; glommio will refuse to start"
        );
    }
}

/// Starts the control shard on its own thread. `shard_fds` are the control
/// ends of one `socketpair(AF_UNIX, SOCK_STREAM)` per data shard, index =
/// shard number. Returns once the executor runs (or with the reason it
/// could not start); the thread ends when every shard has closed its end.
pub fn spawn(
    cfg: ControlConfig,
    shard_fds: Vec<OwnedFd>,
    stats: Arc<ControlStats>,
) -> std::io::Result<JoinHandle<()>> {
    spawn_with_clock(cfg, shard_fds, stats, Clock::real())
}

/// [`spawn`] with the placement decisions (cache TTL, breaker, admission)
/// reading `clock`, which a test can move by hand.
pub fn spawn_with_clock(
    cfg: ControlConfig,
    shard_fds: Vec<OwnedFd>,
    stats: Arc<ControlStats>,
    clock: Clock,
) -> std::io::Result<JoinHandle<()>> {
    spawn_inner(cfg, shard_fds, stats, clock, None, None, Arc::default())
}

/// [`spawn`], the control shard also driving the process's drain
/// ([`drain::Driver`]) on its executor, its placements avoiding the VMs in
/// `evacuations` and, in Controlplane mode, syncing `revocations` with the
/// Controlplane.
pub fn spawn_with_drain(
    cfg: ControlConfig,
    shard_fds: Vec<OwnedFd>,
    stats: Arc<ControlStats>,
    drain: drain::Driver,
    revocations: Arc<crate::revocations::Revocations>,
    evacuations: Arc<registry::Evacuations>,
) -> std::io::Result<JoinHandle<()>> {
    spawn_inner(
        cfg,
        shard_fds,
        stats,
        Clock::real(),
        Some(drain),
        Some(revocations),
        evacuations,
    )
}

fn spawn_inner(
    cfg: ControlConfig,
    shard_fds: Vec<OwnedFd>,
    stats: Arc<ControlStats>,
    clock: Clock,
    drain: Option<drain::Driver>,
    revocations: Option<Arc<crate::revocations::Revocations>>,
    evacuations: Arc<registry::Evacuations>,
) -> std::io::Result<JoinHandle<()>> {
    check_bucket("per_repl", &cfg.admission.per_repl)?;
    check_bucket("per_cluster", &cfg.admission.per_cluster)?;
    let prepared = prepare(cfg.mode)?;
    let shards = shard_fds
        .into_iter()
        .map(|fd| {
            Ok(ShardSocket {
                write: fd.try_clone()?,
                read: fd,
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    ensure_memlock();
    let admission = cfg.admission;
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name("eval-control".into())
        .spawn(move || {
            let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .name("eval-control")
                .io_memory(IO_MEMORY)
                .make();
            let ex = match ex {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = ready_tx.send(Err(std::io::Error::other(format!(
                        "glommio executor: {e} (it needs RLIMIT_MEMLOCK ≥ 512 KiB, and without \
                         CAP_IPC_LOCK io_uring's locked memory counts per user across processes)"
                    ))));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            ex.run(async move {
                if let Some(d) = drain {
                    glommio::spawn_local(d.run()).detach();
                }
                let admission =
                    Admission::new(admission.per_repl, admission.per_cluster, MAX_BUCKETS);
                let (mode, client) = match prepared {
                    Prepared::Static(ring) => (Mode::Static(ring), None),
                    Prepared::Controlplane(cp, urls) => {
                        let mode = Mode::Controlplane(Dynamic {
                            cache: Cache::new(cp.cache_max_entries),
                            flights: Flights::new(),
                            breaker: Breaker::new(
                                cp.breaker_failures,
                                cp.breaker_open_for,
                                cp.request_timeout,
                            ),
                        });
                        let client = std::rc::Rc::new(Client::new(&cp, urls, stats.clone()));
                        if let (Some(store), false) = (revocations, cp.revocations_poll.is_zero()) {
                            glommio::spawn_local(revsync::run(
                                client.clone(),
                                store,
                                cp.revocations_poll,
                            ))
                            .detach();
                        }
                        (mode, Some(client))
                    }
                };
                let placer = Placer::new(admission, mode, stats).avoiding(evacuations);
                service::run(placer, client, shards, clock).await
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(std::io::Error::other(
                "control shard thread died while starting",
            ))
        }
    }
}

#[cfg(test)]
mod local_static_tests {
    use super::*;

    fn two_vms() -> LocalStatic {
        LocalStatic {
            vms: resolve_static(
                vec![
                    ("vm-a".into(), "ws://127.0.0.1:1/".into()),
                    ("vm-b".into(), "ws://127.0.0.1:2/".into()),
                ],
                vec![],
            )
            .unwrap(),
            down_until: ["vm-a", "vm-b"]
                .iter()
                .map(|id| (id.to_string(), AtomicU64::new(0)))
                .collect(),
            epoch: Instant::now(),
        }
    }

    fn vm(r: PlacementResult) -> String {
        match r {
            PlacementResult::Found(f) => f.vm.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_vm_is_passed_over_until_its_timeout_then_used_again() {
        let p = two_vms();
        let t0 = Instant::now();
        let home = vm(p.pick("repl-7", &[], &[], t0));
        p.mark_down(&home, t0, Duration::from_secs(10));
        let other = vm(p.pick("repl-7", &[], &[], t0 + Duration::from_secs(1)));
        assert_ne!(other, home);
        assert_eq!(
            vm(p.pick("repl-7", &[], &[], t0 + Duration::from_secs(11))),
            home
        );
    }

    #[test]
    fn an_evacuated_vm_is_never_picked_even_when_it_is_the_last() {
        let p = two_vms();
        let t0 = Instant::now();
        let home = vm(p.pick("repl-7", &[], &[], t0));
        let evacuated = vec![home.clone()];
        let other = vm(p.pick("repl-7", &[], &evacuated, t0));
        assert_ne!(other, home);
        // Down, or failed in this session: still preferred to an evacuated VM.
        p.mark_down(&other, t0, Duration::from_secs(10));
        assert_eq!(vm(p.pick("repl-7", &[], &evacuated, t0)), other);
        assert!(matches!(
            p.pick("repl-7", &[], &["vm-a".into(), "vm-b".into()], t0),
            PlacementResult::Failed {
                reason: PlacementFailure::NoCapacity,
                ..
            }
        ));
    }

    #[test]
    fn with_every_vm_down_placement_still_answers() {
        let p = two_vms();
        let t0 = Instant::now();
        p.mark_down("vm-a", t0, Duration::from_secs(10));
        p.mark_down("vm-b", t0, Duration::from_secs(10));
        let home = vm(p.pick("repl-7", &[], &[], t0));
        // And the session's own exclusions still hold.
        let other = vm(p.pick("repl-7", std::slice::from_ref(&home), &[], t0));
        assert_ne!(other, home);
    }
}
