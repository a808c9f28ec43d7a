//! What the token unit tests share: keys, claims, options, and the official
//! PASETO v4 test vectors.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::mint::seal;
use super::{Claims, KeySet, VerifyOptions};

pub(super) const NOW: i64 = 1_795_773_600; // 2026-11-27T10:00:00Z

pub(super) fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub(super) fn keys() -> KeySet {
    let mut set = KeySet::new();
    set.insert("k1", key(1).verifying_key());
    set.insert("k2", key(2).verifying_key());
    set
}

pub(super) fn claims() -> Claims {
    Claims {
        repl: "repl-123".into(),
        user: "user-9".into(),
        cluster: "us-east-1".into(),
        exp: NOW + 3600,
        nbf: NOW - 60,
        jti: "jti-abc".into(),
    }
}

pub(super) fn opts() -> VerifyOptions {
    VerifyOptions {
        leeway_s: 30,
        cluster: Some("us-east-1".into()),
    }
}

pub(super) fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub(super) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs arbitrary claims JSON with key(1) under kid k1.
pub(super) fn sealed(claims_json: &str) -> String {
    seal(claims_json.as_bytes(), br#"{"kid":"k1"}"#, &key(1))
}

// Official PASETO v4 test vectors (paseto-standard/test-vectors, v4.json),
// as shipped in the pasetors crate.
pub(super) const SPEC_SK: &str = "b4cbfb43df4ce210727d953e4a713307fa19bb7d9f85041438d9e11b942a37741eb9dbbbbc047c03fd70604e0071f0987e16b28b757225c11f00415d0e20b1a2";
pub(super) const SPEC_PK: &str = "1eb9dbbbbc047c03fd70604e0071f0987e16b28b757225c11f00415d0e20b1a2";
pub(super) const SPEC_PAYLOAD: &str =
    r#"{"data":"this is a signed message","exp":"2022-01-01T00:00:00+00:00"}"#;
pub(super) const SPEC_FOOTER: &str = r#"{"kid":"zVhMiPBP9fRf2snEcT7gFTioeA9COcNy9DfgL1W60haN"}"#;
pub(super) const SPEC_KID: &str = "zVhMiPBP9fRf2snEcT7gFTioeA9COcNy9DfgL1W60haN";
pub(super) const VECTOR_4_S_1: &str = "v4.public.eyJkYXRhIjoidGhpcyBpcyBhIHNpZ25lZCBtZXNzYWdlIiwiZXhwIjoiMjAyMi0wMS0wMVQwMDowMDowMCswMDowMCJ9bg_XBBzds8lTZShVlwwKSgeKpLT3yukTw6JUz3W4h_ExsQV-P0V54zemZDcAxFaSeef1QlXEFtkqxT1ciiQEDA";
pub(super) const VECTOR_4_S_2: &str = "v4.public.eyJkYXRhIjoidGhpcyBpcyBhIHNpZ25lZCBtZXNzYWdlIiwiZXhwIjoiMjAyMi0wMS0wMVQwMDowMDowMCswMDowMCJ9v3Jt8mx_TdM2ceTGoqwrh4yDFn0XsHvvV_D0DtwQxVrJEBMl0F2caAdgnpKlt4p7xBnx1HcO-SPo8FPp214HDw.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";
pub(super) const VECTOR_4_S_3: &str = "v4.public.eyJkYXRhIjoidGhpcyBpcyBhIHNpZ25lZCBtZXNzYWdlIiwiZXhwIjoiMjAyMi0wMS0wMVQwMDowMDowMCswMDowMCJ9NPWciuD3d0o5eXJXG5pJy-DiVEoyPYWs1YSTwWHNJq6DZD3je5gf-0M4JR9ipdUSJbIovzmBECeaWmaqcaP0DQ.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";
pub(super) const VECTOR_4_F_1: &str = "v4.local.vngXfCISbnKgiP6VWGuOSlYrFYU300fy9ijW33rznDYgxHNPwWluAY2Bgb0z54CUs6aYYkIJ-bOOOmJHPuX_34Agt_IPlNdGDpRdGNnBz2MpWJvB3cttheEc1uyCEYltj7wBQQYX.YXJiaXRyYXJ5LXN0cmluZy10aGF0LWlzbid0LWpzb24";
pub(super) const VECTOR_4_F_2: &str = "v4.public.eyJpbnZhbGlkIjoidGhpcyBzaG91bGQgbmV2ZXIgZGVjb2RlIn22Sp4gjCaUw0c7EH84ZSm_jN_Qr41MrgLNu5LIBCzUr1pn3Z-Wukg9h3ceplWigpoHaTLcwxj0NsI1vjTh67YB.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";
pub(super) const VECTOR_4_F_3: &str = "v3.local.23e_2PiqpQBPvRFKzB0zHhjmxK3sKo2grFZRRLM-U7L0a8uHxuF9RlVz3Ic6WmdUUWTxCaYycwWV1yM8gKbZB2JhygDMKvHQ7eBf8GtF0r3K0Q_gF1PXOxcOgztak1eD1dPe9rLVMSgR0nHJXeIGYVuVrVoLWQ.YXJiaXRyYXJ5LXN0cmluZy10aGF0LWlzbid0LWpzb24";
pub(super) const VECTOR_4_F_4: &str = "v4.local.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQAr68PS4AXe7If_ZgesdkUMvSwscFlAl1pk5HC0e8kApeaqMfGo_7OpBnwJOAbY9V7WU6abu74MmcUE8YWAiaArVI8XJ5hOb_4v9RmDkneN0S92dx0OW4pgy7omxgf3S8c3LlQh";
pub(super) const VECTOR_4_F_5: &str = "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WkwMsYXw6FSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t4x-RMNXtQNbz7FvFZ_G-lFpk5RG3EOrwDL6CgDqcerSQ==.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";

pub(super) fn spec_signing_key() -> SigningKey {
    SigningKey::from_keypair_bytes(&hex(SPEC_SK).try_into().unwrap()).unwrap()
}

pub(super) fn spec_keys() -> KeySet {
    let mut set = KeySet::new();
    let pk = VerifyingKey::from_bytes(&hex(SPEC_PK).try_into().unwrap()).unwrap();
    set.insert(SPEC_KID, pk);
    set
}
