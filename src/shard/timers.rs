//! Session deadlines: an indexed min-heap holding at most one entry per
//! session slot, moved in place when the session's deadline moves and
//! removed when the session ends.
//!
//! Why indexed: a heap whose stale entries are dropped only when they come
//! up (the earlier design) kept one entry per setup stage of every session
//! until its time, so a handshake storm left hundreds of thousands behind
//! (15,000 handshakes/s × the header, setup, connect and linger horizons),
//! and popping each walked ~18 levels of cache misses: about 1 µs of the
//! shard's CPU per handshake (`perf annotate` of the ring loop, whose
//! hottest instruction was that sift). Here the heap holds live sessions
//! only, a storm's few dozen in setup fit in cache, and a deadline that
//! does not move costs one comparison.

use std::time::{Duration, Instant};

/// `pos` of a slot that has no entry.
const ABSENT: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    /// Nanoseconds since `base` (584 years of range).
    at: u64,
    slot: u32,
}

pub struct Timers {
    base: Instant,
    heap: Vec<Node>,
    /// Per slot, where its entry is in `heap`, or `ABSENT`.
    pos: Vec<u32>,
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
            heap: Vec::new(),
            pos: Vec::new(),
        }
    }

    fn since_base(&self, at: Instant) -> u64 {
        // Saturates: u64 nanoseconds outlast any process.
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// `slot`'s deadline is now `at` (`None`: it has none).
    pub fn set(&mut self, slot: u32, at: Option<Instant>) {
        let i = self.pos.get(slot as usize).copied().unwrap_or(ABSENT);
        match at {
            None if i != ABSENT => {
                self.remove_at(i as usize);
            }
            None => {}
            Some(at) => {
                let t = self.since_base(at);
                if i == ABSENT {
                    let s = slot as usize;
                    if s >= self.pos.len() {
                        self.pos.resize(s + 1, ABSENT);
                    }
                    self.heap.push(Node { at: t, slot });
                    self.sift_up(self.heap.len() - 1);
                } else {
                    let i = i as usize;
                    let old = self.heap[i].at;
                    self.heap[i].at = t;
                    if t < old {
                        self.sift_up(i);
                    } else if t > old {
                        self.sift_down(i);
                    }
                }
            }
        }
    }

    /// When the earliest deadline is.
    pub fn next(&self) -> Option<Instant> {
        self.heap
            .first()
            .map(|n| self.base + Duration::from_nanos(n.at))
    }

    /// The slot whose deadline is earliest, if it is due at `now`; its
    /// entry is removed.
    pub fn pop_due(&mut self, now: Instant) -> Option<u32> {
        let now = self.since_base(now);
        match self.heap.first() {
            Some(n) if n.at <= now => Some(self.remove_at(0).slot),
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

    fn remove_at(&mut self, i: usize) -> Node {
        let n = self.heap.swap_remove(i);
        self.pos[n.slot as usize] = ABSENT;
        if i < self.heap.len() {
            // The last entry took its place and may belong above or below.
            let j = self.sift_up(i);
            self.sift_down(j);
        }
        n
    }

    /// Moves the entry at `i` up to its place; returns where it ended.
    fn sift_up(&mut self, mut i: usize) -> usize {
        let n = self.heap[i];
        while i > 0 {
            let parent = (i - 1) / 2;
            let p = self.heap[parent];
            if p.at <= n.at {
                break;
            }
            self.put(i, p);
            i = parent;
        }
        self.put(i, n);
        i
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap[i];
        let len = self.heap.len();
        loop {
            let l = 2 * i + 1;
            if l >= len {
                break;
            }
            let r = l + 1;
            let c = if r < len && self.heap[r].at < self.heap[l].at {
                r
            } else {
                l
            };
            let child = self.heap[c];
            if n.at <= child.at {
                break;
            }
            self.put(i, child);
            i = c;
        }
        self.put(i, n);
    }

    /// Stores `n` at `i` and records where it is.
    fn put(&mut self, i: usize, n: Node) {
        self.heap[i] = n;
        self.pos[n.slot as usize] = i as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, n: u64) -> Option<Instant> {
        Some(t0 + Duration::from_millis(n))
    }

    #[test]
    fn pops_only_what_is_due_earliest_first() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        t.set(2, ms(t0, 20));
        t.set(1, ms(t0, 10));
        assert_eq!(t.next(), ms(t0, 10));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), Some(1));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), Some(2));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(30)), None);
        assert_eq!(t.next(), None);
    }

    #[test]
    fn a_deadline_before_the_base_is_due_at_once() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0 + Duration::from_secs(1));
        t.set(3, Some(t0));
        assert_eq!(t.pop_due(t0 + Duration::from_secs(1)), Some(3));
    }

    #[test]
    fn a_slot_has_one_entry_that_moves_and_goes() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        t.set(5, ms(t0, 50));
        t.set(5, ms(t0, 5));
        t.set(7, ms(t0, 7));
        assert_eq!(t.next(), ms(t0, 5));
        // Later: the entry moves, nothing is left at the old time.
        t.set(5, ms(t0, 90));
        assert_eq!(t.next(), ms(t0, 7));
        t.set(7, None);
        t.set(7, None);
        assert_eq!(t.next(), ms(t0, 90));
        let end = t0 + Duration::from_secs(1);
        assert_eq!(t.pop_due(end), Some(5));
        assert_eq!(t.pop_due(end), None);
    }

    /// Random sets, removals and pops against a plain list.
    #[test]
    fn agrees_with_a_list_under_random_use() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        let mut model: Vec<Option<u64>> = vec![None; 64];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut now = 0u64;
        for _ in 0..20_000 {
            let r = rnd();
            let slot = (r % 64) as u32;
            match (r >> 8) % 4 {
                0 => {
                    t.set(slot, None);
                    model[slot as usize] = None;
                }
                1 => {
                    now += (r >> 16) % 5;
                    let at = t0 + Duration::from_millis(now);
                    let got = t.pop_due(at);
                    let want_at = model.iter().flatten().min().copied();
                    match got {
                        Some(s) => {
                            assert_eq!(model[s as usize], want_at, "popped a slot not earliest");
                            assert!(want_at.unwrap() <= now);
                            model[s as usize] = None;
                        }
                        None => assert!(want_at.is_none_or(|w| w > now)),
                    }
                }
                _ => {
                    let d = now + (r >> 16) % 100;
                    t.set(slot, ms(t0, d));
                    model[slot as usize] = Some(d);
                }
            }
            let want = model
                .iter()
                .flatten()
                .min()
                .map(|&m| t0 + Duration::from_millis(m));
            assert_eq!(t.next(), want);
            assert_eq!(t.heap.len(), model.iter().flatten().count());
        }
    }
}
