//! The optional `settlement_token` goes to settlement as `authorization: Bearer`
//! gRPC metadata on every call, and a malformed one is refused at configure time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use x402_filter::host::{Call, FakeHost};
use x402_filter::plugin::Vm;
use x402_proto::signing::{public_key_hex, resource_string, sign_hex, SigningKey};
use x402_proto::wire::{self, PaymentAuthorization, PaymentPayload, PaymentRequirements};

const ROOT: u32 = 1;
const NOW: u64 = 1_800_000_000;
const AUTHORITY: &str = "127.0.0.1:10000";

fn config(token: Option<&str>) -> String {
    let mut c = serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "routes": [{"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"}]
    });
    if let Some(t) = token {
        c["settlement_token"] = t.into();
    }
    c.to_string()
}

fn configured(token: Option<&str>) -> Option<(Vm, FakeHost)> {
    let mut vm = Vm::default();
    let mut host = FakeHost {
        now_nanos: NOW * 1_000_000_000,
        ..FakeHost::default()
    };
    vm.on_context_create(ROOT, 0);
    vm.on_configure(&mut host, ROOT, config(token).as_bytes())
        .then_some((vm, host))
}

/// Sends one paid request and returns the metadata of the Authorize call it causes.
fn authorize_metadata(token: Option<&str>) -> Vec<(String, String)> {
    let (mut vm, mut host) = configured(token).unwrap();
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let mut p = PaymentPayload {
        x402_version: 2,
        accepted: PaymentRequirements {
            scheme: "exact".into(),
            network: "402x:local".into(),
            amount: "10000".into(),
            asset: "USD".into(),
            pay_to: "merchant-demo".into(),
            max_timeout_seconds: 60,
            extra: serde_json::Map::new(),
        },
        payload: PaymentAuthorization {
            payer: public_key_hex(&key),
            nonce: hex::encode([3u8; 16]),
            valid_before: (NOW + 30).to_string(),
            resource: resource_string("GET", AUTHORITY, "/paid/quote"),
            signature: String::new(),
        },
    };
    p.payload.signature = sign_hex(&key, &p.signed_fields()).unwrap();
    let ctx = 2;
    vm.on_context_create(ctx, ROOT);
    host.headers.insert(
        ctx,
        vec![
            (":method".into(), "GET".into()),
            (":path".into(), "/paid/quote".into()),
            (":authority".into(), AUTHORITY.into()),
            (":scheme".into(), "http".into()),
            ("x-request-id".into(), "req-2".into()),
            ("payment-signature".into(), wire::encode_header(&p)),
        ],
    );
    host.effective = ctx;
    vm.on_request_headers(&mut host, ctx);
    match host.grpc_calls().last() {
        Some(Call::Grpc { metadata, .. }) => metadata.clone(),
        other => panic!("no Authorize call: {other:?}"),
    }
}

#[test]
fn the_token_is_sent_as_bearer_metadata() {
    assert_eq!(
        authorize_metadata(Some("dp-token-123")),
        [(
            "authorization".to_string(),
            "Bearer dp-token-123".to_string()
        )]
    );
    assert!(authorize_metadata(None).is_empty());
}

#[test]
fn a_malformed_token_is_refused_at_configure() {
    for bad in ["", "has space", "line\nbreak"] {
        assert!(configured(Some(bad)).is_none(), "{bad:?} was accepted");
    }
}
