//! Limits per client address, shared by every shard of the process:
//! concurrent sessions (`limits.per_ip_sessions`) and a token bucket of
//! handshakes (`limits.per_ip_handshake_rate` / `_burst`). SO_REUSEPORT
//! spreads one address's connections over all shards, so a per-shard count
//! would let it have N times its share.
//!
//! The table is striped: an address hashes (with a per-process random key,
//! so no one can aim every address at one stripe) to one of [`STRIPES`]
//! mutexes, taken once when a session is admitted and once when it ends,
//! never per frame. Contention is between shards admitting addresses of the
//! same stripe at the same instant, for the few dozen nanoseconds of a map
//! lookup.
//!
//! An "address" is an IPv4 address, or the /64 prefix of an IPv6 one: a
//! single subscriber usually holds a whole /64, and counting its 2^64
//! addresses apart would make both limits, and this table's bound, moot.
//!
//! # Memory
//! An entry lives while its address has a session, or while its bucket
//! holds something a fresh bucket would not (tokens spent and not yet
//! refilled). With the rate off, the last session's end removes the entry.
//! Entries without sessions are capped at [`STRIPE_IDLE_MAX`] per stripe:
//! an attacker rotating addresses fills the idle part, never more. When a
//! new address finds its stripe full, refilled buckets go first (they
//! behave as absent ones); if that frees too little, idle entries go in the
//! map's (randomly keyed) order, and each such address may get up to
//! `burst` handshakes more than its rate. Entries with live sessions are
//! never dropped, so counts stay right; they are bounded by the sessions
//! themselves (two descriptors each).
//!
//! Pure apart from the mutexes: `now` is a parameter.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::control::{Bucket, TokenBucket};

/// Power of two: a stripe is picked by masking the hash.
pub const STRIPES: usize = 64;
/// Idle entries (no session) a stripe keeps; 64 stripes hold 65,536 in
/// about 4 MiB.
pub const STRIPE_IDLE_MAX: usize = 1024;

/// Why an address was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It has `limits.per_ip_sessions` sessions already.
    Sessions,
    /// Its handshake bucket is empty; a token comes after this long
    /// (`None`: the wait does not fit a `Duration`).
    Rate(Option<Duration>),
}

#[derive(Debug)]
struct Entry {
    sessions: u32,
    bucket: Option<TokenBucket>,
}

pub struct PerIp {
    /// 0 = no cap on sessions.
    max_sessions: u32,
    rate: Option<Bucket>,
    stripes: Box<[Mutex<HashMap<u128, Entry>>]>,
    stripe_key: RandomState,
}

impl PerIp {
    /// The table for this config; `None` when both limits are off, so that
    /// admission costs nothing then.
    pub fn for_config(cfg: &Config) -> Option<PerIp> {
        let l = &cfg.limits;
        let rate = (l.per_ip_handshake_rate > 0.0).then_some(Bucket {
            rate_per_s: l.per_ip_handshake_rate,
            burst: l.per_ip_handshake_burst,
        });
        (l.per_ip_sessions > 0 || rate.is_some()).then(|| PerIp::new(l.per_ip_sessions, rate))
    }

    pub fn new(max_sessions: u32, rate: Option<Bucket>) -> PerIp {
        PerIp {
            max_sessions,
            rate,
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            stripe_key: RandomState::new(),
        }
    }

