//! Counting and reporting: per-thread recorders merged at the end into one
//! report, printed as text or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::Mode;

/// Latencies above this are recorded as this (a minute is already a failure).
const MAX_TRACKED_NS: u64 = 60_000_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3).expect("constant histogram bounds are valid")
}

/// One thread's counts; merged only when the run is over.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Message round trips (from the intended send time in open-loop modes).
    pub echo_ns: Histogram<u64>,
    /// Connect start to 101.
    pub upgrade_ns: Histogram<u64>,
    /// Connect start to the first echo verified: a session as a user sees it.
    pub session_ns: Histogram<u64>,
    pub messages: u64,
    pub bytes: u64,
    /// Complete connect + upgrade + echo + close cycles.
    pub handshakes: u64,
    pub established: u64,
    /// TLS handshakes of upgraded connections: full, and resumed from a ticket.
    pub tls_full: u64,
    pub tls_resumed: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            echo_ns: histogram(),
            upgrade_ns: histogram(),
            session_ns: histogram(),
            messages: 0,
            bytes: 0,
            handshakes: 0,
            established: 0,
            tls_full: 0,
            tls_resumed: 0,
        }
    }
}

impl Recorder {
    pub fn echo(&mut self, latency_ns: u64, len: u32) {
        self.echo_ns.saturating_record(latency_ns.max(1));
        self.messages += 1;
        self.bytes += u64::from(len);
    }

