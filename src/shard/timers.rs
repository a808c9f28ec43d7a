//! Session deadlines: one min-heap of (time, slot, generation).
//!
//! Invariant: while a session has a deadline, the heap holds an entry for
//! it at or before that time. Entries are never removed early; one that
//! comes up stale (the session moved its deadline later, or ended) is
//! re-pushed at the real time or dropped. So a session usually has one
//! entry, and moving a deadline later costs nothing.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u32, u16)>>,
}

impl Timers {
    pub fn push(&mut self, at: Instant, slot: u32, gen: u16) {
        self.heap.push(Reverse((at, slot, gen)));
    }

    /// When the earliest entry is due.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// The earliest entry if it is due at `now`, removed.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u32, u16)> {
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
    use std::time::Duration;

    #[test]
    fn pops_only_what_is_due_earliest_first() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.push(t0 + Duration::from_millis(20), 2, 1);
        t.push(t0 + Duration::from_millis(10), 1, 1);
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), Some((1, 1)));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), Some((2, 1)));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), None);
    }
}
