//! Every metric name in one place (sozu `metrics/names.rs`), so dashboards
//! and alerts have one file to read. [`ALL`] lists each with its type; the
//! tests hold the names to Prometheus conventions and `/metrics` to this
//! list (`admin` tests: every name exported, with its type, and nothing
//! else).

/// A metric's Prometheus `# TYPE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

// Data shards (`metrics::render`).
pub const CONNECTIONS_ACCEPTED: &str = "eval_connections_accepted_total";
pub const ACCEPT_ERRORS: &str = "eval_accept_errors_total";
pub const SESSION_ATTEMPTS: &str = "eval_session_attempts_total";
pub const SESSIONS_ESTABLISHED: &str = "eval_sessions_established_total";
pub const CLIENT_FAULT_REJECTIONS: &str = "eval_session_client_fault_rejections_total";
pub const SETUP_FAILURES: &str = "eval_session_setup_failures_total";
pub const SESSIONS_ACTIVE: &str = "eval_sessions_active";
pub const SETUP_DURATION: &str = "eval_setup_duration_seconds";
pub const RELAY_BYTES: &str = "eval_relay_bytes_total";
pub const RELAY_FRAMES: &str = "eval_relay_frames_total";
pub const RELAY_SPLICED_BYTES: &str = "eval_relay_spliced_bytes_total";
pub const CLOSE_CODES: &str = "eval_close_codes_total";
pub const RELAY_TORN_FRAMES: &str = "eval_relay_torn_frames_total";
pub const HTTP_RESPONSES: &str = "eval_http_responses_total";
pub const BUFFER_EXHAUSTED: &str = "eval_buffer_ring_exhausted_total";
pub const TLS_POOL_EXHAUSTED: &str = "eval_tls_buffer_pool_exhausted_total";
pub const BACKPRESSURE_PAUSES: &str = "eval_backpressure_pauses_total";
pub const BUDGET_PAUSES: &str = "eval_buffer_budget_pauses_total";
pub const BUFFERED_BYTES: &str = "eval_buffered_bytes";
pub const CONMAN_ATTEMPT_FAILURES: &str = "eval_conman_attempt_failures_total";
pub const KEEPALIVE_PINGS: &str = "eval_keepalive_pings_total";
pub const KEEPALIVE_PONGS: &str = "eval_keepalive_pongs_total";
pub const PEER_TIMEOUTS: &str = "eval_peer_timeouts_total";
pub const SESSIONS_REVOKED: &str = "eval_sessions_revoked_total";
pub const HANDOFF_MOVED: &str = "eval_handoff_sessions_moved_total";
pub const HANDOFF_FALLBACKS: &str = "eval_handoff_sessions_fallen_back_total";
pub const HANDOFF_ADOPTED: &str = "eval_handoff_sessions_adopted_total";
pub const HANDOFF_REFUSED: &str = "eval_handoff_sessions_refused_total";
pub const HANDOFF_PAUSE: &str = "eval_handoff_pause_seconds";

// The process (`admin`).
pub const DRAINING: &str = "eval_draining";
pub const DRAIN_PHASE: &str = "eval_drain_phase";
pub const CONFIG_RELOADS: &str = "eval_config_reloads_total";
pub const CONFIG_RELOAD_FAILURES: &str = "eval_config_reload_failures_total";
pub const DRAIN_SESSIONS_LEFT: &str = "eval_drain_sessions_left";
pub const TOKEN_KEY_RELOADS: &str = "eval_token_key_reloads_total";
pub const REVOCATIONS_IN_FORCE: &str = "eval_revocations_in_force";
pub const REVOCATION_SYNC_FAILURES: &str = "eval_revocation_sync_failures_total";
pub const VM_EVACUATED: &str = "eval_vm_evacuated";

// The control shard (`control::ControlStats::render`).
pub const CONTROLPLANE_REQUESTS: &str = "eval_controlplane_requests_total";
pub const CONTROLPLANE_CACHE_HITS: &str = "eval_controlplane_cache_hits_total";
pub const CONTROLPLANE_CACHE_MISSES: &str = "eval_controlplane_cache_misses_total";
pub const CONTROLPLANE_COALESCED: &str = "eval_controlplane_coalesced_total";
pub const CONTROLPLANE_ERRORS: &str = "eval_controlplane_errors_total";
pub const CONTROLPLANE_BREAKER_STATE: &str = "eval_controlplane_breaker_state";
pub const ADMISSION_REJECTIONS: &str = "eval_admission_rejections_total";

