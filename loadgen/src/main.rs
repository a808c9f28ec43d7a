//! eval-loadgen: load generator, benchmark echo backend and fake Conman for
//! eval-proxy.
//!
//! # Layout
//! - `main.rs`: the command line.
//! - [`config`]: what a run is asked to do (mode and settings).
//! - [`run`]: starts the load threads, progress, `holding N`, the report.
//! - [`worker`]: one epoll loop per thread and the workload of each mode.
//! - [`storm`]: the `storm` mode's sessions across reconnects, its
//!   conductor (kill, CPU of watched processes, when it is over).
//! - [`client`]: one client connection: connect, upgrade, send, verify.
//! - [`stream`]: its bytes over plain TCP or rustls (wss://).
//! - [`wire`]: the stamped payload template and frame assembly.
//! - [`report`]: histograms, counters, text and JSON output.
//! - [`tokens`]: request paths with per-connection PASETO tokens.
//! - [`net`]: open-files limit, source addresses over 127.0.0.0/8.
//! - [`out`]: stdout lines another process waits for (`listening`,
//!   `holding`, the JSON report).
//! - [`echo_server`], [`conman`]: the backends.
//!
//! Dependencies go one way, down this chain: `main.rs` → `run` → `worker`
//! → `storm` → `client` → `report` → `config` → `stream` → `tokens`. The
//! backends use `net` and `out`; `net`, `out`, `stream`, `tokens`, `units`
//! and `wire` use no other module.

mod client;
mod config;
mod conman;
mod echo_server;
mod net;
mod out;
mod report;
mod run;
mod storm;
mod stream;
mod tokens;
mod units;
mod wire;
mod worker;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use eval_proxy::dev::conman::Behavior;
use eval_proxy::proto::handshake::parse_ws_url;

use crate::config::{MixedShape, Mode, RunConfig, StormShape};
use crate::out::print_flushed;
use crate::stream::TlsClient;
use crate::tokens::{Paths, TokenSpec};

/// Largest message the template is built for (it is held twice in memory).
const MAX_MESSAGE: u64 = 256 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "eval-loadgen",
    version,
    about = "Load generator, WebSocket echo backend and fake Conman for eval-proxy",
    long_about = "Load generator, WebSocket echo backend and fake Conman for eval-proxy.\n\n\
        The load modes speak WebSocket to any URL (eval-proxy, nginx, HAProxy, Caddy, or the \
        echo backend directly) and check every echo byte for byte and in order.",
    after_help = "Exit codes: 0 clean run; 1 any verification or connection error, or a \
        runtime failure; 2 bad flags.\n\
        Example:\n  eval-loadgen echo-server --listen 127.0.0.1:9001 &\n  \
        eval-loadgen echo --url ws://127.0.0.1:9001/ --conns 50 --size 64 --duration 10s"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the fake Conman (echoes, misbehaves on request) until killed.
    ///
    /// Prints `listening ADDR` once bound. Text messages `__vm__`, `__headers__`,
    /// `__close__ CODE [REASON]`, `__die__` and `__stall__` are commands; every
    /// other message is echoed.
    Conman(ConmanArgs),
    /// Run the fake Controlplane (the placement HTTP contract) until killed.
    ///
    /// `GET /v1/placement?repl=ID[&exclude=VM]...` places each new repl on the
    /// least-loaded Conman and keeps it there unless excluded; repl ids
    /// starting with `unknown` get 404. `GET /v1/revocations?since=CURSOR`
    /// and `POST /v1/revocations` keep the fleet's revocations (README, "The
    /// Controlplane contract"). Prints `listening ADDR` once bound.
    Controlplane(ControlplaneArgs),
    /// Write a throwaway CA and an ECDSA P-256 certificate it signed for
    /// `localhost` (and 127.0.0.1, ::1) into DIR, as eval-proxy --dev --tls
    /// does: ca.pem (to trust), cert.pem and key.pem (to serve).
    ///
    /// Prints `ca PATH`, `cert PATH` and `key PATH`.
    TlsCert(TlsCertArgs),
    /// Run the fast WebSocket echo backend used behind every proxy in the benchmark.
    ///
    /// One epoll loop per thread; echoes each client frame back unmasked as it
    /// streams in, Ping as Pong, Close then closes. Prints `listening ADDR` once bound.
    EchoServer(EchoServerArgs),
    /// Closed loop: each connection keeps --pipeline messages in flight.
    Echo(EchoArgs),
    /// Open loop at a fixed total rate; latency counts from the intended send
    /// time (coordinated omission corrected).
    Rate(RateArgs),
    /// Handshake storm: connect, upgrade, one echo, close, again, per worker.
    ///
    /// Latency is connect start to the first echo verified.
    Handshake(HandshakeArgs),
    /// Open N sessions, verify each with one echo, print `holding N`, hold them.
    Idle(IdleArgs),
    /// Closed loop with large messages; reports MiB/s.
    Bulk(BulkArgs),
    /// Terminal-like: keystrokes (1-16 B, Poisson per connection) with
    /// occasional output bursts of a few KiB.
    Mixed(MixedArgs),
    /// Reconnect storm: hold N sessions with a light periodic echo, kill a
    /// backend, reconnect every lost session at once; report how long until
    /// all relay again.
    ///
    /// Prints `holding N` once every session echoed, then `killed PID` when
    /// it sends --kill-pid SIGKILL (after --settle). A session closed or
    /// reset by the peer reconnects at once, or after the `retry_after_ms`
    /// of its Close reason (or an HTTP Retry-After); a failed attempt backs
    /// off with full jitter. The storm is over when every lost session
    /// relays again (first echo verified) and --observe has passed, or at
    /// --storm-timeout. Exit 1 if a session never relayed again, nothing
    /// was lost, or an echo was wrong.
    Storm(StormArgs),
}

