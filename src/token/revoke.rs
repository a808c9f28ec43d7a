//! Revocations, sans-IO: entries by `jti`, by user or by repl, each in force
//! until a time (unix seconds), matched against a verified token's claims.
//! No clock (`now` is a parameter) and no IO: the shared store, the file
//! and the Controlplane sync are `crate::revocations`'s.
//!
//! An entry always carries its end: `until` is required when a revocation
//! is made (or `ttl_s`, turned into `until` by the caller), and at most
//! [`MAX_TTL_S`] ahead. There is no default: the proxy does not know how
//! long the tokens it is asked to refuse live, and an entry that outlived
//! every token it could match would only take room. Expired entries match
//! nothing and are dropped at the next change ([`RevokeSet::prune`]).
//!
//! One JSON shape everywhere (admin API answers, `token.revoked_file`, the
//! Controlplane contract): `{"jti"|"user"|"repl":"X","until":"RFC 3339"}`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::time::{format_rfc3339, parse_rfc3339, MAX_RFC3339};

/// Entries a set holds at most (live ones; expired ones are pruned first).
/// At this many an insert fails with [`RevokeError::Full`]: revocations
/// are for leaked tokens and abusive users, not a routine deny list.
pub const MAX_ENTRIES: usize = 100_000;
/// How far ahead `until` may be (30 days).
pub const MAX_TTL_S: i64 = 30 * 24 * 3600;
/// Longest `jti`, user or repl a revocation names (a token of ours is
/// bounded, so are its claims; this keeps the set's memory bounded too).
pub const MAX_VALUE_LEN: usize = 1024;

/// What a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Jti,
    User,
    Repl,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Jti, Scope::User, Scope::Repl];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Jti => "jti",
            Scope::User => "user",
            Scope::Repl => "repl",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub scope: Scope,
    pub value: String,
    /// Unix seconds; the entry matches while `now < until`.
    pub until: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    #[error("name exactly one of jti, user, repl")]
    Target,
    #[error("{0} is empty, longer than 1024 bytes or holds a control character")]
    Value(&'static str),
    #[error("give exactly one of until (RFC 3339 or unix seconds) and ttl_s")]
    Until,
    #[error("until is not a time in the future within 30 days")]
    Range,
    #[error("the revocation list is full ({MAX_ENTRIES} entries in force)")]
    Full,
    #[error("not JSON of the revocation shape: {0}")]
    Json(String),
}

/// The wire shape (module doc); `ttl_s` and a numeric `until` only on the
/// way in, from the admin API.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Wire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Until>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Until {
    Unix(i64),
    Text(String),
}

impl Wire {
    /// A valid revocation, `until` in force after `now` and within
    /// [`MAX_TTL_S`] of it.
    pub fn into_revocation(self, now: i64) -> Result<Revocation, RevokeError> {
        let mut named = [
            (Scope::Jti, self.jti),
            (Scope::User, self.user),
            (Scope::Repl, self.repl),
        ]
        .into_iter()
        .filter_map(|(s, v)| Some((s, v?)));
        let (scope, value) = named.next().ok_or(RevokeError::Target)?;
        if named.next().is_some() {
            return Err(RevokeError::Target);
        }
        if value.is_empty() || value.len() > MAX_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(RevokeError::Value(scope.as_str()));
        }
        let until = match (self.until, self.ttl_s) {
            (Some(Until::Unix(t)), None) => t,
            (Some(Until::Text(t)), None) => match t.parse::<i64>() {
                Ok(n) => n,
                Err(_) => parse_rfc3339(&t).ok_or(RevokeError::Until)?,
            },
            (None, Some(ttl)) if ttl > 0 => now.saturating_add(ttl),
            (None, Some(_)) => return Err(RevokeError::Range),
            _ => return Err(RevokeError::Until),
        };
        if until <= now || until > now.saturating_add(MAX_TTL_S) {
            return Err(RevokeError::Range);
        }
        Ok(Revocation {
            scope,
            value,
            until,
        })
    }

    pub fn from_revocation(r: &Revocation) -> Wire {
        let mut w = Wire {
            until: Some(Until::Text(format_rfc3339(r.until))),
            ..Wire::default()
        };
        let v = Some(r.value.clone());
        match r.scope {
            Scope::Jti => w.jti = v,
            Scope::User => w.user = v,
            Scope::Repl => w.repl = v,
        }
        w
    }
}

