//! The control shard over real sockets: a socketpair per data shard on one
//! side, the fake Controlplane over TCP on the other.

mod control_support;

use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use control_support::*;
use eval_proxy::control::wire::PlacementResult;
use eval_proxy::control::{
    self, AdmissionConfig, Bucket, ControlConfig, ControlStats, PlacementFailure, PlacementMode,
    Scope,
};
use eval_proxy::dev::controlplane::{FakeMode, WRONG_VM};

#[test]
fn placement_found_then_served_from_cache_over_one_connection() {
    let cp = fake(2, 60_000);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    let f = s.found("repl-a", 0, &[]);
    assert_eq!(f.vm, "vm-0");
    assert_eq!(f.addr, "127.0.0.1:7000".parse().unwrap());
    assert_eq!(
        (f.host.as_str(), f.path.as_str()),
        ("127.0.0.1:7000", "/conman-0")
    );
    assert_eq!(cp.requests(), 1);
    assert_eq!(s.found("repl-a", 0, &[]), f);
    assert_eq!(cp.requests(), 1, "second placement comes from the cache");
    assert_eq!(c.stats.cache_hits.load(Relaxed), 1);
    // Least loaded: the next repl lands on the other VM, over the same
    // keep-alive connection.
    assert_eq!(s.found("repl-b", 0, &[]).vm, "vm-1");
    assert_eq!(cp.requests(), 2);
    assert_eq!(cp.connections(), 1);
    assert_eq!(c.stats.controlplane_requests.load(Relaxed), 2);
}

#[test]
fn closed_keep_alive_connection_is_replaced_without_an_error() {
    let cp = fake(1, 60_000);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    s.found("a", 0, &[]);
    cp.drop_connections();
    s.found("b", 0, &[]);
    assert_eq!(cp.requests(), 2);
    assert_eq!(cp.connections(), 2);
}

#[test]
fn cached_placement_expires_with_its_ttl() {
    let cp = fake(1, 300);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    s.found("r", 0, &[]);
    s.found("r", 0, &[]);
    assert_eq!(cp.requests(), 1);
    c.clock.advance(Duration::from_millis(299));
    s.found("r", 0, &[]);
    assert_eq!(cp.requests(), 1, "still cached 1 ms before the ttl");
    c.clock.advance(Duration::from_millis(1));
    s.found("r", 0, &[]);
    assert_eq!(cp.requests(), 2);
}

#[test]
fn exclude_of_the_cached_vm_asks_again_and_lands_elsewhere() {
    let cp = fake(3, 60_000);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    let first = s.found("r", 0, &[]);
    // Excluding a VM the repl is not on changes nothing.
    assert_eq!(s.found("r", 1, &["vm-2"]), first);
    assert_eq!(cp.requests(), 1);
    let second = s.found("r", 1, &[&first.vm]);
    assert_ne!(second.vm, first.vm);
    assert_eq!(cp.requests(), 2);
    // The new placement is what the cache holds now.
    assert_eq!(s.found("r", 0, &[]), second);
    assert_eq!(cp.requests(), 2);
}

#[test]
fn every_failed_vm_is_excluded_and_none_left_is_no_capacity() {
    let cp = fake(3, 60_000);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    let first = s.found("r", 0, &[]);
    let second = s.found("r", 1, &[&first.vm]);
    // The cached VM second in the list is not served either.
    let third = s.found("r", 2, &[&first.vm, &second.vm]);
    assert!(third.vm != first.vm && third.vm != second.vm, "{third:?}");
    assert_eq!(cp.requests(), 3);
    assert_eq!(
        s.place("r", 3, &[&first.vm, &second.vm, &third.vm]),
        PlacementResult::Failed {
            reason: PlacementFailure::NoCapacity,
            retry_after_ms: Some(1000)
        }
    );
}

