//! From the first byte to relaying: the PROXY header, the upgrade request,
//! admission (Origin, caps), the token verdict, placement, the Conman
//! connect and handshake, retries with backoff, and failing a setup with the
//! Close (or HTTP status) that names its stage.
//!
//! Bytes that follow the request head in the same stream are the client's
//! first WebSocket bytes: they are held and later pass through the relay's
//! tracker like any others. RFC 6455 §4.1 has a client wait for the 101
//! before it sends anything, but refusing early would gain nothing, since a
//! client can send the same bytes a moment after its 101; and the tracker
//! already refuses what cannot be a client frame. A second HTTP request
//! pipelined behind the upgrade is such bytes: it is ASCII, so whatever its
//! first byte says (`G` is a reserved opcode), its second has the mask bit
//! clear, and the session fails with 1002 before a byte of it is relayed.
//! Conman gets the proxy's upgrade and then a Close (1001), never the
//! request (`tests/hostile.rs`).

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::{backoff, tls, Env, Kind, Op, Phase, Refused, Session, Setup, Side, Verify, Who};
use crate::config::{Config, RejectWith, UpgradeMode};
use crate::control::wire::{Found, PlacementFailure, PlacementResult};
use crate::error::{SetupError, Stage};
use crate::keys::Ident;
use crate::metrics::{CloseSide, Phase as Timing, ShardStats};
use crate::proto::frame::write_close;
use crate::proto::handshake::{self, accept_key, choose_protocol, new_client_key, AcceptKey};
use crate::proto::http1::{self, Route, UpgradeRequest};
use crate::proto::proxy_header;
use crate::proto::relay::{Direction, Tracker, TrackerConfig};

pub fn head_limits(cfg: &Config) -> http1::Limits {
    http1::Limits {
        max_request_line: cfg.limits.max_request_line,
        max_head: cfg.limits.max_head,
        max_headers: cfg.limits.max_headers,
    }
}

/// An upgrade request turned away by a rule of ours rather than by its
/// syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// 403: its Origin is not in `websocket.allowed_origins`.
    Origin,
    /// 503: this shard has `limits.max_sessions_per_shard` sessions.
    ShardFull,
    /// 429: its address is over a per-address limit.
    PerIp(Refused),
}

impl Refusal {
    fn status(self) -> u16 {
        match self {
            Refusal::Origin => 403,
            Refusal::ShardFull => 503,
            Refusal::PerIp(_) => 429,
        }
    }

    fn error(self) -> SetupError {
        match self {
            Refusal::Origin => SetupError::new(Stage::Request, "origin_not_allowed"),
            Refusal::ShardFull => SetupError::new(Stage::Admission, "shard_full"),
            Refusal::PerIp(Refused::Sessions) => {
                SetupError::new(Stage::Admission, "per_ip_sessions")
            }
            Refusal::PerIp(Refused::Rate(_)) => SetupError::new(Stage::Admission, "per_ip_rate"),
        }
    }

    /// An Origin we do not serve, or an address over its own allowance, is
    /// the client's doing and stays out of the success rate; a full shard
    /// is ours and counts against it.
    fn client_fault(self) -> bool {
        self != Refusal::ShardFull
    }

    /// Seconds for Retry-After: when the address's next handshake token
    /// comes; otherwise (a slot must free up, no telling when) 1 to 5 s at
    /// random, so that refused clients do not come back all at once.
    fn retry_after_s(self, unit: f64) -> Option<u64> {
        match self {
            Refusal::Origin => None,
            Refusal::PerIp(Refused::Rate(wait)) => Some(
                wait.map_or(u64::from(u32::MAX), |w| w.as_secs_f64().ceil() as u64)
                    .max(1),
            ),
            Refusal::ShardFull | Refusal::PerIp(Refused::Sessions) => {
                Some(1 + (unit.clamp(0.0, 1.0) * 4.0).round() as u64)
            }
        }
    }
}

impl Session {
    /// Client bytes while reading the PROXY header. Once it is complete its
    /// source (if it names one) becomes the client, and what follows it is
    /// the request head.
    pub(super) fn on_proxy_bytes(&mut self, env: &mut Env, bytes: &[u8]) {
        let Phase::ProxyHeader(buf) = &mut self.phase else {
            return;
        };
        buf.extend_from_slice(bytes);
        match proxy_header::parse(buf) {
            Ok(None) => {}
            Ok(Some(header)) => {
                let rest = buf.split_off(header.len);
                if let Some(source) = header.source {
                    self.client_ip = Some(source.ip());
                }
                if self.speaks_tls(Who::Client) {
                    // What follows the header is the TLS handshake.
                    self.transition(env.now, |_| Phase::Head(Vec::new()));
                    self.on_tls_bytes(env, Who::Client, &rest);
                } else {
                    self.transition(env.now, |_| Phase::Head(rest));
                    self.on_head_bytes(env, &[]);
                }
            }
            Err(e) => {
                tracing::debug!(session = self.id, peer = ?self.client_ip, err = %e, "bad PROXY header");
                self.refuse_connection(env, e.as_str());
            }
        }
    }