/// The live revocations, one map per scope (value → until).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevokeSet {
    maps: [HashMap<Box<str>, i64>; 3],
}

impl RevokeSet {
    pub fn len(&self) -> usize {
        self.maps.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.iter().all(HashMap::is_empty)
    }

    /// Entries in force at `now`.
    pub fn live_count(&self, now: i64) -> usize {
        self.maps
            .iter()
            .map(|m| m.values().filter(|&&u| u > now).count())
            .sum()
    }

    /// Adds `r` (an entry already there keeps the later `until`); false
    /// when nothing changed. Expired entries go first when the set is full.
    pub fn insert(&mut self, r: Revocation, now: i64) -> Result<bool, RevokeError> {
        if r.until <= now {
            return Ok(false);
        }
        let map = &self.maps[r.scope.index()];
        match map.get(r.value.as_str()) {
            Some(&u) if u >= r.until => return Ok(false),
            Some(_) => {}
            None => {
                if self.len() >= MAX_ENTRIES {
                    self.prune(now);
                }
                if self.len() >= MAX_ENTRIES {
                    return Err(RevokeError::Full);
                }
            }
        }
        self.maps[r.scope.index()].insert(r.value.into_boxed_str(), r.until);
        Ok(true)
    }

    /// Drops entries no longer in force; how many went.
    pub fn prune(&mut self, now: i64) -> usize {
        let before = self.len();
        for m in &mut self.maps {
            m.retain(|_, u| *u > now);
        }
        before - self.len()
    }

    /// Whether a token with these claims is revoked at `now`.
    pub fn matches(&self, jti: &str, user: &str, repl: &str, now: i64) -> bool {
        if self.is_empty() {
            return false;
        }
        [jti, user, repl]
            .iter()
            .zip(&self.maps)
            .any(|(v, m)| m.get(*v).is_some_and(|&u| u > now))
    }

    /// Entries in force at `now`, sorted (scope, value).
    pub fn live(&self, now: i64) -> Vec<Revocation> {
        let mut out: Vec<Revocation> = Scope::ALL
            .iter()
            .zip(&self.maps)
            .flat_map(|(&scope, m)| {
                m.iter()
                    .filter(move |(_, &u)| u > now)
                    .map(move |(v, &until)| Revocation {
                        scope,
                        value: v.to_string(),
                        until,
                    })
            })
            .collect();
        out.sort_by(|a, b| (a.scope, &a.value).cmp(&(b.scope, &b.value)));
        out
    }

    /// `token.revoked_file`'s text: `{"revocations":[…]}` of the live
    /// entries, one a line so a hand edit is easy.
    pub fn to_file_text(&self, now: i64) -> String {
        let mut out = String::from("{\"revocations\": [\n");
        let live = self.live(now);
        for (i, r) in live.iter().enumerate() {
            out.push_str("  ");
            out.push_str(&serde_json::to_string(&Wire::from_revocation(r)).unwrap_or_default());
            out.push_str(if i + 1 < live.len() { ",\n" } else { "\n" });
        }
        out.push_str("]}\n");
        out
    }

    /// Parses [`RevokeSet::to_file_text`]'s format. Entries already
    /// expired are skipped; any other bad entry fails the whole file (a
    /// hand edit gone wrong must not silently un-revoke). `until` is not
    /// bounded by [`MAX_TTL_S`] here: the entry was accepted when made.
    pub fn from_file_text(text: &str, now: i64) -> Result<RevokeSet, RevokeError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            revocations: Vec<Wire>,
        }
        let f: File = serde_json::from_str(text).map_err(|e| RevokeError::Json(e.to_string()))?;
        let mut set = RevokeSet::default();
        for w in f.revocations {
            let r = w.into_stored()?;
            set.insert(r, now)?;
        }
        Ok(set)
    }
}