    pub fn tls_handshake(&mut self, resumed: bool) {
        if resumed {
            self.tls_resumed += 1;
        } else {
            self.tls_full += 1;
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds everywhere, so adding cannot fail.
        self.echo_ns.add(&other.echo_ns).ok();
        self.upgrade_ns.add(&other.upgrade_ns).ok();
        self.session_ns.add(&other.session_ns).ok();
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.handshakes += other.handshakes;
        self.established += other.established;
        self.tls_full += other.tls_full;
        self.tls_resumed += other.tls_resumed;
    }
}

/// What a worker thread hands back.
#[derive(Debug)]
pub struct ThreadResult {
    pub rec: Recorder,
    pub errors: BTreeMap<String, u64>,
    /// From the common start to the thread's last echo.
    pub elapsed: Duration,
    /// `storm`: the thread's record of its sessions' losses and reconnects.
    pub storm: Option<Box<StormRecorder>>,
}

/// One thread's storm records; `storm::report` merges them.
#[derive(Debug)]
pub struct StormRecorder {
    /// Relaying sessions lost, by how (a `ConnError` kind).
    pub lost: BTreeMap<String, u64>,
    /// Of those, lost before the storm started.
    pub lost_before_start: u64,
    /// Reconnect attempts that failed before relaying, by how.
    pub attempt_failures: BTreeMap<String, u64>,
    /// Reconnect attempts started.
    pub reconnects: u64,
    /// Waits the peer asked for that were longer than the backoff.
    pub retry_after_waits: u64,
    /// Lost sessions relaying again, and those that gave up.
    pub recovered: u64,
    pub gave_up: u64,
    /// Lost sessions neither relaying again nor given up at the end.
    pub still_down: u64,
    /// Storm start to loss seen; connect to 101 (reconnects only); connect
    /// to the first echo of the attempt that succeeded; loss seen to
    /// relaying again.
    pub detect_ns: Histogram<u64>,
    pub upgrade_ns: Histogram<u64>,
    pub setup_ns: Histogram<u64>,
    pub recovery_ns: Histogram<u64>,
    /// When each loss was seen and each session relayed again (run clock).
    pub loss_at: Vec<u64>,
    pub recovered_at: Vec<u64>,
}

impl Default for StormRecorder {
    fn default() -> Self {
        Self {
            lost: BTreeMap::new(),
            lost_before_start: 0,
            attempt_failures: BTreeMap::new(),
            reconnects: 0,
            retry_after_waits: 0,
            recovered: 0,
            gave_up: 0,
            still_down: 0,
            detect_ns: histogram(),
            upgrade_ns: histogram(),
            setup_ns: histogram(),
            recovery_ns: histogram(),
            loss_at: Vec::new(),
            recovered_at: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        Self {
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    /// Connections asked for (workers in handshake mode).
    pub conns: usize,
    /// Connections that completed the upgrade.
    pub established: u64,
    pub messages: u64,
    /// Payload bytes echoed (one direction).
    pub bytes: u64,
    pub duration_s: f64,
    pub msgs_per_s: f64,
    pub mib_per_s: f64,
    pub handshakes: u64,
    pub handshakes_per_s: f64,
    /// Echo round trips; for `handshake` and `idle`, connect to first echo.
    pub latency_us: Percentiles,
    /// Connect to 101.
    pub upgrade_us: Percentiles,
    pub errors: BTreeMap<String, u64>,
    /// TLS runs only: how the handshakes of upgraded connections went. A
    /// server that never resumes shows up here, not only in its CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsReport>,
    /// `storm` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormReport>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TlsReport {
    pub full: u64,
    pub resumed: u64,
}

/// What a `storm` did: the section of the report only that mode has.
/// Latencies in µs, durations in ms.
#[derive(Debug, Serialize)]
pub struct StormReport {
    pub sessions: usize,
    /// `kill` (`--kill-pid`), `first_loss`, or `nothing` (no session lost).
    pub started_by: &'static str,
    pub killed_pid: Option<i32>,
    /// Sessions lost (after relaying), by how: `close_1014`, `eof_without_close`, ...
    pub lost: u64,
    pub lost_by: BTreeMap<String, u64>,
    /// Of those, lost before the kill (none are expected).
    pub lost_before_start: u64,
    /// Reconnect attempts started.
    pub reconnects: u64,
    /// Reconnect attempts that failed before relaying, by how; each was
    /// retried with backoff.
    pub attempt_failures: BTreeMap<String, u64>,
    /// Waits longer than the backoff because the peer asked for them.
    pub retry_after_waits: u64,
    /// Lost sessions relaying again.
    pub recovered: u64,
    /// Lost sessions that never relayed again (gave up, or still down at
    /// the end). The goal is 0.
    pub failed_sessions: u64,
    /// From the storm's start until the last lost session relayed again;
    /// none if any failed.
    pub all_relaying_ms: Option<f64>,
    /// Storm start to the loss seen by the client.
    pub detect_us: Percentiles,
    /// Reconnects: connect to 101.
    pub upgrade_us: Percentiles,
    /// Reconnects that succeeded: connect to the first echo verified.
    pub setup_us: Percentiles,
    /// Loss seen to relaying again (retries and waits included).
    pub recovery_us: Percentiles,
    /// CPU of the `--watch-pid` processes, if any.
    pub cpu: Option<StormCpu>,
    /// `relaying[i]`: sessions relaying at `i * timeline_step_ms` after the start.
    pub timeline_step_ms: f64,
    pub relaying: Vec<u64>,
}

/// CPU time of the watched processes (all threads, from schedstat).
#[derive(Debug, Serialize)]
pub struct StormCpu {
    /// From every session held to the storm's start: background echoes.
    pub baseline_s: f64,
    pub baseline_cpu_ms: f64,
    /// From the storm's start until every session relays again (or, if
    /// some never do, until the storm is declared over).
    pub storm_s: f64,
    pub storm_cpu_ms: f64,
    /// The user / kernel split over the storm (clock ticks, 10 ms resolution).
    pub storm_user_ms: f64,
    pub storm_sys_ms: f64,
    /// Time the watched processes were runnable but waited for a CPU over
    /// the storm: other work on their core.
    pub storm_wait_ms: f64,
    /// The storm's CPU minus the baseline rate over the same time.
    pub above_baseline_ms: f64,
    /// That, per reconnect attempt.
    pub per_reconnect_us: Option<f64>,
}

impl Report {
    pub fn new(mode: Mode, conns: usize, results: &[ThreadResult]) -> Self {
        let mut rec = Recorder::default();
        let mut errors = BTreeMap::new();
        let mut elapsed = Duration::ZERO;
        for r in results {
            rec.merge(&r.rec);
            for (kind, n) in &r.errors {
                *errors.entry(kind.clone()).or_insert(0) += n;
            }
            elapsed = elapsed.max(r.elapsed);
        }
        let secs = elapsed.as_secs_f64();
        let per_s = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let latency = match mode {
            Mode::Handshake | Mode::Idle => &rec.session_ns,
            _ => &rec.echo_ns,
        };
        Self {
            mode: mode.as_str(),
            conns,
            established: rec.established,
            messages: rec.messages,
            bytes: rec.bytes,
            duration_s: secs,
            msgs_per_s: per_s(rec.messages as f64),
            mib_per_s: per_s(rec.bytes as f64 / f64::from(1 << 20)),
            handshakes: rec.handshakes,
            handshakes_per_s: per_s(rec.handshakes as f64),
            latency_us: Percentiles::of(latency),
            upgrade_us: Percentiles::of(&rec.upgrade_ns),
            errors,
            tls: Some(TlsReport {
                full: rec.tls_full,
                resumed: rec.tls_resumed,
            }),
            storm: None,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report always serializes")
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let p = |p: &Percentiles| {
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                p.p50, p.p90, p.p99, p.p999, p.max
            )
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "{}: {} conns ({} established), {:.2} s",
            self.mode, self.conns, self.established, self.duration_s
        );
        if self.messages > 0 {
            let _ = writeln!(
                s,
                "  messages    {} ({:.1} msg/s, {:.2} MiB/s)",
                self.messages, self.msgs_per_s, self.mib_per_s
            );
        }
        if self.handshakes > 0 {
            let _ = writeln!(
                s,
                "  handshakes  {} ({:.1} /s)",
                self.handshakes, self.handshakes_per_s
            );
        }
        let latency_label = match self.mode {
            "handshake" | "idle" => "session µs ",
            _ => "latency µs ",
        };
        let _ = writeln!(s, "  {latency_label}{}", p(&self.latency_us));
        if self.established > 0 {
            let _ = writeln!(s, "  upgrade µs {}", p(&self.upgrade_us));
        }
        if let Some(tls) = &self.tls {
            let _ = writeln!(
                s,
                "  TLS         {} full handshakes, {} resumed",
                tls.full, tls.resumed
            );
        }
        if let Some(storm) = &self.storm {
            storm.write_text(&mut s);
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors      none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "  errors      {} ({})",
                self.error_count(),
                list.join(", ")
            );
        }
        s
    }
}

impl StormReport {
    fn write_text(&self, s: &mut String) {
        let p = |p: &Percentiles| format!("p50 {}  p99 {}  max {}", p.p50, p.p99, p.max);
        let kinds = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "  storm       started by {}; {} of {} sessions lost ({}), {} before the start",
            self.started_by,
            self.lost,
            self.sessions,
            kinds(&self.lost_by),
            self.lost_before_start
        );
        let _ = writeln!(
            s,
            "  reconnects  {} attempts, {} failed ({}), {} waits asked for by the peer",
            self.reconnects,
            self.attempt_failures.values().sum::<u64>(),
            kinds(&self.attempt_failures),
            self.retry_after_waits
        );
        let all = self
            .all_relaying_ms
            .map_or("never".to_owned(), |ms| format!("after {ms} ms"));
        let _ = writeln!(
            s,
            "  relaying    {} recovered, {} failed; all relaying again {all}",
            self.recovered, self.failed_sessions
        );
        let _ = writeln!(s, "  detect µs   {}", p(&self.detect_us));
        let _ = writeln!(s, "  reconnect µs {} (to first echo)", p(&self.setup_us));
        let _ = writeln!(
            s,
            "  recovery µs {} (loss to relaying)",
            p(&self.recovery_us)
        );
        if let Some(c) = &self.cpu {
            let _ = writeln!(
                s,
                "  watched CPU {:.1} ms over {:.3} s of storm ({:.1} ms above the baseline of \
                 {:.1} ms/s), user {:.0} ms, sys {:.0} ms, {:.1} ms waiting for a CPU",
                c.storm_cpu_ms,
                c.storm_s,
                c.above_baseline_ms,
                if c.baseline_s > 0.0 {
                    c.baseline_cpu_ms / c.baseline_s
                } else {
                    0.0
                },
                c.storm_user_ms,
                c.storm_sys_ms,
                c.storm_wait_ms
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_threads_and_computes_rates() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for _ in 0..90 {
            a.echo(100_000, 64);
        }
        for _ in 0..10 {
            b.echo(1_000_000, 64);
        }
        let results = [
            ThreadResult {
                rec: a,
                errors: BTreeMap::from([("mismatch".to_string(), 1)]),
                elapsed: Duration::from_secs(1),
                storm: None,
            },
            ThreadResult {
                rec: b,
                errors: BTreeMap::from([("mismatch".to_string(), 2)]),
                elapsed: Duration::from_secs(2),
                storm: None,
            },
        ];
        let r = Report::new(Mode::Echo, 2, &results);
        assert_eq!(r.messages, 100);
        assert_eq!(r.bytes, 6400);
        assert_eq!(r.duration_s, 2.0);
        assert_eq!(r.msgs_per_s, 50.0);
        // Percentiles are the highest value of their bucket (3 significant digits).
        assert!((r.latency_us.p50 - 100.0).abs() < 0.1, "{:?}", r.latency_us);
        assert!(
            (r.latency_us.p99 - 1000.0).abs() < 1.0,
            "{:?}",
            r.latency_us
        );
        assert_eq!(r.error_count(), 3);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["errors"]["mismatch"], 3);
        assert_eq!(json["latency_us"]["p999"], r.latency_us.p999);
        assert!(r.to_text().contains("errors      3 (mismatch 3)"));
    }
}
