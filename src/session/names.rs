//! VM names shared by the sessions of a shard.
//!
//! Every relaying session keeps its VM's name for the access log and the
//! registry. Thousands of sessions land on a handful of VMs, so each name
//! is allocated once per shard and shared: one pointer per session instead
//! of a heap string each (about 40 bytes of an idle session's footprint).

use std::collections::HashSet;
use std::sync::Arc;

/// The interned names. Bounded: names no session holds any more are
/// dropped whenever the set has doubled since the last sweep, so a
/// Controlplane that places on ever-new VMs cannot grow it past twice the
/// VMs in use.
#[derive(Default)]
pub struct VmNames {
    set: HashSet<Arc<str>>,
    sweep_at: usize,
}

/// Below this many names a sweep is not worth its pass.
const MIN_SWEEP: usize = 64;

impl VmNames {
    /// The shared copy of `name`.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(have) = self.set.get(name) {
            return have.clone();
        }
        if self.set.len() >= self.sweep_at.max(MIN_SWEEP) {
            // Only the set holds these: no session names them.
            self.set.retain(|n| Arc::strong_count(n) > 1);
            self.sweep_at = self.set.len() * 2;
        }
        let name: Arc<str> = Arc::from(name);
        self.set.insert(name.clone());
        name
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_allocation_per_name() {
        let mut n = VmNames::default();
        let a = n.intern("vm-1");
        let b = n.intern("vm-1");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &n.intern("vm-2")));
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn names_nobody_holds_are_swept() {
        let mut n = VmNames::default();
        let kept = n.intern("kept");
        for i in 0..10 * MIN_SWEEP {
            n.intern(&format!("vm-{i}"));
        }
        assert!(n.len() <= 2 * MIN_SWEEP + 1, "{} names", n.len());
        assert!(Arc::ptr_eq(&kept, &n.intern("kept")));
    }
}
