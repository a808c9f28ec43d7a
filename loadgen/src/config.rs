//! What a load run is asked to do: the mode and its settings, built by
//! `main.rs` from the command line and read by `run`, `worker` and `report`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::tokens::Paths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Rate,
    Handshake,
    Idle,
    Bulk,
    Mixed,
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

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    pub target: SocketAddr,
    /// Host header value.
    pub host: String,
    pub paths: Paths,
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
}

impl RunConfig {
    pub fn max_message(&self) -> usize {
        match self.mode {
            Mode::Mixed => self.mixed.burst_max.max(self.mixed.key_max) as usize,
            _ => self.size as usize,
        }
    }

    /// Sockets the run may hold at once.
    pub fn max_sockets(&self) -> u64 {
        self.conns as u64
    }
}