    /// Ends a connection without a word: it came from a peer that may not
    /// send a PROXY header, or its header was missing, malformed or late.
    /// No request was read, so it is no session attempt, and the success
    /// rate does not see it; the failure metric does. What the peer sent
    /// is not read: the socket closes as soon as its receive is cancelled.
    pub(super) fn refuse_connection(&mut self, env: &mut Env, reason: &'static str) {
        env.stats.setup_failure(Stage::Request, reason, false);
        tracing::debug!(session = self.id, peer = ?self.client_ip, reason, "connection refused");
        self.begin_closing(env);
        self.client.eof = true;
        self.client.shut = true;
    }

    /// Client bytes while reading the head.
    pub(super) fn on_head_bytes(&mut self, env: &mut Env, bytes: &[u8]) {
        let Phase::Head(head) = &mut self.phase else {
            return;
        };
        let parsed = http1::parse_request(head_input(head, bytes), &head_limits(env.cfg));
        match parsed {
            Ok(None) => {
                head_rest(head, bytes, None);
            }
            Err(e) => {
                let status = e.status();
                if status != 404 {
                    ShardStats::inc(&env.stats.attempts);
                    env.stats.setup_failure(Stage::Request, e.as_str(), true);
                }
                tracing::debug!(
                    session = self.id,
                    client = ?self.client_ip,
                    status,
                    reason = e.reason(),
                    "bad request"
                );
                let mut out = Vec::new();
                http1::write_error(&mut out, &e);
                self.answer_and_close(env, status, out);
            }
            Ok(Some((Route::Healthz, _))) => {
                let mut out = Vec::new();
                http1::write_healthz(&mut out);
                self.answer_and_close(env, 200, out);
            }
            Ok(Some((Route::WebSocket(req), head_len))) => {
                let held = head_rest(head, bytes, Some(head_len));
                if let Err(refusal) = self.admit(env, &req) {
                    self.refuse(env, refusal);
                    return;
                }
                self.transition(env.now, |_| Phase::Verify(Box::new(Verify { req, held })));
                env.op(Op::Verify);
            }
        }
    }

    fn answer_and_close(&mut self, env: &mut Env, status: u16, out: Vec<u8>) {
        env.stats.http_response(status);
        self.client.push_owned(out);
        self.begin_closing(env);
    }

    /// The checks between a valid upgrade head and its token, before any
    /// token is verified (the costly part of a handshake): the Origin
    /// allowlist, this shard's session cap, then the client address's
    /// handshake rate and session cap. A refusal takes nothing from any
    /// limit; an admission holds a place in both counts until the session
    /// finishes ([`Session::leave_gate`]).
    fn admit(&mut self, env: &mut Env, req: &UpgradeRequest) -> Result<(), Refusal> {
        if !origin_allowed(&env.cfg.websocket.allowed_origins, req.origin.as_deref()) {
            return Err(Refusal::Origin);
        }
        let cap = env.cfg.limits.max_sessions_per_shard;
        if cap > 0 && env.gate.sessions >= cap {
            return Err(Refusal::ShardFull);
        }
        // A peer whose address could not be read was gone by its accept;
        // it is not counted, and its session ends on its own.
        if let (Some(table), Some(ip)) = (&env.gate.per_ip, self.client_ip) {
            table.admit(ip, env.now).map_err(Refusal::PerIp)?;
            self.holds_ip_slot = true;
        }
        env.gate.sessions += 1;
        self.admitted = true;
        Ok(())
    }

    /// The session has finished: its places in the shard's count and its
    /// address's entry are free again.
    pub(super) fn leave_gate(&mut self, env: &mut Env) {
        if !std::mem::take(&mut self.admitted) {
            return;
        }
        env.gate.sessions = env.gate.sessions.saturating_sub(1);
        if std::mem::take(&mut self.holds_ip_slot) {
            if let (Some(table), Some(ip)) = (&env.gate.per_ip, self.client_ip) {
                table.release(ip, env.now);
            }
        }
    }

