//! `token::verify` on arbitrary text: never panics, and nothing but a token
//! signed by a known key can pass.

use eval_proxy::token::{dev_signing_key, verify, KeySet, VerifyOptions, DEV_KID};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut keys = KeySet::new();
    keys.insert(DEV_KID, dev_signing_key().verifying_key());
    let opts = VerifyOptions {
        leeway_s: 30,
        cluster: None,
    };
    if verify(text, &keys, 1_800_000_000, &opts).is_ok() {
        // Only possible for a real token; random input never gets here.
        assert!(text.starts_with("v4.public."));
    }
}
