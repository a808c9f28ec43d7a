//! Per-shard counters, merged only when read (seastar's `map_reduce`).
//!
//! Each shard writes its own `ShardStats` with relaxed atomics on its own
//! cache lines; nothing on the data path touches another shard's stats. The
//! rare-event tables (setup failures, close codes, HTTP statuses) sit behind
//! a mutex that only the owning shard and a scrape ever take, so it is
//! uncontended in practice.

pub mod names;
pub mod vm_label;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::error::Stage;
use crate::proto::relay::Direction;

/// Setup phases timed into `eval_setup_duration_seconds{stage}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Token,
    Controlplane,
    ConmanDial,
    /// `wss://`: the TLS handshake with Conman, between dial and upgrade.
    ConmanTls,
    ConmanUpgrade,
    Total,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Token,
        Phase::Controlplane,
        Phase::ConmanDial,
        Phase::ConmanTls,
        Phase::ConmanUpgrade,
        Phase::Total,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Token => "token",
            Phase::Controlplane => "controlplane",
            Phase::ConmanDial => "conman_dial",
            Phase::ConmanTls => "conman_tls",
            Phase::ConmanUpgrade => "conman_upgrade",
            Phase::Total => "total",
        }
    }
}

/// Which peer sent a Close code (or which peer the proxy sent it to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CloseSide {
    Client,
    Conman,
    /// Originated by the proxy toward the client.
    ProxyToClient,
    /// Originated by the proxy toward Conman.
    ProxyToConman,
}

impl CloseSide {
    fn as_str(self) -> &'static str {
        match self {
            CloseSide::Client => "client",
            CloseSide::Conman => "conman",
            CloseSide::ProxyToClient => "proxy_to_client",
            CloseSide::ProxyToConman => "proxy_to_conman",
        }
    }
}

/// What became of a frame whose source was lost before its last byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TornFrame {
    /// Short enough to hold: dropped whole, the other side got a Close.
    Held,
    /// Longer than `relay.hold_max` and partly passed on: the other side
    /// was reset.
    Reset,
}

impl TornFrame {
    fn as_str(self) -> &'static str {
        match self {
            TornFrame::Held => "dropped_held",
            TornFrame::Reset => "reset",
        }
    }
}

#[repr(align(128))]
#[derive(Default)]
pub struct ShardStats {
    pub accepted: AtomicU64,
    /// accept(2) failures (out of descriptors or memory).
    pub accept_errors: AtomicU64,
    pub attempts: AtomicU64,
    pub established: AtomicU64,
    pub active: AtomicU64,
    /// Rejections that are the client's own fault (bad request, bad token):
    /// excluded from the SLO denominator.
    pub client_fault: AtomicU64,
    pub bytes_to_conman: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub frames_to_conman: AtomicU64,
    pub frames_to_client: AtomicU64,
    pub buffer_exhausted: AtomicU64,
    /// TLS receives that found the TLS buffer pool empty and took a main
    /// pool buffer instead.
    pub tls_pool_exhausted: AtomicU64,
    pub backpressure_pauses: AtomicU64,
    /// Payload bytes moved with splice(2) (also in the relayed bytes).
    pub spliced_bytes: AtomicU64,
    /// Bytes sessions hold in their own memory (queued toward a peer or
    /// held back mid-frame), against `limits.shard_buffer_bytes`.
    pub buffered_bytes: AtomicU64,
    /// Times a side stopped being read because the shard's budget was spent.
    pub budget_pauses: AtomicU64,
    /// The proxy's own keepalive Pings, by the side they went to.
    pub pings_to_client: AtomicU64,
    pub pings_to_conman: AtomicU64,
    /// Pongs answering those Pings, swallowed.
    pub pongs: AtomicU64,
    /// Sessions ended for silence: client, Conman, no data either way.
    pub client_timeouts: AtomicU64,
    pub conman_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Sessions ended because a revocation matched their token.
    pub revoked_closes: AtomicU64,
    /// Connections the shard holds, in any phase (what a drain waits for).
    pub live: AtomicU64,
    /// Live sessions handed to a new process (`shard::handoff`): moved
    /// out, kept here after all (too late, refused, connection lost), and,
    /// in the new process, adopted or refused.
    pub handoff_moved: AtomicU64,
    pub handoff_fallbacks: AtomicU64,
    pub handoff_adopted: AtomicU64,
    pub handoff_refused: AtomicU64,
    rare: Mutex<Rare>,
}

