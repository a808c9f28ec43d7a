//! Whole-process stress test of the memory rule: memory the kernel can see
//! belongs to its operation until the completion arrives, whatever happens
//! to the session. A breach shows as one session's bytes reaching another
//! session's peer, so every session here has its own byte pattern (both
//! directions, derived from its tag, which rides in its repl id) and every
//! byte any client or fake Conman receives is checked against it, while
//! thousands of sessions are reset at every point of their lives.
//!
//! The real `eval-proxy` binary runs with static placement over several fake
//! Conmans (one of them an address that refuses TCP) and a small splice
//! threshold, so large frames are spliced. Clients reset in the request
//! head, right after it, while Conman holds its 101, in the middle of a
//! frame or of a spliced frame, or end with a Close handshake; Conmans
//! answer 503, stall before the 101, reset mid-session or in the middle of
//! their own (spliced) frame, or echo. Afterwards the proxy must be alive,
//! must not have panicked, and must be back to its baseline of open sockets
//! and `eval_sessions_active`, with every Conman connection closed.
//!
//! Size and seed: `STRESS_SESSIONS` (default 2000), `STRESS_SEED` (default
//! random; printed, with the line that replays the run), `STRESS_THREADS`
//! (client threads, default 3), `STRESS_WINDOW` (sessions in flight per
//! client thread, default 150). The seed fixes what every session does;
//! timing still varies from run to run.

mod support;

#[path = "stress/client.rs"]
mod client;
#[path = "stress/conman.rs"]
mod conman;
#[path = "stress/pattern.rs"]
mod pattern;
#[path = "stress/plan.rs"]
mod plan;
#[path = "stress/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use support::{metric_value, Proxy};