#[test]
fn hundred_concurrent_sessions_for_one_repl_make_one_request() {
    let cp = fake(2, 60_000);
    // Slow answers keep the request in flight while all 100 arrive.
    cp.set_mode(FakeMode::Slow(Duration::from_millis(300)));
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        2,
    );
    let mut sent = [Vec::new(), Vec::new()];
    for i in 0..100 {
        sent[i % 2].push(c.shards[i % 2].send("hot", 0, &[]));
    }
    let mut vms = Vec::new();
    for (shard, ids) in sent.iter().enumerate() {
        let mut got: Vec<u64> = Vec::new();
        for _ in ids {
            let (id, r) = c.shards[shard].recv();
            let PlacementResult::Found(f) = r else {
                panic!("{r:?}")
            };
            got.push(id);
            vms.push(f.vm.clone());
        }
        got.sort_unstable();
        assert_eq!(&got, ids, "each request answered exactly once");
    }
    assert!(vms.iter().all(|v| *v == vms[0]));
    assert_eq!(cp.requests(), 1);
    assert_eq!(c.stats.coalesced.load(Relaxed), 99);
}

#[test]
fn unknown_repl_and_timeout_have_their_reasons() {
    let cp = fake(1, 60_000);
    let mut cfg = cp_config(vec![url(&cp)]);
    cfg.request_timeout = Duration::from_millis(100);
    let mut c = start(with_controlplane(cfg, Default::default()), 1);
    let s = &mut c.shards[0];
    assert_eq!(
        s.failed("unknown-1", 0),
        (PlacementFailure::UnknownRepl, None)
    );
    cp.set_mode(FakeMode::Slow(Duration::from_secs(3)));
    let t0 = Instant::now();
    assert_eq!(s.failed("r", 0), (PlacementFailure::Timeout, None));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(c.stats.errors(PlacementFailure::Timeout), 1);
    assert_eq!(c.stats.errors(PlacementFailure::UnknownRepl), 1);
}

/// Three failures open the breaker; while open no request reaches the
/// fake; after `breaker_open_for` one probe goes through and closes it.
fn breaker_opens_and_recovers(
    mode: FakeMode,
    reason: PlacementFailure,
    retry_after_ms: Option<u64>,
) {
    let cp = fake(1, 60_000);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    cp.set_mode(mode);
    for i in 0..3 {
        assert_eq!(s.failed(&format!("r{i}"), 0), (reason, retry_after_ms));
    }
    assert_eq!(cp.requests(), 3);
    // The clock stands still: every hint is the whole open period.
    for i in 0..20 {
        assert_eq!(
            s.failed(&format!("storm{i}"), 0),
            (PlacementFailure::CircuitOpen, Some(200))
        );
    }
    assert_eq!(cp.requests(), 3, "no request storm while open");
    assert_eq!(c.stats.breaker_state.load(Relaxed), 1);
    c.clock.advance(Duration::from_millis(199));
    assert_eq!(
        s.failed("early", 0),
        (PlacementFailure::CircuitOpen, Some(1))
    );
    assert_eq!(cp.requests(), 3, "no probe before the open period is over");

    // Still failing when the probe goes: open again for a full period.
    c.clock.advance(Duration::from_millis(1));
    assert_eq!(s.failed("probe-1", 0), (reason, retry_after_ms));
    assert_eq!(cp.requests(), 4);
    assert_eq!(
        s.failed("after-probe", 0),
        (PlacementFailure::CircuitOpen, Some(200))
    );

    cp.set_mode(FakeMode::Normal);
    c.clock.advance(Duration::from_millis(200));
    assert_eq!(s.found("probe-2", 0, &[]).vm, "vm-0");
    assert_eq!(c.stats.breaker_state.load(Relaxed), 0);
    for i in 0..3 {
        s.found(&format!("ok{i}"), 0, &[]);
    }
    assert_eq!(cp.requests(), 8);
    assert_eq!(c.stats.errors(PlacementFailure::CircuitOpen), 22);
}

#[test]
fn breaker_opens_on_503_and_closes_after_recovery() {
    breaker_opens_and_recovers(
        FakeMode::Unavailable503,
        PlacementFailure::NoCapacity,
        Some(1000),
    );
}

