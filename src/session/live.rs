//! Liveness while relaying: the proxy's own Pings to a side that has gone
//! silent, the Pongs that answer them (swallowed, never relayed), and the
//! end of a session whose side stays silent (`keepalive.timeout_s`) or that
//! carries no data frame at all (`limits.idle_timeout_s`).
//!
//! Every decision is taken at the session's timer ([`Session::check_liveness`]);
//! the receive path only notes the time a side was heard from, and the
//! relay looks at one flag to place a Ping that had to wait for a frame
//! boundary. Times are milliseconds since the session started, in 32 bits
//! that wrap: only differences are taken, and each is far below 49 days
//! because the timer looks at least once per period (config caps them).

use std::time::{Duration, Instant};

use super::{Env, Phase, Session, Who};
use crate::error::{SetupError, Stage};
use crate::proto::close;
use crate::proto::frame::{write_control, OpCode};

/// How soon a Ping that waits for a frame boundary is tried again when no
/// boundary has come by (at most; less with a shorter interval).
const RETRY_MS: u32 = 1000;

/// A side's index in [`Live`]'s arrays.
fn ix(who: Who) -> usize {
    match who {
        Who::Client => 0,
        Who::Conman => 1,
    }
}

/// Keepalive (and move) state, carried by `Phase::Relay` (24 bytes, inside the room
/// the phase enum already has, so a session does not grow).
#[derive(Debug)]
pub struct Live {
    /// When each side last sent anything.
    heard: [u32; 2],
    /// When the proxy last pinged each side; that Ping is unanswered while
    /// this is later than `heard`.
    pinged: [u32; 2],
    /// When the last data frame went either way.
    data: u32,
    /// A Ping is due toward the side, but what goes to it is inside a
    /// frame: it goes at the next frame boundary.
    due: [bool; 2],
    /// A Close went one way and the close timer owns the deadline:
    /// liveness is no longer checked.
    pub(super) closing: bool,
    /// A move to a new process (`handoff.rs`): only a relaying session
    /// moves, so the state lives here, in the phase's spare room.
    pub(super) moving: super::handoff::Moving,
}

impl Live {
    pub(super) fn new(now_ms: u32) -> Live {
        Live {
            heard: [now_ms; 2],
            pinged: [now_ms; 2],
            data: now_ms,
            due: [false; 2],
            closing: false,
            moving: super::handoff::Moving::No,
        }
    }

    /// Something arrived from `who` (the one thing the receive path does).
    #[inline]
    pub(super) fn heard(&mut self, who: Who, now_ms: u32) {
        self.heard[ix(who)] = now_ms;
    }

    /// The later of the two `heard` times, in milliseconds after the
    /// session's start (a session older than 49 days wraps, which only
    /// blurs a drain's order).
    pub(super) fn last_heard(&self) -> u32 {
        self.heard[0].max(self.heard[1])
    }

    /// When `who` last sent anything (same clock as [`Live::last_heard`]).
    pub(super) fn heard_at(&self, who: Who) -> u32 {
        self.heard[ix(who)]
    }

    pub(super) fn data_seen(&mut self, now_ms: u32) {
        self.data = now_ms;
    }

    /// A Ping waits for a frame boundary toward `to`.
    #[inline]
    pub(super) fn ping_due(&self, to: Who) -> bool {
        self.due[ix(to)]
    }

    fn unanswered(&self, i: usize) -> bool {
        (self.pinged[i].wrapping_sub(self.heard[i]) as i32) > 0
    }
}

impl Live {
    /// As durations before the session clock's `t` (now), for a record.
    pub(super) fn to_record(&self, t: u32) -> super::handoff::LiveRecord {
        super::handoff::LiveRecord {
            heard_ago_ms: self.heard.map(|h| t.wrapping_sub(h)),
            pinged_ago_ms: self.pinged.map(|p| t.wrapping_sub(p)),
            data_ago_ms: t.wrapping_sub(self.data),
            ping_due: self.due,
            closing: self.closing,
        }
    }

    /// The clock of a record, on a session clock that reads `t` now.
    pub(super) fn from_record(r: &super::handoff::LiveRecord, t: u32) -> Live {
        Live {
            heard: r.heard_ago_ms.map(|a| t.wrapping_sub(a)),
            pinged: r.pinged_ago_ms.map(|a| t.wrapping_sub(a)),
            data: t.wrapping_sub(r.data_ago_ms),
            due: r.ping_due,
            closing: r.closing,
            moving: super::handoff::Moving::No,
        }
    }
}

/// The payload of the proxy's Pings to this session's peers: the Pong
/// that carries it back is the proxy's, any other is relayed.
pub fn ping_payload(session: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(b"evalping");
    p[8..].copy_from_slice(&session.to_be_bytes());
    p
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX)) as u32
}

