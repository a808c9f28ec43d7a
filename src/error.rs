//! Where a session setup failed, as one value that yields the metric label,
//! the log field and the Close frame the client gets.

use crate::proto::close;

/// Setup stages, in flow order. Variant names match the `stage` label of
/// `eval_session_setup_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Request,
    /// Turned away before the upgrade by a limit on sessions or handshakes
    /// (per client address, per shard).
    Admission,
    Token,
    Controlplane,
    ConmanConnect,
    /// `wss://` to Conman: the TLS handshake (its certificate, ours, the
    /// deadline) or a record during setup.
    ConmanTls,
    ConmanHandshake,
    ClientGone,
    /// Not a setup stage: the relay after setup (Conman lost mid-session).
    Relay,
    /// Draining or evacuating.
    Drain,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Request => "request",
            Stage::Admission => "admission",
            Stage::Token => "token",
            Stage::Controlplane => "controlplane",
            Stage::ConmanConnect => "conman_connect",
            Stage::ConmanTls => "conman_tls",
            Stage::ConmanHandshake => "conman_handshake",
            Stage::ClientGone => "client_gone",
            Stage::Relay => "relay",
            Stage::Drain => "drain",
        }
    }

    /// The close code a client gets when this stage fails after the 101.
    pub fn close_code(self) -> u16 {
        match self {
            Stage::Request => close::PROTOCOL_ERROR,
            Stage::Token => close::POLICY,
            Stage::Admission | Stage::Controlplane => close::TRY_AGAIN_LATER,
            Stage::ConmanConnect | Stage::ConmanTls | Stage::ConmanHandshake | Stage::Relay => {
                close::BAD_GATEWAY
            }
            Stage::ClientGone => close::GOING_AWAY,
            Stage::Drain => close::SERVICE_RESTART,
        }
    }
}

/// The reason word when the proxy itself has no descriptor left.
pub const OUT_OF_FDS: &str = "out_of_fds";

/// A failed setup: `reason` is a snake_case word (metric label and close reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupError {
    pub stage: Stage,
    pub reason: &'static str,
    pub retry_after_ms: Option<u64>,
}

impl SetupError {
    pub fn new(stage: Stage, reason: &'static str) -> Self {
        SetupError {
            stage,
            reason,
            retry_after_ms: None,
        }
    }

    pub fn close_code(&self) -> u16 {
        // The Controlplane does not know the token's repl: another attempt
        // will not help, a fresh token (which names the repl anew) may.
        if self.stage == Stage::Controlplane && self.reason == "unknown_repl" {
            return close::POLICY;
        }
        // The proxy ran out of descriptors: its own fault, not Conman's.
        if self.reason == OUT_OF_FDS {
            return close::INTERNAL;
        }
        self.stage.close_code()
    }

    /// `stage=STAGE;reason=WORD[;retry_after_ms=N]`, at most 123 bytes.
    pub fn close_reason(&self) -> String {
        close::reason_text(self.stage.as_str(), self.reason, self.retry_after_ms)
    }
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage={} reason={}", self.stage.as_str(), self.reason)
    }
}

impl std::error::Error for SetupError {}
