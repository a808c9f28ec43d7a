//! Configuration: a TOML file, overridden by the common CLI flags.
//!
//! Every key has a default so an empty file is a valid config. Unknown keys
//! are errors (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::proto::handshake::parse_ws_url;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub admin: AdminConfig,
    pub limits: Limits,
    pub buffers: Buffers,
    pub relay: RelayConfig,
    pub token: TokenConfig,
    pub placement: PlacementConfig,
    pub websocket: WebSocketConfig,
    pub log: LogConfig,
    pub drain: DrainConfig,
    pub lifecycle: LifecycleConfig,
    pub handover: HandoverConfig,
    pub controlplane: ControlplaneSection,
    pub admission: AdmissionSection,
    pub keepalive: KeepaliveConfig,
    pub tls: TlsSection,
    pub conman: ConmanSection,
}

/// `[conman]`: how the proxy talks to Conman.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConmanSection {
    pub tls: ConmanTls,
    /// TCP congestion control for Conman sockets (`TCP_CONGESTION`, e.g.
    /// `"cubic"`); unset, the kernel's default. The Conman hop is inside
    /// the datacenter, while the default is often chosen for clients across
    /// the internet: BBR paces every socket, and without the `fq` qdisc
    /// (always so on loopback) the kernel arms a timer per paced packet,
    /// which costs the relay measurably (see bench/README.md, "Congestion
    /// control").
    pub tcp_congestion: Option<String>,
}

/// `[conman.tls]`: for `wss://` Conman URLs (static VMs or Controlplane
/// answers). Without `ca_file` no `wss://` URL is used: a static one is a
/// config error, one from the Controlplane fails the attempt with
/// `stage=conman_tls;reason=no_ca`. There is no fallback to the system's
/// web roots: Conman certificates come from a private CA, and trusting
/// every public CA for that hop would be a surprise (name the system
/// bundle as `ca_file` to get exactly that).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConmanTls {
    /// PEM bundle of the CAs that sign Conman certificates.
    pub ca_file: Option<PathBuf>,
    /// The proxy's client certificate (PEM, chain after it) and key, for a
    /// Conman that asks for one (mTLS); both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The TLS handshake with Conman must be done within this long of the
    /// TCP connect; its 101 then gets `limits.connect_timeout_ms`.
    pub handshake_timeout_ms: u64,
    /// The rustls client config built from the above by
    /// [`Config::load_tls`].
    #[serde(skip)]
    pub client: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Default for ConmanTls {
    fn default() -> Self {
        ConmanTls {
            ca_file: None,
            cert: None,
            key: None,
            handshake_timeout_ms: 5_000,
            client: None,
        }
    }
}

/// `[tls]`: TLS on the public listener (wss://). Off unless a certificate
/// is listed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Certificates, chosen by SNI; the first is also the one for clients
    /// that send no name or a name no entry lists.
    pub certs: Vec<TlsCert>,
    /// The handshake must be complete within this long of the accept; the
    /// request head then gets `limits.header_timeout_ms` of its own.
    pub handshake_timeout_ms: u64,
    /// PEM bundle of the CAs whose client certificates are verified; the
    /// verified subject goes into the access log. None = no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `optional` (default; a client may send none) or
    /// `required` (a client without a valid one fails its handshake).
    pub client_auth: Option<ClientAuth>,
    /// The rustls server config built from the above by
    /// [`Config::load_tls`]; shared by every shard (one ticketer, so a
    /// ticket issued on one shard resumes on any).
    #[serde(skip)]
    pub server: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            certs: Vec::new(),
            handshake_timeout_ms: 10_000,
            client_ca: None,
            client_auth: None,
            server: None,
        }
    }
}

/// `tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

/// One `[[tls.certs]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCert {
    /// PEM file: the certificate, then its chain.
    pub cert: PathBuf,
    /// PEM file: its private key (PKCS#8, SEC1 or PKCS#1; ECDSA, RSA or
    /// Ed25519).
    pub key: PathBuf,
    /// SNI names this certificate answers (`"eval.example"`, or
    /// `"*.example"` for one label); empty = only as the default.
    #[serde(default)]
    pub names: Vec<String>,
}

/// Dead-peer detection: the proxy's own WebSocket Pings to a silent side,
/// and TCP keepalive / `TCP_USER_TIMEOUT` on both sockets. Seconds may be
/// fractional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// A side that has sent nothing for this long gets a Ping from the
    /// proxy (at a frame boundary); 0 = no pings.
    pub interval_s: f64,
    /// A side that has sent nothing for this long is dead: the session
    /// ends (1001 to Conman, 1014 to the client); 0 = never.
    pub timeout_s: f64,
    /// SO_KEEPALIVE on client and Conman sockets.
    pub tcp_keepalive: bool,
    /// TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT for those sockets.
    pub tcp_keepidle_s: u32,
    pub tcp_keepintvl_s: u32,
    pub tcp_keepcnt: u32,
    /// TCP_USER_TIMEOUT: data unacknowledged this long fails the
    /// connection; 0 = the kernel's default (retransmissions for ~15 min).
    pub tcp_user_timeout_ms: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval_s: 30.0,
            timeout_s: 75.0,
            tcp_keepalive: true,
            tcp_keepidle_s: 60,
            tcp_keepintvl_s: 10,
            tcp_keepcnt: 6,
            tcp_user_timeout_ms: 75_000,
        }
    }
}