    /// An HTTP answer before the upgrade, with Retry-After where another
    /// attempt later may pass; the body is the machine-readable
    /// `stage=…;reason=…` a Close would carry.
    fn refuse(&mut self, env: &mut Env, refusal: Refusal) {
        let e = refusal.error();
        ShardStats::inc(&env.stats.attempts);
        env.stats
            .setup_failure(e.stage, e.reason, refusal.client_fault());
        tracing::debug!(
            session = self.id,
            client = ?self.client_ip,
            stage = e.stage.as_str(),
            reason = e.reason,
            "upgrade refused"
        );
        let status = refusal.status();
        let mut out = Vec::new();
        match refusal.retry_after_s(env.rng.gen()) {
            Some(after) => http1::write_status_retry(&mut out, status, &e.close_reason(), after),
            None => http1::write_status(&mut out, status, &e.close_reason()),
        }
        self.answer_and_close(env, status, out);
    }

    /// The token's verdict: identity, or the reason it was rejected.
    pub fn handle_token(&mut self, env: &mut Env, verdict: Result<Arc<Ident>, &'static str>) {
        let Phase::Verify(v) = &mut self.phase else {
            return;
        };
        ShardStats::inc(&env.stats.attempts);
        let accept = accept_key(&v.req.key);
        let held = std::mem::take(&mut v.held);
        let ident = match verdict {
            Ok(c) => c,
            Err(reason) => {
                env.stats.setup_failure(Stage::Token, reason, true);
                tracing::debug!(session = self.id, reason, "token rejected");
                self.log_setup_failed(env, &SetupError::new(Stage::Token, reason), None);
                let mut out = Vec::new();
                match env.cfg.token.reject_with {
                    RejectWith::Http => {
                        http1::write_status(&mut out, 401, &format!("token rejected: {reason}"));
                        env.stats.http_response(401);
                    }
                    RejectWith::Close => {
                        http1::write_switching_protocols(&mut out, &accept, None, None);
                        let e = SetupError::new(Stage::Token, reason);
                        write_close(&mut out, e.close_code(), &e.close_reason(), None);
                        env.stats
                            .close_code(CloseSide::ProxyToClient, e.close_code());
                        self.injected_close_to_client = true;
                    }
                }
                self.client.push_owned(out);
                self.begin_closing(env);
                self.advance(env);
                return;
            }
        };
        let req = &mut v.req;
        let upstream_first = env.cfg.websocket.mode == UpgradeMode::UpstreamFirst;
        let protocol = if upstream_first {
            None
        } else {
            let p =
                choose_protocol(&req.protocols, &env.cfg.websocket.subprotocols).map(str::to_owned);
            let mut out = Vec::new();
            http1::write_switching_protocols(&mut out, &accept, p.as_deref(), None);
            self.client.push_owned(out);
            p
        };
        // A client's own X-Forwarded-For is believed only from a trusted
        // proxy in front of us; anyone else could claim any address. Behind
        // a PROXY header the request's sender is the client it names, not
        // the balancer (which does not touch HTTP).
        let trusted = env.cfg.listen.trusts(self.client_ip);
        let claimed_forwarded_for = req.x_forwarded_for.take().filter(|_| trusted);
        let setup = Box::new(Setup {
            phase_started: env.now,
            deadline: env.now + Duration::from_millis(env.cfg.limits.setup_timeout_ms),
            attempt: 0,
            seq: 0,
            vm: None,
            exclude: Vec::new(),
            backoff_done: false,
            last_error: None,
            expected_accept: AcceptKey::default(),
            request: Vec::new(),
            protocol,
            claimed_forwarded_for,
            client_accept: upstream_first.then_some(accept),
            offered_protocols: if upstream_first {
                std::mem::take(&mut req.protocols)
            } else {
                Vec::new()
            },
            offered_extensions: if upstream_first {
                req.extensions.take()
            } else {
                None
            },
            head: Vec::new(),
            held,
        });
        self.ident = Some(ident);
        self.transition(env.now, |_| Phase::Placement(setup));
        self.request_placement(env);
        if self.held_len() >= env.cfg.limits.held_bytes {
            self.pause_recv(env, Who::Client);
        }
        self.advance(env);
    }

    fn held_len(&self) -> usize {
        match &self.phase {
            Phase::Verify(v) => v.held.len(),
            p => p.setup().map_or(0, |st| st.held.len()),
        }
    }

    /// Client bytes received before relaying: kept, in order, up to
    /// `limits.held_bytes`; beyond that the client is not read.
    pub(super) fn hold(&mut self, env: &mut Env, bytes: &[u8]) {
        match &mut self.phase {
            Phase::Verify(v) => v.held.extend_from_slice(bytes),
            p => {
                if let Some(st) = p.setup_mut() {
                    st.held.extend_from_slice(bytes);
                }
            }
        }
        if self.held_len() >= env.cfg.limits.held_bytes {
            self.pause_recv(env, Who::Client);
        }
    }

