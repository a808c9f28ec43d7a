//! Verification: [`verify`] and its batched form [`verify_many`], with the
//! token decoding (into one buffer laid out as the signed PAE) and the claims
//! checks they share.

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey, SIGNATURE_LENGTH};
use serde::Deserialize;

use super::paserk::KeySet;
use super::time::parse_rfc3339;
use super::{le64, Claims, TokenError, HEADER};

/// Our footers are `{"kid":"…"}`; the PASETO spec asks verifiers to bound
/// footer JSON before parsing it, and this also bounds work on garbage.
pub(super) const MAX_FOOTER_B64_LEN: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Clock skew allowance in seconds, applied to both `nbf` and `exp`;
    /// negative counts as 0.
    pub leeway_s: i64,
    /// If set, the `cluster` claim must equal it.
    pub cluster: Option<String>,
}

/// Verifies a v4.public token and returns its claims.
///
/// The footer is required and must be JSON with a `kid` naming a key in
/// `keys`. A token is valid for `nbf - leeway <= now_unix <= exp + leeway`.
/// `iat`, if present, must be a valid RFC 3339 time but is not compared with
/// `now_unix`. Other claims and footer fields are ignored.
///
/// `repl`, `user` and `cluster` travel on: to Conman as `X-Repl-Id` and
/// `X-User`, to the Controlplane with each placement request, and into
/// per-repl and per-cluster admission as keys. So an empty one counts as
/// missing ([`TokenError::MissingClaim`]) and one holding a control
/// character (C0 including tab, CR and LF; DEL; C1) is
/// [`TokenError::Malformed`], rather than being passed on, where a header
/// writer would have to blank it (`a\nb` would reach Conman as `a b`, the
/// same `X-Repl-Id` as another repl's). `cluster` gets this check whether or
/// not [`VerifyOptions::cluster`] is set: it is required either way and used
/// either way. Any other printable character, non-ASCII included, is
/// accepted. `jti` is not passed on, and is not checked here; the shard
/// keeps it for revocation (`token::revoke`).
pub fn verify(
    token: &str,
    keys: &KeySet,
    now_unix: i64,
    opts: &VerifyOptions,
) -> Result<Claims, TokenError> {
    let opened = Opened::parse(token)?;
    let key = key_of(&opened, keys)?;
    key.verify_strict(&opened.pae, &opened.signature)
        .map_err(|_| TokenError::BadSignature)?;
    claims_of(&opened, now_unix, opts)
}

/// [`verify`] for several tokens at once, with one Ed25519 batch
/// verification for all the signatures: per signature it costs 69 % of a
/// single verify for 2 tokens, 57 % for 4, 49 % for 8 (`cargo bench
/// --bench token`). If the batch fails, each signature is checked alone, so
/// one bad token costs the others nothing but time. The batch equation is
/// not the strict one of [`verify`]: a signature with a small-order
/// component may pass it. That admits no forgery (claims still need the
/// key holder's signature), only alternative encodings of a valid one.
pub fn verify_many(
    tokens: &[&str],
    keys: &KeySet,
    now_unix: i64,
    opts: &VerifyOptions,
) -> Vec<Result<Claims, TokenError>> {
    let opened: Vec<Result<(Opened, VerifyingKey), TokenError>> = tokens
        .iter()
        .map(|t| {
            let o = Opened::parse(t)?;
            let k = *key_of(&o, keys)?;
            Ok((o, k))
        })
        .collect();
    let ok: Vec<&(Opened, VerifyingKey)> = opened.iter().filter_map(|r| r.as_ref().ok()).collect();
    let batch_ok = ok.len() >= 2 && {
        let msgs: Vec<&[u8]> = ok.iter().map(|(o, _)| o.pae.as_slice()).collect();
        let sigs: Vec<Signature> = ok.iter().map(|(o, _)| o.signature).collect();
        let vks: Vec<VerifyingKey> = ok.iter().map(|(_, k)| *k).collect();
        ed25519_dalek::verify_batch(&msgs, &sigs, &vks).is_ok()
    };
    opened
        .into_iter()
        .map(|r| {
            let (o, k) = r?;
            if !batch_ok {
                k.verify_strict(&o.pae, &o.signature)
                    .map_err(|_| TokenError::BadSignature)?;
            }
            claims_of(&o, now_unix, opts)
        })
        .collect()
}

