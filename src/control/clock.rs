//! The control shard's time source. Every decision takes `now` as a
//! parameter (`placer.rs`); the glue in `service.rs` reads it from a
//! [`Clock`]: the real one in production, or one a test moves by hand
//! ([`ManualClock`]) to pass cache TTLs, the breaker's open period and
//! admission refills without sleeping. Request timeouts are glommio timers
//! and always run on real time.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the control shard reads `now`.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<Manual>>);

#[derive(Debug)]
struct Manual {
    start: Instant,
    /// Nanoseconds advanced since `start`.
    elapsed: AtomicU64,
}

impl Clock {
    /// `Instant::now()`.
    pub fn real() -> Clock {
        Clock(None)
    }

    pub fn now(&self) -> Instant {
        match &self.0 {
            None => Instant::now(),
            Some(m) => m.start + Duration::from_nanos(m.elapsed.load(Ordering::Acquire)),
        }
    }
}

/// A clock that stands still until [`advance`](Self::advance)d; its
/// [`clock`](Self::clock) handles, wherever they are read, all see the same
/// time.
#[derive(Debug)]
pub struct ManualClock(Arc<Manual>);

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock(Arc::new(Manual {
            start: Instant::now(),
            elapsed: AtomicU64::new(0),
        }))
    }

    pub fn clock(&self) -> Clock {
        Clock(Some(self.0.clone()))
    }

    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).expect("advance by less than 584 years");
        self.0.elapsed.fetch_add(ns, Ordering::AcqRel);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let m = ManualClock::new();
        let (a, b) = (m.clock(), m.clock());
        let t0 = a.now();
        assert_eq!(b.now(), t0);
        m.advance(Duration::from_millis(250));
        assert_eq!(a.now(), t0 + Duration::from_millis(250));
        assert_eq!(b.now(), a.now());
    }

    #[test]
    fn real_clock_runs() {
        let c = Clock::real();
        let t0 = c.now();
        assert!(c.now() >= t0);
    }
}