/// Named counters kept by one thread, merged at the end.
#[derive(Default, Debug)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    pub fn bump(&mut self, key: &str, n: u64) {
        match self.0.get_mut(key) {
            Some(v) => *v += n,
            None => {
                self.0.insert(key.to_string(), n);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.0 {
            self.bump(&k, v);
        }
    }

    fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// `prefix` counters as `name=N` with the prefix cut off.
    fn list(&self, prefix: &str) -> String {
        self.0
            .iter()
            .filter_map(|(k, v)| Some(format!("{}={v}", k.strip_prefix(prefix)?)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

const MAX_ATTEMPTS: u32 = 3;
const SHARDS: usize = 2;
const LIVE_VMS: usize = 4;
/// The shard keeps up to this many empty splice pipes for reuse
/// (`PIPE_POOL` in src/shard/), so pipes may stay open after a run.
const PIPE_POOL_PER_SHARD: usize = 32;
/// How long the proxy may take to wind every session down after the last
/// client is gone (its Close handshake timeout is 10 s).
const SETTLE: Duration = Duration::from_secs(30);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

fn parse_seed(v: &str) -> u64 {
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .unwrap_or_else(|_| panic!("STRESS_SEED={v:?} does not parse"))
}

/// Printed past the test harness's capture, so CI logs always have it.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The proxy's open file descriptors: (sockets, pipes, others).
fn fds(pid: u32) -> (usize, usize, usize) {
    let mut n = (0, 0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd") {
        let Ok(target) = std::fs::read_link(e.unwrap().path()) else {
            continue; // closed while we looked
        };
        let target = target.to_string_lossy();
        if target.starts_with("socket:") {
            n.0 += 1;
        } else if target.starts_with("pipe:") {
            n.1 += 1;
        } else {
            n.2 += 1;
        }
    }
    n
}

fn config(vms: &[(String, std::net::SocketAddr)], buffers: usize) -> String {
    let mut c = format!(
        "[token]\nallow_dev_key = true\n\n\
         [limits]\nconnect_timeout_ms = 1000\nsetup_timeout_ms = 3000\n\
         max_attempts = {MAX_ATTEMPTS}\nretry_base_ms = 5\nretry_cap_ms = 50\n\n\
         [buffers]\ncount = {buffers}\nsplice_min = 4096\n\n\
         [placement]\nmode = \"static\"\n\n[placement.vms]\n"
    );
    for (name, addr) in vms {
        c.push_str(&format!("{name} = \"ws://{addr}/conman\"\n"));
    }
    c
}

#[test]
fn sessions_never_see_each_others_bytes() {
    let sessions: usize = env_or("STRESS_SESSIONS", 2000);
    let seed = std::env::var("STRESS_SEED")
        .map(|v| parse_seed(&v))
        .unwrap_or_else(|_| rand::random());
    let threads: usize = env_or("STRESS_THREADS", 3);
    let window: usize = env_or("STRESS_WINDOW", 150);
    let buffers: usize = env_or("STRESS_BUFFERS", 64);
    say(&format!(
        "stress: seed={seed:#x} sessions={sessions} (replay: STRESS_SEED={seed:#x} STRESS_SESSIONS={sessions} cargo test --test stress)"
    ));
    let began = Instant::now();

    let mut rng = StdRng::seed_from_u64(seed);
    let ctx = Arc::new(plan::Ctx::new(plan::draw(&mut rng, sessions, MAX_ATTEMPTS)));
    let vms: Vec<conman::Vm> = (0..LIVE_VMS)
        .map(|_| conman::Vm::spawn(ctx.clone()))
        .collect();
    let (_refusing, refusing_addr) = conman::refusing();
    let mut names: Vec<(String, std::net::SocketAddr)> = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| (format!("vm-{i}"), vm.addr))
        .collect();
    names.push(("vm-refusing".into(), refusing_addr));
    let mut proxy =
        Proxy::start_captured(&config(&names, buffers), &["--shards", &SHARDS.to_string()]);
    let pid = proxy.child.id();
    let base_fds = fds(pid);
    let active = |p: &Proxy| metric_value(&p.metrics(), "eval_sessions_active", &[]);
    let base_active = active(&proxy);

    let cfg = Arc::new(client::Clients {
        proxy: proxy.listen,
        window,
        seed,
    });
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let (ctx, cfg) = (ctx.clone(), cfg.clone());
            let mine: Vec<usize> = (th..sessions).step_by(threads).collect();
            std::thread::Builder::new()
                .name(format!("client-{th}"))
                .spawn(move || client::run(ctx, &cfg, th as u64, mine))
                .unwrap()
        })
        .collect();
    // Watch the proxy while the clients run: if it dies or a shard
    // panics, the clients stop at once instead of running into deadlines.
    let mut proxy_down = None;
    while !handles.iter().all(|h| h.is_finished()) {
        if proxy_down.is_none() {
            proxy_down = match proxy.child.try_wait().expect("try_wait") {
                Some(st) => Some(format!("exited ({st})")),
                None => proxy.log().contains("panicked").then(|| "panicked".into()),
            };
            if proxy_down.is_some() {
                ctx.abort.store(true, Ordering::SeqCst);
            }
        }
        std::thread::park_timeout(Duration::from_millis(200));
    }
    let mut t = Tally::default();
    for h in handles {
        t.merge(h.join().expect("client thread panicked"));
    }
    let clients_done = began.elapsed();

    // Readiness wait, bounded: the proxy winds down what is left.
    let deadline = Instant::now()
        + if proxy_down.is_some() {
            Duration::ZERO
        } else {
            SETTLE
        };
    let (end_fds, end_active, end_conman) = loop {
        let alive = proxy.child.try_wait().expect("try_wait").is_none();
        let now = (
            fds(pid),
            if alive { active(&proxy) } else { f64::NAN },
            ctx.conman_open.load(Ordering::SeqCst),
        );
        let settled = now.0 .0 == base_fds.0 && now.1 == base_active && now.2 == 0;
        if settled || !alive || Instant::now() > deadline {
            break now;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    };
    let metrics = proxy.metrics();
    ctx.stop.store(true, Ordering::SeqCst);
    for vm in vms {
        t.merge(vm.join());
    }
    let exit = proxy.child.try_wait().expect("try_wait");
    let log = proxy.log();
    let panicked = log.contains("panicked");
    let panic_lines = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("src/"))
        .take(12)
        .collect::<Vec<_>>()
        .join("\n");

    let m = |name: &str, want: &[&str]| metric_value(&metrics, name, want) as u64;
    let foreign = t.get("foreign_bytes_client") + t.get("foreign_bytes_conman");
    let mut planned = Tally::default();
    for p in &ctx.plans {
        planned.bump(p.conman.label(), 1);
    }
    let summary = format!(
        "stress summary: seed={seed:#x} sessions={sessions} threads={threads}x{window} \
         resets{{{}}} client_saw{{{}}} conman_plans{{{}}} conman{{{},refused_tcp={}}} \
         bytes_checked{{client={},conman={}}} foreign_bytes={foreign} \
         protocol_errors={} stuck={} \
         proxy{{established={},spliced_bytes={},ring_exhausted={}}} \
         fds{{baseline={:?},end={:?}}} active{{baseline={base_active},end={end_active}}} \
         conman_open_end={end_conman} proxy_down={proxy_down:?} clients={:.1}s total={:.1}s",
        t.list("reset_"),
        t.list("client_close_") + "," + &t.list("client_http_"),
        planned.list(""),
        t.list("conman_"),
        m(
            "eval_conman_attempt_failures_total",
            &["stage=\"conman_connect\"", "reason=\"refused\""]
        ),
        t.get("client_bytes_checked"),
        t.get("conman_bytes_checked"),
        t.get("protocol_errors_client") + t.get("protocol_errors_conman"),
        t.get("stuck_sessions"),
        m("eval_sessions_established_total", &[]),
        m("eval_relay_spliced_bytes_total", &[]),
        m("eval_buffer_ring_exhausted_total", &[]),
        base_fds,
        end_fds,
        clients_done.as_secs_f64(),
        began.elapsed().as_secs_f64(),
    );
    say(&summary);
    let samples = ctx.reg.samples();
    for s in &samples {
        say(&format!("stress sample: {s}"));
    }
    let replay = format!("replay: STRESS_SEED={seed:#x} STRESS_SESSIONS={sessions}");
    if std::env::var_os("STRESS_SHOW_LOG").is_some() {
        say(&log);
    }

    assert!(exit.is_none(), "the proxy exited: {exit:?}; {replay}");
    assert!(
        !panicked,
        "the proxy panicked; {replay}; its stderr:\n{panic_lines}"
    );
    assert_eq!(foreign, 0, "foreign bytes seen; {replay}; {samples:#?}");
    assert_eq!(
        t.get("protocol_errors_client") + t.get("protocol_errors_conman"),
        0,
        "frames our peers never send were seen; {replay}; {samples:#?}"
    );
    assert_eq!(
        t.get("conman_foreign_heads") + t.get("conman_bad_heads") + t.get("conman_early_data"),
        0,
        "Conman got a wrong upgrade request; {replay}; {samples:#?}"
    );
    assert_eq!(
        t.get("stuck_sessions"),
        0,
        "sessions stuck; {replay}; {samples:#?}"
    );
    assert_eq!(
        t.get("client_sessions"),
        sessions as u64,
        "clients could not connect: {t:?}; {replay}"
    );
    assert!(
        t.get("client_bytes_checked") > 0 && t.get("conman_bytes_checked") > 0,
        "nothing was relayed: {t:?}"
    );
    assert_eq!(
        (end_fds.0, end_active, end_conman),
        (base_fds.0, base_active, 0),
        "after {SETTLE:?} the proxy still holds sockets or sessions, or Conman connections \
         are open (proxy sockets, eval_sessions_active, conman connections); {replay}"
    );
    assert!(
        end_fds.1 <= base_fds.1 + 2 * PIPE_POOL_PER_SHARD * SHARDS && end_fds.2 == base_fds.2,
        "the proxy holds more pipes than its pools or other fds: {base_fds:?} -> {end_fds:?}; {replay}"
    );
}
