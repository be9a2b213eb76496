//! Regenerates `testdata/vectors.json`: `cargo run -p x402-proto --features ed25519 --example gen_vectors`.
//! The vectors are deterministic (fixed seeds, ed25519 is deterministic), so running it
//! again must not change the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use x402_proto::signing::{public_key_hex, sign_hex, SigningKey};
use x402_proto::wire::{encode_header, PaymentAuthorization, PaymentPayload, PaymentRequirements};

fn main() {
    let cases = [
        (
            "flat price, GET with query",
            1u8,
            "exact",
            "10000",
            "GET localhost:10000/paid/quote?sym=ABC",
            "1900000000",
            16usize,
        ),
        (
            "metered maximum, POST",
            2,
            "upto",
            "500000",
            "POST api.example.com/v1/chat/completions",
            "1900000123",
            32,
        ),
        (
            "zero decimals asset, port in authority",
            3,
            "exact",
            "1",
            "GET api.example.com:8443/items/42",
            "2000000000",
            16,
        ),
        (
            "large amount, long nonce",
            4,
            "exact",
            "9223372036854775807",
            "PUT 127.0.0.1:8080/a/b?x=1&y=%20z",
            "1800000000",
            64,
        ),
        (
            "unicode in path",
            5,
            "exact",
            "250",
            "GET example.org/caf\u{e9}/men\u{fc}",
            "1900000000",
            24,
        ),
    ];
    let mut out = Vec::new();
    for (name, seed_byte, scheme, amount, resource, valid_before, nonce_len) in cases {
        let seed = [seed_byte; 32];
        let key = SigningKey::from_bytes(&seed);
        let nonce: String = (0..nonce_len)
            .map(|i| format!("{:02x}", (i as u8).wrapping_mul(7).wrapping_add(seed_byte)))
            .collect();
        let mut payload = PaymentPayload {
            x402_version: 2,
            accepted: PaymentRequirements {
                scheme: scheme.into(),
                network: "402x:local".into(),
                amount: amount.into(),
                asset: if seed_byte == 3 {
                    "CREDIT".into()
                } else {
                    "USD".into()
                },
                pay_to: "merchant-demo".into(),
                max_timeout_seconds: 60,
                extra: serde_json::Map::new(),
            },
            payload: PaymentAuthorization {
                payer: public_key_hex(&key),
                nonce,
                valid_before: valid_before.into(),
                resource: resource.into(),
                signature: String::new(),
            },
        };
        let canonical =
            String::from_utf8(payload.signed_fields().canonical_bytes().unwrap()).unwrap();
        payload.payload.signature = sign_hex(&key, &payload.signed_fields()).unwrap();
        out.push(serde_json::json!({
            "name": name,
            "seed": hex::encode(seed),
            "publicKey": public_key_hex(&key),
            "payload": payload,
            "canonical": canonical,
            "header": encode_header(&payload),
        }));
    }
    let text = serde_json::to_string_pretty(&out).unwrap();
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/vectors.json"),
        text + "\n",
    )
    .unwrap();
}
