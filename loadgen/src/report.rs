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

fn histogram() -> Histogram<u64> {
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
        }
    }
}

impl Recorder {
    pub fn echo(&mut self, latency_ns: u64, len: u32) {
        self.echo_ns.saturating_record(latency_ns.max(1));
        self.messages += 1;
        self.bytes += u64::from(len);
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
    }
}

/// What a worker thread hands back.
#[derive(Debug)]
pub struct ThreadResult {
    pub rec: Recorder,
    pub errors: BTreeMap<String, u64>,
    /// From the common start to the thread's last echo.
    pub elapsed: Duration,
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
    fn of(h: &Histogram<u64>) -> Self {
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
            },
            ThreadResult {
                rec: b,
                errors: BTreeMap::from([("mismatch".to_string(), 2)]),
                elapsed: Duration::from_secs(2),
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
