//! What each session will do, drawn up front from the seed, so that a seed
//! and a size replay the same sessions (timing aside).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

use rand::rngs::StdRng;
use rand::Rng;

/// Where the client ends its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientEnd {
    /// RST after `bytes` of the request head.
    InHead { bytes: usize },
    /// RST right after the whole head, before reading the 101.
    AfterHead,
    /// RST while Conman holds the upgrade request unanswered (its plan is
    /// a stall).
    InConmanHandshake,
    /// RST after frames `..frame` and `part` wire bytes of `frame`.
    MidFrame { frame: usize, part: usize },
    /// The same, `frame` being large enough to be spliced.
    MidSplice { frame: usize, part: usize },
    /// Everything sent and received, then a Close handshake.
    Close,
}

impl ClientEnd {
    pub fn label(&self) -> &'static str {
        match self {
            ClientEnd::InHead { .. } => "in_head",
            ClientEnd::AfterHead => "after_head",
            ClientEnd::InConmanHandshake => "conman_handshake",
            ClientEnd::MidFrame { .. } => "mid_frame",
            ClientEnd::MidSplice { .. } => "mid_splice",
            ClientEnd::Close => "close",
        }
    }
}

/// What the fake Conman does with this session's upgrade requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConmanPlan {
    Echo,
    /// 503 to the first `times` upgrade requests, then echo.
    Reject {
        times: u32,
    },
    /// Hold the 101 this long (`None`: until the proxy gives up), then echo.
    Stall {
        ms: Option<u32>,
    },
    /// RST once this many client payload bytes arrived.
    ResetAfterRecv {
        bytes: u64,
    },
    /// RST after `part` wire bytes of own frame `frame` (a large one).
    ResetMidOwnFrame {
        frame: usize,
        part: usize,
    },
}

impl ConmanPlan {
    pub fn label(&self) -> &'static str {
        match self {
            ConmanPlan::Echo => "echo",
            ConmanPlan::Reject { .. } => "reject503",
            ConmanPlan::Stall { ms: Some(_) } => "stall",
            ConmanPlan::Stall { ms: None } => "stall_forever",
            ConmanPlan::ResetAfterRecv { .. } => "reset_mid_session",
            ConmanPlan::ResetMidOwnFrame { .. } => "reset_mid_frame",
        }
    }
}

pub struct SessionPlan {
    pub tag: u64,
    /// Payload sizes of the client's frames (Binary).
    pub frames: Vec<usize>,
    /// Payload sizes of Conman's own frames (Text).
    pub own: Vec<usize>,
    pub end: ClientEnd,
    pub conman: ConmanPlan,
}

impl SessionPlan {
    pub fn repl(&self, idx: usize) -> String {
        format!("st{idx}-{:016x}", self.tag)
    }

    /// Parses what [`SessionPlan::repl`] made: (index, tag).
    pub fn parse_repl(repl: &str) -> Option<(usize, u64)> {
        let (idx, tag) = repl.strip_prefix("st")?.split_once('-')?;
        Some((idx.parse().ok()?, u64::from_str_radix(tag, 16).ok()?))
    }

    pub fn up_total(&self) -> u64 {
        self.frames.iter().sum::<usize>() as u64
    }

    pub fn own_total(&self) -> u64 {
        self.own.iter().sum::<usize>() as u64
    }
}

/// What a session's client and Conman tell each other, so a reset can wait
/// for the point it is meant to hit.
#[derive(Default)]
pub struct Progress {
    /// Upgrade requests Conman received for this session.
    pub conman_heads: AtomicU32,
    /// Conman holds an unanswered upgrade request right now.
    pub conman_stalled: AtomicBool,
    /// Client payload bytes Conman received (all attempts).
    pub conman_rx: AtomicU64,
}

/// Larger than `buffers.splice_min`, so the proxy splices it.
pub const LARGE: std::ops::RangeInclusive<usize> = 8 << 10..=64 << 10;

/// A frame size: tiny (empty included), about 1 KiB, or tens of KiB.
fn size(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..100) {
        0..=39 => rng.gen_range(0..=125),
        40..=74 => rng.gen_range(500..=2048),
        _ => rng.gen_range(LARGE),
    }
}

