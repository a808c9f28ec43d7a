//! Why a placement failed: one word per cause, shared by the placer that
//! decides it, the client and `http` that detect it, and the stats that
//! count it. A leaf, so `stats` need not depend on `placer`.

/// Why a placement could not be had; the label words of `wire.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UnknownRepl,
    NoCapacity,
    Timeout,
    Unavailable,
    CircuitOpen,
    BadResponse,
    Admission,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::UnknownRepl,
        Reason::NoCapacity,
        Reason::Timeout,
        Reason::Unavailable,
        Reason::CircuitOpen,
        Reason::BadResponse,
        Reason::Admission,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownRepl => "unknown_repl",
            Reason::NoCapacity => "no_capacity",
            Reason::Timeout => "timeout",
            Reason::Unavailable => "unavailable",
            Reason::CircuitOpen => "circuit_open",
            Reason::BadResponse => "bad_response",
            Reason::Admission => "admission",
        }
    }
}
