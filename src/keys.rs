//! The token keys in force, replaceable at run time (SIGHUP, or a change
//! in `token.keys_dir`) without a restart, so keys rotate.
//!
//! Shards hold an `Arc<KeySet>` and check one relaxed atomic per loop turn;
//! only when the epoch moved do they take the lock to pick up the new set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::token::revoke::RevokeSet;
use crate::token::{verify, verify_many, Claims, KeySet, TokenError, VerifyOptions};

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

    /// How many times the set was replaced since start: moves on every
    /// successful reload (a failed one keeps the old set and this count),
    /// so it is also the `eval_token_key_reloads_total` counter.
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

/// What a session keeps of its verified token: the claims it routes and
/// labels by, and the `jti` revocations match, in one allocation. Every
/// live session and every cache entry holds one, so at thousands of
/// sessions the four separately allocated strings of [`Claims`] would cost
/// more than the rest of an idle session.
#[derive(Debug, PartialEq, Eq)]
pub struct Ident {
    pub exp: i64,
    pub nbf: i64,
    /// repl, user, cluster and jti, back to back.
    text: Box<str>,
    repl_end: u32,
    user_end: u32,
    cluster_end: u32,
}

impl Ident {
    pub fn new(c: &Claims) -> Ident {
        let text = [c.repl.as_str(), &c.user, &c.cluster, &c.jti].concat();
        // The token is bounded far below 4 GiB, so are its claims.
        let repl_end = c.repl.len() as u32;
        let user_end = repl_end + c.user.len() as u32;
        Ident {
            exp: c.exp,
            nbf: c.nbf,
            repl_end,
            user_end,
            cluster_end: user_end + c.cluster.len() as u32,
            text: text.into_boxed_str(),
        }
    }

    /// The token's id (revocations by `jti` match it).
    pub fn jti(&self) -> &str {
        &self.text[self.cluster_end as usize..]
    }

    /// Whether `set` revokes this token at `now_unix`.
    pub fn revoked_in(&self, set: &RevokeSet, now_unix: i64) -> bool {
        set.matches(self.jti(), self.user(), self.repl(), now_unix)
    }

    pub fn repl(&self) -> &str {
        &self.text[..self.repl_end as usize]
    }

    pub fn user(&self) -> &str {
        &self.text[self.repl_end as usize..self.user_end as usize]
    }

    pub fn cluster(&self) -> &str {
        &self.text[self.user_end as usize..self.cluster_end as usize]
    }
}

/// Tokens this shard verified recently, so a client that reconnects with
/// the same token (the common case: a token lives for minutes, reconnects
/// happen in seconds) costs a hash lookup instead of an Ed25519 verify.
///
/// Only successful verifications are kept, keyed by the SHA-256 of the
/// token text (32 bytes instead of the token's hundreds, and no collision
/// anyone can produce), so a hit is a token whose signature was already
/// checked under the same keys; its time window is checked again on every
/// hit. Two
/// generations bound it: when the current one fills, it becomes the
/// previous one and the old previous is dropped.
pub struct VerifyCache {
    current: HashMap<[u8; 32], Arc<Ident>>,
    previous: HashMap<[u8; 32], Arc<Ident>>,
    half: usize,
    epoch: u64,
}

impl VerifyCache {
    pub fn new(capacity: usize) -> VerifyCache {
        VerifyCache {
            current: HashMap::new(),
            previous: HashMap::new(),
            half: (capacity / 2).max(1),
            epoch: 0,
        }
    }

    /// Verifies `token`, from the cache when it can.
    pub fn verify(
        &mut self,
        keys: &LocalKeys,
        token: &str,
        now_unix: i64,
        opts: &VerifyOptions,
    ) -> Result<Arc<Ident>, TokenError> {
        match self.cached(keys, token, now_unix, opts) {
            Some(hit) => hit,
            None => self.verify_fresh(keys, token, now_unix, opts),
        }
    }

    /// Verifies a token [`cached`](Self::cached) has just missed, and
    /// caches it if good.
    pub fn verify_fresh(
        &mut self,
        keys: &LocalKeys,
        token: &str,
        now_unix: i64,
        opts: &VerifyOptions,
    ) -> Result<Arc<Ident>, TokenError> {
        let claims = verify(token, keys.get(), now_unix, opts)?;
        Ok(self.insert(token, &claims))
    }