pub fn frame_wire_len(payload: usize, masked: bool) -> usize {
    let ext = match payload {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 } + payload
}

/// Draws `n` sessions; `max_attempts` is the proxy's limit, so that some
/// rejections outlast every attempt and some do not.
pub fn draw(rng: &mut StdRng, n: usize, max_attempts: u32) -> Vec<SessionPlan> {
    let mut tags = HashMap::new();
    (0..n)
        .map(|idx| {
            let tag = loop {
                let t: u64 = rng.gen();
                if tags.insert(t, idx).is_none() {
                    break t;
                }
            };
            let mut frames: Vec<usize> = (0..rng.gen_range(1..=6)).map(|_| size(rng)).collect();
            let mut own: Vec<usize> = (0..rng.gen_range(0..=4)).map(|_| size(rng)).collect();
            let end = match rng.gen_range(0..100) {
                0..=7 => ClientEnd::InHead { bytes: 0 }, // bytes set by the client
                8..=15 => ClientEnd::AfterHead,
                16..=23 => ClientEnd::InConmanHandshake,
                24..=37 => {
                    let frame = rng.gen_range(0..frames.len());
                    frames[frame] = rng.gen_range(0..=2048);
                    let wire = frame_wire_len(frames[frame], true);
                    ClientEnd::MidFrame {
                        frame,
                        part: rng.gen_range(1..wire),
                    }
                }
                38..=51 => {
                    let frame = rng.gen_range(0..frames.len());
                    frames[frame] = rng.gen_range(LARGE);
                    let wire = frame_wire_len(frames[frame], true);
                    ClientEnd::MidSplice {
                        frame,
                        // Inside the payload, far enough from both ends
                        // that splicing has begun and has more to do.
                        part: rng.gen_range(wire / 8..wire - wire / 8),
                    }
                }
                _ => ClientEnd::Close,
            };
            let end = match end {
                ClientEnd::InHead { .. } => ClientEnd::InHead {
                    bytes: rng.gen_range(1..1000),
                },
                e => e,
            };
            let conman = if end == ClientEnd::InConmanHandshake {
                ConmanPlan::Stall {
                    ms: rng.gen_bool(0.5).then_some(5_000),
                }
            } else {
                match rng.gen_range(0..100) {
                    0..=54 => ConmanPlan::Echo,
                    55..=66 => ConmanPlan::Reject {
                        times: rng.gen_range(1..=max_attempts),
                    },
                    67..=76 => ConmanPlan::Stall {
                        ms: Some(rng.gen_range(5..=200)),
                    },
                    77 => ConmanPlan::Stall { ms: None },
                    78..=88 => ConmanPlan::ResetAfterRecv {
                        bytes: rng.gen_range(0..frames.iter().sum::<usize>() as u64 + 1),
                    },
                    _ => {
                        let frame = rng.gen_range(0..=own.len());
                        own.insert(frame, rng.gen_range(LARGE));
                        let wire = frame_wire_len(own[frame], false);
                        ConmanPlan::ResetMidOwnFrame {
                            frame,
                            part: rng.gen_range(wire / 8..wire - wire / 8),
                        }
                    }
                }
            };
            SessionPlan {
                tag,
                frames,
                own,
                end,
                conman,
            }
        })
        .collect()
}

/// Everything the client and Conman threads share.
pub struct Ctx {
    pub plans: Vec<SessionPlan>,
    pub progress: Vec<Progress>,
    pub reg: crate::pattern::Registry,
    /// Conman connections open right now (all fake VMs).
    pub conman_open: std::sync::atomic::AtomicI64,
    /// Tells the fake Conmans to stop.
    pub stop: AtomicBool,
    /// Tells the clients to reset what they have and stop (the proxy died).
    pub abort: AtomicBool,
}

impl Ctx {
    pub fn new(plans: Vec<SessionPlan>) -> Ctx {
        let owner = plans.iter().enumerate().map(|(i, p)| (p.tag, i)).collect();
        Ctx {
            progress: plans.iter().map(|_| Progress::default()).collect(),
            plans,
            reg: crate::pattern::Registry::new(owner),
            conman_open: Default::default(),
            stop: AtomicBool::new(false),
            abort: AtomicBool::new(false),
        }
    }
}
