//! Minting: [`mint`] for `eval-proxy token mint`, `--dev` and tests, and the
//! insecure development key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, SIGNATURE_LENGTH};
use serde::Serialize;

use super::time::format_rfc3339;
use super::{pae, Claims, HEADER};

/// Kid of [`dev_signing_key`].
pub const DEV_KID: &str = "dev";

/// **INSECURE, PUBLICLY KNOWN.** The seed is in this source file, so anyone
/// can mint tokens that a proxy trusting this key accepts. Only for
/// `eval-proxy --dev` and tests; never load its public key in production.
const DEV_SEED: [u8; 32] = *b"eval-proxy dev key: NOT A SECRET";

/// Signs `claims` into a v4.public token with footer `{"kid":kid}`.
///
/// `exp`/`nbf` outside what RFC 3339 can express (years 0000–9999) saturate
/// to the nearest end, so a huge `exp` means "never expires".
pub fn mint(claims: &Claims, kid: &str, key: &SigningKey) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        repl: &'a str,
        user: &'a str,
        cluster: &'a str,
        exp: String,
        nbf: String,
        jti: &'a str,
    }
    let message = serde_json::to_vec(&Wire {
        repl: &claims.repl,
        user: &claims.user,
        cluster: &claims.cluster,
        exp: format_rfc3339(claims.exp),
        nbf: format_rfc3339(claims.nbf),
        jti: &claims.jti,
    })
    .expect("a struct of strings always serializes");
    let footer =
        serde_json::to_vec(&FooterOut { kid }).expect("a struct of strings always serializes");
    seal(&message, &footer, key)
}

/// A fixed, publicly known development key (kid [`DEV_KID`]).
///
/// **INSECURE: anyone can mint tokens with it.** The seed is a constant in
/// this source file. Only `eval-proxy --dev` and tests may use it; a
/// production proxy must never trust its public key.
pub fn dev_signing_key() -> SigningKey {
    SigningKey::from_bytes(&DEV_SEED)
}

#[derive(Serialize)]
struct FooterOut<'a> {
    kid: &'a str,
}

pub(super) fn seal(message: &[u8], footer: &[u8], key: &SigningKey) -> String {
    let signature = key.sign(&pae(&[HEADER.as_bytes(), message, footer, b""]));
    let mut body = Vec::with_capacity(message.len() + SIGNATURE_LENGTH);
    body.extend_from_slice(message);
    body.extend_from_slice(&signature.to_bytes());
    let mut out = String::with_capacity(HEADER.len() + (body.len() + footer.len()) * 4 / 3 + 4);
    out.push_str(HEADER);
    URL_SAFE_NO_PAD.encode_string(&body, &mut out);
    if !footer.is_empty() {
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(footer, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::testkit::*;
    use crate::token::time::{MAX_RFC3339, MIN_RFC3339};
    use crate::token::verify::{verify, MAX_FOOTER_B64_LEN};
    use crate::token::{KeySet, TokenError};
    use proptest::prelude::*;

    #[test]
    fn spec_vectors_seal_byte_for_byte() {
        // Ed25519 is deterministic, so sealing the vectors' inputs must
        // reproduce the published tokens exactly.
        let sk = spec_signing_key();
        assert_eq!(hex(SPEC_PK), sk.verifying_key().as_bytes());
        assert_eq!(seal(SPEC_PAYLOAD.as_bytes(), b"", &sk), VECTOR_4_S_1);
        assert_eq!(
            seal(SPEC_PAYLOAD.as_bytes(), SPEC_FOOTER.as_bytes(), &sk),
            VECTOR_4_S_2
        );
    }

    #[test]
    fn mint_then_verify_round_trips() {
        let token = mint(&claims(), "k1", &key(1));
        assert!(token.starts_with("v4.public."));
        assert_eq!(verify(&token, &keys(), NOW, &opts()), Ok(claims()));
    }

    #[test]
    fn dev_key_is_fixed() {
        assert_eq!(dev_signing_key().to_bytes(), DEV_SEED);
        let mut set = KeySet::new();
        set.insert(DEV_KID, dev_signing_key().verifying_key());
        let token = mint(&claims(), DEV_KID, &dev_signing_key());
        assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
    }

    proptest! {
        /// Any `repl` and `user` that verify accepts (non-empty, no control
        /// character: see `verify`'s tables for the refused ones), any `jti`.
        #[test]
        fn mint_verify_round_trips(
            repl in r"[^\p{Cc}]{1,40}", user in r"[^\p{Cc}]{1,40}", jti in any::<String>(), kid in any::<String>(),
            exp in NOW..=MAX_RFC3339, nbf in MIN_RFC3339..=NOW,
        ) {
            let c = Claims { repl, user, cluster: "us-east-1".into(), exp, nbf, jti };
            let mut set = KeySet::new();
            set.insert(&kid, key(7).verifying_key());
            let token = mint(&c, &kid, &key(7));
            // Kids whose JSON escaping blows past the footer bound are refused as Malformed.
            let footer_len = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&FooterOut { kid: &kid }).unwrap()).len();
            if footer_len <= MAX_FOOTER_B64_LEN {
                prop_assert_eq!(verify(&token, &set, NOW, &opts()), Ok(c));
            } else {
                prop_assert_eq!(verify(&token, &set, NOW, &opts()), Err(TokenError::Malformed));
            }
        }
    }
}