#[derive(Args, Debug)]
struct ConmanArgs {
    /// Address to bind, e.g. 127.0.0.1:0 for any free port.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// VM id returned by the `__vm__` command.
    #[arg(long, value_name = "ID", default_value = "loadgen-vm")]
    vm: String,
    /// Accept TCP connections and close them at once.
    #[arg(long)]
    refuse: bool,
    /// Answer every upgrade with this HTTP status (4xx/5xx).
    #[arg(long, value_name = "N")]
    reject_status: Option<u16>,
    /// Read the upgrade request and never answer it.
    #[arg(long)]
    stall: bool,
    /// Drop a connection without a Close after echoing this many payload bytes.
    #[arg(long, value_name = "N", value_parser = size)]
    die_after: Option<u64>,
    /// Read at most this many bytes per second per connection.
    #[arg(long, value_name = "BPS", value_parser = size)]
    slow_reader: Option<u64>,
}

#[derive(Args, Debug)]
struct ControlplaneArgs {
    /// Address to bind, e.g. 127.0.0.1:0 for any free port.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// A Conman to place repls on, as VM=ws://HOST:PORT/PATH (repeatable).
    #[arg(long = "conman", value_name = "VM=URL", required = true)]
    conmans: Vec<String>,
    /// ttl_ms in every answer.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    ttl_ms: u64,
    /// Misbehaviour: normal, slow:MS, 503, down, wrong-vm.
    #[arg(long, value_name = "MODE", default_value = "normal")]
    mode: String,
    /// Place repls whose id starts with PREFIX only on these VMs (repeatable;
    /// the first matching prefix wins).
    #[arg(long = "pin", value_name = "PREFIX=VM[,VM...]")]
    pins: Vec<String>,
}

#[derive(Args, Debug)]
struct TlsCertArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