impl Wire {
    /// An entry as stored or synced: `until` given, any time (an expired
    /// one is then simply not inserted; one past the year 9999 ends then,
    /// the latest time the file can write).
    pub fn into_stored(self) -> Result<Revocation, RevokeError> {
        if self.ttl_s.is_some() {
            return Err(RevokeError::Until);
        }
        // Validated against the earliest time there is, so only the shape
        // and the target are checked; `until` may be anything.
        let until = match &self.until {
            Some(Until::Unix(t)) => *t,
            Some(Until::Text(t)) => parse_rfc3339(t)
                .or_else(|| t.parse().ok())
                .ok_or(RevokeError::Until)?,
            None => return Err(RevokeError::Until),
        };
        let mut r = Wire {
            until: Some(Until::Unix(1)),
            ..self
        }
        .into_revocation(0)?;
        r.until = until.min(MAX_RFC3339);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    fn rev(scope: Scope, value: &str, until: i64) -> Revocation {
        Revocation {
            scope,
            value: value.into(),
            until,
        }
    }

    fn wire(json: &str) -> Wire {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn matches_each_scope_only_while_in_force() {
        let mut s = RevokeSet::default();
        assert!(!s.matches("j", "u", "r", NOW));
        s.insert(rev(Scope::Jti, "j1", NOW + 10), NOW).unwrap();
        s.insert(rev(Scope::User, "bob", NOW + 10), NOW).unwrap();
        s.insert(rev(Scope::Repl, "r9", NOW + 10), NOW).unwrap();
        assert!(s.matches("j1", "alice", "r1", NOW));
        assert!(s.matches("j2", "bob", "r1", NOW));
        assert!(s.matches("j2", "alice", "r9", NOW));
        assert!(!s.matches("j2", "alice", "r1", NOW));
        // A value of one scope does not match another scope's claim.
        assert!(!s.matches("bob", "j1", "j1", NOW));
        // Expiry: in force before `until`, not at it.
        assert!(s.matches("j1", "", "", NOW + 9));
        assert!(!s.matches("j1", "", "", NOW + 10));
        assert_eq!(s.live_count(NOW + 10), 0);
        assert_eq!(s.prune(NOW + 10), 3);
        assert!(s.is_empty());
    }

    #[test]
    fn insert_keeps_the_later_until_and_says_what_changed() {
        let mut s = RevokeSet::default();
        assert_eq!(s.insert(rev(Scope::Jti, "j", NOW + 50), NOW), Ok(true));
        assert_eq!(s.insert(rev(Scope::Jti, "j", NOW + 20), NOW), Ok(false));
        assert_eq!(s.insert(rev(Scope::Jti, "j", NOW + 90), NOW), Ok(true));
        assert_eq!(s.live(NOW), vec![rev(Scope::Jti, "j", NOW + 90)]);
        // Already expired: not stored.
        assert_eq!(s.insert(rev(Scope::User, "u", NOW), NOW), Ok(false));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_cap_refuses_new_entries_until_some_expire() {
        let mut s = RevokeSet::default();
        for i in 0..MAX_ENTRIES {
            let until = if i < 10 { NOW + 5 } else { NOW + 100 };
            s.insert(rev(Scope::Jti, &i.to_string(), until), NOW)
                .unwrap();
        }
        assert_eq!(
            s.insert(rev(Scope::User, "one-more", NOW + 100), NOW),
            Err(RevokeError::Full)
        );
        // An existing entry may still be extended.
        assert_eq!(s.insert(rev(Scope::Jti, "0", NOW + 100), NOW), Ok(true));
        // Once some expired, the insert prunes them and fits.
        assert_eq!(
            s.insert(rev(Scope::User, "one-more", NOW + 100), NOW + 6),
            Ok(true)
        );
        assert_eq!(s.len(), MAX_ENTRIES - 9 + 1);
        assert!(RevokeError::Full.to_string().contains("100000"));
    }

    #[test]
    fn admin_input_is_validated() {
        let ok = |j: &str| wire(j).into_revocation(NOW);
        assert_eq!(
            ok(r#"{"jti":"abc","ttl_s":60}"#),
            Ok(rev(Scope::Jti, "abc", NOW + 60))
        );
        assert_eq!(
            ok(&format!(r#"{{"user":"bob","until":{}}}"#, NOW + 5)),
            Ok(rev(Scope::User, "bob", NOW + 5))
        );
        assert_eq!(
            ok(&format!(r#"{{"repl":"r","until":"{}"}}"#, NOW + 7)),
            Ok(rev(Scope::Repl, "r", NOW + 7))
        );
        let t = format_rfc3339(NOW + 3600);
        assert_eq!(
            ok(&format!(r#"{{"repl":"r","until":"{t}"}}"#)),
            Ok(rev(Scope::Repl, "r", NOW + 3600))
        );
        for (bad, want) in [
            (r#"{"ttl_s":60}"#, RevokeError::Target),
            (r#"{"jti":"a","user":"b","ttl_s":60}"#, RevokeError::Target),
            (r#"{"jti":"","ttl_s":60}"#, RevokeError::Value("jti")),
            (r#"{"user":"a\nb","ttl_s":60}"#, RevokeError::Value("user")),
            (r#"{"jti":"a"}"#, RevokeError::Until),
            (r#"{"jti":"a","ttl_s":60,"until":1}"#, RevokeError::Until),
            (r#"{"jti":"a","until":"tomorrow"}"#, RevokeError::Until),
            (r#"{"jti":"a","ttl_s":0}"#, RevokeError::Range),
            (r#"{"jti":"a","ttl_s":2592001}"#, RevokeError::Range),
            (r#"{"jti":"a","until":5}"#, RevokeError::Range),
        ] {
            assert_eq!(ok(bad), Err(want), "{bad}");
        }
        assert!(serde_json::from_str::<Wire>(r#"{"jti":"a","ttl_s":1,"x":1}"#).is_err());
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(
            ok(&format!(r#"{{"jti":"{long}","ttl_s":1}}"#)),
            Err(RevokeError::Value("jti"))
        );
    }

    #[test]
    fn file_round_trip_keeps_live_entries_and_drops_expired_ones() {
        let mut s = RevokeSet::default();
        s.insert(rev(Scope::Jti, "j\"quoted", NOW + 100), NOW)
            .unwrap();
        s.insert(rev(Scope::User, "ünï", NOW + 200), NOW).unwrap();
        s.insert(rev(Scope::Repl, "r", NOW + 3), NOW).unwrap();
        let text = s.to_file_text(NOW);
        assert!(text.contains("\"until\":\""), "{text}");
        assert_eq!(RevokeSet::from_file_text(&text, NOW), Ok(s.clone()));
        // Read later: the repl entry has expired and is left out.
        let later = RevokeSet::from_file_text(&text, NOW + 3).unwrap();
        assert_eq!(later.len(), 2);
        assert!(!later.matches("", "", "r", NOW + 3));
        // Empty file shape, and garbage refused whole.
        let empty = RevokeSet::default().to_file_text(NOW);
        assert_eq!(
            RevokeSet::from_file_text(&empty, NOW),
            Ok(RevokeSet::default())
        );
        for bad in [
            "",
            "[]",
            r#"{"revocations":[{"jti":"a"}]}"#,
            r#"{"revocations":[{"jti":"a","until":"x"}]}"#,
            r#"{"revocations":[{"until":"2030-01-01T00:00:00Z"}]}"#,
        ] {
            assert!(RevokeSet::from_file_text(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_entries_accept_any_until_shape() {
        let w = wire(r#"{"user":"u","until":"2030-01-01T00:00:00Z"}"#);
        assert_eq!(w.into_stored().unwrap().until, 1_893_456_000);
        let w = wire(r#"{"user":"u","until":5}"#);
        assert_eq!(w.into_stored().unwrap().until, 5);
        let w = wire(&format!(r#"{{"user":"u","until":{}}}"#, i64::MAX));
        assert_eq!(w.into_stored().unwrap().until, MAX_RFC3339);
        assert!(wire(r#"{"user":"u","ttl_s":5}"#).into_stored().is_err());
    }
}