/// Every name above with its type.
pub const ALL: &[(&str, Kind)] = &[
    (CONNECTIONS_ACCEPTED, Kind::Counter),
    (ACCEPT_ERRORS, Kind::Counter),
    (SESSION_ATTEMPTS, Kind::Counter),
    (SESSIONS_ESTABLISHED, Kind::Counter),
    (CLIENT_FAULT_REJECTIONS, Kind::Counter),
    (SETUP_FAILURES, Kind::Counter),
    (SESSIONS_ACTIVE, Kind::Gauge),
    (SETUP_DURATION, Kind::Histogram),
    (RELAY_BYTES, Kind::Counter),
    (RELAY_FRAMES, Kind::Counter),
    (RELAY_SPLICED_BYTES, Kind::Counter),
    (CLOSE_CODES, Kind::Counter),
    (RELAY_TORN_FRAMES, Kind::Counter),
    (HTTP_RESPONSES, Kind::Counter),
    (BUFFER_EXHAUSTED, Kind::Counter),
    (TLS_POOL_EXHAUSTED, Kind::Counter),
    (BACKPRESSURE_PAUSES, Kind::Counter),
    (BUDGET_PAUSES, Kind::Counter),
    (BUFFERED_BYTES, Kind::Gauge),
    (CONMAN_ATTEMPT_FAILURES, Kind::Counter),
    (KEEPALIVE_PINGS, Kind::Counter),
    (KEEPALIVE_PONGS, Kind::Counter),
    (PEER_TIMEOUTS, Kind::Counter),
    (SESSIONS_REVOKED, Kind::Counter),
    (HANDOFF_MOVED, Kind::Counter),
    (HANDOFF_FALLBACKS, Kind::Counter),
    (HANDOFF_ADOPTED, Kind::Counter),
    (HANDOFF_REFUSED, Kind::Counter),
    (HANDOFF_PAUSE, Kind::Histogram),
    (DRAINING, Kind::Gauge),
    (DRAIN_PHASE, Kind::Gauge),
    (CONFIG_RELOADS, Kind::Counter),
    (CONFIG_RELOAD_FAILURES, Kind::Counter),
    (DRAIN_SESSIONS_LEFT, Kind::Gauge),
    (TOKEN_KEY_RELOADS, Kind::Counter),
    (REVOCATIONS_IN_FORCE, Kind::Gauge),
    (REVOCATION_SYNC_FAILURES, Kind::Counter),
    (VM_EVACUATED, Kind::Gauge),
    (CONTROLPLANE_REQUESTS, Kind::Counter),
    (CONTROLPLANE_CACHE_HITS, Kind::Counter),
    (CONTROLPLANE_CACHE_MISSES, Kind::Counter),
    (CONTROLPLANE_COALESCED, Kind::Counter),
    (CONTROLPLANE_ERRORS, Kind::Counter),
    (CONTROLPLANE_BREAKER_STATE, Kind::Gauge),
    (ADMISSION_REJECTIONS, Kind::Counter),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let mut seen = BTreeSet::new();
        for &(name, kind) in ALL {
            assert!(seen.insert(name), "{name} declared twice");
            let rest = name.strip_prefix("eval_").unwrap_or("");
            assert!(
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name} does not match ^eval_[a-z_]+$"
            );
            assert_eq!(
                name.ends_with("_total"),
                kind == Kind::Counter,
                "{name}: counters, and only counters, end in _total"
            );
        }
    }

    /// A constant left out of `ALL` would escape every other check.
    #[test]
    fn every_name_in_this_file_is_in_all() {
        let src = include_str!("names.rs");
        let declared: BTreeSet<&str> = src
            .lines()
            .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \""))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        let listed: BTreeSet<&str> = ALL.iter().map(|&(n, _)| n).collect();
        assert_eq!(declared, listed);
    }
}
