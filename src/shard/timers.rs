//! Session deadlines: one min-heap of (time, slot, generation).
//!
//! Invariant: while a session has a deadline, the heap holds an entry for
//! it at or before that time. Entries are never removed early; one that
//! comes up stale (the session moved its deadline later, or ended) is
//! re-pushed at the real time or dropped. So a session usually has one
//! entry, and moving a deadline later costs nothing.
//!
//! A session in setup leaves a few stale entries behind (one per stage
//! deadline) until they come up, so the heap holds several entries per
//! session for a while: each is 16 bytes (nanoseconds since the heap's
//! base instant, 584 years of range) rather than the 24 of an `Instant`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

pub struct Timers {
    base: Instant,
    heap: BinaryHeap<Reverse<(u64, u32, u16)>>,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers::new(Instant::now())
    }
}

impl Timers {
    /// Deadlines before `base` are due at once.
    pub fn new(base: Instant) -> Timers {
        Timers {
            base,
            heap: BinaryHeap::new(),
        }
    }

    fn since_base(&self, at: Instant) -> u64 {
        // Saturates: u64 nanoseconds outlast any process.
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn push(&mut self, at: Instant, slot: u32, gen: u16) {
        let t = self.since_base(at);
        self.heap.push(Reverse((t, slot, gen)));
    }

    /// When the earliest entry is due.
    pub fn next(&self) -> Option<Instant> {
        self.heap
            .peek()
            .map(|Reverse((t, _, _))| self.base + Duration::from_nanos(*t))
    }

    /// The earliest entry if it is due at `now`, removed.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u32, u16)> {
        let now = self.since_base(now);
        match self.heap.peek() {
            Some(Reverse((t, _, _))) if *t <= now => {
                self.heap.pop().map(|Reverse((_, slot, gen))| (slot, gen))
            }
            _ => None,
        }
    }

    /// A storm of handshakes is over: don't keep its peak.
    pub fn shrink(&mut self) {
        let cap = self.heap.capacity();
        if cap > 1024 && self.heap.len() < cap / 8 {
            self.heap.shrink_to(cap / 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_only_what_is_due_earliest_first() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        t.push(t0 + Duration::from_millis(20), 2, 1);
        t.push(t0 + Duration::from_millis(10), 1, 1);
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), Some((1, 1)));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), Some((2, 1)));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), None);
    }

    #[test]
    fn a_deadline_before_the_base_is_due_at_once() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0 + Duration::from_secs(1));
        t.push(t0, 3, 1);
        assert_eq!(t.pop_due(t0 + Duration::from_secs(1)), Some((3, 1)));
    }

    #[test]
    fn an_entry_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Reverse<(u64, u32, u16)>>(), 16);
    }
}
