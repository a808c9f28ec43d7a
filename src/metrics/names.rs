//! Every metric name in one place (sozu `metrics/names.rs`), so dashboards
//! and alerts have one file to read.

pub const CONNECTIONS_ACCEPTED: &str = "eval_connections_accepted_total";
pub const SESSION_ATTEMPTS: &str = "eval_session_attempts_total";
pub const SESSIONS_ESTABLISHED: &str = "eval_sessions_established_total";
pub const SETUP_FAILURES: &str = "eval_session_setup_failures_total";
pub const SESSIONS_ACTIVE: &str = "eval_sessions_active";
pub const SETUP_DURATION: &str = "eval_setup_duration_seconds";
pub const RELAY_BYTES: &str = "eval_relay_bytes_total";
pub const RELAY_FRAMES: &str = "eval_relay_frames_total";
pub const RELAY_SPLICED_BYTES: &str = "eval_relay_spliced_bytes_total";
pub const CLOSE_CODES: &str = "eval_close_codes_total";
pub const HTTP_RESPONSES: &str = "eval_http_responses_total";
pub const BUFFER_EXHAUSTED: &str = "eval_buffer_ring_exhausted_total";
pub const BACKPRESSURE_PAUSES: &str = "eval_backpressure_pauses_total";
pub const CONMAN_ATTEMPT_FAILURES: &str = "eval_conman_attempt_failures_total";
