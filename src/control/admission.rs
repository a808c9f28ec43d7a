//! Admission control for new sessions: a token bucket per repl and one per
//! cluster, so that a mass reconnect reaches the Controlplane and Conman at a
//! bounded rate. Pure: time is a parameter.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Bucket;

/// Buckets kept per scope. Repl ids come from signed tokens, but a mass
/// reconnect touches every repl at once; past this many, buckets that have
/// refilled (which behave exactly like a fresh one) are dropped.
pub(crate) const MAX_BUCKETS: usize = 64 * 1024;

/// One token bucket's state; the rate and burst live in the shared
/// [`Bucket`] config so a map of thousands stays two words per entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn full(cfg: &Bucket, now: Instant) -> Self {
        TokenBucket {
            tokens: cfg.burst,
            last: now,
        }
    }

    fn refill(&mut self, cfg: &Bucket, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * cfg.rate_per_s).min(cfg.burst);
        self.last = now;
    }

    /// `Ok` if a token is there now, else how long until one is (`None`:
    /// never, the rate is zero).
    pub(crate) fn check(&mut self, cfg: &Bucket, now: Instant) -> Result<(), Option<Duration>> {
        self.refill(cfg, now);
        if self.tokens >= 1.0 {
            return Ok(());
        }
        if cfg.rate_per_s <= 0.0 {
            return Err(None);
        }
        // A rate so low that the wait overflows a Duration means never.
        Err(Duration::try_from_secs_f64((1.0 - self.tokens) / cfg.rate_per_s).ok())
    }

    /// Takes the token [`check`](Self::check) found; call only after `Ok`.
    pub(crate) fn take(&mut self) {
        self.tokens -= 1.0;
    }

    pub(crate) fn is_full(&mut self, cfg: &Bucket, now: Instant) -> bool {
        self.refill(cfg, now);
        self.tokens >= cfg.burst
    }
}

/// Buckets by key, bounded.
#[derive(Debug)]
pub(crate) struct BucketMap {
    cfg: Bucket,
    max: usize,
    buckets: HashMap<String, TokenBucket>,
}

impl BucketMap {
    pub(crate) fn new(cfg: Bucket, max: usize) -> Self {
        BucketMap {
            cfg,
            max: max.max(1),
            buckets: HashMap::new(),
        }
    }

    fn check(&mut self, key: &str, now: Instant) -> Result<(), Option<Duration>> {
        match self.buckets.get_mut(key) {
            Some(b) => b.check(&self.cfg, now),
            // A missing bucket is a full one.
            None if self.cfg.burst >= 1.0 => Ok(()),
            None => TokenBucket::full(&self.cfg, now).check(&self.cfg, now),
        }
    }

    fn take(&mut self, key: &str, now: Instant) {
        if let Some(b) = self.buckets.get_mut(key) {
            b.take();
            return;
        }
        if self.buckets.len() >= self.max {
            self.evict(now);
        }
        let mut b = TokenBucket::full(&self.cfg, now);
        b.take();
        self.buckets.insert(key.to_owned(), b);
    }