impl KeepaliveConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval_s)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlplaneSection {
    /// Base URLs (`http://host:port`), tried in order on failure.
    pub urls: Vec<String>,
    pub request_timeout_ms: u64,
    /// Keep-alive connections per URL.
    pub max_connections: usize,
    pub cache_max_entries: usize,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long it stays open before a half-open probe.
    pub breaker_open_ms: u64,
    /// How often the control shard asks for new revocations
    /// (`GET /v1/revocations?since=CURSOR`); 0 turns the sync off.
    pub revocations_poll_ms: u64,
}

impl Default for ControlplaneSection {
    fn default() -> Self {
        ControlplaneSection {
            urls: Vec::new(),
            request_timeout_ms: 1_000,
            max_connections: 8,
            cache_max_entries: 100_000,
            breaker_failures: 5,
            breaker_open_ms: 5_000,
            revocations_poll_ms: 2_000,
        }
    }
}

/// Token buckets for new sessions; a rate of 0 turns a bucket off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    pub per_repl_rate: f64,
    pub per_repl_burst: f64,
    pub per_cluster_rate: f64,
    pub per_cluster_burst: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// After SIGTERM or POST /drain, sessions run on this long before the
    /// rest are closed (Close 1012, spread over `close_spread_s`).
    pub grace_s: u64,
    /// `/readyz` answers 503 this long before the shards stop accepting,
    /// so load balancers take the proxy out before any connect could be
    /// refused. Fractions allowed (tests).
    pub readiness_delay_s: f64,
    /// At the end of the grace period the remaining sessions are closed
    /// idle-first, spread with jitter over this many seconds, so their
    /// clients do not all reconnect in the same millisecond.
    pub close_spread_s: f64,
    /// `POST /vms/{id}/evacuate` closes the VM's sessions idle-first,
    /// spread with jitter over this many seconds (the request's
    /// `spread_s` overrides it).
    pub evacuate_spread_s: f64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            grace_s: 30 * 3600,
            readiness_delay_s: 10.0,
            close_spread_s: 60.0,
            evacuate_spread_s: 60.0,
        }
    }
}

impl DrainConfig {
    pub fn readiness_delay(&self) -> Duration {
        Duration::from_secs_f64(self.readiness_delay_s)
    }

    pub fn close_spread(&self) -> Duration {
        Duration::from_secs_f64(self.close_spread_s)
    }

    pub fn evacuate_spread(&self) -> Duration {
        Duration::from_secs_f64(self.evacuate_spread_s)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Unix socket on which the running proxy hands its listening sockets
    /// to `eval-proxy --takeover`. `None`: `DEFAULT_HANDOVER_DIR/handover-PORT.sock`
    /// when `listen.addr` has a fixed port (port 0 is a new port at every
    /// start: there is nothing to hand over); `""` turns handover off.
    pub handover_socket: Option<PathBuf>,
}

/// `[handover]`: what an upgrade (`--takeover`) does with live sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoverConfig {
    /// After the listeners, hand each relaying plaintext session (both
    /// sockets and its relay state) to the new process, so the old one
    /// exits in seconds instead of draining for `drain.grace_s`. Both
    /// processes must have it on. Sessions that cannot move stay and drain.
    pub move_sessions: bool,
    /// How long a session may take to reach a point where it can move (its
    /// sends done, a splice finished) once it stopped being read; a slower
    /// one reads again and stays in the old process.
    pub session_deadline_ms: u64,
}

impl Default for HandoverConfig {
    fn default() -> Self {
        HandoverConfig {
            move_sessions: true,
            session_deadline_ms: 2000,
        }
    }
}

/// Where the handover socket lives unless `lifecycle.handover_socket` says.
pub const DEFAULT_HANDOVER_DIR: &str = "/run/eval-proxy";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Public WebSocket listener; every shard binds it with SO_REUSEPORT.
    pub addr: SocketAddr,
    /// listen(2) backlog of each shard's socket.
    pub backlog: u32,
    /// Data shards; 0 means one per online core.
    pub shards: usize,
    /// Pin shard N to core N (mod online cores).
    pub pin: bool,
    /// Before sleeping, a shard polls its ring for this long for new
    /// completions: lower latency (no wake-up from idle) for CPU burned
    /// while polling. 0 = sleep at once.
    pub busy_poll_us: u32,
    /// `TCP_DEFER_ACCEPT`: the kernel completes an accept once the client's
    /// first bytes arrive (every client here speaks first), so the shard is
    /// woken once per connection rather than for the accept and again for
    /// the request. A client that sends nothing is accepted after about
    /// this many seconds all the same, and its header deadline starts
    /// then. 0 = accept at once.
    pub defer_accept_s: u32,
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front
    /// of the proxy); from anyone else the header is dropped, so a client
    /// cannot put an address of its choosing in front of its own.
    pub trusted_proxies: Vec<Cidr>,
    /// Every accepted connection starts with a PROXY protocol header (v1 or
    /// v2) naming the real client, and only peers in `trusted_proxies` may
    /// send one; other peers, and connections without a valid header, are
    /// closed unanswered.
    pub proxy_protocol: bool,
    /// TCP congestion control for client sockets (`TCP_CONGESTION`, set on
    /// the listener, which accepted sockets inherit); unset, the kernel's
    /// default.
    pub tcp_congestion: Option<String>,
}