#[derive(Default)]
struct Rare {
    failures: BTreeMap<(&'static str, &'static str), u64>,
    /// (stage, reason, vm label)
    attempt_failures: BTreeMap<(&'static str, &'static str, Arc<str>), u64>,
    closes: BTreeMap<(CloseSide, u16), u64>,
    torn: BTreeMap<(&'static str, TornFrame), u64>,
    http: BTreeMap<u16, u64>,
    setup: Vec<(Phase, Histogram<u64>)>,
    /// An adopted session's pause: from the old process's last read to
    /// this one reading it again (microseconds).
    handoff_pause: Option<Histogram<u64>>,
}

fn lock(m: &Mutex<Rare>) -> std::sync::MutexGuard<'_, Rare> {
    // A panic while holding it cannot leave the counters inconsistent in a
    // way that matters more than losing the metrics.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ShardStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn add_bytes(&self, dir: Direction, bytes: u64, frames: u64) {
        let (b, f) = match dir {
            Direction::ToConman => (&self.bytes_to_conman, &self.frames_to_conman),
            Direction::ToClient => (&self.bytes_to_client, &self.frames_to_client),
        };
        b.fetch_add(bytes, Relaxed);
        if frames > 0 {
            f.fetch_add(frames, Relaxed);
        }
    }

    pub fn setup_failure(&self, stage: Stage, reason: &'static str, client_fault: bool) {
        if client_fault {
            Self::inc(&self.client_fault);
        }
        *lock(&self.rare)
            .failures
            .entry((stage.as_str(), reason))
            .or_default() += 1;
    }

    /// One Conman attempt failed (the session may still succeed on a retry);
    /// `vm` comes from [`vm_label::for_attempt`], so its values are bounded.
    pub fn attempt_failure(&self, stage: Stage, reason: &'static str, vm: Arc<str>) {
        *lock(&self.rare)
            .attempt_failures
            .entry((stage.as_str(), reason, vm))
            .or_default() += 1;
    }

    pub fn keepalive_ping(&self, to_client: bool) {
        let c = if to_client {
            &self.pings_to_client
        } else {
            &self.pings_to_conman
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn keepalive_pong(&self) {
        self.pongs.fetch_add(1, Relaxed);
    }

    /// `who`: "client", "conman" or "idle".
    pub fn peer_timeout(&self, who: &str) {
        let c = match who {
            "client" => &self.client_timeouts,
            "conman" => &self.conman_timeouts,
            _ => &self.idle_timeouts,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn close_code(&self, side: CloseSide, code: u16) {
        *lock(&self.rare).closes.entry((side, code)).or_default() += 1;
    }

    pub fn torn_frame(&self, dir: crate::proto::relay::Direction, what: TornFrame) {
        *lock(&self.rare)
            .torn
            .entry((dir.as_str(), what))
            .or_default() += 1;
    }

    pub fn http_response(&self, status: u16) {
        *lock(&self.rare).http.entry(status).or_default() += 1;
    }

    pub fn handoff_pause(&self, d: Duration) {
        let mut r = lock(&self.rare);
        r.handoff_pause
            .get_or_insert_with(|| {
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")
            })
            .saturating_record(d.as_micros().max(1) as u64);
    }

    pub fn setup_duration(&self, phase: Phase, d: Duration) {
        let mut r = lock(&self.rare);
        let us = d.as_micros().max(1) as u64;
        if let Some((_, h)) = r.setup.iter_mut().find(|(p, _)| *p == phase) {
            h.saturating_record(us);
            return;
        }
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds");
        h.saturating_record(us);
        r.setup.push((phase, h));
    }
}

/// One unlabelled counter with its HELP and TYPE lines.
pub fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// One unlabelled gauge with its HELP and TYPE lines.
pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Prometheus text exposition of all shards, merged at read time.
pub fn render(shards: &[Arc<ShardStats>]) -> String {
    let mut out = String::with_capacity(4096);
    let sum = |f: fn(&ShardStats) -> &AtomicU64| -> u64 {
        shards.iter().map(|s| f(s).load(Relaxed)).sum()
    };
    let _ = writeln!(
        out,
        "# HELP {0} TCP connections accepted on the public listener, per shard.\n# TYPE {0} counter",
        names::CONNECTIONS_ACCEPTED
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}{{shard=\"{i}\"}} {}",
            names::CONNECTIONS_ACCEPTED,
            s.accepted.load(Relaxed)
        );
    }
    counter(
        &mut out,
        names::ACCEPT_ERRORS,
        "Accepts that failed (out of file descriptors or memory); the shard backs off, then accepts again.",
        sum(|s| &s.accept_errors),
    );
    counter(
        &mut out,
        names::SESSION_ATTEMPTS,
        "WebSocket upgrade requests received.",
        sum(|s| &s.attempts),
    );
    counter(
        &mut out,
        names::SESSIONS_ESTABLISHED,
        "Sessions relaying between client and Conman.",
        sum(|s| &s.established),
    );
    counter(
        &mut out,
        names::CLIENT_FAULT_REJECTIONS,
        "Rejections caused by the client (bad request, bad token); excluded from the success-rate SLO.",
        sum(|s| &s.client_fault),
    );
    let _ = writeln!(
        out,
        "# HELP {0} Sessions currently open, per shard (autoscaling signal).\n# TYPE {0} gauge",
        names::SESSIONS_ACTIVE
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}{{shard=\"{i}\"}} {}",
            names::SESSIONS_ACTIVE,
            s.active.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP {0} Payload and header bytes relayed, by direction.\n# TYPE {0} counter\n{0}{{direction=\"to_conman\"}} {1}\n{0}{{direction=\"to_client\"}} {2}",
        names::RELAY_BYTES,
        sum(|s| &s.bytes_to_conman),
        sum(|s| &s.bytes_to_client)
    );
    let _ = writeln!(
        out,
        "# HELP {0} Frames relayed, by direction.\n# TYPE {0} counter\n{0}{{direction=\"to_conman\"}} {1}\n{0}{{direction=\"to_client\"}} {2}",
        names::RELAY_FRAMES,
        sum(|s| &s.frames_to_conman),
        sum(|s| &s.frames_to_client)
    );
    counter(
        &mut out,
        names::BUFFER_EXHAUSTED,
        "Receives that found the provided-buffer ring empty (ENOBUFS).",
        sum(|s| &s.buffer_exhausted),
    );
    counter(
        &mut out,
        names::TLS_POOL_EXHAUSTED,
        "TLS receives that found the TLS buffer pool empty and took a buffer of the main ring.",
        sum(|s| &s.tls_pool_exhausted),
    );
    counter(
        &mut out,
        names::BACKPRESSURE_PAUSES,
        "Times a side stopped being read because its peer had too much queued.",
        sum(|s| &s.backpressure_pauses),
    );
    counter(
        &mut out,
        names::BUDGET_PAUSES,
        "Times a side stopped being read because the shard's sessions held limits.shard_buffer_bytes in their own memory.",
        sum(|s| &s.budget_pauses),
    );
    let _ = writeln!(
        out,
        "# HELP {0} Bytes sessions hold in their own memory (queued toward a slow peer, or the start of a frame held back), per shard; bounded by limits.shard_buffer_bytes.\n# TYPE {0} gauge",
        names::BUFFERED_BYTES
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}{{shard=\"{i}\"}} {}",
            names::BUFFERED_BYTES,
            s.buffered_bytes.load(Relaxed)
        );
    }
    counter(
        &mut out,
        names::RELAY_SPLICED_BYTES,
        "Payload bytes of long data frames moved socket to pipe to socket, never copied to user space (also counted in eval_relay_bytes_total).",
        sum(|s| &s.spliced_bytes),
    );

    let _ = writeln!(
        out,
        "# HELP {0} The proxy's own Pings to a side silent for keepalive.interval_s, by the side they went to.\n# TYPE {0} counter\n{0}{{to=\"client\"}} {1}\n{0}{{to=\"conman\"}} {2}",
        names::KEEPALIVE_PINGS,
        sum(|s| &s.pings_to_client),
        sum(|s| &s.pings_to_conman)
    );
    counter(
        &mut out,
        names::KEEPALIVE_PONGS,
        "Pongs answering the proxy's own Pings, consumed (never relayed).",
        sum(|s| &s.pongs),
    );
    let _ = writeln!(
        out,
        "# HELP {0} Sessions ended for silence: a side silent past keepalive.timeout_s (client_timeout, conman_timeout) or no data frame past limits.idle_timeout_s (idle_timeout).\n# TYPE {0} counter\n{0}{{reason=\"client_timeout\"}} {1}\n{0}{{reason=\"conman_timeout\"}} {2}\n{0}{{reason=\"idle_timeout\"}} {3}",
        names::PEER_TIMEOUTS,
        sum(|s| &s.client_timeouts),
        sum(|s| &s.conman_timeouts),
        sum(|s| &s.idle_timeouts)
    );

    counter(
        &mut out,
        names::SESSIONS_REVOKED,
        "Sessions ended (Close 1008, stage=token;reason=revoked) because a new revocation matched their token.",
        sum(|s| &s.revoked_closes),
    );

    let mut failures: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut attempt_failures: BTreeMap<(&str, &str, Arc<str>), u64> = BTreeMap::new();
    let mut closes: BTreeMap<(CloseSide, u16), u64> = BTreeMap::new();
    let mut torn: BTreeMap<(&str, TornFrame), u64> = BTreeMap::new();
    let mut http: BTreeMap<u16, u64> = BTreeMap::new();
    let mut setup: Vec<(Phase, Histogram<u64>)> = Vec::new();
    let mut pause: Option<Histogram<u64>> = None;
    for s in shards {
        let r = lock(&s.rare);
        if let Some(h) = &r.handoff_pause {
            match pause.as_mut() {
                Some(acc) => {
                    let _ = acc.add(h);
                }
                None => pause = Some(h.clone()),
            }
        }
        for (k, v) in &r.failures {
            *failures.entry(*k).or_default() += v;
        }
        for (k, v) in &r.attempt_failures {
            *attempt_failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.closes {
            *closes.entry(*k).or_default() += v;
        }
        for (k, v) in &r.torn {
            *torn.entry(*k).or_default() += v;
        }
        for (k, v) in &r.http {
            *http.entry(*k).or_default() += v;
        }
        for (p, h) in &r.setup {
            match setup.iter_mut().find(|(q, _)| q == p) {
                Some((_, acc)) => {
                    let _ = acc.add(h);
                }
                None => setup.push((*p, h.clone())),
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP {0} Session setups that failed, by stage and reason.\n# TYPE {0} counter",
        names::SETUP_FAILURES
    );
    for ((stage, reason), v) in &failures {
        let _ = writeln!(
            out,
            "{}{{stage=\"{stage}\",reason=\"{reason}\"}} {v}",
            names::SETUP_FAILURES
        );
    }
    let _ = writeln!(
        out,
        "# HELP {0} Conman attempts that failed (retried or not), by stage, reason and VM (Controlplane VMs past the first {1}: vm=\"{2}\").\n# TYPE {0} counter",
        names::CONMAN_ATTEMPT_FAILURES,
        vm_label::MAX_CONTROLPLANE_VMS,
        vm_label::OTHER,
    );
    for ((stage, reason, vm), v) in &attempt_failures {
        let _ = writeln!(
            out,
            "{}{{stage=\"{stage}\",reason=\"{reason}\",vm=\"{}\"}} {v}",
            names::CONMAN_ATTEMPT_FAILURES,
            escape_label(vm)
        );
    }
    let _ = writeln!(
        out,
        "# HELP {0} Close codes seen or sent, by side.\n# TYPE {0} counter",
        names::CLOSE_CODES
    );
    for ((side, code), v) in &closes {
        let _ = writeln!(
            out,
            "{}{{side=\"{}\",code=\"{code}\"}} {v}",
            names::CLOSE_CODES,
            side.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP {0} Frames whose source was lost before their last byte, by direction and outcome: dropped_held (no byte passed on, the other side got a Close) or reset (longer than relay.hold_max, the other side was reset).\n# TYPE {0} counter",
        names::RELAY_TORN_FRAMES
    );
    for ((dir, what), v) in &torn {
        let _ = writeln!(
            out,
            "{}{{direction=\"{dir}\",outcome=\"{}\"}} {v}",
            names::RELAY_TORN_FRAMES,
            what.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP {0} Plain HTTP responses on the public port, by status.\n# TYPE {0} counter",
        names::HTTP_RESPONSES
    );
    for (status, v) in &http {
        let _ = writeln!(out, "{}{{status=\"{status}\"}} {v}", names::HTTP_RESPONSES);
    }
    render_histograms(&mut out, &setup);
    for (name, help, v) in [
        (names::HANDOFF_MOVED, "Live sessions handed to a new process during an upgrade.", sum(|s| &s.handoff_moved)),
        (names::HANDOFF_FALLBACKS, "Sessions a move began on that stayed in this process (no movable point in handover.session_deadline_ms, refused by the new process, or the handover connection lost); they drain here.", sum(|s| &s.handoff_fallbacks)),
        (names::HANDOFF_ADOPTED, "Live sessions this process took over from the one it upgraded.", sum(|s| &s.handoff_adopted)),
        (names::HANDOFF_REFUSED, "Session records this process refused (unreadable or another version); the old process kept those sessions.", sum(|s| &s.handoff_refused)),
    ] {
        counter(&mut out, name, help, v);
    }
    let name = names::HANDOFF_PAUSE;
    let _ = writeln!(
        out,
        "# HELP {name} Per adopted session, from the old process's last read of it to this one reading it again.\n# TYPE {name} histogram"
    );
    let h = pause.unwrap_or_else(|| Histogram::new(2).expect("valid precision"));
    for le in BUCKETS_US {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {}",
            le as f64 / 1e6,
            h.count_between(0, le)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let _ = writeln!(out, "{name}_sum {}", h.mean() * h.len() as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.len());
    out
}

/// A label value as the text format wants it: a VM id comes from the
/// config or the Controlplane, and a quote or newline in it must not break
/// the exposition.
pub fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

const BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 10_000_000,
];

fn render_histograms(out: &mut String, setup: &[(Phase, Histogram<u64>)]) {
    let name = names::SETUP_DURATION;
    let _ = writeln!(
        out,
        "# HELP {name} Time spent in each setup stage.\n# TYPE {name} histogram"
    );
    for phase in Phase::ALL {
        let Some((_, h)) = setup.iter().find(|(p, _)| *p == phase) else {
            continue;
        };
        let stage = phase.as_str();
        for le in BUCKETS_US {
            let c = h.count_between(0, le);
            let _ = writeln!(
                out,
                "{name}_bucket{{stage=\"{stage}\",le=\"{}\"}} {c}",
                le as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
            h.len()
        );
        let sum_s = h.mean() * h.len() as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{stage=\"{stage}\"}} {sum_s}");
        let _ = writeln!(out, "{name}_count{{stage=\"{stage}\"}} {}", h.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_failures_carry_the_vm_merged_across_shards() {
        let a = Arc::new(ShardStats::default());
        let b = Arc::new(ShardStats::default());
        a.attempt_failure(Stage::ConmanConnect, "refused", "vm-1".into());
        b.attempt_failure(Stage::ConmanConnect, "refused", "vm-1".into());
        b.attempt_failure(Stage::ConmanHandshake, "status", "vm-2".into());
        b.attempt_failure(Stage::ConmanHandshake, "status", "a\"b\\c\nd".into());
        let out = render(&[a, b]);
        let n = names::CONMAN_ATTEMPT_FAILURES;
        for want in [
            format!("{n}{{stage=\"conman_connect\",reason=\"refused\",vm=\"vm-1\"}} 2"),
            format!("{n}{{stage=\"conman_handshake\",reason=\"status\",vm=\"vm-2\"}} 1"),
            format!("{n}{{stage=\"conman_handshake\",reason=\"status\",vm=\"a\\\"b\\\\c\\nd\"}} 1"),
        ] {
            assert!(out.lines().any(|l| l == want), "{want} missing in\n{out}");
        }
    }
}
