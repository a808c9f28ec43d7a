//! Request paths: the URL's path as is, or with a freshly minted token
//! appended per connection (`/wsv2/` + token), as eval-proxy expects.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use eval_proxy::token::{decode_secret, dev_signing_key, mint, Claims, DEV_KID};

/// How tokens are minted.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub key: SigningKey,
    pub kid: String,
    pub user: String,
    pub cluster: String,
    pub ttl_s: i64,
    /// With `Some(k)`, connection `i` uses repl `repl-{i % k}` and the k
    /// tokens are minted once, so a proxy sees each token many times (its
    /// verification cache applies). With `None`, every connection attempt
    /// gets a token never seen before.
    pub repls: Option<u32>,
    /// With `repls: None`: repl `repl-{conn}-{attempt}` rather than
    /// `repl-{conn}`, so no two attempts share a repl.
    pub unique_repls: bool,
}

impl TokenSpec {
    pub fn dev() -> Self {
        Self::with_key(dev_signing_key(), DEV_KID.to_owned())
    }

    /// Reads a `k4.secret.` key file; its kid is the file stem, as with
    /// `eval-proxy token keygen`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = decode_secret(&text).with_context(|| format!("{}", path.display()))?;
        let kid = path
            .file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("{}: no file stem to use as kid", path.display()))?;
        Ok(Self::with_key(key, kid.to_owned()))
    }

    fn with_key(key: SigningKey, kid: String) -> Self {
        Self {
            key,
            kid,
            user: "loadgen".into(),
            cluster: "dev".into(),
            ttl_s: 3600,
            repls: None,
            unique_repls: false,
        }
    }
}

/// Builds the request path for each connection attempt.
#[derive(Debug, Clone)]
pub struct Paths {
    base: String,
    spec: Option<TokenSpec>,
    /// One token per repl, when `spec.repls` is set.
    per_repl: Arc<Vec<String>>,
}

impl Paths {
    pub fn new(base: &str, spec: Option<TokenSpec>) -> Self {
        let mut base = base.to_owned();
        if spec.is_some() && !base.ends_with('/') {
            base.push('/');
        }
        let per_repl = match &spec {
            Some(spec @ TokenSpec { repls: Some(k), .. }) => (0..*k)
                .map(|r| spec.mint(&format!("repl-{r}"), &format!("lg-repl-{r}")))
                .collect(),
            _ => Vec::new(),
        };
        Self {
            base,
            spec,
            per_repl: Arc::new(per_repl),
        }
    }

    /// Whether every attempt gets a token of its own (worth minting ahead).
    pub fn mints_per_attempt(&self) -> bool {
        matches!(&self.spec, Some(TokenSpec { repls: None, .. }))
    }

    /// The path for attempt `attempt` of connection `conn`.
    pub fn path(&self, conn: u32, attempt: u64) -> String {
        match &self.spec {
            None => self.base.clone(),
            Some(TokenSpec { repls: Some(_), .. }) => {
                let token = &self.per_repl[conn as usize % self.per_repl.len()];
                format!("{}{token}", self.base)
            }
            Some(spec) => {
                let jti = format!("lg-{}-{conn}-{attempt}", std::process::id());
                let repl = if spec.unique_repls {
                    format!("repl-{conn}-{attempt}-{}", std::process::id())
                } else {
                    format!("repl-{conn}")
                };
                format!("{}{}", self.base, spec.mint(&repl, &jti))
            }
        }
    }
}

impl TokenSpec {
    fn mint(&self, repl: &str, jti: &str) -> String {
        let now = unix_now();
        let claims = Claims {
            repl: repl.to_owned(),
            user: self.user.clone(),
            cluster: self.cluster.clone(),
            exp: now + self.ttl_s,
            // A minute of slack for a proxy whose clock runs behind ours.
            nbf: now - 60,
            jti: jti.to_owned(),
        };
        mint(&claims, &self.kid, &self.key)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use eval_proxy::token::{verify, KeySet, VerifyOptions};

    fn verifies(path: &str) -> String {
        let token = path.rsplit('/').next().expect("token segment");
        let mut keys = KeySet::new();
        keys.insert(DEV_KID, dev_signing_key().verifying_key());
        let claims =
            verify(token, &keys, unix_now(), &VerifyOptions::default()).expect("valid token");
        claims.repl
    }

    #[test]
    fn plain_paths_are_used_as_is() {
        let paths = Paths::new("/echo", None);
        assert_eq!(paths.path(7, 0), "/echo");
    }

    #[test]
    fn fresh_token_per_attempt() {
        let paths = Paths::new("/wsv2", Some(TokenSpec::dev()));
        let a = paths.path(3, 0);
        let b = paths.path(3, 1);
        assert!(a.starts_with("/wsv2/v4.public."));
        assert_ne!(a, b);
        assert_eq!(verifies(&a), "repl-3");
    }

    #[test]
    fn one_token_per_repl() {
        let spec = TokenSpec {
            repls: Some(2),
            ..TokenSpec::dev()
        };
        let paths = Paths::new("/wsv2/", Some(spec));
        assert_eq!(paths.path(0, 0), paths.path(2, 5));
        assert_ne!(paths.path(0, 0), paths.path(1, 0));
        assert_eq!(verifies(&paths.path(1, 0)), "repl-1");
    }
}
