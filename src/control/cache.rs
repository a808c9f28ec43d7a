//! Placement cache: repl → placement until the Controlplane's `ttl_ms`
//! runs out, bounded in entries. Pure: time is a parameter.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

#[derive(Debug)]
struct Entry<V> {
    value: V,
    expires: Instant,
    seq: u64,
}

/// When full, the entry that expires first goes: expired ones before any
/// live one, then the one with the least time left.
#[derive(Debug)]
pub(crate) struct Cache<V> {
    max: usize,
    entries: HashMap<String, Entry<V>>,
    /// (expires, seq) → key, so the next victim is the first key; `seq`
    /// breaks ties between equal deadlines.
    by_expiry: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

impl<V> Cache<V> {
    pub(crate) fn new(max: usize) -> Self {
        Cache {
            max,
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// The live entry for `key`; an expired one is dropped on the way.
    pub(crate) fn get(&mut self, key: &str, now: Instant) -> Option<&V> {
        let expired = self.entries.get(key)?.expires <= now;
        if expired {
            self.remove(key);
            return None;
        }
        self.entries.get(key).map(|e| &e.value)
    }

    pub(crate) fn insert(&mut self, key: &str, value: V, expires: Instant, now: Instant) {
        if self.max == 0 || expires <= now {
            self.remove(key);
            return;
        }
        self.remove(key);
        if self.entries.len() >= self.max {
            if let Some((_, victim)) = self.by_expiry.pop_first() {
                self.entries.remove(&victim);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry.insert((expires, seq), key.to_owned());
        self.entries.insert(
            key.to_owned(),
            Entry {
                value,
                expires,
                seq,
            },
        );
    }

    pub(crate) fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.by_expiry.remove(&(e.expires, e.seq));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.entries.len(), self.by_expiry.len());
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn entries_live_until_their_ttl() {
        let t0 = Instant::now();
        let mut c = Cache::new(8);
        c.insert("r", "vm-1", t0 + 100 * MS, t0);
        assert_eq!(c.get("r", t0 + 99 * MS), Some(&"vm-1"));
        assert_eq!(c.get("r", t0 + 100 * MS), None);
        assert_eq!(c.len(), 0, "expired entry dropped on lookup");
    }

    #[test]
    fn insert_replaces_and_remove_invalidates() {
        let t0 = Instant::now();
        let mut c = Cache::new(8);
        c.insert("r", "vm-1", t0 + 100 * MS, t0);
        c.insert("r", "vm-2", t0 + 50 * MS, t0);
        assert_eq!(c.get("r", t0), Some(&"vm-2"));
        assert_eq!(c.len(), 1);
        c.remove("r");
        assert_eq!(c.get("r", t0), None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn full_cache_evicts_expired_then_soonest_to_expire() {
        let t0 = Instant::now();
        let mut c = Cache::new(3);
        c.insert("a", 1, t0 + 10 * MS, t0);
        c.insert("b", 2, t0 + 500 * MS, t0);
        c.insert("c", 3, t0 + 300 * MS, t0);
        // "a" has expired by now: it goes, not a live one.
        let t1 = t0 + 20 * MS;
        c.insert("d", 4, t1 + 1000 * MS, t1);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("a", t1), None);
        // Full of live entries: "c" has the least time left.
        c.insert("e", 5, t1 + 1000 * MS, t1);
        assert_eq!(c.get("c", t1), None);
        assert_eq!(c.get("b", t1), Some(&2));
        assert_eq!(c.get("d", t1), Some(&4));
        assert_eq!(c.get("e", t1), Some(&5));
    }

    #[test]
    fn zero_capacity_or_zero_ttl_caches_nothing() {
        let t0 = Instant::now();
        let mut c = Cache::new(0);
        c.insert("r", 1, t0 + 10 * MS, t0);
        assert_eq!(c.get("r", t0), None);
        let mut c = Cache::new(4);
        c.insert("r", 1, t0, t0);
        assert_eq!(c.get("r", t0), None);
        assert_eq!(c.len(), 0);
    }
}
