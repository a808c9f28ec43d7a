//! Circuit breaker in front of the Controlplane: after `failures` failures in
//! a row, fail fast for `open_for`; then let one probe through, whose outcome
//! closes or re-opens it. Pure: time is a parameter.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The probe is out; everyone else still fails fast.
    HalfOpen,
}

/// What a request may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    Allow,
    /// Allowed as the half-open probe: its outcome decides the state.
    Probe,
    /// Fail fast; the hint says when asking again may help.
    Reject {
        retry_after: Duration,
    },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    state: State,
    threshold: u32,
    open_for: Duration,
    /// The hint while a probe is out: its answer comes within one request
    /// timeout.
    probe_hint: Duration,
}

/// The `eval_controlplane_breaker_state` gauge value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gauge {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, open_for: Duration, probe_hint: Duration) -> Self {
        Breaker {
            state: State::Closed { failures: 0 },
            threshold: threshold.max(1),
            open_for,
            probe_hint,
        }
    }

    pub(crate) fn check(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Allow,
            State::Open { until } if now < until => Permit::Reject {
                retry_after: until - now,
            },
            State::Open { .. } => {
                self.state = State::HalfOpen;
                Permit::Probe
            }
            State::HalfOpen => Permit::Reject {
                retry_after: self.probe_hint,
            },
        }
    }

    /// Any answer that shows the Controlplane working closes the breaker,
    /// even a late one from a request sent before it opened.
    pub(crate) fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    pub(crate) fn on_failure(&mut self, now: Instant) {
        match self.state {
            State::Closed { failures } if failures + 1 < self.threshold => {
                self.state = State::Closed {
                    failures: failures + 1,
                }
            }
            State::Closed { .. } | State::HalfOpen => self.open(now),
            // Stragglers sent before it opened do not push the probe back.
            State::Open { .. } => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open {
            until: now + self.open_for,
        };
    }

    pub(crate) fn gauge(&self) -> Gauge {
        match self.state {
            State::Closed { .. } => Gauge::Closed,
            State::Open { .. } => Gauge::Open,
            State::HalfOpen => Gauge::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn breaker() -> Breaker {
        Breaker::new(3, 200 * MS, 50 * MS)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.check(t0), Permit::Allow, "a success resets the count");
        b.on_failure(t0);
        assert_eq!(b.gauge(), Gauge::Open);
        assert_eq!(
            b.check(t0 + 50 * MS),
            Permit::Reject {
                retry_after: 150 * MS
            }
        );
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, 200 * MS, 50 * MS);
        b.on_failure(t0);
        let t1 = t0 + 200 * MS;
        assert_eq!(b.check(t1), Permit::Probe);
        assert_eq!(b.gauge(), Gauge::HalfOpen);
        assert_eq!(
            b.check(t1),
            Permit::Reject {
                retry_after: 50 * MS
            }
        );
        b.on_success();
        assert_eq!(b.gauge(), Gauge::Closed);
        assert_eq!(b.check(t1), Permit::Allow);
    }

    #[test]
    fn failed_probe_reopens_for_a_full_period() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, 200 * MS, 50 * MS);
        b.on_failure(t0);
        b.on_failure(t0);
        let t1 = t0 + 300 * MS;
        assert_eq!(b.check(t1), Permit::Probe);
        b.on_failure(t1);
        assert_eq!(b.gauge(), Gauge::Open);
        assert_eq!(
            b.check(t1 + 10 * MS),
            Permit::Reject {
                retry_after: 190 * MS
            }
        );
    }

    #[test]
    fn stragglers_do_not_extend_the_open_period() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, 200 * MS, 50 * MS);
        b.on_failure(t0);
        b.on_failure(t0 + 100 * MS);
        assert_eq!(b.check(t0 + 200 * MS), Permit::Probe);
    }
}
