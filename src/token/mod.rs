//! PASETO v4.public tokens: verification on the session setup path, minting
//! for `eval-proxy token mint`, `--dev` and tests.
//!
//! Hand-rolled on ed25519-dalek instead of a PASETO crate: eval-proxy needs
//! one version and one purpose, every data shard verifies on its hot path, and
//! the whole format is a few dozen lines.
//!
//! # Layout
//! - Wire format: `v4.public.<b64url(m || sig)>.<b64url(f)>`, base64url
//!   without padding; `sig` is Ed25519 over `PAE("v4.public.", m, f, i)` with
//!   the implicit assertion `i` always empty. `m` is the claims JSON, `f` the
//!   footer JSON `{"kid":"…"}` that picks the public key, so keys can rotate.
//!   This file holds what both directions share: [`Claims`], [`TokenError`],
//!   the header and PAE.
//! - `verify`: [`verify()`] runs its checks in a fixed order so each token
//!   gets exactly one [`TokenError`]: shape and base64 → footer kid →
//!   signature → claims (missing or empty, then malformed: control
//!   characters, times) → `nbf`/`exp` with leeway → cluster;
//!   [`verify_many`] batches the signatures.
//! - `mint`: [`mint()`] and the insecure [`dev_signing_key`].
//! - `paserk`: the PASERK-style key text forms (`k4.public.`, `k4.secret.`),
//!   [`KeySet`] and [`KeySet::load_dir`].
//! - [`revoke`]: revocations by `jti`, user or repl, each with an end,
//!   matched against verified claims (sans-IO; the shared store, its file
//!   and the fleet sync are `crate::revocations`).
//! - `time`: a small RFC 3339 `date-time` ⇄ unix seconds converter (no
//!   chrono).
//!
//! Dependencies go one way: `verify` uses `paserk`, `time` and this file;
//! `mint` uses `time` and this file; `paserk` and `time` use nothing here.
//! Only tests cross between `verify` and `mint` (round trips).
//!
//! No clock (time is a parameter) and no IO except [`KeySet::load_dir`].
//! Token text never appears in an error: tokens are credentials and errors
//! end up in logs.

mod mint;
mod paserk;
pub mod revoke;
#[cfg(test)]
mod testkit;
mod time;
mod verify;

use std::fmt;

pub use mint::{dev_signing_key, mint, DEV_KID};
pub use paserk::{
    decode_public, decode_secret, encode_public, encode_secret, KeyFileError, KeyFormatError,
    KeySet,
};
pub use verify::{verify, verify_many, VerifyOptions};

const HEADER: &str = "v4.public.";

/// The claims eval-proxy needs. Times are unix seconds (on the wire they are
/// RFC 3339 strings, as the PASETO spec requires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub repl: String,
    pub user: String,
    pub cluster: String,
    pub exp: i64,
    pub nbf: i64,
    pub jti: String,
}

/// Why a token was refused. Carries no data, so the token can't leak into
/// logs through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a well-formed v4.public token with a JSON `kid` footer, or claims
    /// that are not the JSON object / RFC 3339 times the spec requires, or a
    /// `repl`, `user` or `cluster` holding a control character.
    Malformed,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongCluster,
    /// A required claim absent, `null`, or (`repl`, `user`, `cluster`) empty.
    MissingClaim,
    /// Valid, but its `jti`, user or repl is revoked ([`revoke`]). Never
    /// returned by [`verify()`], which knows no revocations: the shard
    /// checks them after it, cached tokens included.
    Revoked,
}

impl TokenError {
    /// Metric label and Close-frame reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongCluster => "wrong_cluster",
            Self::MissingClaim => "missing_claim",
            Self::Revoked => "revoked",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for TokenError {}

/// PASETO's LE64: little-endian with the top bit cleared.
fn le64(n: usize) -> [u8; 8] {
    (n as u64 & (u64::MAX >> 1)).to_le_bytes()
}

/// PASETO pre-authentication encoding.
fn pae(pieces: &[&[u8]]) -> Vec<u8> {
    let len = 8 + pieces.iter().map(|p| 8 + p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&le64(pieces.len()));
    for piece in pieces {
        out.extend_from_slice(&le64(piece.len()));
        out.extend_from_slice(piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::testkit::hex;
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::no_pieces(&[], "0000000000000000")]
    #[case::one_empty(&[b"".as_slice()], "01000000000000000000000000000000")]
    #[case::test(&[b"test".as_slice()], "0100000000000000040000000000000074657374")]
    fn pae_matches_spec(#[case] pieces: &[&[u8]], #[case] want: &str) {
        assert_eq!(pae(pieces), hex(want));
    }

    #[test]
    fn error_labels() {
        use TokenError::*;
        let all = [
            Malformed,
            UnknownKid,
            BadSignature,
            Expired,
            NotYetValid,
            WrongCluster,
            MissingClaim,
            Revoked,
        ];
        let labels: Vec<_> = all.iter().map(TokenError::as_str).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "unknown_kid",
                "bad_signature",
                "expired",
                "not_yet_valid",
                "wrong_cluster",
                "missing_claim",
                "revoked"
            ]
        );
        assert_eq!(Expired.to_string(), "expired");
    }
}