#[test]
fn breaker_opens_when_controlplane_is_down_and_closes_after_recovery() {
    breaker_opens_and_recovers(FakeMode::Down, PlacementFailure::Unavailable, None);
}

#[test]
fn fails_over_to_the_next_url_and_reports_unavailable_when_all_are_down() {
    let cp = fake(1, 60_000);
    let dead = refusing_addr();
    let dead2 = refusing_addr();
    let mut c = start(
        with_controlplane(
            cp_config(vec![format!("http://{dead}"), url(&cp)]),
            Default::default(),
        ),
        1,
    );
    assert_eq!(c.shards[0].found("r", 0, &[]).vm, "vm-0");
    assert_eq!(c.shards[0].found("s", 0, &[]).vm, "vm-0");
    // Both requests reached the fake; the dead URL was tried only once
    // since the one that answered is asked first.
    assert_eq!(cp.requests(), 2);
    assert_eq!(c.stats.controlplane_requests.load(Relaxed), 3);

    let mut c = start(
        with_controlplane(
            cp_config(vec![format!("http://{dead}"), format!("http://{dead2}")]),
            Default::default(),
        ),
        1,
    );
    assert_eq!(
        c.shards[0].failed("r", 0),
        (PlacementFailure::Unavailable, None)
    );
}

#[test]
fn wrong_vm_refuses_and_exclude_moves_the_repl() {
    let cp = fake(2, 60_000);
    cp.set_mode(FakeMode::WrongVm);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    let wrong = s.found("r", 0, &[]);
    assert_eq!(wrong.vm, WRONG_VM);
    let err = TcpStream::connect(wrong.addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    cp.set_mode(FakeMode::Normal);
    let right = s.found("r", 1, &[WRONG_VM]);
    assert_eq!(right.vm, "vm-0");
}

#[test]
fn admission_rejects_the_session_past_the_burst_with_a_hint() {
    let cp = fake(1, 60_000);
    let admission = AdmissionConfig {
        per_repl: Some(Bucket {
            rate_per_s: 0.5,
            burst: 3.0,
        }),
        per_cluster: Some(Bucket {
            rate_per_s: 0.5,
            burst: 5.0,
        }),
    };
    let mut c = start(with_controlplane(cp_config(vec![url(&cp)]), admission), 1);
    let s = &mut c.shards[0];
    for _ in 0..3 {
        s.found("r", 0, &[]);
    }
    // The clock stands still: a token is exactly 1 / 0.5 per s away.
    assert_eq!(s.failed("r", 0), (PlacementFailure::Admission, Some(2000)));
    // Retries of admitted sessions are never refused.
    s.found("r", 1, &[]);
    // The cluster bucket (5) has 2 left: other repls in it get 2 more.
    s.found("x", 0, &[]);
    s.found("y", 0, &[]);
    assert_eq!(s.failed("z", 0), (PlacementFailure::Admission, Some(2000)));
    // The hint is right: by then both buckets hold a token again.
    c.clock.advance(Duration::from_millis(2000));
    s.found("r", 0, &[]);
    // Another cluster has its own bucket.
    let id = s.send_in("z", "elsewhere");
    let (got, r) = s.recv();
    assert_eq!(got, id);
    assert!(matches!(r, PlacementResult::Found(_)), "{r:?}");
    assert_eq!(c.stats.admission_rejections(Scope::Repl), 1);
    assert_eq!(c.stats.admission_rejections(Scope::Cluster), 1);
}

#[test]
fn static_mode_hashes_consistently_and_honours_exclude_and_pins() {
    let vms = conmans(3);
    let cfg = || ControlConfig {
        mode: PlacementMode::Static {
            vms: vms.clone(),
            repls: vec![("pinned".into(), "vm-2".into())],
        },
        admission: Default::default(),
    };
    let mut a = start(cfg(), 1);
    let mut b = start(cfg(), 1);
    let mut per_vm = [0; 3];
    for i in 0..60 {
        let repl = format!("repl-{i}");
        let f = a.shards[0].found(&repl, 0, &[]);
        // Another instance (another proxy process) agrees.
        assert_eq!(b.shards[0].found(&repl, 0, &[]), f);
        assert_eq!(a.shards[0].found(&repl, 0, &[]), f);
        let i: usize = f.vm.strip_prefix("vm-").unwrap().parse().unwrap();
        assert_eq!(f.addr.port(), 7000 + i as u16);
        per_vm[i] += 1;
        let next = a.shards[0].found(&repl, 1, &[&f.vm]);
        assert_ne!(next.vm, f.vm);
    }
    assert!(per_vm.iter().all(|&n| n > 5), "{per_vm:?}");
    assert_eq!(a.shards[0].found("pinned", 0, &[]).vm, "vm-2");
    assert_ne!(a.shards[0].found("pinned", 1, &["vm-2"]).vm, "vm-2");
}

#[test]
fn thread_exits_when_every_shard_socket_is_closed() {
    let cp = fake(1, 60_000);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        3,
    );
    c.shards[1].found("r", 0, &[]);
    // A request still in flight when the shards go must not keep it alive.
    cp.set_mode(FakeMode::Slow(Duration::from_secs(5)));
    c.shards[0].send("slow", 0, &[]);
    let (done_tx, done_rx) = mpsc::channel();
    let thread = c.thread;
    thread::spawn(move || {
        let _ = done_tx.send(thread.join().is_ok());
    });
    c.shards.pop();
    c.shards.pop();
    assert!(done_rx.try_recv().is_err(), "one shard is still open");
    c.shards.clear();
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(3)), Ok(true));
}

