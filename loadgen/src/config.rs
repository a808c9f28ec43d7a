//! What a load run is asked to do: the mode and its settings, built by
//! `main.rs` from the command line and read by `run`, `worker` and `report`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::stream::TlsClient;
use crate::tokens::Paths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Rate,
    Handshake,
    Idle,
    Bulk,
    Mixed,
    Storm,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Rate => "rate",
            Self::Handshake => "handshake",
            Self::Idle => "idle",
            Self::Bulk => "bulk",
            Self::Mixed => "mixed",
            Self::Storm => "storm",
        }
    }
}

/// The shape of `mixed`: keystrokes with the occasional output burst.
#[derive(Debug, Clone, Copy)]
pub struct MixedShape {
    /// Keystrokes per second per connection (Poisson arrivals).
    pub key_rate: f64,
    /// Keystroke messages are 1..=key_max bytes.
    pub key_max: u32,
    /// One message in this many is a burst.
    pub burst_every: u32,
    pub burst_min: u32,
    pub burst_max: u32,
}

/// The shape of `storm`: sessions held with a light periodic echo, one
/// backend killed, every lost session reconnected at once.
#[derive(Debug, Clone, Default)]
pub struct StormShape {
    /// Sent SIGKILL once every session is held and `settle` has passed;
    /// without it the storm starts at the first session lost.
    pub kill_pid: Option<i32>,
    /// Holding time before the kill (the CPU baseline is taken over it).
    pub settle: Duration,
    /// The storm is over once every session is relaying again and at
    /// least this long has passed since it started.
    pub observe: Duration,
    /// Ends the storm (sessions still down count as failed) this long
    /// after it started, or after `settle` if nothing is ever lost.
    pub timeout: Duration,
    /// Each held session sends one message this often.
    pub echo_every: Duration,
    /// After a failed reconnect attempt: full jitter over
    /// min(cap, base * 2^(n-1)), and never less than a `retry_after` hint.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// A session not relaying again this long after it was lost has failed.
    pub give_up: Duration,
    /// Processes whose CPU time is read at the start and end of the storm.
    pub watch_pids: Vec<i32>,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    pub target: SocketAddr,
    /// Host header value.
    pub host: String,
    pub paths: Paths,
    /// wss://: every connection speaks TLS with this client.
    pub tls: Option<TlsClient>,
    /// Connections (workers, in handshake mode).
    pub conns: usize,
    pub threads: usize,
    /// Message size for every mode but `mixed`.
    pub size: u32,
    pub pipeline: usize,
    pub duration: Option<Duration>,
    pub messages: Option<u64>,
    /// Total messages per second (`rate`).
    pub rate: f64,
    pub mixed: MixedShape,
    /// How long `idle` holds its sessions; forever if `None`.
    pub hold: Option<Duration>,
    pub spread: bool,
    pub connect_timeout: Duration,
    pub echo_timeout: Duration,
    /// Open-loop sends are grouped into wake-ups at least this far apart.
    pub tick: Duration,
    /// Connects in progress per thread during setup.
    pub max_connecting: usize,
    /// Handshake mode: paths with fresh tokens minted before the clock starts.
    pub premint: usize,
    pub storm: StormShape,
}

impl RunConfig {
    pub fn max_message(&self) -> usize {
        match self.mode {
            Mode::Mixed => self.mixed.burst_max.max(self.mixed.key_max) as usize,
            _ => self.size as usize,
        }
    }

    /// Sockets the run may hold at once. A storm drops a lost session's
    /// socket before it opens the next one.
    pub fn max_sockets(&self) -> u64 {
        self.conns as u64
    }
}