    /// Asks where the session's repl lives (again, after a failed attempt:
    /// excluding every VM that failed). Called in `Placement` (first ask) or
    /// `Backoff` (retry).
    fn request_placement(&mut self, env: &mut Env) {
        if self.kind() == Kind::Backoff {
            self.step(env.now, Phase::Placement);
        }
        let Phase::Placement(st) = &mut self.phase else {
            return;
        };
        st.seq = st.seq.wrapping_add(1);
        st.backoff_done = false;
        let op = Op::Placement {
            seq: st.seq,
            attempt: st.attempt,
            exclude: st.exclude.clone(),
        };
        let deadline = st.deadline;
        self.set_deadline(deadline);
        env.op(op);
    }

    /// The answer to `Op::Placement { seq, .. }`; stale answers are ignored.
    pub fn handle_placement(&mut self, env: &mut Env, seq: u16, result: PlacementResult) {
        let last_error = match &self.phase {
            Phase::Placement(st) if st.seq == seq => st.last_error,
            _ => return,
        };
        env.stats
            .setup_duration(Timing::Controlplane, self.in_phase(env.now));
        match result {
            PlacementResult::Found(found) => self.connect(env, found),
            PlacementResult::Failed {
                reason,
                retry_after_ms,
            } => {
                // No VM left on a retry: every one failed this session, and
                // the last Conman error says why better than "no capacity".
                let e = match last_error {
                    Some(e) if reason == PlacementFailure::NoCapacity => e,
                    _ => {
                        let mut e = SetupError::new(Stage::Controlplane, reason.as_str());
                        e.retry_after_ms = retry_after_ms;
                        e
                    }
                };
                self.fail_setup(env, e);
            }
        }
        self.advance(env);
    }

    /// The control shard is gone: a session waiting for a placement fails.
    pub fn handle_control_lost(&mut self, env: &mut Env) {
        if self.kind() == Kind::Placement {
            let e = SetupError::new(Stage::Controlplane, "control_unavailable");
            self.fail_setup(env, e);
            self.advance(env);
        }
    }