#[test]
fn spawn_rejects_bad_config() {
    let bad = |mode: PlacementMode, admission: AdmissionConfig| {
        let stats = std::sync::Arc::new(ControlStats::default());
        control::spawn(ControlConfig { mode, admission }, vec![], stats).unwrap_err()
    };
    let no_vms = PlacementMode::Static {
        vms: vec![],
        repls: vec![],
    };
    bad(no_vms, Default::default());
    let pinned_unknown = PlacementMode::Static {
        vms: conmans(1),
        repls: vec![("r".into(), "nope".into())],
    };
    assert!(bad(pinned_unknown, Default::default())
        .to_string()
        .contains("nope"));
    let bad_url = PlacementMode::Static {
        vms: vec![("vm".into(), "wss://x/".into())],
        repls: vec![],
    };
    bad(bad_url, Default::default());
    bad(
        PlacementMode::Controlplane(cp_config(vec!["ftp://x".into()])),
        Default::default(),
    );
    bad(
        PlacementMode::Controlplane(cp_config(vec![])),
        Default::default(),
    );
    let zero_burst = AdmissionConfig {
        per_repl: Some(Bucket {
            rate_per_s: 1.0,
            burst: 0.0,
        }),
        per_cluster: None,
    };
    bad(
        PlacementMode::Controlplane(cp_config(vec!["http://127.0.0.1:1".into()])),
        zero_burst,
    );
}

#[test]
fn fake_places_least_loaded_with_reported_load() {
    let cp = fake(3, 60_000);
    cp.report_load("vm-0", 2);
    cp.report_load("vm-1", 1);
    let mut c = start(
        with_controlplane(cp_config(vec![url(&cp)]), Default::default()),
        1,
    );
    let s = &mut c.shards[0];
    let vms: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|r| s.found(r, 0, &[]).vm)
        .collect();
    // Loads 2,1,0 → vm-2, then vm-1 and vm-2 tie at 1 (first wins), then
    // all at 2 → vm-0.
    assert_eq!(vms, ["vm-2", "vm-1", "vm-2", "vm-0"]);
}

/// The test helper the dead-URL tests rely on: refused for as long as it
/// lives, and nobody else can listen on its port meanwhile.
#[test]
fn refusing_addr_refuses_and_keeps_its_port() {
    let dead = refusing_addr();
    for _ in 0..3 {
        let err = TcpStream::connect(dead.addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    let err = std::net::TcpListener::bind(dead.addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}