impl ListenConfig {
    /// Whether `peer` is one of `trusted_proxies`.
    pub fn trusts(&self, peer: Option<std::net::IpAddr>) -> bool {
        peer.is_some_and(|ip| self.trusted_proxies.iter().any(|c| c.contains(ip)))
    }
}

/// An address block, `10.0.0.0/8` or `2001:db8::/32`; a bare address is
/// the block of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address or an address/prefix");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.as_str(), None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        // An IPv4 peer on a dual-stack listener shows as ::ffff:a.b.c.d.
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(ip, V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (V4(a), V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
            (V6(a), V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// /metrics, /healthz, /readyz, POST /drain, the session registry.
    pub addr: SocketAddr,
    pub enabled: bool,
    /// A file holding the bearer token every admin request must carry
    /// (`Authorization: Bearer TOKEN`). Required when `addr` is not a
    /// loopback address.
    pub token_file: Option<PathBuf>,
}

/// The shortest admin token accepted: shorter ones can be guessed.
pub const MIN_ADMIN_TOKEN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_request_line: usize,
    pub max_head: usize,
    pub max_headers: usize,
    /// The whole request head must arrive within this.
    pub header_timeout_ms: u64,
    /// Largest frame payload relayed; larger → Close 1009.
    pub max_frame: u64,
    /// TCP connect to Conman.
    pub connect_timeout_ms: u64,
    /// From 101 to relaying, all attempts included.
    pub setup_timeout_ms: u64,
    /// Client bytes held while Conman is being reached; beyond this the
    /// client is simply not read until setup ends.
    pub held_bytes: usize,
    /// Bytes queued toward one side before the other side stops being read.
    pub send_queue_bytes: usize,
    /// Bytes all of a shard's sessions may hold in their own memory (queued
    /// toward slow peers, frames held back); past it, every side whose peer
    /// has such bytes queued stops being read until they are sent.
    pub shard_buffer_bytes: usize,
    /// Conman attempts per session (first try included), within
    /// `setup_timeout_ms`.
    pub max_attempts: u8,
    /// Backoff before retry N: full jitter over min(cap, base * 2^(N-1)).
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    /// After one side's Close, how long the other side has to answer with
    /// its own before the proxy ends the session.
    pub close_timeout_ms: u64,
    /// After the proxy's FIN, how long a peer may take to send its own (or
    /// to read what is queued for it) before its socket is forced shut.
    pub linger_ms: u64,
    /// Sessions one client address (IPv6: its /64) may have open at once,
    /// across all shards; more get 429. 0 = no cap.
    pub per_ip_sessions: u32,
    /// Handshakes per second one client address may start (token bucket,
    /// across all shards); more get 429. 0 = no limit.
    pub per_ip_handshake_rate: f64,
    /// That bucket's size: handshakes allowed at once after a quiet spell.
    pub per_ip_handshake_burst: f64,
    /// Sessions one shard admits at once; more get 503. 0 = no cap.
    pub max_sessions_per_shard: u32,
    /// A relaying session with no data frame either way for this long is
    /// closed (1001, `stage=relay;reason=idle_timeout`); 0 = never.
    pub idle_timeout_s: f64,
}

impl Limits {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_s)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Buffers {
    /// Provided buffers per shard (power of two, ≤ 32768).
    pub count: u32,
    /// Bytes per provided buffer.
    pub size: u32,
    /// Buffers of the TLS pool per shard (power of two, 2..=16384): sessions
    /// that speak TLS on a side receive into these (see `shard::bufring`);
    /// when they run dry, a receive takes a main buffer.
    pub tls_count: u32,
    /// Bytes per TLS pool buffer (1024..=1048576).
    pub tls_size: u32,
    /// A data frame with at least this many payload bytes still to come is
    /// moved socket to pipe to socket with splice(2) instead of being copied
    /// through a buffer; 0 turns splicing off.
    pub splice_min: u64,
    /// Capacity asked for each splice pipe (F_SETPIPE_SZ; the kernel caps
    /// it at /proc/sys/fs/pipe-max-size).
    pub pipe_size: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// A data frame with at most this many payload bytes is passed on only
    /// once it is complete, so a peer lost mid-frame leaves the other side a
    /// Close rather than a torn frame. Longer frames stream (and splice);
    /// if their source is lost mid-frame, the other side is reset.
    pub hold_max: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            hold_max: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectWith {
    /// 101 then Close 1008: browsers never see the HTTP status of a refused
    /// handshake, but they do see a Close code.
    Close,
    /// Plain 401 before the upgrade.
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Directory of `<kid>.pub` files (`k4.public.…`).
    pub keys_dir: Option<PathBuf>,
    /// Trust the built-in, publicly known dev key. Never in production.
    pub allow_dev_key: bool,
    /// Clock-skew allowance for exp/nbf.
    pub leeway_s: i64,
    /// If set, tokens must carry this cluster.
    pub cluster: Option<String>,
    pub reject_with: RejectWith,
    /// Verify the fresh tokens of the handshakes that arrive in one loop
    /// turn with a single Ed25519 batch check.
    pub batch_verify: bool,
    /// Where the revocations in force are kept (JSON, rewritten on each
    /// change, reloaded when edited), so they survive a restart.
    pub revoked_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementSource {
    /// Consistent (rendezvous) hashing of repl ids over `placement.vms`.
    #[default]
    Static,
    /// Ask the Controlplane (`[controlplane]`).
    Controlplane,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    pub mode: PlacementSource,
    /// Shorthand for a single Conman: a VM named "default".
    pub default: Option<String>,
    /// VM id → Conman URL; repls are spread over them by rendezvous hashing.
    pub vms: BTreeMap<String, String>,
    /// repl id → VM id, pinning a repl to a VM.
    pub repls: BTreeMap<String, String>,
    /// Static placement: after a failed Conman attempt on a VM, new
    /// sessions are placed elsewhere for this long (unless no other VM is
    /// left); 0 = off.
    pub fail_timeout_ms: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            mode: PlacementSource::default(),
            default: None,
            vms: BTreeMap::new(),
            repls: BTreeMap::new(),
            fail_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Subprotocols the proxy accepts from clients (first offered wins);
    /// client-first mode only.
    pub subprotocols: Vec<String>,
    pub mode: UpgradeMode,
    /// Origins (`scheme://host[:port]`, as browsers send them) allowed to
    /// open a session; others get 403. Empty = any. A request without an
    /// Origin (not a browser) is allowed either way.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeMode {
    /// Answer the client's 101 first, then reach Conman (the seed's order:
    /// the browser sees a Close code, never an opaque HTTP failure).
    #[default]
    ClientFirst,
    /// Reach Conman first and answer 101 with what Conman negotiated, so
    /// subprotocols and extensions (permessage-deflate) are end to end.
    UpstreamFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// tracing EnvFilter directive; RUST_LOG wins when set.
    pub level: String,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addr: "0.0.0.0:8080".parse().unwrap(),
            backlog: 4096,
            shards: 0,
            pin: true,
            busy_poll_us: 0,
            defer_accept_s: 1,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            tcp_congestion: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: "127.0.0.1:9090".parse().unwrap(),
            enabled: true,
            token_file: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 16 * 1024,
            max_head: 32 * 1024,
            max_headers: 64,
            header_timeout_ms: 5_000,
            max_frame: 64 * 1024 * 1024,
            connect_timeout_ms: 3_000,
            setup_timeout_ms: 10_000,
            held_bytes: 64 * 1024,
            send_queue_bytes: 256 * 1024,
            shard_buffer_bytes: 256 << 20,
            max_attempts: 5,
            retry_base_ms: 50,
            retry_cap_ms: 1_000,
            close_timeout_ms: 10_000,
            linger_ms: 5_000,
            per_ip_sessions: 0,
            per_ip_handshake_rate: 0.0,
            per_ip_handshake_burst: 0.0,
            max_sessions_per_shard: 0,
            idle_timeout_s: 0.0,
        }
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            count: 1024,
            size: 16 * 1024,
            tls_count: 32,
            tls_size: 64 * 1024,
            splice_min: 32 * 1024,
            pipe_size: 1 << 20,
        }
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            keys_dir: None,
            allow_dev_key: false,
            leeway_s: 30,
            cluster: None,
            reject_with: RejectWith::Close,
            batch_verify: true,
            revoked_file: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// A config error always names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// The handover socket in force, if any (see [`LifecycleConfig`]).
    pub fn handover_socket(&self) -> Option<PathBuf> {
        match &self.lifecycle.handover_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None if self.listen.addr.port() == 0 => None,
            None => Some(
                Path::new(DEFAULT_HANDOVER_DIR)
                    .join(format!("handover-{}.sock", self.listen.addr.port())),
            ),
        }
    }

    /// Checks cross-field rules; run after CLI overrides are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("drain.readiness_delay_s", self.drain.readiness_delay_s),
            ("drain.close_spread_s", self.drain.close_spread_s),
            ("drain.evacuate_spread_s", self.drain.evacuate_spread_s),
        ] {
            // Up to a year: `Duration::from_secs_f64` panics on what does
            // not fit, and no drain step is meant to last longer.
            if !(0.0..=365.0 * 86400.0).contains(&v) {
                return Err(invalid(key, "must be between 0 and a year, in seconds"));
            }
        }
        if self.token.cluster.as_deref() == Some("") {
            // Tokens with an empty cluster are refused, so this would
            // refuse every token.
            return Err(invalid("token.cluster", "must not be empty"));
        }
        let l = &self.limits;
        if l.max_request_line < 1024 {
            return Err(invalid("limits.max_request_line", "must be at least 1024"));
        }
        if l.max_head < l.max_request_line {
            return Err(invalid(
                "limits.max_head",
                "must be at least limits.max_request_line",
            ));
        }
        if l.max_headers == 0 || l.max_headers > crate::proto::http1::MAX_HEADERS {
            return Err(invalid(
                "limits.max_headers",
                format!("must be in 1..={}", crate::proto::http1::MAX_HEADERS),
            ));
        }
        for (key, v) in [
            ("limits.header_timeout_ms", l.header_timeout_ms),
            ("limits.connect_timeout_ms", l.connect_timeout_ms),
            ("limits.setup_timeout_ms", l.setup_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if l.max_attempts == 0 {
            return Err(invalid("limits.max_attempts", "must be at least 1"));
        }
        if l.retry_base_ms == 0 || l.retry_cap_ms < l.retry_base_ms {
            return Err(invalid(
                "limits.retry_cap_ms",
                "must be at least limits.retry_base_ms, which must be > 0",
            ));
        }
        if !(l.per_ip_handshake_rate.is_finite() && l.per_ip_handshake_rate >= 0.0) {
            return Err(invalid(
                "limits.per_ip_handshake_rate",
                "must be a number >= 0",
            ));
        }
        if l.per_ip_handshake_rate > 0.0
            && !(l.per_ip_handshake_burst.is_finite() && l.per_ip_handshake_burst >= 1.0)
        {
            return Err(invalid(
                "limits.per_ip_handshake_burst",
                "must be >= 1 when limits.per_ip_handshake_rate is set",
            ));
        }
        if l.max_frame < 125 {
            return Err(invalid("limits.max_frame", "must be at least 125"));
        }
        if l.send_queue_bytes < self.buffers.size as usize {
            return Err(invalid(
                "limits.send_queue_bytes",
                "must be at least buffers.size",
            ));
        }
        if l.shard_buffer_bytes < l.send_queue_bytes {
            return Err(invalid(
                "limits.shard_buffer_bytes",
                "must be at least limits.send_queue_bytes",
            ));
        }
        let b = &self.buffers;
        if !b.count.is_power_of_two() || b.count > 32768 || b.count < 16 {
            return Err(invalid(
                "buffers.count",
                "must be a power of two in 16..=32768",
            ));
        }
        if b.size < 1024 || b.size > 1 << 20 {
            return Err(invalid("buffers.size", "must be in 1024..=1048576"));
        }
        if !b.tls_count.is_power_of_two() || b.tls_count > 16384 || b.tls_count < 2 {
            return Err(invalid(
                "buffers.tls_count",
                "must be a power of two in 2..=16384",
            ));
        }
        if b.tls_size < 1024 || b.tls_size > 1 << 20 {
            return Err(invalid("buffers.tls_size", "must be in 1024..=1048576"));
        }
        // As for buffers.size: one receive must fit the queue's bound, or a
        // side would pause after every receive.
        if l.send_queue_bytes < b.tls_size as usize {
            return Err(invalid(
                "limits.send_queue_bytes",
                "must be at least buffers.tls_size",
            ));
        }
        // A held frame enters the send queue all at once when complete, so
        // one larger than the queue's bound would defeat backpressure.
        if self.relay.hold_max > l.send_queue_bytes as u64 {
            return Err(invalid(
                "relay.hold_max",
                "must be at most limits.send_queue_bytes",
            ));
        }
        for (key, cc) in [
            ("listen.tcp_congestion", &self.listen.tcp_congestion),
            ("conman.tcp_congestion", &self.conman.tcp_congestion),
        ] {
            if let Some(cc) = cc {
                crate::shard::listener::check_congestion(cc).map_err(|why| invalid(key, &why))?;
            }
        }
        if self.listen.defer_accept_s > 3600 {
            return Err(invalid("listen.defer_accept_s", "must be at most 3600"));
        }
        if self.listen.busy_poll_us > 100_000 {
            return Err(invalid("listen.busy_poll_us", "must be at most 100000"));
        }
        if b.pipe_size < 4096 || b.pipe_size > 1 << 30 {
            return Err(invalid("buffers.pipe_size", "must be in 4096..=1073741824"));
        }
        if self.listen.backlog == 0 {
            return Err(invalid("listen.backlog", "must be greater than 0"));
        }
        if self.listen.shards > 1024 {
            return Err(invalid("listen.shards", "must be at most 1024"));
        }
        if self.listen.proxy_protocol && self.listen.trusted_proxies.is_empty() {
            return Err(invalid(
                "listen.proxy_protocol",
                "needs listen.trusted_proxies: the load balancers allowed to send a PROXY header",
            ));
        }
        for (i, origin) in self.websocket.allowed_origins.iter().enumerate() {
            if !is_origin(origin) {
                return Err(invalid(
                    &format!("websocket.allowed_origins[{i}]"),
                    format!(
                        "{origin:?} is not an origin: scheme://host or scheme://host:port, \
                         without path or trailing slash (or \"null\")"
                    ),
                ));
            }
        }
        self.control_config()?;
        if self.token.keys_dir.is_none() && !self.token.allow_dev_key {
            return Err(invalid(
                "token.keys_dir",
                "no token keys: set token.keys_dir (or token.allow_dev_key for development)",
            ));
        }
        self.validate_keepalive()?;
        // Anyone who reaches the admin API can close every session: off
        // loopback it must ask who is calling.
        if self.admin.enabled
            && !self.admin.addr.ip().is_loopback()
            && self.admin.token_file.is_none()
        {
            return Err(invalid(
                "admin.token_file",
                format!(
                    "admin.addr {} is not a loopback address: set admin.token_file (a file \
                     holding the bearer token admin requests must carry), or bind the admin \
                     listener to 127.0.0.1",
                    self.admin.addr
                ),
            ));
        }
        if self.tls.handshake_timeout_ms == 0 {
            return Err(invalid("tls.handshake_timeout_ms", "must be positive"));
        }
        if self.tls.client_auth.is_some() && self.tls.client_ca.is_none() {
            return Err(invalid("tls.client_auth", "needs tls.client_ca"));
        }
        let ct = &self.conman.tls;
        if ct.handshake_timeout_ms == 0 {
            return Err(invalid(
                "conman.tls.handshake_timeout_ms",
                "must be positive",
            ));
        }
        if ct.cert.is_some() != ct.key.is_some() {
            return Err(invalid(
                "conman.tls.cert",
                "conman.tls.cert and conman.tls.key go together",
            ));
        }
        if self.token.leeway_s < 0 {
            return Err(invalid("token.leeway_s", "must not be negative"));
        }
        Ok(())
    }

    fn validate_keepalive(&self) -> Result<(), ConfigError> {
        // Session clocks count milliseconds in 32 bits (wrapping), which
        // is sound while every period is far below 49 days.
        const MAX_S: f64 = 30.0 * 86400.0;
        let k = &self.keepalive;
        for (key, v) in [
            ("keepalive.interval_s", k.interval_s),
            ("keepalive.timeout_s", k.timeout_s),
            ("limits.idle_timeout_s", self.limits.idle_timeout_s),
        ] {
            if !(v.is_finite() && (0.0..=MAX_S).contains(&v)) {
                return Err(invalid(key, "must be a number of seconds in 0..=2592000"));
            }
            if v > 0.0 && v < 0.01 {
                return Err(invalid(key, "must be 0 (off) or at least 0.01"));
            }
        }
        if k.timeout_s > 0.0 && k.interval_s > 0.0 && k.timeout_s <= k.interval_s {
            return Err(invalid(
                "keepalive.timeout_s",
                "must be greater than keepalive.interval_s, so a Pong can come back",
            ));
        }
        if k.tcp_keepalive
            && (k.tcp_keepidle_s == 0 || k.tcp_keepintvl_s == 0 || k.tcp_keepcnt == 0)
        {
            return Err(invalid(
                "keepalive.tcp_keepidle_s",
                "tcp_keepidle_s, tcp_keepintvl_s and tcp_keepcnt must be > 0 with tcp_keepalive",
            ));
        }
        Ok(())
    }

    pub fn shard_count(&self) -> usize {
        if self.listen.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.listen.shards
        }
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.header_timeout_ms)
    }

    /// The first deadline of a new client connection: the TLS handshake's
    /// when the listener speaks TLS, else the request head's.
    pub fn first_timeout(&self) -> Duration {
        if self.tls.server.is_some() {
            Duration::from_millis(self.tls.handshake_timeout_ms)
        } else {
            self.header_timeout()
        }
    }

    /// The admin bearer token from `admin.token_file` (surrounding
    /// whitespace trimmed), or `None` without one. The error names the key.
    pub fn admin_token(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.admin.token_file else {
            return Ok(None);
        };
        let key = "admin.token_file";
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
        let token = text.trim();
        if token.len() < MIN_ADMIN_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                key,
                format!(
                    "{}: the token must be at least {MIN_ADMIN_TOKEN} printable ASCII \
                     characters without spaces",
                    path.display()
                ),
            ));
        }
        Ok(Some(token.as_bytes().to_vec()))
    }

    /// Reads `[[tls.certs]]` and builds the server config every shard
    /// shares, and the client config for `wss://` Conman URLs
    /// (`[conman.tls]`); each a no-op when not configured. Run after
    /// [`Config::validate`].
    pub fn load_tls(&mut self) -> Result<(), ConfigError> {
        let ct = &self.conman.tls;
        self.conman.tls.client = match &ct.ca_file {
            None => None,
            Some(ca) => Some(
                crate::tls::conman_client_config(ca, ct.cert.as_deref().zip(ct.key.as_deref()))
                    .map_err(|m| invalid("conman.tls", m))?,
            ),
        };
        if self.tls.certs.is_empty() {
            self.tls.server = None;
            return Ok(());
        }
        let clients = match &self.tls.client_ca {
            None => None,
            Some(ca) => {
                let optional = self.tls.client_auth != Some(ClientAuth::Required);
                Some(
                    crate::tls::client_verifier(ca, optional)
                        .map_err(|m| invalid("tls.client_ca", m))?,
                )
            }
        };
        let server = crate::tls::server_config(&self.tls.certs, clients)
            .map_err(|(i, m)| invalid(&format!("tls.certs[{i}]"), m))?;
        self.tls.server = Some(server);
        Ok(())
    }

    /// The control shard's configuration (placement source and admission).
    pub fn control_config(&self) -> Result<crate::control::ControlConfig, ConfigError> {
        use crate::control::{
            AdmissionConfig, Bucket, ControlConfig, ControlplaneConfig, PlacementMode,
        };
        let p = &self.placement;
        let mut vms: Vec<(String, String)> = Vec::new();
        let check = |key: &str, url: &str| {
            let u = parse_ws_url(url).map_err(|e| invalid(key, e.to_string()))?;
            if u.tls && self.conman.tls.ca_file.is_none() {
                return Err(invalid(
                    key,
                    format!("{url} is wss://: set conman.tls.ca_file to the CA that signs Conman certificates"),
                ));
            }
            Ok(())
        };
        if let Some(url) = &p.default {
            check("placement.default", url)?;
            vms.push(("default".into(), url.clone()));
        }
        for (vm, url) in &p.vms {
            check(&format!("placement.vms.{vm}"), url)?;
            vms.push((vm.clone(), url.clone()));
        }
        for (repl, vm) in &p.repls {
            if !vms.iter().any(|(v, _)| v == vm) {
                return Err(invalid(
                    &format!("placement.repls.{repl}"),
                    format!("names VM {vm:?}, which is not in placement.vms"),
                ));
            }
        }
        let mode = match p.mode {
            PlacementSource::Static => {
                if vms.is_empty() {
                    return Err(invalid(
                        "placement.default",
                        "no Conman configured: set placement.default, placement.vms or --conman",
                    ));
                }
                PlacementMode::Static {
                    vms,
                    repls: p
                        .repls
                        .iter()
                        .map(|(a, b)| (a.clone(), b.clone()))
                        .collect(),
                }
            }
            PlacementSource::Controlplane => {
                let c = &self.controlplane;
                if c.urls.is_empty() {
                    return Err(invalid(
                        "controlplane.urls",
                        "placement.mode = \"controlplane\" needs at least one URL",
                    ));
                }
                if c.request_timeout_ms == 0 {
                    return Err(invalid("controlplane.request_timeout_ms", "must be > 0"));
                }
                if c.breaker_failures == 0 {
                    return Err(invalid("controlplane.breaker_failures", "must be > 0"));
                }
                if c.max_connections == 0 {
                    return Err(invalid("controlplane.max_connections", "must be > 0"));
                }
                PlacementMode::Controlplane(ControlplaneConfig {
                    urls: c.urls.clone(),
                    request_timeout: Duration::from_millis(c.request_timeout_ms),
                    max_connections: c.max_connections,
                    cache_max_entries: c.cache_max_entries.max(1),
                    breaker_failures: c.breaker_failures,
                    breaker_open_for: Duration::from_millis(c.breaker_open_ms),
                    revocations_poll: Duration::from_millis(c.revocations_poll_ms),
                })
            }
        };
        let bucket = |key: &str, rate: f64, burst: f64| -> Result<Option<Bucket>, ConfigError> {
            if rate == 0.0 {
                return Ok(None);
            }
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid(&format!("admission.{key}_rate"), "must be >= 0"));
            }
            if burst < 1.0 {
                return Err(invalid(
                    &format!("admission.{key}_burst"),
                    "must be >= 1 when the rate is set",
                ));
            }
            Ok(Some(Bucket {
                rate_per_s: rate,
                burst,
            }))
        };
        let a = &self.admission;
        Ok(ControlConfig {
            mode,
            admission: AdmissionConfig {
                per_repl: bucket("per_repl", a.per_repl_rate, a.per_repl_burst)?,
                per_cluster: bucket("per_cluster", a.per_cluster_rate, a.per_cluster_burst)?,
            },
        })
    }
}

