//! Token verification cost on the session setup path.
//!
//! In eval-proxy this file lives at bench/token.rs; swap the crate name in
//! the `use` below.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ed25519_dalek::SigningKey;
use eval_proxy::token::{self, Claims, KeySet, VerifyOptions};

const NOW: i64 = 1_795_773_600;

fn claims(user: String) -> Claims {
    Claims {
        repl: "8f14e45f-ceea-467f-a0e6-9d1c2b3a4f5e".into(),
        user,
        cluster: "us-east-1".into(),
        exp: NOW + 3600,
        nbf: NOW - 60,
        jti: "01JDQ6Z8Y4M2T5V7X9B3C1N0PK".into(),
    }
}

fn verify(c: &mut Criterion) {
    // Two kids, as during a key rotation.
    let old = SigningKey::from_bytes(&[1; 32]);
    let current = SigningKey::from_bytes(&[2; 32]);
    let mut keys = KeySet::new();
    keys.insert("2026-10", old.verifying_key());
    keys.insert("2026-11", current.verifying_key());
    let opts = VerifyOptions {
        leeway_s: 30,
        cluster: Some("us-east-1".into()),
    };

    let typical = token::mint(&claims("user-1234567".into()), "2026-11", &current);
    let large = token::mint(&claims("u".repeat(11_000)), "2026-11", &current);
    let mut forged = claims("user-1234567".into());
    forged.user = "user-7654321".into();
    let forged = token::mint(&forged, "2026-11", &old);
    let unknown_kid = token::mint(&claims("user-1234567".into()), "gone", &current);
    assert!(token::verify(&typical, &keys, NOW, &opts).is_ok());
    assert!(token::verify(&large, &keys, NOW, &opts).is_ok());

    let mut g = c.benchmark_group("verify");
    for (name, tok) in [
        ("typical", &typical),
        ("large_15k", &large),
        ("bad_signature", &forged),
        ("unknown_kid", &unknown_kid),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| token::verify(black_box(tok), &keys, NOW, &opts))
        });
    }
    // Floor: the bare signature check on a message of the typical token's size.
    let msg = vec![b'x'; typical.len() * 3 / 4];
    let sig = ed25519_dalek::Signer::sign(&current, &msg);
    let vk = current.verifying_key();
    g.bench_function("ed25519_only", |b| {
        b.iter(|| vk.verify_strict(black_box(&msg), &sig))
    });
    g.finish();

    // Batch verification: per-signature cost for n signatures checked at
    // once (what a loop turn with n fresh tokens could do).
    let mut g = c.benchmark_group("ed25519_batch");
    for n in [1usize, 2, 4, 8, 16, 32] {
        let keys: Vec<SigningKey> = (0..n)
            .map(|i| SigningKey::from_bytes(&[i as u8 + 3; 32]))
            .collect();
        let msgs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; msg.len()]).collect();
        let sigs: Vec<_> = keys
            .iter()
            .zip(&msgs)
            .map(|(k, m)| ed25519_dalek::Signer::sign(k, m))
            .collect();
        let vks: Vec<_> = keys.iter().map(|k| k.verifying_key()).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        g.throughput(criterion::Throughput::Elements(n as u64));
        g.bench_function(format!("n{n}"), |b| {
            b.iter(|| ed25519_dalek::verify_batch(black_box(&refs), &sigs, &vks))
        });
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