    fn stripe(&self, key: u128) -> MutexGuard<'_, HashMap<u128, Entry>> {
        let i = self.stripe_key.hash_one(key) as usize & (STRIPES - 1);
        // A panic elsewhere while holding it leaves counts no worse than
        // losing them; admission must go on.
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new session of `ip`, or says why not; a refused one takes
    /// neither a session slot nor a handshake token.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        let key = key(ip);
        let mut map = self.stripe(key);
        if map.len() >= STRIPE_IDLE_MAX
            && !map.contains_key(&key)
            && idle_count(&map) >= STRIPE_IDLE_MAX
        {
            self.make_room(&mut map, now);
        }
        let rate = self.rate;
        let e = map.entry(key).or_insert_with(|| Entry {
            sessions: 0,
            bucket: rate.map(|b| TokenBucket::full(&b, now)),
        });
        if let (Some(cfg), Some(b)) = (&rate, e.bucket.as_mut()) {
            b.check(cfg, now).map_err(Refused::Rate)?;
        }
        if self.max_sessions > 0 && e.sessions >= self.max_sessions {
            return Err(Refused::Sessions);
        }
        if let Some(b) = e.bucket.as_mut() {
            b.take();
        }
        e.sessions += 1;
        Ok(())
    }

    /// A session that [`admit`](Self::admit) counted has ended.
    pub fn release(&self, ip: IpAddr, now: Instant) {
        let key = key(ip);
        let mut map = self.stripe(key);
        let Some(e) = map.get_mut(&key) else {
            debug_assert!(false, "release of an address never admitted");
            return;
        };
        e.sessions = e.sessions.saturating_sub(1);
        if e.sessions == 0 && self.forgettable(e, now) {
            map.remove(&key);
        }
    }

    /// An entry with no session whose bucket is full says nothing a
    /// missing entry would not.
    fn forgettable(&self, e: &mut Entry, now: Instant) -> bool {
        e.sessions == 0
            && match (&self.rate, e.bucket.as_mut()) {
                (Some(cfg), Some(b)) => b.is_full(cfg, now),
                _ => true,
            }
    }

    fn make_room(&self, map: &mut HashMap<u128, Entry>, now: Instant) {
        map.retain(|_, e| !self.forgettable(e, now));
        // Down to 7/8 at least, so that a sweep (one pass over the stripe)
        // comes at most once per STRIPE_IDLE_MAX / 8 new addresses.
        let keep = STRIPE_IDLE_MAX * 7 / 8;
        let idle = idle_count(map);
        if idle > keep {
            let mut drop = idle - keep;
            map.retain(|_, e| {
                let go = drop > 0 && e.sessions == 0;
                drop -= usize::from(go);
                !go
            });
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// One pass over the stripe, only when it holds STRIPE_IDLE_MAX entries or
/// more and a new address arrives.
fn idle_count(map: &HashMap<u128, Entry>) -> usize {
    map.values().filter(|e| e.sessions == 0).count()
}

/// IPv4 (also when mapped into IPv6) as itself, IPv6 as its /64.
fn key(ip: IpAddr) -> u128 {
    let v6 = match ip {
        IpAddr::V4(v4) => return u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => v6,
    };
    match v6.to_ipv4_mapped() {
        Some(_) => u128::from(v6),
        None => u128::from(v6) & !u128::from(u64::MAX),
    }
}

/// The shard's side of admission: its own session count and the shared
/// per-address table. Lent to sessions through `Env`.
#[derive(Default)]
pub struct Gate {
    /// Sessions of this shard admitted and not finished
    /// (`limits.max_sessions_per_shard`).
    pub sessions: u32,
    pub per_ip: Option<std::sync::Arc<PerIp>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn bucket(rate_per_s: f64, burst: f64) -> Option<Bucket> {
        Some(Bucket { rate_per_s, burst })
    }

    #[test]
    fn sessions_are_capped_per_address_and_freed_on_release() {
        let t = Instant::now();
        let table = PerIp::new(2, None);
        assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
        assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
        assert_eq!(table.admit(ip("192.0.2.1"), t), Err(Refused::Sessions));
        assert_eq!(table.admit(ip("192.0.2.2"), t), Ok(()));
        table.release(ip("192.0.2.1"), t);
        assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
        for a in ["192.0.2.1", "192.0.2.1", "192.0.2.2"] {
            table.release(ip(a), t);
        }
        assert_eq!(table.len(), 0, "entries at zero are removed");
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let t = Instant::now();
        let table = PerIp::new(1, None);
        assert_eq!(table.admit(ip("2001:db8:1:2::1"), t), Ok(()));
        assert_eq!(
            table.admit(ip("2001:db8:1:2:ffff::9"), t),
            Err(Refused::Sessions)
        );
        assert_eq!(table.admit(ip("2001:db8:1:3::1"), t), Ok(()));
        assert_eq!(table.admit(ip("10.0.0.1"), t), Ok(()));
        assert_eq!(
            table.admit(ip("::ffff:10.0.0.1"), t),
            Err(Refused::Sessions)
        );
        assert_eq!(table.admit(ip("::ffff:10.0.0.2"), t), Ok(()));
    }

    #[test]
    fn handshakes_follow_the_bucket() {
        let t = Instant::now();
        let table = PerIp::new(0, bucket(2.0, 3.0));
        for _ in 0..3 {
            assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
            table.release(ip("192.0.2.1"), t);
        }
        let Err(Refused::Rate(Some(wait))) = table.admit(ip("192.0.2.1"), t) else {
            panic!("fourth handshake in the same instant admitted");
        };
        assert_eq!(wait, S / 2);
        assert_eq!(table.admit(ip("192.0.2.2"), t), Ok(()));
        assert_eq!(table.admit(ip("192.0.2.1"), t + S / 2), Ok(()));
    }

    #[test]
    fn a_refusal_takes_nothing() {
        let t = Instant::now();
        let table = PerIp::new(1, bucket(1.0, 2.0));
        assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
        // Refused for the session cap: its token stays.
        assert_eq!(table.admit(ip("192.0.2.1"), t), Err(Refused::Sessions));
        table.release(ip("192.0.2.1"), t);
        assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
    }

    #[test]
    fn spent_buckets_outlive_their_sessions_until_refilled() {
        let t = Instant::now();
        let table = PerIp::new(0, bucket(1.0, 1.0));
        assert_eq!(table.admit(ip("192.0.2.1"), t), Ok(()));
        table.release(ip("192.0.2.1"), t);
        assert_eq!(table.len(), 1, "the spent bucket is remembered");
        assert!(matches!(
            table.admit(ip("192.0.2.1"), t),
            Err(Refused::Rate(_))
        ));
        assert_eq!(table.admit(ip("192.0.2.1"), t + S), Ok(()));
        table.release(ip("192.0.2.1"), t + 2 * S);
        assert_eq!(table.len(), 0, "a refilled bucket is forgotten");
    }

    /// An attacker rotating addresses cannot grow the table past the idle
    /// cap, and addresses with live sessions keep their counts.
    #[test]
    fn rotating_addresses_stay_bounded() {
        let t = Instant::now();
        let table = PerIp::new(1, bucket(0.001, 2.0));
        let live: Vec<IpAddr> = (0..100u32)
            .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
            .collect();
        for &a in &live {
            assert_eq!(table.admit(a, t), Ok(()));
        }
        for i in 0..(STRIPES * STRIPE_IDLE_MAX * 3) as u32 {
            let a = IpAddr::from((0xc000_0000 + i).to_be_bytes());
            assert_eq!(table.admit(a, t), Ok(()));
            table.release(a, t);
        }
        assert!(
            table.len() <= STRIPES * STRIPE_IDLE_MAX + live.len(),
            "{} entries",
            table.len()
        );
        for &a in &live {
            assert_eq!(table.admit(a, t), Err(Refused::Sessions), "{a}");
        }
    }
}