fn key_of<'k>(opened: &Opened, keys: &'k KeySet) -> Result<&'k VerifyingKey, TokenError> {
    let footer: Footer<'_> =
        serde_json::from_slice(opened.footer()).map_err(|_| TokenError::Malformed)?;
    keys.get(&footer.kid.0).ok_or(TokenError::UnknownKid)
}

/// The claims of a token whose signature has been checked.
fn claims_of(opened: &Opened, now_unix: i64, opts: &VerifyOptions) -> Result<Claims, TokenError> {
    let raw: RawClaims<'_> =
        serde_json::from_slice(opened.message()).map_err(|_| TokenError::Malformed)?;
    let (Some(repl), Some(user), Some(cluster), Some(exp), Some(nbf), Some(jti)) =
        (raw.repl, raw.user, raw.cluster, raw.exp, raw.nbf, raw.jti)
    else {
        return Err(TokenError::MissingClaim);
    };
    let forwarded = [&repl.0, &user.0, &cluster.0];
    if forwarded.iter().any(|s| s.is_empty()) {
        return Err(TokenError::MissingClaim);
    }
    if forwarded.iter().any(|s| s.chars().any(char::is_control)) {
        return Err(TokenError::Malformed);
    }
    let exp = parse_rfc3339(&exp.0).ok_or(TokenError::Malformed)?;
    let nbf = parse_rfc3339(&nbf.0).ok_or(TokenError::Malformed)?;
    if let Some(iat) = raw.iat {
        parse_rfc3339(&iat.0).ok_or(TokenError::Malformed)?;
    }

    let leeway = opts.leeway_s.max(0);
    if now_unix.saturating_add(leeway) < nbf {
        return Err(TokenError::NotYetValid);
    }
    if now_unix.saturating_sub(leeway) > exp {
        return Err(TokenError::Expired);
    }
    if opts
        .cluster
        .as_deref()
        .is_some_and(|want| want != cluster.0)
    {
        return Err(TokenError::WrongCluster);
    }
    // Strings are only copied once the token is accepted.
    Ok(Claims {
        repl: repl.0.into_owned(),
        user: user.0.into_owned(),
        cluster: cluster.0.into_owned(),
        exp,
        nbf,
        jti: jti.0.into_owned(),
    })
}

#[derive(Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct Footer<'a> {
    #[serde(borrow)]
    kid: Text<'a>,
}

/// Borrowed from the decoded payload: nothing is allocated unless a string
/// holds JSON escapes, or until the token is accepted.
#[derive(Deserialize)]
struct RawClaims<'a> {
    #[serde(borrow)]
    repl: Option<Text<'a>>,
    #[serde(borrow)]
    user: Option<Text<'a>>,
    #[serde(borrow)]
    cluster: Option<Text<'a>>,
    #[serde(borrow)]
    exp: Option<Text<'a>>,
    #[serde(borrow)]
    nbf: Option<Text<'a>>,
    #[serde(borrow)]
    iat: Option<Text<'a>>,
    #[serde(borrow)]
    jti: Option<Text<'a>>,
}

/// A decoded token whose one buffer is laid out as the PAE that the signature
/// covers, with message and footer read from inside it: one allocation per
/// verify instead of separate decode and PAE buffers.
struct Opened {
    pae: Vec<u8>,
    signature: Signature,
    message: (usize, usize),
    footer: (usize, usize),
}

/// `LE64(4) || LE64(10) || "v4.public."`, followed by `LE64(len(m))`.
const PAE_HEAD: [u8; 26] = {
    let mut out = [0u8; 26];
    out[0] = 4;
    out[8] = HEADER.len() as u8;
    let h = HEADER.as_bytes();
    let mut i = 0;
    while i < h.len() {
        out[16 + i] = h[i];
        i += 1;
    }
    out
};