#[derive(Args, Debug)]
struct EchoServerArgs {
    /// Address to bind, e.g. 127.0.0.1:0 for any free port.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Event-loop threads, each with its own SO_REUSEPORT listener.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

/// Options shared by every load mode.
#[derive(Args, Debug)]
struct Target {
    /// ws://HOST:PORT/PATH (or wss://) to load. For eval-proxy the path is
    /// /wsv2/<token>, or /wsv2/ with --token-per-conn.
    #[arg(long, value_name = "URL")]
    url: String,
    /// Speak TLS (implied by a wss:// URL): TLS 1.3 only, AES-128-GCM and
    /// X25519 only, ALPN http/1.1, the eval-proxy build's crypto provider.
    #[arg(long)]
    tls: bool,
    /// With TLS: trust the certificates in this PEM file (and no others).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// With TLS: the server name to send and verify, and the Host header's
    /// name, as a browser's would be [default: the URL's host].
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// With TLS: keep no session cache, so every handshake is a full one
    /// (default: resume with TLS 1.3 tickets kept across connections).
    #[arg(long)]
    no_resume: bool,
    /// Load threads, one epoll loop each; connections are split between them.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=254))]
    threads: u16,
    /// Print one JSON object at the end instead of the text report.
    #[arg(long)]
    json: bool,
    /// Mint a token per connection and append it to the URL path.
    #[arg(long)]
    token_per_conn: bool,
    /// Sign tokens with the public, insecure dev key (kid "dev").
    #[arg(long, conflicts_with = "key")]
    dev_key: bool,
    /// Sign tokens with this `k4.secret.` key file (kid: the file stem).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Use K repls, one token each, minted once and reused (a proxy's
    /// verification cache applies); default: a fresh token per connection attempt.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    repls: Option<u32>,
    /// With fresh tokens: a new repl id for every attempt too (a proxy's
    /// placement cache never hits); default: one repl per connection slot.
    #[arg(long, conflicts_with = "repls")]
    unique_repls: bool,
    /// `cluster` claim of minted tokens.
    #[arg(long, default_value = "dev")]
    cluster: String,
    /// `user` claim of minted tokens.
    #[arg(long, default_value = "loadgen")]
    user: String,
    /// Lifetime of minted tokens.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
    token_ttl: Duration,
    /// Connect from the kernel's choice of source address instead of
    /// spreading client sockets over 127.0.0.0/8.
    #[arg(long)]
    no_spread: bool,
    /// Deadline for connect plus upgrade.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    connect_timeout: Duration,
    /// An echo not back within this is an error.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// Connects in progress per thread while opening connections.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_connecting: u32,
}

#[derive(Args, Debug)]
struct EchoArgs {
    /// Connections.
    #[arg(long, value_name = "N", default_value_t = 50)]
    conns: usize,
    /// Message size (e.g. 64, 4KiB, 1MiB).
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = message_size)]
    size: u32,
    /// Messages in flight per connection.
    #[arg(long, value_name = "D", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pipeline: u32,
    /// How long to run [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = duration, conflicts_with = "messages")]
    duration: Option<Duration>,
    /// Stop after this many echoes in total instead.
    #[arg(long, value_name = "M")]
    messages: Option<u64>,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

#[derive(Args, Debug)]
struct RateArgs {
    /// Connections.
    #[arg(long, value_name = "N", default_value_t = 100)]
    conns: usize,
    /// Message size.
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = message_size)]
    size: u32,
    /// Messages per second, in total across connections.
    #[arg(long, value_name = "R", default_value_t = 5000.0)]
    rate: f64,
    /// How long to run.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Sends due within this of each other share one wake-up.
    #[arg(long, value_name = "DURATION", default_value = "50us", value_parser = duration)]
    tick: Duration,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

#[derive(Args, Debug)]
struct HandshakeArgs {
    /// Concurrent connect-upgrade-echo-close cycles.
    #[arg(long, value_name = "W", default_value_t = 32)]
    workers: usize,
    /// Size of the one echo per cycle.
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = message_size)]
    size: u32,
    /// How long to run.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// With --token-per-conn (and no --repls): mint this many fresh tokens
    /// before the clock starts, so signing does not load the client during
    /// the storm; later attempts mint on the fly.
    #[arg(long, value_name = "N", default_value_t = 0)]
    premint: usize,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// Connections.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    conns: usize,
    /// Size of the verification echo.
    #[arg(long, value_name = "BYTES", default_value = "16", value_parser = message_size)]
    size: u32,
    /// Hold the sessions this long, then close them and report [default: until killed].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    hold: Option<Duration>,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