/// Where a pending Ping may go in an input of `len` bytes of which the
/// first `now` are passed on and `hold` held: the last frame boundary in
/// it, if there is one.
pub(super) fn ping_offset(
    at_boundary: bool,
    fed: u64,
    now: usize,
    hold: usize,
    len: usize,
) -> Option<usize> {
    if hold > 0 || at_boundary {
        return Some(now);
    }
    // Inside a frame too long to hold, streaming: it began at `len - fed`
    // if it began in this input.
    usize::try_from(fed)
        .ok()
        .filter(|&fed| fed <= len)
        .map(|fed| len - fed)
}

impl Session {
    /// The session's clock: milliseconds since it started, wrapping.
    #[inline]
    pub(super) fn clock(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.started).as_millis() as u32
    }

    pub(super) fn live(&self) -> Option<&Live> {
        match &self.phase {
            Phase::Relay(l) => Some(l),
            _ => None,
        }
    }

    pub(super) fn live_mut(&mut self) -> Option<&mut Live> {
        match &mut self.phase {
            Phase::Relay(l) => Some(l),
            _ => None,
        }
    }

    /// A data frame went by (only with `limits.idle_timeout_s` set).
    pub(super) fn note_data(&mut self, now: Instant) {
        let t = self.clock(now);
        if let Phase::Relay(l) = &mut self.phase {
            l.data_seen(t);
        }
    }

    /// Bytes came from `who`: the receive path's only liveness work, a
    /// store (and no clock arithmetic outside `Relay`).
    #[inline]
    pub(super) fn note_heard(&mut self, now: Instant, who: Who) {
        let started = self.started;
        if let Phase::Relay(l) = &mut self.phase {
            l.heard(
                who,
                now.saturating_duration_since(started).as_millis() as u32,
            );
        }
    }

    /// A Ping may go to `to` now only if the proxy could still write a
    /// frame to it and neither peer has begun closing.
    fn may_ping(&self, to: Who) -> bool {
        !self.to_conman.close_seen() && !self.to_client.close_seen() && self.deliverable(to)
    }

    /// Queues the proxy's Ping toward `to`. The caller knows that what is
    /// queued for `to` ends at a frame boundary.
    pub(super) fn inject_ping(&mut self, env: &mut Env, to: Who) {
        let t = self.clock(env.now);
        let mask = match to {
            // The proxy is Conman's client: its frames are masked.
            Who::Conman => Some(rand::Rng::gen::<[u8; 4]>(env.rng)),
            Who::Client => None,
        };
        let mut frame = Vec::with_capacity(2 + 4 + 16);
        write_control(&mut frame, OpCode::Ping, &ping_payload(self.id), mask);
        self.side(to).push_owned(frame);
        env.stats.keepalive_ping(to == Who::Client);
        if let Some(l) = self.live_mut() {
            l.pinged[ix(to)] = t;
            l.due[ix(to)] = false;
        }
    }

    /// Called from the relay while a Ping toward `to` waits for a frame
    /// boundary: whether it should still go (the side may have spoken
    /// meanwhile, or the session begun to close).
    pub(super) fn ping_still_wanted(&mut self, env: &Env, to: Who) -> bool {
        let interval = millis(env.cfg.keepalive.interval());
        let t = self.clock(env.now);
        let ok = self.may_ping(to);
        let Some(l) = self.live_mut() else {
            return false;
        };
        let i = ix(to);
        if !ok || t.wrapping_sub(l.heard[i]) < interval || l.unanswered(i) {
            l.due[i] = false;
            return false;
        }
        true
    }

    /// The liveness deadline came: ping silent sides, end the session if a
    /// side is dead or it carried no data for too long, and set the next
    /// deadline.
    pub(super) fn check_liveness(&mut self, env: &mut Env) {
        if std::mem::take(&mut self.conman.tcp_keepalive_due) {
            self.conman_tcp_keepalive(env);
        }
        let interval = millis(env.cfg.keepalive.interval());
        let timeout = millis(env.cfg.keepalive.timeout());
        let idle = millis(env.cfg.limits.idle_timeout());
        let t = self.clock(env.now);
        for who in [Who::Client, Who::Conman] {
            // Silence the proxy causes or cannot see says nothing of the
            // peer: a side it stopped reading (backpressure, no buffers),
            // or one it is still sending to (a slow reader: that the data
            // is acknowledged is TCP_USER_TIMEOUT's to judge). It counts
            // as heard now, so it gets a whole timeout once that ends.
            let sd = self.side_ref(who);
            if sd.paused || sd.sending || self.splice_waits_on(who) {
                if let Some(l) = self.live_mut() {
                    l.heard(who, t);
                }
            }
        }
        let Some(l) = self.live() else {
            return;
        };
        for who in [Who::Client, Who::Conman] {
            if timeout > 0 && t.wrapping_sub(l.heard[ix(who)]) >= timeout {
                self.peer_timed_out(env, who);
                return;
            }
        }
        if idle > 0 && t.wrapping_sub(l.data) >= idle {
            tracing::debug!(session = self.id, "idle timeout");
            self.ended(super::access::End::IdleTimeout);
            env.stats.peer_timeout("idle");
            let reason = close::reason_text("relay", "idle_timeout", None);
            self.end_session(env, close::GOING_AWAY, &reason);
            return;
        }
        if interval > 0 {
            for to in [Who::Client, Who::Conman] {
                let i = ix(to);
                let Some(l) = self.live() else {
                    return;
                };
                if l.due[i] || l.unanswered(i) || t.wrapping_sub(l.heard[i]) < interval {
                    continue;
                }
                if !self.may_ping(to) {
                    continue;
                }
                // What goes to `to` travels in the other side's direction.
                let dir = to.other().outbound();
                if self.passed_at_boundary(dir) {
                    self.inject_ping(env, to);
                } else if let Some(l) = self.live_mut() {
                    l.due[i] = true;
                }
            }
        }
        self.schedule_liveness(env);
    }

    /// Sets the deadline to the next moment liveness needs a look.
    pub(super) fn schedule_liveness(&mut self, env: &mut Env) {
        let interval = millis(env.cfg.keepalive.interval());
        let timeout = millis(env.cfg.keepalive.timeout());
        let idle = millis(env.cfg.limits.idle_timeout());
        let t = self.clock(env.now);
        let Some(l) = self.live() else {
            return;
        };
        if l.closing {
            return;
        }
        // Time left until `since + period`, from now (0 if past).
        let left = |since: u32, period: u32| period.saturating_sub(t.wrapping_sub(since));
        let mut next: Option<u32> = None;
        let mut at = |d: u32| next = Some(next.map_or(d, |n| n.min(d)));
        for i in 0..2 {
            if timeout > 0 {
                at(left(l.heard[i], timeout));
            }
            if interval > 0 {
                if l.due[i] {
                    at(RETRY_MS.min(interval));
                } else if l.unanswered(i) {
                    // A Pong does not move the deadline (the receive path
                    // does no timer work): look again every interval after
                    // the Ping, and count from the Pong once it is in.
                    at(interval - t.wrapping_sub(l.pinged[i]) % interval);
                } else {
                    at(left(l.heard[i], interval));
                }
            }
        }
        if idle > 0 {
            at(left(l.data, idle));
        }
        self.deadline = next.map(|d| env.now + Duration::from_millis(u64::from(d.max(1))));
    }

    /// `who` has sent nothing for `keepalive.timeout_s`: it is gone as if
    /// its connection had dropped. The other side hears why; the silent
    /// one is reset, so its socket goes now rather than after the linger.
    fn peer_timed_out(&mut self, env: &mut Env, who: Who) {
        tracing::debug!(session = self.id, side = ?who, "peer timed out");
        env.stats.peer_timeout(match who {
            Who::Client => "client",
            Who::Conman => "conman",
        });
        self.side_lost_as(env, who, true);
        self.reset_side(env, who);
    }

    /// The Close the other side gets when `from` is lost mid-session.
    pub(super) fn lost_close(from: Who, timed_out: bool) -> (u16, String) {
        match (from, timed_out) {
            (Who::Client, false) => (
                close::GOING_AWAY,
                close::reason_text("client_gone", "eof", None),
            ),
            (Who::Client, true) => (
                close::GOING_AWAY,
                close::reason_text("relay", "client_timeout", None),
            ),
            (Who::Conman, timed_out) => {
                let e = SetupError::new(
                    Stage::Relay,
                    if timed_out {
                        "conman_timeout"
                    } else {
                        "conman_lost"
                    },
                );
                (e.close_code(), e.close_reason())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_goes_at_the_last_boundary_of_an_input() {
        // Whole frames only: after all of them.
        assert_eq!(ping_offset(true, 0, 10, 0, 10), Some(10));
        // A short frame's start is held: right before it.
        assert_eq!(ping_offset(false, 4, 6, 4, 10), Some(6));
        // A long frame began 4 bytes before the end: before it.
        assert_eq!(ping_offset(false, 4, 10, 0, 10), Some(6));
        // A long frame that began in an earlier input: nowhere.
        assert_eq!(ping_offset(false, 11, 10, 0, 10), None);
    }

    #[test]
    fn unanswered_follows_the_wrapping_clock() {
        let mut l = Live::new(u32::MAX - 5);
        assert!(!l.unanswered(0));
        l.pinged[0] = 3; // after the wrap
        assert!(l.unanswered(0));
        l.heard(Who::Client, 4);
        assert!(!l.unanswered(0));
    }
}