impl Opened {
    fn parse(token: &str) -> Result<Self, TokenError> {
        let rest = token.strip_prefix(HEADER).ok_or(TokenError::Malformed)?;
        let (body, footer) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        if footer.is_empty() || footer.len() > MAX_FOOTER_B64_LEN || footer.contains('.') {
            return Err(TokenError::Malformed);
        }
        // base64's decode_vec grows the buffer to this estimate before trimming.
        let estimate = |n: usize| n.div_ceil(4) * 3;
        let mut pae = Vec::with_capacity(
            PAE_HEAD.len() + 8 + estimate(body.len()) + 8 + estimate(footer.len()) + 8,
        );
        pae.extend_from_slice(&PAE_HEAD);
        pae.extend_from_slice(&[0; 8]);
        let m_start = pae.len();
        URL_SAFE_NO_PAD
            .decode_vec(body, &mut pae)
            .map_err(|_| TokenError::Malformed)?;
        let m_len = (pae.len() - m_start)
            .checked_sub(SIGNATURE_LENGTH)
            .ok_or(TokenError::Malformed)?;
        let m_end = m_start + m_len;
        let mut sig = [0u8; SIGNATURE_LENGTH];
        sig.copy_from_slice(&pae[m_end..]);
        pae.truncate(m_end);
        pae[m_start - 8..m_start].copy_from_slice(&le64(m_len));

        pae.extend_from_slice(&[0; 8]);
        let f_start = pae.len();
        URL_SAFE_NO_PAD
            .decode_vec(footer, &mut pae)
            .map_err(|_| TokenError::Malformed)?;
        let f_end = pae.len();
        pae[f_start - 8..f_start].copy_from_slice(&le64(f_end - f_start));
        // The implicit assertion is always empty for eval-proxy.
        pae.extend_from_slice(&le64(0));
        Ok(Self {
            pae,
            signature: Signature::from_bytes(&sig),
            message: (m_start, m_end),
            footer: (f_start, f_end),
        })
    }

    fn message(&self) -> &[u8] {
        &self.pae[self.message.0..self.message.1]
    }

    fn footer(&self) -> &[u8] {
        &self.pae[self.footer.0..self.footer.1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::mint::seal;
    use crate::token::testkit::*;
    use crate::token::time::MIN_RFC3339;
    use crate::token::{mint, pae};
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;
    use rstest::rstest;

    /// Batch verification answers exactly what one-by-one verification
    /// does, for any mix of good and bad tokens.
    #[rstest::rstest]
    #[case::all_good(&[0, 0, 0, 0])]
    #[case::one_forged(&[0, 1, 0])]
    #[case::mixed(&[2, 0, 3, 1, 0, 4])]
    #[case::single(&[0])]
    #[case::only_bad(&[1, 2])]
    fn verify_many_matches_verify(#[case] kinds: &[u8]) {
        let good = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let mut keys = KeySet::new();
        keys.insert("k", good.verifying_key());
        let tokens: Vec<String> = kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let mut c = claims();
                c.jti = format!("{i}");
                match kind {
                    0 => mint(&c, "k", &good),
                    1 => mint(&c, "k", &other),
                    2 => mint(&c, "nope", &good),
                    3 => "v4.public.garbage".to_string(),
                    _ => {
                        c.exp = NOW - 3600;
                        mint(&c, "k", &good)
                    }
                }
            })
            .collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let many = verify_many(&refs, &keys, NOW, &opts());
        let one: Vec<_> = refs
            .iter()
            .map(|t| verify(t, &keys, NOW, &opts()))
            .collect();
        assert_eq!(many, one);
    }

    #[test]
    fn spec_vector_4_s_2_opens_and_verifies() {
        let opened = Opened::parse(VECTOR_4_S_2).unwrap();
        assert_eq!(opened.message(), SPEC_PAYLOAD.as_bytes());
        assert_eq!(opened.footer(), SPEC_FOOTER.as_bytes());
        assert_eq!(
            opened.pae,
            pae(&[
                HEADER.as_bytes(),
                SPEC_PAYLOAD.as_bytes(),
                SPEC_FOOTER.as_bytes(),
                b""
            ])
        );
        let pk = spec_keys();
        let pk = pk.get(SPEC_KID).unwrap();
        assert!(pk.verify_strict(&opened.pae, &opened.signature).is_ok());
        // Signature passes; the vector just lacks eval-proxy's claims.
        assert_eq!(
            verify(VECTOR_4_S_2, &spec_keys(), NOW, &VerifyOptions::default()),
            Err(TokenError::MissingClaim)
        );
    }