    fn connect(&mut self, env: &mut Env, found: Arc<Found>) {
        let key = new_client_key(env.rng.gen());
        let mut hex = [0u8; 16];
        for (i, b) in hex.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[(self.id >> (60 - 4 * i)) as usize & 15];
        }
        let mut ip_buf = [0u8; 64];
        let ip = self.client_ip.map(|ip| ip_text(ip, &mut ip_buf));
        let (Some(ident), Phase::Placement(st)) = (self.ident.as_ref(), &mut self.phase) else {
            return;
        };
        let joined;
        let forwarded_for = match (&st.claimed_forwarded_for, ip) {
            (Some(prev), Some(ip)) => {
                joined = format!("{prev}, {ip}");
                joined.as_str()
            }
            (None, Some(ip)) => ip,
            (Some(prev), None) => prev.as_str(),
            (None, None) => "",
        };
        let mut request = Vec::with_capacity(512);
        let protocols: &[String] = if st.client_accept.is_some() {
            &st.offered_protocols
        } else {
            st.protocol.as_slice()
        };
        let extra = [
            (
                "X-Eval-Session",
                std::str::from_utf8(&hex).unwrap_or_default(),
            ),
            ("X-Repl-Id", ident.repl()),
            ("X-User", ident.user()),
            ("X-Forwarded-For", forwarded_for),
        ];
        let with_xff = if forwarded_for.is_empty() { 3 } else { 4 };
        handshake::write_conman_request(
            &mut request,
            &found.host,
            &found.path,
            &key,
            protocols,
            st.offered_extensions.as_deref(),
            &extra[..with_xff],
        );
        st.expected_accept = accept_key(&key);
        st.request = request;
        st.vm = Some(Arc::clone(&found));
        st.attempt = st.attempt.saturating_add(1);
        let deadline = st.deadline;
        if let Err(reason) = self.conman_transport(env, found.tls.as_deref()) {
            // Nothing about the VM: our own config cannot reach it.
            self.fail_setup(env, SetupError::new(Stage::ConmanTls, reason));
            return;
        }
        self.step(env.now, Phase::Connecting);
        // Each attempt's connect gets its own timeout within the setup's;
        // at it, `setup_timeout` cancels the connect and tries again.
        self.set_deadline(
            deadline.min(env.now + Duration::from_millis(env.cfg.limits.connect_timeout_ms)),
        );
        env.op(Op::Connect {
            addr: found.addr,
            keepalive: !super::defer_tcp_keepalive(env.cfg),
        });
    }

    /// A TLS transport for this attempt when Conman's URL is `wss://`
    /// (`tls`: the name to verify), or none; the last attempt's goes.
    fn conman_transport(&mut self, env: &Env, tls: Option<&str>) -> Result<(), &'static str> {
        // A plaintext client's box goes with its last Conman transport:
        // the box's presence is what turns splice off.
        match self.tls.as_deref_mut() {
            Some(t) if t.client.is_some() => t.conman = None,
            _ => self.tls = None,
        }
        let Some(name) = tls else {
            return Ok(());
        };
        // The session's failed-setup line and the counters say it; a line
        // per session here would flood the log from a misconfiguration.
        let Some(cfg) = &env.cfg.conman.tls.client else {
            tracing::debug!(
                session = self.id,
                "a wss:// Conman URL, and no conman.tls.ca_file"
            );
            return Err("no_ca");
        };
        let t = tls::Transport::conman(cfg, name).map_err(|e| {
            tracing::debug!(session = self.id, err = %e, "no TLS to this Conman");
            "bad_name"
        })?;
        self.tls.get_or_insert_with(Box::default).conman = Some(Box::new(t));
        Ok(())
    }

    /// The socket for `Op::Connect`: its fd, or the errno of socket(2).
    /// Returns whether the session took the socket: the shard connects it
    /// only then (and closes it otherwise).
    #[must_use]
    pub fn handle_socket(&mut self, env: &mut Env, res: Result<std::os::fd::RawFd, i32>) -> bool {
        if self.kind() != Kind::Connecting {
            debug_assert!(false, "socket outside Connecting");
            return false;
        }
        match res {
            Ok(fd) => {
                self.conman = Side::new(fd);
                // The connect is in flight on it.
                self.conman.inflight = 1;
                // Decided as for the connect (`Op::Connect`), which the
                // shard performs in the same turn, under the same config.
                self.conman.tcp_keepalive_due = super::defer_tcp_keepalive(env.cfg);
                true
            }
            Err(errno) => {
                let reason = match errno {
                    libc::EMFILE | libc::ENFILE => crate::error::OUT_OF_FDS,
                    _ => "socket",
                };
                self.fail_setup(env, SetupError::new(Stage::ConmanConnect, reason));
                self.advance(env);
                false
            }
        }
    }

    /// The connect completed (0) or failed (-errno; -ECANCELED when the
    /// session cancelled it, by which time it has left `Connecting`).
    pub fn handle_connected(&mut self, env: &mut Env, res: i32) {
        self.conman.done_op();
        if self.kind() == Kind::Connecting {
            if res < 0 {
                let reason = match -res {
                    libc::ECONNREFUSED => "refused",
                    libc::ECANCELED | libc::ETIMEDOUT => "timeout",
                    libc::ENETUNREACH | libc::EHOSTUNREACH => "unreachable",
                    libc::ECONNRESET => "reset",
                    _ => "error",
                };
                self.retry_or_fail(env, SetupError::new(Stage::ConmanConnect, reason));
            } else {
                self.connected(env);
            }
        }
        self.advance(env);
    }

    fn connected(&mut self, env: &mut Env) {
        env.stats
            .setup_duration(Timing::ConmanDial, self.in_phase(env.now));
        self.step(env.now, Phase::ConmanHandshake);
        // Each attempt's handshake gets the connect timeout too, so a Conman
        // that stalls before its 101 does not eat the whole setup deadline;
        // over TLS, the TLS handshake first gets its own.
        let first = if self.speaks_tls(Who::Conman) {
            env.cfg.conman.tls.handshake_timeout_ms
        } else {
            env.cfg.limits.connect_timeout_ms
        };
        let Phase::ConmanHandshake(st) = &mut self.phase else {
            return;
        };
        let t = st.deadline.min(env.now + Duration::from_millis(first));
        let request = std::mem::take(&mut st.request);
        st.head.clear();
        self.set_deadline(t);
        self.conman.push_owned(request);
        self.arm_recv(env, Who::Conman);
    }

    /// Conman bytes while waiting for its 101.
    pub(super) fn on_conman_head(&mut self, env: &mut Env, bytes: &[u8]) {
        let Phase::ConmanHandshake(st) = &mut self.phase else {
            return;
        };
        let parsed = handshake::parse_conman_response(
            head_input(&mut st.head, bytes),
            &st.expected_accept,
            env.cfg.limits.max_head,
        );
        let (resp, head_len) = match parsed {
            Ok(None) => {
                head_rest(&mut st.head, bytes, None);
                return;
            }
            Ok(Some(r)) => r,
            Err(e) => {
                let e = SetupError::new(Stage::ConmanHandshake, e.as_str());
                self.retry_or_fail(env, e);
                return;
            }
        };
        // RFC 6455 4.1: a client fails the handshake when the server picks
        // a subprotocol or an extension it did not offer.
        let protocol_offered = match (&resp.protocol, &st.client_accept) {
            (None, _) => true,
            (Some(p), Some(_)) => st.offered_protocols.iter().any(|o| o == p),
            (Some(p), None) => st.protocol.as_ref() == Some(p),
        };
        let unoffered = if !protocol_offered {
            Some("unoffered_protocol")
        } else if !extensions_offered(resp.extensions.as_deref(), st.offered_extensions.as_deref())
        {
            Some("unoffered_extension")
        } else {
            None
        };
        if let Some(reason) = unoffered {
            self.retry_or_fail(env, SetupError::new(Stage::ConmanHandshake, reason));
            return;
        }
        let mut deflate = false;
        if let Some(accept) = st.client_accept.as_deref() {
            // Upstream-first: Conman's choices become the client's answer.
            deflate = resp
                .extensions
                .as_deref()
                .is_some_and(|e| e.to_ascii_lowercase().contains("permessage-deflate"));
            let mut out = Vec::new();
            http1::write_switching_protocols(
                &mut out,
                accept,
                resp.protocol.as_deref(),
                resp.extensions.as_deref(),
            );
            self.client.push_owned(out);
        }
        let early = head_rest(&mut st.head, bytes, Some(head_len));
        let held = std::mem::take(&mut st.held);
        let upgrade_took = env.now - st.phase_started;
        let vm = st.vm_name().map(|name| env.vms.intern(name));
        if deflate {
            // Compressed messages carry RSV1; nothing was tracked yet.
            let cfg = TrackerConfig {
                max_frame: env.cfg.limits.max_frame,
                allow_rsv1: true,
            };
            self.to_conman = Tracker::new(Direction::ToConman, cfg);
            self.to_client = Tracker::new(Direction::ToClient, cfg);
        }
        env.stats
            .setup_duration(Timing::ConmanUpgrade, upgrade_took);
        env.stats
            .setup_duration(Timing::Total, env.now - self.started);
        let t = self.clock(env.now);
        self.transition(env.now, |_| Phase::Relay(super::live::Live::new(t)));
        self.vm = vm;
        self.deadline = None;
        self.schedule_liveness(env);
        self.tcp_keepalive_unless_deferred(env);
        self.established = true;
        ShardStats::inc(&env.stats.established);
        env.stats.active.fetch_add(1, Relaxed);
        // Frames Conman sent right behind its 101, then the client's held
        // frames: both pass through their trackers like any other bytes.
        self.forward_owned(env, Who::Conman, early);
        self.forward_owned(env, Who::Client, held);
        if self.kind() == Kind::Relay {
            self.close_progress(env);
        }
        if self.kind() == Kind::Relay {
            self.resume_recv(env, Who::Client);
            self.arm_recv(env, Who::Client);
        }
    }

    /// A Conman attempt failed: back off and try another VM while the setup
    /// deadline allows, else fail the session with this error.
    pub(super) fn retry_or_fail(&mut self, env: &mut Env, err: SetupError) {
        let vm = self.phase.setup().and_then(|st| st.vm_name());
        let vm = crate::metrics::vm_label::for_attempt(env.cfg, vm);
        env.stats.attempt_failure(err.stage, err.reason, vm);
        let limits = &env.cfg.limits;
        let (max, base, cap) = (
            limits.max_attempts,
            limits.retry_base_ms,
            limits.retry_cap_ms,
        );
        let unit: f64 = env.rng.gen();
        let now = env.now;
        let Some(st) = self.phase.setup_mut() else {
            return;
        };
        st.last_error = Some(err);
        // A socket the proxy could not even create says nothing of the VM,
        // nor does an operator's evacuation.
        let vm_at_fault = !matches!(err.reason, "socket" | "out_of_fds" | "evacuate");
        if let (Some(vm), true) = (&st.vm, vm_at_fault) {
            env.out.push_back(Op::VmFailed { vm: vm.vm.clone() });
        }
        let delay = backoff(st.attempt, base, cap, unit);
        if st.attempt >= max || now + delay >= st.deadline {
            self.fail_setup(env, err);
            return;
        }
        tracing::debug!(session = self.id, vm = ?st.vm_name(), stage = err.stage.as_str(), reason = err.reason, attempt = st.attempt, "conman attempt failed, retrying");
        if let Some(found) = st.vm.take() {
            if !st.exclude.contains(&found.vm) && st.exclude.len() < usize::from(max) {
                st.exclude.push(found.vm.clone());
            }
        }
        st.backoff_done = false;
        self.drop_conman(env);
        self.step(now, Phase::Backoff);
        self.set_deadline(now + delay);
    }

    /// In `Backoff`: the failed attempt's socket goes once nothing is in
    /// flight on it; the retry starts once that and the backoff are done.
    pub(super) fn retry_when_ready(&mut self, env: &mut Env) {
        if self.conman.fd >= 0 && self.conman.inflight == 0 {
            env.op(Op::Close { fd: self.conman.fd });
            self.conman = Side::new(-1);
        }
        let ready = self.phase.setup().is_some_and(|st| st.backoff_done);
        if ready && self.conman.fd < 0 {
            self.request_placement(env);
        }
    }

    /// Abandons the current Conman socket: nothing more is sent or read on
    /// it; it is closed once its operations complete.
    fn drop_conman(&mut self, env: &mut Env) {
        self.discard_queued(env, Who::Conman);
        if self.conman.fd < 0 {
            return;
        }
        self.conman.eof = true;
        self.conman.shut = true;
        // What the old socket still says is read as plaintext and dropped.
        if let Some(t) = self.tls.as_deref_mut() {
            t.conman = None;
        }
        if self.conman.recv_armed {
            self.pause_recv(env, Who::Conman);
        }
        if self.kind() == Kind::Connecting && self.conman.inflight > 0 {
            env.op(Op::CancelConnect);
        }
    }

    pub(super) fn head_timeout(&mut self, env: &mut Env) {
        env.stats
            .setup_failure(Stage::Request, "header_timeout", true);
        let mut out = Vec::new();
        http1::write_status(&mut out, 408, "request head not received in time");
        env.stats.http_response(408);
        self.client.push_owned(out);
        self.begin_closing(env);
    }

    pub(super) fn setup_timeout(&mut self, env: &mut Env) {
        let kind = self.kind();
        let conman_tls = kind == Kind::ConmanHandshake && self.tls_handshaking(Who::Conman);
        let now = env.now;
        let Some(st) = self.phase.setup_mut() else {
            return;
        };
        let overall = now >= st.deadline;
        let stage = match kind {
            Kind::Placement => Stage::Controlplane,
            Kind::Connecting => Stage::ConmanConnect,
            _ if conman_tls => Stage::ConmanTls,
            _ => Stage::ConmanHandshake,
        };
        if kind == Kind::Backoff && !overall {
            st.backoff_done = true;
        } else if overall {
            let e = match (kind, st.last_error) {
                // Out of time while waiting to retry: the failure that
                // caused the wait is the one to report.
                (Kind::Backoff, Some(e)) => e,
                _ => SetupError::new(stage, "timeout"),
            };
            self.fail_setup(env, e);
        } else {
            // One attempt's handshake took too long; others may not.
            self.retry_or_fail(env, SetupError::new(stage, "timeout"));
        }
    }

    /// Setup failed for good: the client hears why (a Close naming the
    /// stage, or an HTTP status before a 101), and the session ends.
    pub(super) fn fail_setup(&mut self, env: &mut Env, err: SetupError) {
        env.stats.setup_failure(err.stage, err.reason, false);
        let vm = self
            .phase
            .setup()
            .and_then(|st| st.vm_name().or(st.exclude.last().map(String::as_str)));
        self.log_setup_failed(env, &err, vm);
        let before_101 = self
            .phase
            .setup()
            .is_some_and(|st| st.client_accept.is_some());
        if err.stage == Stage::ClientGone {
            // Nobody to tell.
        } else if before_101 {
            // Upstream-first: no 101 yet, so an HTTP status says it.
            let status = match err.stage {
                Stage::Controlplane => 503,
                _ => 502,
            };
            let mut out = Vec::new();
            match err.retry_after_ms {
                Some(ms) => http1::write_status_retry(
                    &mut out,
                    status,
                    &err.close_reason(),
                    ms.div_ceil(1000),
                ),
                None => http1::write_status(&mut out, status, &err.close_reason()),
            }
            env.stats.http_response(status);
            self.client.push_owned(out);
        } else {
            let mut frame = Vec::new();
            write_close(&mut frame, err.close_code(), &err.close_reason(), None);
            self.client.push_owned(frame);
            env.stats
                .close_code(CloseSide::ProxyToClient, err.close_code());
        }
        // Nothing Conman sends from here on is for the client.
        self.injected_close_to_client = true;
        if self.kind() == Kind::ConmanHandshake {
            // Connected: Closing shuts our write side and reads to Conman's
            // FIN, so its socket ends without a reset.
            self.discard_queued(env, Who::Conman);
        } else {
            self.drop_conman(env);
        }
        self.deadline = None;
        self.begin_closing(env);
    }
}