/// An origin as RFC 6454 serializes it: `scheme://host[:port]` (no path,
/// query, userinfo or trailing slash), or `null`.
fn is_origin(s: &str) -> bool {
    if s == "null" {
        return true;
    }
    let Some((scheme, authority)) = s.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c))
        && (host.starts_with('[') == host.ends_with(']'))
        && (host.starts_with('[') || !host.contains(':'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    scheme_ok && host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits.max_head, 32 * 1024);
        assert_eq!(c.listen.backlog, 4096);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[limits]\nmax_hed = 3\n").unwrap_err();
        assert!(e.to_string().contains("max_hed"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let mut c = Config::from_toml("[buffers]\ncount = 1000\n").unwrap();
        c.token.allow_dev_key = true;
        c.placement.default = Some("ws://127.0.0.1:1/".into());
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("buffers.count"), "{e}");
    }

    #[test]
    fn bad_conman_url_is_named() {
        let mut c = Config::default();
        c.token.allow_dev_key = true;
        c.placement.vms.insert("vm1".into(), "http://x".into());
        c.placement.default = Some("ws://127.0.0.1:1/".into());
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("placement.vms.vm1"), "{e}");
    }

    #[test]
    fn wss_conman_needs_a_ca() {
        let mut c = Config::default();
        c.token.allow_dev_key = true;
        c.placement
            .vms
            .insert("vm1".into(), "wss://conman.test/".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("placement.vms.vm1") && e.contains("conman.tls.ca_file"),
            "{e}"
        );
        c.conman.tls.ca_file = Some("/nonexistent/ca.pem".into());
        c.validate().unwrap();
        let e = c.load_tls().unwrap_err().to_string();
        assert!(
            e.contains("conman.tls") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        c.conman.tls.cert = Some("/x.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
    }

    fn valid() -> Config {
        let mut c = Config::default();
        c.token.allow_dev_key = true;
        c.placement.default = Some("ws://127.0.0.1:1/".into());
        c
    }

    #[test]
    fn hostile_client_keys_are_checked() {
        let err = |f: fn(&mut Config)| {
            let mut c = valid();
            f(&mut c);
            c.validate().err().map(|e| e.to_string())
        };
        assert_eq!(err(|_| {}), None);
        let e = err(|c| c.listen.proxy_protocol = true).unwrap();
        assert!(
            e.contains("listen.proxy_protocol") && e.contains("trusted_proxies"),
            "{e}"
        );
        let e = err(|c| c.limits.per_ip_handshake_rate = -1.0).unwrap();
        assert!(e.contains("limits.per_ip_handshake_rate"), "{e}");
        let e = err(|c| c.limits.per_ip_handshake_rate = f64::NAN).unwrap();
        assert!(e.contains("limits.per_ip_handshake_rate"), "{e}");
        let e = err(|c| c.limits.per_ip_handshake_rate = 5.0).unwrap();
        assert!(e.contains("limits.per_ip_handshake_burst"), "{e}");
        assert_eq!(
            err(|c| {
                c.limits.per_ip_handshake_rate = 5.0;
                c.limits.per_ip_handshake_burst = 10.0;
            }),
            None
        );
        let e = err(|c| c.websocket.allowed_origins = vec!["https://a.example/".into()]).unwrap();
        assert!(e.contains("websocket.allowed_origins[0]"), "{e}");
    }

    #[test]
    fn keepalive_keys_take_fractions_and_are_checked() {
        let c = Config::from_toml("[keepalive]\ninterval_s = 1\ntimeout_s = 2.5\n").unwrap();
        assert_eq!(c.keepalive.interval(), Duration::from_secs(1));
        assert_eq!(c.keepalive.timeout(), Duration::from_millis(2500));
        let err = |f: fn(&mut Config)| {
            let mut c = valid();
            f(&mut c);
            c.validate().err().map(|e| e.to_string())
        };
        let e = err(|c| c.keepalive.timeout_s = 30.0).unwrap();
        assert!(e.contains("keepalive.timeout_s"), "{e}");
        let e = err(|c| c.keepalive.interval_s = -1.0).unwrap();
        assert!(e.contains("keepalive.interval_s"), "{e}");
        let e = err(|c| c.limits.idle_timeout_s = f64::INFINITY).unwrap();
        assert!(e.contains("limits.idle_timeout_s"), "{e}");
        let e = err(|c| c.keepalive.tcp_keepcnt = 0).unwrap();
        assert!(e.contains("keepalive.tcp_keepidle_s"), "{e}");
        // Each check can be turned off.
        assert_eq!(
            err(|c| {
                c.keepalive.interval_s = 0.0;
                c.keepalive.timeout_s = 0.0;
                c.keepalive.tcp_keepalive = false;
                c.keepalive.tcp_keepcnt = 0;
            }),
            None
        );
    }

    #[test]
    fn origins() {
        for good in [
            "https://replit.com",
            "http://localhost:3000",
            "https://[::1]:8443",
            "https://[2001:db8::1]",
            "chrome-extension://abcdef",
            "null",
        ] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "",
            "replit.com",
            "https://replit.com/",
            "https://replit.com/path",
            "https://",
            "https://a:",
            "https://a:99999",
            "https://u@a",
            "https://a?x",
            "1http://a",
            "https://[::1",
            "https://a:b:80",
            "*",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    #[test]
    fn pin_to_unknown_vm_is_named() {
        let mut c = Config::default();
        c.token.allow_dev_key = true;
        c.placement.default = Some("ws://127.0.0.1:1/".into());
        c.placement.repls.insert("r1".into(), "vm9".into());
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("placement.repls.r1"), "{e}");
    }
}

#[cfg(test)]
mod cidr_tests {
    use super::Cidr;

    fn cidr(s: &str) -> Cidr {
        Cidr::try_from(s.to_owned()).unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses_and_no_others() {
        let ip = |s: &str| s.parse().unwrap();
        assert!(cidr("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1::7")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129", "10.0.0.0/-1"] {
            assert!(Cidr::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }
}