    #[rstest]
    #[case::s1_no_footer(VECTOR_4_S_1, TokenError::Malformed)]
    #[case::s3_nonempty_implicit_assertion(VECTOR_4_S_3, TokenError::BadSignature)]
    #[case::f1_local(VECTOR_4_F_1, TokenError::Malformed)]
    #[case::f2_bad_signature(VECTOR_4_F_2, TokenError::BadSignature)]
    #[case::f3_v3(VECTOR_4_F_3, TokenError::Malformed)]
    #[case::f4_local_no_footer(VECTOR_4_F_4, TokenError::Malformed)]
    #[case::f5_padded(VECTOR_4_F_5, TokenError::Malformed)]
    fn spec_vectors_rejected(#[case] token: &str, #[case] want: TokenError) {
        assert_eq!(
            verify(token, &spec_keys(), NOW, &VerifyOptions::default()),
            Err(want)
        );
    }

    #[test]
    fn cluster_not_checked_without_option() {
        let mut c = claims();
        c.cluster = "eu-west-1".into();
        let token = mint(&c, "k1", &key(1));
        assert_eq!(
            verify(&token, &keys(), NOW, &VerifyOptions::default()),
            Ok(c)
        );
    }

    fn with_footer(token: &str, footer: &[u8]) -> String {
        let (body, _) = token.rsplit_once('.').unwrap();
        format!("{body}.{}", b64(footer))
    }

    fn tampered_payload(token: &str) -> String {
        let mut bytes = URL_SAFE_NO_PAD
            .decode(token[HEADER.len()..].split('.').next().unwrap())
            .unwrap();
        // Flip a byte inside the claims JSON ("repl-123" -> "repl-133").
        let at = bytes.windows(3).position(|w| w == b"123").unwrap() + 1;
        bytes[at] = b'3';
        let footer = token.rsplit('.').next().unwrap();
        format!("{HEADER}{}.{footer}", b64(&bytes))
    }