    /// Drops every full bucket; if none is full, the fullest one, whose
    /// repl gets at most `burst - tokens` extra sessions from the reset.
    fn evict(&mut self, now: Instant) {
        let cfg = self.cfg;
        self.buckets.retain(|_, b| !b.is_full(&cfg, now));
        if self.buckets.len() >= self.max {
            let fullest = self
                .buckets
                .iter()
                .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                .map(|(k, _)| k.clone());
            if let Some(k) = fullest {
                self.buckets.remove(&k);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// Which limit turned a session away (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Repl,
    Cluster,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Repl => "repl",
            Scope::Cluster => "cluster",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub scope: Scope,
    /// Until a token is available in every bucket that lacks one.
    pub retry_after: Option<Duration>,
}

#[derive(Debug)]
pub(crate) struct Admission {
    per_repl: Option<BucketMap>,
    per_cluster: Option<BucketMap>,
}

impl Admission {
    pub(crate) fn new(per_repl: Option<Bucket>, per_cluster: Option<Bucket>, max: usize) -> Self {
        Admission {
            per_repl: per_repl.map(|b| BucketMap::new(b, max)),
            per_cluster: per_cluster.map(|b| BucketMap::new(b, max)),
        }
    }

    /// Admits one new session, taking a token from both buckets, or from
    /// neither: a session the cluster limit refuses must not use up its
    /// repl's allowance.
    pub(crate) fn admit(
        &mut self,
        repl: &str,
        cluster: &str,
        now: Instant,
    ) -> Result<(), Rejected> {
        let repl_wait = self.per_repl.as_mut().map(|m| m.check(repl, now));
        let cluster_wait = self.per_cluster.as_mut().map(|m| m.check(cluster, now));
        let mut rejected: Option<Rejected> = None;
        for (scope, wait) in [(Scope::Repl, repl_wait), (Scope::Cluster, cluster_wait)] {
            if let Some(Err(wait)) = wait {
                rejected = Some(match rejected {
                    None => Rejected {
                        scope,
                        retry_after: wait,
                    },
                    Some(r) => Rejected {
                        scope: r.scope,
                        retry_after: r.retry_after.zip(wait).map(|(a, b)| a.max(b)),
                    },
                });
            }
        }
        if let Some(r) = rejected {
            return Err(r);
        }
        if let Some(m) = self.per_repl.as_mut() {
            m.take(repl, now);
        }
        if let Some(m) = self.per_cluster.as_mut() {
            m.take(cluster, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn assert_near(got: Option<Duration>, want: Duration) {
        let got = got.expect("a finite wait");
        assert!(
            got.abs_diff(want) < Duration::from_micros(1),
            "{got:?} != {want:?}"
        );
    }

    fn bucket(rate_per_s: f64, burst: f64) -> Bucket {
        Bucket { rate_per_s, burst }
    }

    #[test]
    fn bucket_allows_burst_then_tells_when_the_next_token_comes() {
        let t0 = Instant::now();
        let mut a = Admission::new(Some(bucket(10.0, 3.0)), None, 16);
        for _ in 0..3 {
            assert_eq!(a.admit("r", "c", t0), Ok(()));
        }
        let r = a.admit("r", "c", t0).unwrap_err();
        assert_eq!(r.scope, Scope::Repl);
        assert_near(r.retry_after, 100 * MS);
        // Part of the way there: the wait shrinks.
        let r = a.admit("r", "c", t0 + 40 * MS).unwrap_err();
        assert_near(r.retry_after, 60 * MS);
        assert_eq!(a.admit("r", "c", t0 + 101 * MS), Ok(()));
        // Other repls have their own bucket.
        assert_eq!(a.admit("other", "c", t0), Ok(()));
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let t0 = Instant::now();
        let mut a = Admission::new(Some(bucket(1000.0, 2.0)), None, 16);
        assert_eq!(a.admit("r", "c", t0), Ok(()));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(a.admit("r", "c", later), Ok(()));
        assert_eq!(a.admit("r", "c", later), Ok(()));
        assert!(a.admit("r", "c", later).is_err());
    }

    #[test]
    fn zero_rate_never_refills() {
        let t0 = Instant::now();
        let mut a = Admission::new(Some(bucket(0.0, 1.0)), None, 16);
        assert_eq!(a.admit("r", "c", t0), Ok(()));
        let r = a
            .admit("r", "c", t0 + Duration::from_secs(100))
            .unwrap_err();
        assert_eq!(r.retry_after, None);
    }

    #[test]
    fn cluster_refusal_takes_no_repl_token() {
        let t0 = Instant::now();
        let mut a = Admission::new(Some(bucket(1.0, 1.0)), Some(bucket(1.0, 1.0)), 16);
        assert_eq!(a.admit("r1", "c", t0), Ok(()));
        let r = a.admit("r2", "c", t0).unwrap_err();
        assert_eq!(r.scope, Scope::Cluster);
        // r2's own bucket is untouched: once the cluster refills, r2 passes.
        assert_eq!(a.admit("r2", "c", t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn both_empty_reports_the_longer_wait() {
        let t0 = Instant::now();
        let mut a = Admission::new(Some(bucket(1.0, 1.0)), Some(bucket(4.0, 1.0)), 16);
        assert_eq!(a.admit("r", "c", t0), Ok(()));
        let r = a.admit("r", "c", t0).unwrap_err();
        assert_eq!(r.scope, Scope::Repl);
        assert_near(r.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn map_is_bounded_and_drops_refilled_buckets_first() {
        let t0 = Instant::now();
        let mut m = BucketMap::new(bucket(1.0, 2.0), 4);
        for i in 0..4 {
            m.take(&format!("r{i}"), t0);
        }
        assert_eq!(m.len(), 4);
        // r0 uses its second token: it is the emptiest and must survive.
        m.take("r0", t0);
        // A second later r1..r3 are full again (1 + 1/s), r0 is not.
        let t1 = t0 + Duration::from_secs(1);
        m.take("r4", t1);
        assert_eq!(m.len(), 2);
        assert!(m.check("r0", t1).is_ok());
        m.take("r0", t1);
        assert!(m.check("r0", t1).is_err(), "r0's bucket was kept");
        // Nobody full: the fullest goes, the map stays bounded.
        for i in 5..20 {
            m.take(&format!("r{i}"), t1);
            assert!(m.len() <= 4);
        }
    }
}
