//! Relaying: received bytes pass through the direction's tracker and are
//! queued toward the other side unchanged; Close frames, violations and a
//! side's loss decide how the session ends.

use rand::Rng;

use super::{Chunk, Env, Kind, Op, Phase, Session, Who, RING_HOLD_MAX};
use crate::error::{SetupError, Stage};
use crate::metrics::CloseSide;
use crate::proto::close;
use crate::proto::frame::write_close;
use crate::proto::relay::{Event, Tracker, Violation, ViolationKind};

/// What tracking one run of bytes found.
struct Scanned {
    /// Bytes that belong to valid frames (all of them without a violation).
    good: usize,
    frames: u64,
    /// Code of a Close frame completed in these bytes (1005 if it had none).
    close: Option<u16>,
    violation: Option<Violation>,
}

fn scan(tracker: &mut Tracker, data: &[u8]) -> Scanned {
    let frames_before = tracker.frames();
    let mut off = 0usize;
    let mut close = None;
    let mut violation = None;
    while off < data.len() {
        match tracker.handle(&data[off..]) {
            Ok(scan) => {
                off += scan.consumed;
                if let Some(Event::Close { code, .. }) = scan.event {
                    close = Some(code.unwrap_or(1005));
                }
                if scan.consumed == 0 && scan.event.is_none() {
                    break;
                }
            }
            Err(v) => {
                off += tracker.bytes_valid_before_violation();
                violation = Some(v);
                break;
            }
        }
    }
    Scanned {
        good: if violation.is_some() { off } else { data.len() },
        frames: tracker.frames() - frames_before,
        close,
        violation,
    }
}

/// What to do when a side's stream ends without a Close frame, decided from
/// whether the stream toward the other side is at a frame boundary.
#[derive(Debug, PartialEq, Eq)]
pub enum EofAction {
    /// Inject this Close toward the other side, then shut it down.
    InjectClose { code: u16, reason: String },
    /// Mid-frame: a Close cannot be injected, end the TCP stream cleanly.
    Shutdown,
}

/// Side `from` ended (FIN or error) during relay.
pub fn on_eof(from: Who, peer_stream_at_boundary: bool, close_already: bool) -> EofAction {
    if close_already || !peer_stream_at_boundary {
        return EofAction::Shutdown;
    }
    match from {
        // Conman only needs to know the client left.
        Who::Client => EofAction::InjectClose {
            code: close::GOING_AWAY,
            reason: close::reason_text("client_gone", "eof", None),
        },
        Who::Conman => {
            let e = SetupError::new(Stage::Relay, "conman_lost");
            EofAction::InjectClose {
                code: e.close_code(),
                reason: e.close_reason(),
            }
        }
    }
}

impl Session {
    /// Received bytes, by phase.
    pub(super) fn on_data(&mut self, env: &mut Env, who: Who, bid: u16, data: &[u8]) {
        match (self.kind(), who) {
            (Kind::ProxyHeader, Who::Client) => {
                env.op(Op::Recycle { bid });
                self.on_proxy_bytes(env, data);
            }
            (Kind::Head, Who::Client) => {
                env.op(Op::Recycle { bid });
                self.on_head_bytes(env, data);
            }
            (
                Kind::Verify
                | Kind::Placement
                | Kind::Connecting
                | Kind::ConmanHandshake
                | Kind::Backoff,
                Who::Client,
            ) => {
                env.op(Op::Recycle { bid });
                self.hold(env, data);
            }
            (Kind::ConmanHandshake, Who::Conman) => {
                env.op(Op::Recycle { bid });
                self.on_conman_head(env, data);
            }
            (Kind::Relay, _) => self.relay(env, who, bid, data),
            _ => {
                // Closing (or input we no longer want): drain and discard so
                // the socket can end with a FIN rather than a reset.
                // Conman's answer to the client's Close still reaches the
                // client, unless the proxy already closed toward it.
                let wanted = self.kind() == Kind::Closing && who == Who::Conman;
                if wanted && self.deliverable(Who::Client) {
                    self.forward(env, who, bid, data);
                } else {
                    env.op(Op::Recycle { bid });
                }
            }
        }
    }