    fn case(name: &str) -> String {
        let good = mint(&claims(), "k1", &key(1));
        let mut c = claims();
        match name {
            "empty" => String::new(),
            "header_only" => HEADER.into(),
            "local" => good.replacen("v4.public.", "v4.local.", 1),
            "v3" => good.replacen("v4.", "v3.", 1),
            "no_footer" => good.rsplit_once('.').unwrap().0.into(),
            "empty_footer" => format!("{}.", good.rsplit_once('.').unwrap().0),
            "extra_part" => format!("{good}.e30"),
            "bad_char" => good.replacen("v4.public.ey", "v4.public.e*", 1),
            "padded" => {
                let (body, footer) = good[HEADER.len()..].split_once('.').unwrap();
                format!("{HEADER}{body}==.{footer}")
            }
            "short_body" => format!("{HEADER}{}.{}", b64(&[0; 63]), b64(br#"{"kid":"k1"}"#)),
            "footer_not_json" => with_footer(&good, b"k1"),
            "footer_no_kid" => with_footer(&good, br#"{"key":"k1"}"#),
            "footer_kid_number" => with_footer(&good, br#"{"kid":1}"#),
            "footer_duplicate_kid" => with_footer(&good, br#"{"kid":"k1","kid":"k2"}"#),
            "footer_too_long" => with_footer(&good, &[b' '; 800]),
            "payload_not_json" => sealed("not json"),
            "payload_array" => sealed("[]"),
            "exp_number" => sealed(
                r#"{"repl":"r","user":"u","cluster":"c","exp":1,"nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            "exp_not_rfc3339" => sealed(
                r#"{"repl":"r","user":"u","cluster":"c","exp":"tomorrow","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            "bad_iat" => sealed(
                r#"{"repl":"r","user":"u","cluster":"c","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","iat":"x","jti":"j"}"#,
            ),
            "duplicate_claim" => sealed(
                r#"{"repl":"r","repl":"s","user":"u","cluster":"c","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            "unknown_kid" => mint(&claims(), "k9", &key(1)),
            "other_key" => mint(&claims(), "k1", &key(2)),
            "tampered_payload" => tampered_payload(&good),
            // The footer is signed: pointing at another known key must fail.
            "footer_swapped" => with_footer(&good, br#"{"kid":"k2"}"#),
            "expired" => {
                c.exp = NOW - 3600;
                mint(&c, "k1", &key(1))
            }
            "not_yet_valid" => {
                c.nbf = NOW + 3600;
                mint(&c, "k1", &key(1))
            }
            "wrong_cluster" => {
                c.cluster = "eu-west-1".into();
                mint(&c, "k1", &key(1))
            }
            "null_claim" => sealed(
                r#"{"repl":null,"user":"u","cluster":"c","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            other => {
                // "missing_<claim>": a valid claim set minus one claim.
                let claim = other.strip_prefix("missing_").unwrap();
                let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
                    r#"{"repl":"r","user":"u","cluster":"us-east-1","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
                )
                .unwrap();
                assert!(v.remove(claim).is_some());
                sealed(&serde_json::Value::Object(v).to_string())
            }
        }
    }

    #[rstest]
    #[case::empty("empty", TokenError::Malformed)]
    #[case::header_only("header_only", TokenError::Malformed)]
    #[case::local("local", TokenError::Malformed)]
    #[case::v3("v3", TokenError::Malformed)]
    #[case::no_footer("no_footer", TokenError::Malformed)]
    #[case::empty_footer("empty_footer", TokenError::Malformed)]
    #[case::extra_part("extra_part", TokenError::Malformed)]
    #[case::bad_char("bad_char", TokenError::Malformed)]
    #[case::padded("padded", TokenError::Malformed)]
    #[case::short_body("short_body", TokenError::Malformed)]
    #[case::footer_not_json("footer_not_json", TokenError::Malformed)]
    #[case::footer_no_kid("footer_no_kid", TokenError::Malformed)]
    #[case::footer_kid_number("footer_kid_number", TokenError::Malformed)]
    #[case::footer_duplicate_kid("footer_duplicate_kid", TokenError::Malformed)]
    #[case::footer_too_long("footer_too_long", TokenError::Malformed)]
    #[case::payload_not_json("payload_not_json", TokenError::Malformed)]
    #[case::payload_array("payload_array", TokenError::Malformed)]
    #[case::exp_number("exp_number", TokenError::Malformed)]
    #[case::exp_not_rfc3339("exp_not_rfc3339", TokenError::Malformed)]
    #[case::bad_iat("bad_iat", TokenError::Malformed)]
    #[case::duplicate_claim("duplicate_claim", TokenError::Malformed)]
    #[case::unknown_kid("unknown_kid", TokenError::UnknownKid)]
    #[case::other_key("other_key", TokenError::BadSignature)]
    #[case::tampered_payload("tampered_payload", TokenError::BadSignature)]
    #[case::footer_swapped("footer_swapped", TokenError::BadSignature)]
    #[case::expired("expired", TokenError::Expired)]
    #[case::not_yet_valid("not_yet_valid", TokenError::NotYetValid)]
    #[case::wrong_cluster("wrong_cluster", TokenError::WrongCluster)]
    #[case::null_claim("null_claim", TokenError::MissingClaim)]
    #[case::missing_repl("missing_repl", TokenError::MissingClaim)]
    #[case::missing_user("missing_user", TokenError::MissingClaim)]
    #[case::missing_cluster("missing_cluster", TokenError::MissingClaim)]
    #[case::missing_exp("missing_exp", TokenError::MissingClaim)]
    #[case::missing_nbf("missing_nbf", TokenError::MissingClaim)]
    #[case::missing_jti("missing_jti", TokenError::MissingClaim)]
    fn rejects(#[case] name: &str, #[case] want: TokenError) {
        let token = case(name);
        let err = verify(&token, &keys(), NOW, &opts()).unwrap_err();
        assert_eq!(err, want);
        // Errors carry no token text.
        let shown = format!("{err} {err:?}");
        assert!(shown.len() < 40, "{shown}");
    }

    /// `repl`, `user` and `cluster` are passed on (headers to Conman, the
    /// Controlplane, admission keys): empty is missing, a control character
    /// (C0, DEL, C1) is malformed, anything else printable stays accepted.
    /// `mint` writes C0 as JSON escapes and DEL and C1 as raw UTF-8, so both
    /// ways into the decoded string are covered.
    #[rstest]
    #[case::empty("", Some(TokenError::MissingClaim))]
    #[case::lf("a\nb", Some(TokenError::Malformed))]
    #[case::cr("a\rb", Some(TokenError::Malformed))]
    #[case::crlf_header("a\r\nX-Admin: 1", Some(TokenError::Malformed))]
    #[case::tab("a\tb", Some(TokenError::Malformed))]
    #[case::nul("\0", Some(TokenError::Malformed))]
    #[case::x1f_last_c0("a\x1fb", Some(TokenError::Malformed))]
    #[case::x20_space("a b", None)]
    #[case::only_space(" ", None)]
    #[case::x7e_tilde("a~b", None)]
    #[case::x7f_del("a\x7fb", Some(TokenError::Malformed))]
    #[case::u80_first_c1("a\u{80}b", Some(TokenError::Malformed))]
    #[case::u85_nel("a\u{85}b", Some(TokenError::Malformed))]
    #[case::u9f_last_c1("a\u{9f}b", Some(TokenError::Malformed))]
    #[case::ua0_nbsp("a\u{a0}b", None)]
    #[case::e_acute("é", None)]
    #[case::cjk("日本-1", None)]
    #[case::emoji("🦀", None)]
    fn forwarded_claims_text(
        #[values("repl", "user", "cluster")] field: &str,
        #[case] value: &str,
        #[case] want: Option<TokenError>,
    ) {
        let mut c = claims();
        match field {
            "repl" => c.repl = value.into(),
            "user" => c.user = value.into(),
            _ => c.cluster = value.into(),
        }
        let token = mint(&c, "k1", &key(1));
        let any_cluster = VerifyOptions {
            cluster: None,
            ..opts()
        };
        let got = verify(&token, &keys(), NOW, &any_cluster);
        match want {
            None => assert_eq!(got, Ok(c)),
            Some(e) => assert_eq!(got, Err(e)),
        }
    }

    /// Claim text is checked with the other claims, before the cluster
    /// comparison: a required cluster that is empty is missing, not wrong.
    #[rstest]
    #[case::empty("", TokenError::MissingClaim)]
    #[case::lf("us-east-1\n", TokenError::Malformed)]
    #[case::other("eu-west-1", TokenError::WrongCluster)]
    fn required_cluster_text_checked_first(#[case] cluster: &str, #[case] want: TokenError) {
        let mut c = claims();
        c.cluster = cluster.into();
        let token = mint(&c, "k1", &key(1));
        assert_eq!(verify(&token, &keys(), NOW, &opts()), Err(want));
    }

    /// Escapes in the JSON are decoded before the check, and an empty
    /// claim is missing even when another one is also malformed.
    #[rstest]
    #[case::escaped_lf(r#""repl":"a\u000ab","user":"u""#, TokenError::Malformed)]
    #[case::escaped_nul(r#""repl":"r","user":"\u0000""#, TokenError::Malformed)]
    #[case::escaped_del(r#""repl":"r","user":"\u007f""#, TokenError::Malformed)]
    #[case::escaped_c1(r#""repl":"\u009f","user":"u""#, TokenError::Malformed)]
    #[case::empty_beats_malformed(r#""repl":"","user":"a\nb""#, TokenError::MissingClaim)]
    fn forwarded_claims_escaped(#[case] repl_user: &str, #[case] want: TokenError) {
        let token = sealed(&format!(
            r#"{{{repl_user},"cluster":"us-east-1","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}}"#
        ));
        assert_eq!(verify(&token, &keys(), NOW, &opts()), Err(want));
    }

    #[rstest]
    #[case::exp_now(NOW, 0, 0, None)]
    #[case::exp_one_past(NOW - 1, 0, 0, Some(TokenError::Expired))]
    #[case::exp_within_leeway(NOW - 30, 0, 30, None)]
    #[case::exp_past_leeway(NOW - 30 - 1, 0, 30, Some(TokenError::Expired))]
    #[case::nbf_now(NOW + 60, NOW, 0, None)]
    #[case::nbf_one_ahead(NOW + 60, NOW + 1, 0, Some(TokenError::NotYetValid))]
    #[case::nbf_within_leeway(NOW + 60, NOW + 30, 30, None)]
    #[case::nbf_past_leeway(NOW + 60, NOW + 30 + 1, 30, Some(TokenError::NotYetValid))]
    #[case::negative_leeway_is_zero(NOW, 0, -100, None)]
    #[case::huge_leeway_saturates(i64::MIN + 1, 0, i64::MAX, None)]
    fn leeway_edges(
        #[case] exp: i64,
        #[case] nbf: i64,
        #[case] leeway_s: i64,
        #[case] want: Option<TokenError>,
    ) {
        let c = Claims {
            exp,
            nbf,
            ..claims()
        };
        let token = mint(&c, "k1", &key(1));
        let opts = VerifyOptions {
            leeway_s,
            cluster: None,
        };
        let got = verify(&token, &keys(), NOW, &opts);
        match want {
            None => assert_eq!(got.map(|c| (c.exp, c.nbf)), Ok((exp.max(MIN_RFC3339), nbf))),
            Some(e) => assert_eq!(got, Err(e)),
        }
    }

    #[test]
    fn key_rotation_each_kid_verifies_its_own() {
        let set = keys();
        for (kid, n) in [("k1", 1), ("k2", 2)] {
            let token = mint(&claims(), kid, &key(n));
            assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
        }
        // After dropping k1 from the set, its tokens stop verifying.
        let mut only_k2 = KeySet::new();
        only_k2.insert("k2", key(2).verifying_key());
        let old = mint(&claims(), "k1", &key(1));
        assert_eq!(
            verify(&old, &only_k2, NOW, &opts()),
            Err(TokenError::UnknownKid)
        );
    }

    #[test]
    fn token_of_16000_chars_verifies() {
        // Unpadded base64 never has length 1 mod 4, so vary the kid too.
        let mut set = keys();
        set.insert("k10", key(1).verifying_key());
        let mut c = claims();
        let token = (11_500..12_000)
            .flat_map(|n| ["k1", "k10"].map(|kid| (n, kid)))
            .find_map(|(n, kid)| {
                c.user = "u".repeat(n);
                let t = mint(&c, kid, &key(1));
                (t.len() == 16_000).then_some(t)
            })
            .unwrap();
        assert_eq!(verify(&token, &set, NOW, &opts()), Ok(c));
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let token = sealed(
            r#"{"repl":"r\u0031","user":"\"u\"","cluster":"us-east-1","exp":"\u0032027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j","extra":{"a":[1,2]}}"#,
        );
        let got = verify(&token, &keys(), NOW, &opts()).unwrap();
        assert_eq!((got.repl.as_str(), got.user.as_str()), ("r1", "\"u\""));
        assert_eq!(got.exp, 1_798_761_600);
    }

    #[test]
    fn claims_borrow_from_payload() {
        let raw: RawClaims<'_> =
            serde_json::from_slice(br#"{"repl":"r","user":"\u0075"}"#).unwrap();
        assert!(matches!(raw.repl, Some(Text(Cow::Borrowed("r")))));
        assert!(matches!(raw.user, Some(Text(Cow::Owned(ref u))) if u == "u"));
    }

    fn b64ish() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_=.-]{0,200}".prop_map(|s| format!("{HEADER}{s}"))
    }

    proptest! {
        #[test]
        fn verify_never_panics(s in any::<String>(), now in any::<i64>(), leeway in any::<i64>()) {
            let opts = VerifyOptions { leeway_s: leeway, cluster: Some("c".into()) };
            let _ = verify(&s, &keys(), now, &opts);
        }

        #[test]
        fn verify_never_panics_on_token_shapes(s in b64ish()) {
            prop_assert!(verify(&s, &keys(), NOW, &opts()).is_err());
        }

        #[test]
        fn verify_never_panics_on_signed_garbage(payload in any::<Vec<u8>>(), footer in any::<Vec<u8>>()) {
            let token = seal(&payload, &footer, &key(1));
            let _ = verify(&token, &keys(), NOW, &VerifyOptions::default());
        }
    }
}
