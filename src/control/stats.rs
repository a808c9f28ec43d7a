//! The control shard's counters, shared with the admin listener.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::metrics::names::{
    ADMISSION_REJECTIONS, CONTROLPLANE_BREAKER_STATE, CONTROLPLANE_CACHE_HITS,
    CONTROLPLANE_CACHE_MISSES, CONTROLPLANE_COALESCED, CONTROLPLANE_ERRORS, CONTROLPLANE_REQUESTS,
};
use crate::metrics::{counter, gauge};

use super::admission::Scope;
use super::wire::PlacementFailure;

/// Written by the control shard only, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ControlStats {
    /// HTTP requests sent to the Controlplane (failover attempts included).
    pub controlplane_requests: AtomicU64,
    /// Placements served from the cache.
    pub cache_hits: AtomicU64,
    /// Placements the cache could not serve (Controlplane mode only).
    pub cache_misses: AtomicU64,
    /// Misses that joined a request already in flight for their repl.
    pub coalesced: AtomicU64,
    /// 0 closed, 1 open, 2 half-open, as of the last placement request.
    pub breaker_state: AtomicU64,
    errors: [AtomicU64; PlacementFailure::ALL.len()],
    admission: [AtomicU64; 2],
}

impl ControlStats {
    /// Placement requests answered with `reason` (admission included).
    pub fn errors(&self, reason: PlacementFailure) -> u64 {
        self.errors[reason as usize].load(Relaxed)
    }

    pub fn admission_rejections(&self, scope: Scope) -> u64 {
        self.admission[scope as usize].load(Relaxed)
    }

    pub(crate) fn add_error(&self, reason: PlacementFailure, n: u64) {
        self.errors[reason as usize].fetch_add(n, Relaxed);
    }

    pub(crate) fn add_rejection(&self, scope: Scope) {
        self.admission[scope as usize].fetch_add(1, Relaxed);
        self.add_error(PlacementFailure::Admission, 1);
    }

    /// Prometheus text exposition, appended to `out`.
    pub fn render(&self, out: &mut String) {
        let counters = [
            (
                CONTROLPLANE_REQUESTS,
                "HTTP requests sent to the Controlplane, failover attempts included.",
                &self.controlplane_requests,
            ),
            (
                CONTROLPLANE_CACHE_HITS,
                "Placements served from the control shard's cache.",
                &self.cache_hits,
            ),
            (
                CONTROLPLANE_CACHE_MISSES,
                "Placements the cache could not serve.",
                &self.cache_misses,
            ),
            (
                CONTROLPLANE_COALESCED,
                "Placement requests that joined a Controlplane request already in flight for their repl.",
                &self.coalesced,
            ),
        ];
        for (name, help, v) in counters {
            counter(out, name, help, v.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP {0} Placement requests answered with an error, by reason.\n# TYPE {0} counter",
            CONTROLPLANE_ERRORS
        );
        for r in PlacementFailure::ALL {
            let _ = writeln!(
                out,
                "{CONTROLPLANE_ERRORS}{{reason=\"{}\"}} {}",
                r.as_str(),
                self.errors(r)
            );
        }
        gauge(
            out,
            CONTROLPLANE_BREAKER_STATE,
            "Controlplane circuit breaker: 0 closed, 1 open, 2 half-open.",
            self.breaker_state.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP {0} New sessions refused by admission control, by the limit that refused them.\n# TYPE {0} counter",
            ADMISSION_REJECTIONS
        );
        for s in [Scope::Repl, Scope::Cluster] {
            let _ = writeln!(
                out,
                "{ADMISSION_REJECTIONS}{{scope=\"{}\"}} {}",
                s.as_str(),
                self.admission_rejections(s)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_has_help_and_type() {
        let s = ControlStats::default();
        s.cache_hits.fetch_add(3, Relaxed);
        s.add_error(PlacementFailure::Timeout, 2);
        s.add_rejection(Scope::Cluster);
        s.breaker_state.store(1, Relaxed);
        let mut out = String::new();
        s.render(&mut out);
        for line in [
            format!("{CONTROLPLANE_CACHE_HITS} 3"),
            format!("{CONTROLPLANE_ERRORS}{{reason=\"timeout\"}} 2"),
            format!("{CONTROLPLANE_ERRORS}{{reason=\"admission\"}} 1"),
            format!("{ADMISSION_REJECTIONS}{{scope=\"cluster\"}} 1"),
            format!("{ADMISSION_REJECTIONS}{{scope=\"repl\"}} 0"),
            format!("{CONTROLPLANE_BREAKER_STATE} 1"),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(out.contains(&format!("# HELP {name} ")), "{name}");
        }
    }
}