    /// Queues a received buffer toward the other side after tracking it.
    fn forward(&mut self, env: &mut Env, from: Who, bid: u16, data: &[u8]) {
        let dir = from.outbound();
        if self.tracker(dir).close_seen() {
            // RFC 6455 5.5.1: nothing follows a Close; ignore what does.
            env.op(Op::Recycle { bid });
            return;
        }
        let scanned = scan(self.tracker(dir), data);
        account(env, from, &scanned);
        let deliverable = self.deliverable(from.other());
        let dest = self.side(from.other());
        if scanned.good > 0 && deliverable {
            if env.ring_low || dest.sendq.len() >= RING_HOLD_MAX {
                // A peer that does not read keeps what is queued for it:
                // in the session's own memory (bounded by backpressure),
                // never in the shard's shared ring, which every session
                // needs to receive anything at all.
                dest.push_owned(data[..scanned.good].to_vec());
                env.op(Op::Recycle { bid });
            } else {
                dest.push(Chunk::Buf {
                    bid,
                    off: 0,
                    len: scanned.good as u32,
                });
            }
        } else {
            env.op(Op::Recycle { bid });
        }
        self.after_scan(env, from, &scanned);
    }

    /// Like `forward`, for bytes the proxy had to copy (setup leftovers).
    pub(super) fn forward_owned(&mut self, env: &mut Env, from: Who, mut data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let scanned = scan(self.tracker(from.outbound()), &data);
        account(env, from, &scanned);
        data.truncate(scanned.good);
        if self.deliverable(from.other()) {
            self.side(from.other()).push_owned(data);
        }
        self.after_scan(env, from, &scanned);
    }

    /// Bytes may still be queued toward `to`: its socket is writable and
    /// the proxy has not sent it a Close, after which nothing may follow
    /// (RFC 6455 5.5.1), whatever was received or held before.
    fn deliverable(&self, to: Who) -> bool {
        let closed_by_proxy = match to {
            Who::Client => self.injected_close_to_client,
            Who::Conman => self.injected_close_to_conman,
        };
        let sd = self.side_ref(to);
        !closed_by_proxy && !sd.shut && !sd.closed
    }

    fn after_scan(&mut self, env: &mut Env, from: Who, scanned: &Scanned) {
        match scanned.violation {
            // A peer may race data against its own Close: drop it quietly.
            Some(v) if v.kind == ViolationKind::DataAfterClose => {}
            Some(v) => {
                tracing::debug!(
                    session = self.id,
                    code = v.code,
                    reason = v.as_str(),
                    "protocol violation"
                );
                self.on_violation(env, from, v);
            }
            None => {}
        }
    }

    fn relay(&mut self, env: &mut Env, from: Who, bid: u16, data: &[u8]) {
        self.forward(env, from, bid, data);
        if self.kind() != Kind::Relay {
            return;
        }
        self.maybe_splice(env, from);
        self.close_progress(env);
    }

    /// After bytes were relayed: a Close seen both ways ends the session
    /// once both are out; a Close seen one way gives the other side
    /// `limits.close_timeout_ms` to answer. Also run for the bytes held
    /// during setup, which may carry a Close of their own.
    pub(super) fn close_progress(&mut self, env: &mut Env) {
        let both_closed = self.to_conman.close_seen() && self.to_client.close_seen();
        if both_closed {
            // The close handshake is complete: end the TCP streams once
            // both Close frames are out.
            self.begin_closing(env);
        } else if (self.to_conman.close_seen() || self.to_client.close_seen())
            && self.deadline.is_none()
        {
            self.set_deadline(
                env.now + std::time::Duration::from_millis(env.cfg.limits.close_timeout_ms),
            );
        }
    }

    fn on_violation(&mut self, env: &mut Env, from: Who, v: Violation) {
        // The violating side gets the protocol close code; the other side
        // learns its peer is gone. Neither hears of the other's bytes again.
        let text = close::reason_text("relay", v.as_str(), None);
        match from {
            Who::Client => {
                self.inject_close(env, Who::Client, v.code, &text);
                self.inject_close(
                    env,
                    Who::Conman,
                    close::GOING_AWAY,
                    "stage=client_gone;reason=protocol_error",
                );
            }
            Who::Conman => {
                self.inject_close(env, Who::Conman, v.code, &text);
                let e = SetupError::new(Stage::Relay, "conman_protocol_error");
                self.inject_close(env, Who::Client, e.close_code(), &e.close_reason());
            }
        }
        self.side(from).eof = true;
        self.transition(env.now, |_| Phase::Closing);
        self.client.want_shut = true;
        self.conman.want_shut = true;
    }

