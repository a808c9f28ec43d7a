//! eval-proxy: an io_uring, thread-per-core reverse WebSocket proxy between
//! users' clients and Conman, the container manager that runs their session.
//!
//! # Layout
//! Data flows top to bottom:
//! - [`shard`]: one pinned thread per core, each with its own io_uring loop,
//!   provided-buffer ring and `SO_REUSEPORT` listener. Performs the
//!   operations sessions ask for and feeds the results back; its op table
//!   owns every byte the kernel can see until the completion. No protocol
//!   decision lives here.
//! - [`session`]: one session's life as a sans-IO state machine (`handle_*`
//!   in, operations out, `now` passed in): setup, retries, relay, splice
//!   steps, Close logic, keepalive Pings and dead-peer timeouts, the
//!   access log line.
//! - [`proto`]: sans-IO protocol code: the HTTP/1.1 upgrade, the WebSocket
//!   handshake both ways, frame headers, the per-direction relay tracker,
//!   close codes. Bytes and time in, decisions out; no sockets, no clock.
//! - [`tls`]: certificates and the rustls server config of a `wss://`
//!   listener (the per-session TLS transport is in [`session`]).
//! - [`token`]: PASETO v4.public: verification (pure), minting, key files.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `POST /drain`, the
//!   session registry (`/sessions`, `/vms`), bearer-token authentication.
//! - [`metrics`]: per-shard counters merged on read; every metric name.
//! - [`config`], [`error`]: the TOML config and the setup-stage error.
//! - [`reload`]: the config in force, replaced on SIGHUP.
//! - [`revocations`]: the revocations in force (admin API, file, the
//!   Controlplane sync), checked by every shard.
//! - [`control::drain`], [`control::handover`]: drain phases and listener
//!   handover to a new binary.
//! - [`dev`]: the embedded fake Conman behind `eval-proxy --dev`, also used
//!   by `eval-loadgen conman` and the tests.
//! - [`doctor`]: `eval-proxy doctor`, the host against a tuning profile.

pub mod admin;
pub mod config;
pub mod control;
pub mod dev;
pub mod doctor;
pub mod error;
pub mod keys;
pub(crate) mod log_every;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod revocations;
pub mod server;
pub mod session;
pub mod shard;
pub mod tls;
pub mod token;