#[derive(Args, Debug)]
struct BulkArgs {
    /// Connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    conns: usize,
    /// Message size.
    #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = message_size)]
    size: u32,
    /// Messages in flight per connection.
    #[arg(long, value_name = "D", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pipeline: u32,
    /// How long to run [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = duration, conflicts_with = "messages")]
    duration: Option<Duration>,
    /// Stop after this many echoes in total instead.
    #[arg(long, value_name = "M")]
    messages: Option<u64>,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

#[derive(Args, Debug)]
struct MixedArgs {
    /// Connections.
    #[arg(long, value_name = "N", default_value_t = 100)]
    conns: usize,
    /// How long to run.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Keystrokes per second per connection (Poisson).
    #[arg(long, value_name = "R", default_value_t = 10.0)]
    key_rate: f64,
    /// Keystroke messages are 1..=this many bytes.
    #[arg(long, value_name = "BYTES", default_value = "16", value_parser = message_size)]
    key_max: u32,
    /// One message in this many is an output burst.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    burst_every: u32,
    /// Smallest burst message.
    #[arg(long, value_name = "BYTES", default_value = "1KiB", value_parser = message_size)]
    burst_min: u32,
    /// Largest burst message.
    #[arg(long, value_name = "BYTES", default_value = "8KiB", value_parser = message_size)]
    burst_max: u32,
    /// Sends due within this of each other share one wake-up.
    #[arg(long, value_name = "DURATION", default_value = "50us", value_parser = duration)]
    tick: Duration,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

#[derive(Args, Debug)]
struct StormArgs {
    /// Sessions.
    #[arg(long, value_name = "N", default_value_t = 8000)]
    sessions: usize,
    /// Size of each echo.
    #[arg(long, value_name = "BYTES", default_value = "32", value_parser = message_size)]
    size: u32,
    /// Each held session echoes one message this often.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    echo_every: Duration,
    /// Process to SIGKILL once every session is held and --settle has
    /// passed (a backend, standing for a Conman VM). Without it the storm
    /// starts at the first session lost.
    #[arg(long, value_name = "PID")]
    kill_pid: Option<i32>,
    /// Hold this long before the kill; the CPU baseline is taken over it.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = duration)]
    settle: Duration,
    /// Once every session relays again, end if this long has passed since
    /// the storm started.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    observe: Duration,
    /// End the storm this long after it started even if sessions are still
    /// down (they count as failed).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    storm_timeout: Duration,
    /// Backoff after a failed reconnect attempt: full jitter over
    /// min(--retry-cap, this * 2^(n-1)).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = duration)]
    retry_base: Duration,
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    retry_cap: Duration,
    /// A session not relaying again this long after it was lost has failed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    give_up: Duration,
    /// Report this process's CPU time (all threads) over the storm, e.g. the
    /// proxy's (repeatable: nginx's master and worker).
    #[arg(long = "watch-pid", value_name = "PID")]
    watch_pids: Vec<i32>,
    #[command(flatten, next_help_heading = "Target and client")]
    target: Target,
}

impl From<StormArgs> for StormShape {
    fn from(a: StormArgs) -> Self {
        Self {
            kill_pid: a.kill_pid,
            settle: a.settle,
            observe: a.observe,
            timeout: a.storm_timeout,
            echo_every: a.echo_every,
            retry_base: a.retry_base,
            retry_cap: a.retry_cap,
            give_up: a.give_up,
            watch_pids: a.watch_pids,
        }
    }
}

fn size(s: &str) -> Result<u64, String> {
    units::parse_size(s)
}

fn message_size(s: &str) -> Result<u32, String> {
    match units::parse_size(s)? {
        0 => Err("messages need at least 1 byte".into()),
        n if n > MAX_MESSAGE => Err(format!("at most {MAX_MESSAGE} bytes")),
        n => Ok(n as u32),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    units::parse_duration(s)
}

/// Bad flag combinations found after parsing; exit code 2 like clap's own.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

fn controlplane(a: ControlplaneArgs) -> Result<()> {
    use eval_proxy::dev::controlplane::{spawn, FakeControlplaneConfig, FakeMode, Pin};
    let mut conmans = Vec::new();
    for c in &a.conmans {
        let (vm, url) = c
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--conman {c:?}: expected VM=URL")))?;
        conmans.push((vm.to_string(), url.to_string()));
    }
    let mut pins = Vec::new();
    for p in &a.pins {
        let (prefix, vms) = p
            .split_once('=')
            .filter(|(_, vms)| !vms.is_empty())
            .ok_or_else(|| UsageError(format!("--pin {p:?}: expected PREFIX=VM[,VM...]")))?;
        pins.push(Pin {
            prefix: prefix.to_string(),
            vms: vms.split(',').map(str::to_string).collect(),
        });
    }
    let mode = match a.mode.as_str() {
        "normal" => FakeMode::Normal,
        "503" => FakeMode::Unavailable503,
        "down" => FakeMode::Down,
        "wrong-vm" => FakeMode::WrongVm,
        m => match m.strip_prefix("slow:").and_then(|ms| ms.parse().ok()) {
            Some(ms) => FakeMode::Slow(std::time::Duration::from_millis(ms)),
            None => {
                return Err(UsageError(format!(
                    "--mode {m:?}: use normal, slow:MS, 503, down or wrong-vm"
                ))
                .into())
            }
        },
    };
    let cp = spawn(FakeControlplaneConfig {
        listen: a.listen,
        conmans,
        ttl_ms: a.ttl_ms,
        pins,
    })
    .map_err(|e| match e.kind() {
        // A pin naming a VM that is not among the --conman flags.
        std::io::ErrorKind::InvalidInput => usage(e.to_string()),
        _ => {
            anyhow::Error::new(e).context(format!("starting the fake Controlplane on {}", a.listen))
        }
    })?;
    cp.set_mode(mode);
    print_flushed(&format!("listening {}", cp.local_addr))?;
    loop {
        std::thread::park();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("eval-loadgen: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    let (cfg, json) = match cli.command {
        Command::Conman(a) => {
            let behavior = Behavior {
                refuse: a.refuse,
                reject_status: a.reject_status,
                stall_before_101: a.stall,
                die_after_bytes: a.die_after,
                slow_reader_bps: a.slow_reader,
                vm_id: a.vm,
                ..Behavior::default()
            };
            conman::run(a.listen, behavior)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Controlplane(a) => {
            controlplane(a)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::TlsCert(a) => {
            let made = eval_proxy::dev::tls::generate(&a.dir).map_err(anyhow::Error::msg)?;
            print_flushed(&format!(
                "ca {}\ncert {}\nkey {}",
                made.ca.display(),
                made.cert.cert.display(),
                made.cert.key.display()
            ))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::EchoServer(a) => {
            echo_server::run(a.listen, a.threads.into())?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Echo(a) => {
            let duration = default_duration(a.duration, a.messages);
            let mut cfg = base_config(Mode::Echo, &a.target, a.conns)?;
            cfg.size = a.size;
            cfg.pipeline = a.pipeline as usize;
            cfg.duration = duration;
            cfg.messages = a.messages;
            (cfg, a.target.json)
        }
        Command::Rate(a) => {
            if !(a.rate.is_finite() && a.rate > 0.0) {
                return Err(usage("--rate must be a positive number"));
            }
            let mut cfg = base_config(Mode::Rate, &a.target, a.conns)?;
            cfg.size = a.size;
            cfg.rate = a.rate;
            cfg.duration = Some(a.duration);
            cfg.tick = a.tick;
            (cfg, a.target.json)
        }
        Command::Handshake(a) => {
            let mut cfg = base_config(Mode::Handshake, &a.target, a.workers)?;
            cfg.size = a.size;
            cfg.duration = Some(a.duration);
            cfg.premint = a.premint;
            (cfg, a.target.json)
        }
        Command::Idle(a) => {
            let mut cfg = base_config(Mode::Idle, &a.target, a.conns)?;
            cfg.size = a.size;
            cfg.hold = a.hold;
            (cfg, a.target.json)
        }
        Command::Bulk(a) => {
            let duration = default_duration(a.duration, a.messages);
            let mut cfg = base_config(Mode::Bulk, &a.target, a.conns)?;
            cfg.size = a.size;
            cfg.pipeline = a.pipeline as usize;
            cfg.duration = duration;
            cfg.messages = a.messages;
            (cfg, a.target.json)
        }
        Command::Storm(a) => {
            if a.echo_every.is_zero() {
                return Err(usage("--echo-every must be more than 0"));
            }
            let mut cfg = base_config(Mode::Storm, &a.target, a.sessions)?;
            cfg.size = a.size;
            let json = a.target.json;
            cfg.storm = a.into();
            (cfg, json)
        }
        Command::Mixed(a) => {
            if !(a.key_rate.is_finite() && a.key_rate > 0.0) {
                return Err(usage("--key-rate must be a positive number"));
            }
            if a.burst_min > a.burst_max {
                return Err(usage("--burst-min is larger than --burst-max"));
            }
            let mut cfg = base_config(Mode::Mixed, &a.target, a.conns)?;
            cfg.duration = Some(a.duration);
            cfg.tick = a.tick;
            cfg.mixed = MixedShape {
                key_rate: a.key_rate,
                key_max: a.key_max,
                burst_every: a.burst_every,
                burst_min: a.burst_min,
                burst_max: a.burst_max,
            };
            (cfg, a.target.json)
        }
    };
    let report = run::run(cfg, json)?;
    if json {
        print_flushed(&report.to_json())?;
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.error_count() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn default_duration(duration: Option<Duration>, messages: Option<u64>) -> Option<Duration> {
    match (duration, messages) {
        (None, None) => Some(Duration::from_secs(10)),
        (duration, _) => duration,
    }
}

fn base_config(mode: Mode, t: &Target, conns: usize) -> Result<RunConfig> {
    if conns == 0 {
        return Err(usage("at least one connection is needed"));
    }
    let (wss, ws_url) = strip_wss(&t.url);
    let mut url = parse_ws_url(&ws_url).map_err(|e| usage(format!("--url {}: {e}", t.url)))?;
    if wss && !has_port(&ws_url) {
        url.port = 443;
    }
    let target = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", url.host))?
        .next()
        .with_context(|| format!("{} has no address", url.host))?;
    let tls = match (wss || t.tls, &t.ca) {
        (false, None) if t.sni.is_none() && !t.no_resume => None,
        (false, _) => {
            return Err(usage(
                "--ca, --sni and --no-resume need --tls or a wss:// URL",
            ))
        }
        (true, None) => return Err(usage("TLS needs --ca FILE (the certificates to trust)")),
        (true, Some(ca)) => {
            if let Some(sni) = &t.sni {
                url.host = sni.clone();
            }
            Some(TlsClient::new(ca, &url.host, !t.no_resume).map_err(usage)?)
        }
    };
    let spec = match (t.token_per_conn, t.dev_key, &t.key) {
        (false, false, None) => None,
        (false, _, _) => return Err(usage("--dev-key and --key need --token-per-conn")),
        (true, true, _) => Some(TokenSpec::dev()),
        (true, false, Some(path)) => Some(TokenSpec::from_file(path)?),
        (true, false, None) => return Err(usage("--token-per-conn needs --dev-key or --key FILE")),
    };
    let spec = spec.map(|spec| TokenSpec {
        user: t.user.clone(),
        cluster: t.cluster.clone(),
        ttl_s: t.token_ttl.as_secs() as i64,
        repls: t.repls,
        unique_repls: t.unique_repls,
        ..spec
    });
    if t.repls.is_some() && spec.is_none() {
        bail!(usage("--repls needs --token-per-conn"));
    }
    let threads = usize::from(t.threads).min(conns);
    Ok(RunConfig {
        mode,
        target,
        host: url.host_header(),
        paths: Paths::new(&url.path, spec),
        tls,
        conns,
        threads,
        size: 64,
        pipeline: 1,
        duration: None,
        messages: None,
        rate: 0.0,
        mixed: MixedShape {
            key_rate: 10.0,
            key_max: 16,
            burst_every: 20,
            burst_min: 1024,
            burst_max: 8192,
        },
        hold: None,
        spread: !t.no_spread,
        connect_timeout: t.connect_timeout,
        echo_timeout: t.timeout,
        tick: Duration::from_micros(50),
        max_connecting: t.max_connecting as usize,
        premint: 0,
        storm: StormShape::default(),
    })
}

/// `wss://…` as `ws://…` (which the URL parser reads) and whether it was.
fn strip_wss(url: &str) -> (bool, String) {
    match url.get(..6) {
        Some(scheme) if scheme.eq_ignore_ascii_case("wss://") => {
            (true, format!("ws://{}", &url[6..]))
        }
        _ => (false, url.to_owned()),
    }
}

/// Whether a ws:// URL names its port (else wss:// means 443, not 80).
fn has_port(ws_url: &str) -> bool {
    let rest = ws_url.split_once("://").map_or(ws_url, |(_, r)| r);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    // An IPv6 literal's colons are inside its brackets.
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, a)| a);
    after_host.contains(':')
}