/// What a head (the client's request, Conman's response) is parsed from:
/// the bytes just received where they lie when none came before, as a head
/// nearly always comes whole in one receive; else `so_far` with them added.
/// [`head_rest`] finishes the step.
fn head_input<'a>(so_far: &'a mut Vec<u8>, bytes: &'a [u8]) -> &'a [u8] {
    if so_far.is_empty() {
        bytes
    } else {
        so_far.extend_from_slice(bytes);
        so_far
    }
}

/// After parsing [`head_input`]: an incomplete head (`None`) keeps every
/// byte in `so_far`; a complete one of `head_len` bytes gives back what
/// followed it.
fn head_rest(so_far: &mut Vec<u8>, bytes: &[u8], head_len: Option<usize>) -> Vec<u8> {
    // `so_far` is still empty exactly when the parse read `bytes` alone.
    match (so_far.is_empty(), head_len) {
        (true, None) => {
            so_far.extend_from_slice(bytes);
            Vec::new()
        }
        (true, Some(n)) => bytes[n..].to_vec(),
        (false, None) => Vec::new(),
        (false, Some(n)) => so_far.split_off(n),
    }
}

/// An address as text in `buf` (the longest, an IPv4-mapped IPv6
/// address, is 45 bytes): one per handshake, and none needs the heap.
fn ip_text(ip: IpAddr, buf: &mut [u8; 64]) -> &str {
    use std::io::Write as _;
    let mut w = &mut buf[..];
    let _ = write!(w, "{ip}");
    let n = 64 - w.len();
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

/// A request may open a session from `origin`: no allowlist, no Origin
/// header (not a browser, so not the cross-site case an allowlist is for),
/// or an exact match of a listed origin, in any case (schemes and hosts
/// are case-insensitive; browsers send them lower-case).
fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(o) => allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
    }
}