    /// The answer for a token verified before, or `None` if it was not.
    pub fn cached(
        &mut self,
        keys: &LocalKeys,
        token: &str,
        now_unix: i64,
        opts: &VerifyOptions,
    ) -> Option<Result<Arc<Ident>, TokenError>> {
        if keys.epoch != self.epoch {
            // Keys changed: a cached token may be signed by a removed key.
            self.current.clear();
            self.previous.clear();
            self.epoch = keys.epoch;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let c = self
            .current
            .get(&digest)
            .or_else(|| self.previous.get(&digest))?;
        let leeway = opts.leeway_s.max(0);
        Some(if now_unix > c.exp.saturating_add(leeway) {
            Err(TokenError::Expired)
        } else if now_unix < c.nbf.saturating_sub(leeway) {
            Err(TokenError::NotYetValid)
        } else {
            Ok(c.clone())
        })
    }

    /// Verifies tokens not in the cache, with one batch signature check
    /// ([`crate::token::verify_many`]), and caches the good ones.
    pub fn verify_uncached(
        &mut self,
        keys: &LocalKeys,
        tokens: &[&str],
        now_unix: i64,
        opts: &VerifyOptions,
    ) -> Vec<Result<Arc<Ident>, TokenError>> {
        let results = verify_many(tokens, keys.get(), now_unix, opts);
        tokens
            .iter()
            .zip(results)
            .map(|(t, r)| r.map(|c| self.insert(t, &c)))
            .collect()
    }

    fn insert(&mut self, token: &str, claims: &Claims) -> Arc<Ident> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let ident = Arc::new(Ident::new(claims));
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(digest, ident.clone());
        ident
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn ident_keeps_each_claim_apart() {
        let c = Claims {
            repl: "r-ü".into(),
            user: "".into(),
            cluster: "eu".into(),
            exp: 5,
            nbf: 1,
            jti: "j".into(),
        };
        let id = Ident::new(&c);
        assert_eq!(
            (id.repl(), id.user(), id.cluster(), id.jti()),
            ("r-ü", "", "eu", "j")
        );
        assert_eq!((id.exp, id.nbf), (5, 1));
    }
    use crate::token::{dev_signing_key, mint, DEV_KID};

    fn claims(exp: i64) -> Claims {
        Claims {
            repl: "r".into(),
            user: "u".into(),
            cluster: "c".into(),
            exp,
            nbf: 0,
            jti: "j".into(),
        }
    }

    fn dev_store() -> Arc<KeyStore> {
        let mut ks = KeySet::new();
        ks.insert(DEV_KID, dev_signing_key().verifying_key());
        Arc::new(KeyStore::new(ks))
    }

    #[test]
    fn cache_hit_still_checks_time_and_keys() {
        let store = dev_store();
        let mut local = LocalKeys::new(store.clone());
        let mut cache = VerifyCache::new(8);
        let opts = VerifyOptions {
            leeway_s: 0,
            cluster: None,
        };
        let t = mint(&claims(1000), DEV_KID, &dev_signing_key());
        assert!(cache.verify(&local, &t, 500, &opts).is_ok());
        assert_eq!(cache.len(), 1);
        // A hit past exp is still refused.
        assert_eq!(
            cache.verify(&local, &t, 1001, &opts),
            Err(TokenError::Expired)
        );
        // Keys replaced (dev key gone): the cached entry must not vouch.
        store.replace(KeySet::new());
        local.refresh();
        assert_eq!(
            cache.verify(&local, &t, 500, &opts),
            Err(TokenError::UnknownKid)
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn cache_is_bounded_and_skips_failures() {
        let local = LocalKeys::new(dev_store());
        let mut cache = VerifyCache::new(4);
        let opts = VerifyOptions::default();
        for i in 0..20 {
            let mut c = claims(i64::MAX / 4);
            c.jti = format!("{i}");
            let t = mint(&c, DEV_KID, &dev_signing_key());
            cache.verify(&local, &t, 0, &opts).unwrap();
            assert!(cache.len() <= 4);
        }
        assert!(cache.verify(&local, "v4.public.bad", 0, &opts).is_err());
        assert!(cache.len() <= 4);
    }

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
