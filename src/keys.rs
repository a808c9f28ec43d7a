//! The token keys in force, replaceable at run time (SIGHUP, or a change
//! in `token.keys_dir`) without a restart, so keys rotate.
//!
//! Shards hold an `Arc<KeySet>` and check one relaxed atomic per loop turn;
//! only when the epoch moved do they take the lock to pick up the new set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::token::KeySet;

pub struct KeyStore {
    epoch: AtomicU64,
    keys: Mutex<Arc<KeySet>>,
}

impl KeyStore {
    pub fn new(keys: KeySet) -> KeyStore {
        KeyStore {
            epoch: AtomicU64::new(0),
            keys: Mutex::new(Arc::new(keys)),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, keys: KeySet) {
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        self.epoch.fetch_add(1, Ordering::Release);
    }
}

/// A shard's view: the set it verifies with and the epoch it came from.
pub struct LocalKeys {
    store: Arc<KeyStore>,
    epoch: u64,
    keys: Arc<KeySet>,
}

impl LocalKeys {
    pub fn new(store: Arc<KeyStore>) -> LocalKeys {
        let epoch = store.epoch();
        let keys = store.current();
        LocalKeys { store, epoch, keys }
    }

    /// Picks up a replaced set; one atomic load when nothing changed.
    pub fn refresh(&mut self) {
        let e = self.store.epoch();
        if e != self.epoch {
            self.epoch = e;
            self.keys = self.store.current();
        }
    }

    pub fn get(&self) -> &KeySet {
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_see_a_replaced_set_after_refresh() {
        let store = Arc::new(KeyStore::new(KeySet::new()));
        let mut local = LocalKeys::new(store.clone());
        assert!(local.get().is_empty());
        let mut ks = KeySet::new();
        ks.insert("k2", crate::token::dev_signing_key().verifying_key());
        store.replace(ks);
        assert!(local.get().is_empty(), "no change before refresh");
        local.refresh();
        assert_eq!(local.get().len(), 1);
    }
}