/// Every extension in Conman's answer was among those offered (by name;
/// parameters are the extension's own negotiation).
fn extensions_offered(answer: Option<&str>, offered: Option<&str>) -> bool {
    let names = |list: &str| -> Vec<String> {
        list.split(',')
            .filter_map(|e| e.split(';').next())
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect()
    };
    let Some(answer) = answer else {
        return true;
    };
    let offered = offered.map(names).unwrap_or_default();
    names(answer).iter().all(|n| offered.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_be_listed_when_a_list_is_set() {
        let list = vec!["https://replit.com".to_string(), "null".to_string()];
        assert!(origin_allowed(&[], Some("https://evil.example")));
        assert!(origin_allowed(&list, None));
        assert!(origin_allowed(&list, Some("https://replit.com")));
        assert!(origin_allowed(&list, Some("HTTPS://Replit.COM")));
        assert!(origin_allowed(&list, Some("null")));
        for bad in [
            "https://evil.example",
            "http://replit.com",
            "https://replit.com:8443",
            "https://replit.com.evil.example",
            "https://sub.replit.com",
            "",
        ] {
            assert!(!origin_allowed(&list, Some(bad)), "{bad}");
        }
    }

    #[test]
    fn refusals_say_when_to_come_back() {
        use std::time::Duration;
        let rate = |ms| Refusal::PerIp(Refused::Rate(Some(Duration::from_millis(ms))));
        assert_eq!(rate(1).retry_after_s(0.5), Some(1));
        assert_eq!(rate(1500).retry_after_s(0.5), Some(2));
        assert_eq!(
            Refusal::PerIp(Refused::Rate(None)).retry_after_s(0.5),
            Some(u64::from(u32::MAX))
        );
        for unit in [0.0, 0.3, 0.999] {
            let s = Refusal::ShardFull.retry_after_s(unit).unwrap();
            assert!((1..=5).contains(&s), "{s}");
        }
        assert_eq!(Refusal::Origin.retry_after_s(0.5), None);
        assert!(!Refusal::ShardFull.client_fault());
        assert!(Refusal::PerIp(Refused::Sessions).client_fault());
    }

    #[test]
    fn extensions_must_have_been_offered_by_name() {
        assert!(extensions_offered(None, None));
        assert!(extensions_offered(Some(""), None));
        assert!(!extensions_offered(Some("permessage-deflate"), None));
        assert!(extensions_offered(
            Some("permessage-deflate; server_no_context_takeover"),
            Some("permessage-deflate; client_max_window_bits, x-webkit-deflate-frame")
        ));
        assert!(!extensions_offered(
            Some("permessage-deflate, x-other"),
            Some("Permessage-Deflate")
        ));
    }
}
