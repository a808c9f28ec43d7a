//! The access log: one `info` line per session attempt, when it ends
//! (`eval_proxy::access` target): who (ids, never the token), where
//! (VM, shard, client address, the client certificate's verified subject
//! with `tls.client_ca`), how long, how much each way, and how it
//! ended on each side, or at which stage and why its setup failed.

use std::time::Instant;

use super::{Env, Session, Who};
use crate::error::SetupError;

/// What ended a relaying session, first cause only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum End {
    #[default]
    Open,
    /// A Close frame from the client or from Conman began the end.
    ClientClose,
    ConmanClose,
    /// Its connection ended without a Close.
    ClientGone,
    ConmanLost,
    /// Silent past `keepalive.timeout_s`.
    ClientTimeout,
    ConmanTimeout,
    /// No data past `limits.idle_timeout_s`.
    IdleTimeout,
    /// A protocol violation.
    ClientViolation,
    ConmanViolation,
    /// Drain grace over, or any other end the proxy decided.
    Proxy,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Open => "open",
            End::ClientClose => "client_close",
            End::ConmanClose => "conman_close",
            End::ClientGone => "client_gone",
            End::ConmanLost => "conman_lost",
            End::ClientTimeout => "client_timeout",
            End::ConmanTimeout => "conman_timeout",
            End::IdleTimeout => "idle_timeout",
            End::ClientViolation => "client_protocol_error",
            End::ConmanViolation => "conman_protocol_error",
            End::Proxy => "proxy",
        }
    }

    /// Which party ended the session.
    pub fn by(self) -> &'static str {
        match self {
            End::ClientClose | End::ClientGone | End::ClientViolation => "client",
            End::ConmanClose | End::ConmanLost | End::ConmanViolation => "conman",
            End::Open => "",
            _ => "proxy",
        }
    }
}

/// The Close a side received, and from whom: `(code, by)`, or `(0, "")`.
fn received(proxy_code: u16, peer_code: Option<u16>, peer: &'static str) -> (u16, &'static str) {
    match (proxy_code, peer_code) {
        (0, Some(code)) => (code, peer),
        (0, None) => (0, ""),
        (code, _) => (code, "proxy"),
    }
}

/// A session id as Conman sees it in `X-Eval-Session`: 16 hex digits (a
/// string in JSON, where a 64-bit number would lose digits).
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Session {
    /// Records the first cause of a relaying session's end.
    pub(super) fn ended(&mut self, why: End) {
        if self.end == End::Open {
            self.end = why;
        }
    }

    /// The proxy queued a Close with `code` toward `to`.
    pub(super) fn note_proxy_close(&mut self, to: Who, code: u16) {
        let i = match to {
            Who::Client => 0,
            Who::Conman => 1,
        };
        if self.proxy_close[i] == 0 {
            self.proxy_close[i] = code;
        }
    }

    /// The verified subject of the client's certificate (`tls.client_ca`),
    /// or "".
    fn client_cert(&self) -> String {
        self.tls
            .as_deref()
            .and_then(|t| t.client.as_ref())
            .and_then(|t| t.peer_subject())
            .unwrap_or_default()
    }

    fn duration_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    /// The line for a session that relayed, once both its sockets are closed.
    pub(super) fn log_ended(&self, env: &Env) {
        let (repl, user) = self
            .ident
            .as_ref()
            .map_or(("", ""), |i| (i.repl(), i.user()));
        let (client_close, client_close_by) =
            received(self.proxy_close[0], self.to_client.close_code(), "conman");
        let (conman_close, conman_close_by) =
            received(self.proxy_close[1], self.to_conman.close_code(), "client");
        tracing::info!(
            target: "eval_proxy::access",
            session = %SessionId(self.id),
            repl,
            user,
            vm = self.vm.as_deref().unwrap_or(""),
            shard = env.shard,
            client = %self.client_ip.map_or_else(String::new, |ip| ip.to_string()),
            client_cert = %self.client_cert(),
            duration_ms = self.duration_ms(env.now),
            bytes_from_client = self.bytes[0],
            bytes_from_conman = self.bytes[1],
            client_close,
            client_close_by,
            conman_close,
            conman_close_by,
            end = self.end.as_str(),
            ended_by = self.end.by(),
            "session ended"
        );
    }

    /// The line for a session whose setup failed for good (after its
    /// token was checked): the stage and reason, as in the metrics.
    pub(super) fn log_setup_failed(&self, env: &Env, err: &SetupError, vm: Option<&str>) {
        let (repl, user) = self
            .ident
            .as_ref()
            .map_or(("", ""), |i| (i.repl(), i.user()));
        tracing::info!(
            target: "eval_proxy::access",
            session = %SessionId(self.id),
            repl,
            user,
            vm = vm.unwrap_or(""),
            shard = env.shard,
            client = %self.client_ip.map_or_else(String::new, |ip| ip.to_string()),
            client_cert = %self.client_cert(),
            duration_ms = self.duration_ms(env.now),
            stage = err.stage.as_str(),
            reason = err.reason,
            "session setup failed"
        );
    }
}
