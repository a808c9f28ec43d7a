//! Repeating warnings at most once per interval, with how many were held
//! back: an out-of-descriptors storm must not turn into gigabytes of log.

use std::time::{Duration, Instant};

pub const EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct LogEvery {
    last: Option<Instant>,
    held_back: u64,
}

impl LogEvery {
    /// `Some(n)` when a line may be written now, `n` being how many were
    /// held back since the last one; `None` while the interval runs.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < EVERY => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t0 = Instant::now();
        let mut l = LogEvery::default();
        assert_eq!(l.check(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(l.check(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.check(t0 + EVERY), Some(1000));
        assert_eq!(l.check(t0 + EVERY), None);
    }
}
