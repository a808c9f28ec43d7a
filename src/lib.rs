//! eval-proxy: an io_uring, thread-per-core reverse WebSocket proxy between
//! users' clients and Conman, the container manager that runs their session.
//!
//! # Layout
//! Data flows top to bottom:
//! - [`shard`]: one pinned thread per core, each with its own io_uring loop,
//!   provided-buffer ring and `SO_REUSEPORT` listener. Drives sessions from
//!   completions; does all the IO.
//! - [`session`]: one session's state (phase, both sockets, queues,
//!   trackers) and the pure decisions about it.
//! - [`proto`]: sans-IO protocol code: the HTTP/1.1 upgrade, the WebSocket
//!   handshake both ways, frame headers, the per-direction relay tracker,
//!   close codes. Bytes and time in, decisions out; no sockets, no clock.
//! - [`token`]: PASETO v4.public verification (pure).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `POST /drain`.
//! - [`metrics`]: per-shard counters merged on read; every metric name.
//! - [`config`], [`error`]: the TOML config and the setup-stage error.
//! - [`dev`]: the embedded fake Conman behind `eval-proxy --dev`, also used
//!   by `eval-loadgen conman` and the tests.

pub mod admin;
pub mod config;
pub mod control;
pub mod dev;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod session;
pub mod shard;
pub mod token;