    /// Queues a Close frame toward `to` if its stream is at a frame boundary
    /// and it has not had one; otherwise only its TCP stream will end.
    fn inject_close(&mut self, env: &mut Env, to: Who, code: u16, reason: &str) {
        let (tracker_ok, already, mask) = match to {
            Who::Client => (
                self.to_client.at_frame_boundary(),
                self.injected_close_to_client || self.to_client.close_seen(),
                None,
            ),
            Who::Conman => (
                self.to_conman.at_frame_boundary(),
                self.injected_close_to_conman || self.to_conman.close_seen(),
                Some(env.rng.gen::<[u8; 4]>()),
            ),
        };
        let sd = self.side(to);
        if !tracker_ok || already || sd.fd < 0 || sd.shut || sd.closed {
            return;
        }
        let mut frame = Vec::with_capacity(4 + reason.len() + 8);
        write_close(&mut frame, code, reason, mask);
        sd.push_owned(frame);
        match to {
            Who::Client => {
                self.injected_close_to_client = true;
                env.stats.close_code(CloseSide::ProxyToClient, code);
            }
            Who::Conman => {
                self.injected_close_to_conman = true;
                env.stats.close_code(CloseSide::ProxyToConman, code);
            }
        }
    }

    /// Ends a session from the proxy's side with a Close to both peers.
    pub(super) fn end_session(&mut self, env: &mut Env, code: u16, reason: &str) {
        if self.kind() == Kind::Relay {
            self.inject_close(env, Who::Client, code, reason);
            self.inject_close(env, Who::Conman, close::GOING_AWAY, reason);
        }
        self.begin_closing(env);
    }

    /// A side stopped sending (FIN, reset, failed send).
    pub(super) fn on_side_lost(&mut self, env: &mut Env, who: Who) {
        match (self.kind(), who) {
            // Nothing was promised yet: just go.
            (Kind::ProxyHeader | Kind::Head | Kind::Verify, _) => self.begin_closing(env),
            (
                Kind::Placement | Kind::Connecting | Kind::ConmanHandshake | Kind::Backoff,
                Who::Client,
            ) => self.fail_setup(env, SetupError::new(Stage::ClientGone, "eof")),
            (Kind::Connecting | Kind::ConmanHandshake, Who::Conman) => {
                let e = SetupError::new(Stage::ConmanHandshake, "eof");
                self.retry_or_fail(env, e);
            }
            // An abandoned attempt's socket ending changes nothing.
            (Kind::Placement | Kind::Backoff, Who::Conman) => {}
            (Kind::Relay, _) => {
                let close_already = match who {
                    Who::Client => self.to_conman.close_seen(),
                    Who::Conman => self.to_client.close_seen(),
                };
                let at_boundary = self.tracker(who.outbound()).at_frame_boundary();
                match on_eof(who, at_boundary, close_already) {
                    EofAction::InjectClose { code, reason } => {
                        self.inject_close(env, who.other(), code, &reason);
                    }
                    EofAction::Shutdown => {}
                }
                if who == Who::Conman && !close_already {
                    tracing::debug!(session = self.id, "conman lost mid-session");
                }
                self.begin_closing(env);
            }
            (Kind::Closing, _) => {}
        }
    }
}

fn account(env: &mut Env, from: Who, scanned: &Scanned) {
    env.stats
        .add_bytes(from.outbound(), scanned.good as u64, scanned.frames);
    if let Some(code) = scanned.close {
        let side_label = match from {
            Who::Client => CloseSide::Client,
            Who::Conman => CloseSide::Conman,
        };
        env.stats.close_code(side_label, code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conman_lost_at_boundary_closes_1014() {
        match on_eof(Who::Conman, true, false) {
            EofAction::InjectClose { code, reason } => {
                assert_eq!(code, 1014);
                assert_eq!(reason, "stage=relay;reason=conman_lost");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_gone_tells_conman_1001() {
        assert!(matches!(
            on_eof(Who::Client, true, false),
            EofAction::InjectClose { code: 1001, .. }
        ));
    }

    #[test]
    fn mid_frame_or_after_close_just_shuts_down() {
        assert_eq!(on_eof(Who::Conman, false, false), EofAction::Shutdown);
        assert_eq!(on_eof(Who::Client, true, true), EofAction::Shutdown);
    }
}
