//! The published test vectors through the filter's own decoding and checking path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use x402_filter::config::Config;
use x402_filter::request::{check_payment, RequestInfo};
use x402_proto::vectors::vectors;
use x402_proto::wire::{self, ErrorCode};

/// A config and request under which `vector` is exactly right (price = its amount).
fn setting(v: &x402_proto::vectors::Vector) -> (Config, RequestInfo) {
    let a = &v.payload.accepted;
    let config = Config::from_json(
        serde_json::json!({
            "settlement_cluster": "settlement",
            "network": a.network, "asset": a.asset, "asset_decimals": 0, "pay_to": a.pay_to,
            "verify_signatures_in_filter": true,
            "routes": [{"name": "all", "match": {"path_prefix": "/"}, "price": a.amount}]
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let (method, rest) = v.payload.payload.resource.split_once(' ').unwrap();
    let slash = rest.find('/').unwrap();
    let valid_before: u64 = v.payload.payload.valid_before.parse().unwrap();
    let info = RequestInfo {
        scheme: "http".into(),
        method: method.into(),
        authority: rest[..slash].into(),
        path: rest[slash..].into(),
        now_secs: valid_before - 10,
        ..RequestInfo::default()
    };
    (config, info)
}

#[test]
fn every_vector_decodes_and_its_signature_is_accepted() {
    let vs = vectors().unwrap();
    assert!(vs.len() >= 5);
    for v in &vs {
        let checked = wire::decode_payment(&v.header).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(checked.payload, v.payload, "{}", v.name);
        let (config, info) = setting(v);
        let expected = if v.payload.accepted.scheme == "exact" {
            Ok(())
        } else {
            Err(ErrorCode::WrongScheme)
        };
        assert_eq!(
            check_payment(&config, &config.routes[0], &info, &checked),
            expected,
            "{}",
            v.name
        );
    }
}

#[test]
fn a_tampered_vector_is_an_invalid_signature() {
    for v in vectors()
        .unwrap()
        .iter()
        .filter(|v| v.payload.accepted.scheme == "exact")
    {
        let (config, info) = setting(v);
        let mut tampered = v.payload.clone();
        let sig = &mut tampered.payload.signature;
        let flipped = if sig.starts_with('0') { "1" } else { "0" };
        sig.replace_range(0..1, flipped);
        let checked = wire::decode_payment(&wire::encode_header(&tampered)).unwrap();
        assert_eq!(
            check_payment(&config, &config.routes[0], &info, &checked),
            Err(ErrorCode::InvalidSignature),
            "{}",
            v.name
        );
        // A changed signed field breaks it too (the nonce is not checked anywhere else here).
        let mut other = v.payload.clone();
        other.payload.nonce.replace_range(0..2, "ff");
        let checked = wire::decode_payment(&wire::encode_header(&other)).unwrap();
        assert_eq!(
            check_payment(&config, &config.routes[0], &info, &checked),
            Err(ErrorCode::InvalidSignature),
            "{}",
            v.name
        );
    }
}
