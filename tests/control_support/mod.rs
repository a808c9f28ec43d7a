//! A data shard's side of the control socket, as plain blocking std code,
//! and a fake Controlplane with loopback Conman URLs.

#![allow(dead_code)] // each test binary uses its own subset

#[path = "../support/refusing.rs"]
mod refusing;
#[allow(unused_imports)] // not every test binary refuses
pub use refusing::{refusing_addr, RefusingAddr};

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use eval_proxy::control::wire::{Found, PlacementFailure, PlacementResult, ToControl, ToShard};
use eval_proxy::control::{
    self, AdmissionConfig, ControlConfig, ControlStats, ControlplaneConfig, ManualClock,
    PlacementMode,
};
use eval_proxy::dev::controlplane::{self as fake, FakeControlplane, FakeControlplaneConfig};

/// Upper bound on any single reply; a hang fails the test instead of
/// stalling the run.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Shard {
    sock: UnixStream,
    next_id: u64,
    buf: Vec<u8>,
}

impl Shard {
    pub fn send(&mut self, repl: &str, attempt: u8, exclude: &[&str]) -> u64 {
        self.send_placement(repl, "test", attempt, exclude)
    }

    pub fn send_in(&mut self, repl: &str, cluster: &str) -> u64 {
        self.send_placement(repl, cluster, 0, &[])
    }

    fn send_placement(&mut self, repl: &str, cluster: &str, attempt: u8, exclude: &[&str]) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        ToControl::Placement {
            id,
            repl: repl.into(),
            cluster: cluster.into(),
            attempt,
            exclude: exclude.iter().map(|&vm| vm.to_owned()).collect(),
        }
        .encode(&mut out);
        self.sock.write_all(&out).unwrap();
        id
    }

    pub fn recv(&mut self) -> (u64, PlacementResult) {
        loop {
            if let Some((msg, used)) = ToShard::decode(&self.buf).unwrap() {
                self.buf.drain(..used);
                let ToShard::Placement { id, result } = msg;
                return (id, result);
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .sock
                .read(&mut chunk)
                .expect("reply within the timeout");
            assert!(n > 0, "control shard closed the socket");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn place(&mut self, repl: &str, attempt: u8, exclude: &[&str]) -> PlacementResult {
        let id = self.send(repl, attempt, exclude);
        let (got, result) = self.recv();
        assert_eq!(got, id);
        result
    }

    pub fn found(&mut self, repl: &str, attempt: u8, exclude: &[&str]) -> Found {
        match self.place(repl, attempt, exclude) {
            PlacementResult::Found(f) => std::sync::Arc::unwrap_or_clone(f),
            other => panic!("{repl}: expected a placement, got {other:?}"),
        }
    }

    /// (reason, retry_after_ms) of a failed placement.
    pub fn failed(&mut self, repl: &str, attempt: u8) -> (PlacementFailure, Option<u64>) {
        match self.place(repl, attempt, &[]) {
            PlacementResult::Failed {
                reason,
                retry_after_ms,
            } => (reason, retry_after_ms),
            other => panic!("{repl}: expected a failure, got {other:?}"),
        }
    }
}

pub struct Control {
    pub shards: Vec<Shard>,
    pub stats: Arc<ControlStats>,
    pub thread: JoinHandle<()>,
    /// The control shard's clock: it stands still until a test advances
    /// it (cache TTLs, the breaker's open period, admission refills).
    pub clock: ManualClock,
}

pub fn start(cfg: ControlConfig, shards: usize) -> Control {
    let mut ours = Vec::new();
    let mut theirs: Vec<OwnedFd> = Vec::new();
    for _ in 0..shards {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        ours.push(Shard {
            sock: a,
            next_id: 1,
            buf: Vec::new(),
        });
        theirs.push(b.into());
    }
    let stats = Arc::new(ControlStats::default());
    let clock = ManualClock::new();
    let thread = control::spawn_with_clock(cfg, theirs, stats.clone(), clock.clock())
        .expect("control shard starts");
    Control {
        shards: ours,
        stats,
        thread,
        clock,
    }
}

pub fn cp_config(urls: Vec<String>) -> ControlplaneConfig {
    ControlplaneConfig {
        urls,
        request_timeout: Duration::from_secs(2),
        max_connections: 4,
        cache_max_entries: 1000,
        breaker_failures: 3,
        breaker_open_for: Duration::from_millis(200),
        revocations_poll: Duration::ZERO,
    }
}

pub fn with_controlplane(cp: ControlplaneConfig, admission: AdmissionConfig) -> ControlConfig {
    ControlConfig {
        mode: PlacementMode::Controlplane(cp),
        admission,
    }
}

/// VM `vm-i` at `ws://127.0.0.1:{7000 + i}/conman-i` (never dialled here).
pub fn conmans(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("vm-{i}"),
                format!("ws://127.0.0.1:{}/conman-{i}", 7000 + i),
            )
        })
        .collect()
}

pub fn fake(n: usize, ttl_ms: u64) -> FakeControlplane {
    fake::spawn(FakeControlplaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        conmans: conmans(n),
        ttl_ms,
        pins: Vec::new(),
    })
    .unwrap()
}

pub fn url(f: &FakeControlplane) -> String {
    format!("http://{}", f.local_addr)
}
