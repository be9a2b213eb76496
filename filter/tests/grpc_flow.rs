//! gRPC calls through the filter on the native target: a route priced by gRPC method,
//! payment answers as gRPC statuses with the challenge in metadata, and the upstream's
//! `grpc-status` (trailers-only headers or trailers) deciding capture or void.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use prost::Message;
use x402_filter::host::{Call, FakeHost};
use x402_filter::plugin::{Action, Vm};
use x402_proto::settlement::v1::{
    AuthorizeOutcome, AuthorizeRequest, AuthorizeResponse, AuthorizeResult, CaptureRequest,
    VoidRequest,
};
use x402_proto::signing::{public_key_hex, resource_string, sign_hex, SigningKey};
use x402_proto::wire::{
    self, PaymentAuthorization, PaymentPayload, PaymentRequired, PaymentRequirements,
};

const ROOT: u32 = 1;
const NOW: u64 = 1_800_000_000;
const AUTHORITY: &str = "127.0.0.1:10000";
const METHOD_PATH: &str = "/quotes.v1.Quotes/GetQuote";

fn vm(void_codes: Option<serde_json::Value>) -> (Vm, FakeHost) {
    let mut config = serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "routes": [
            {"name": "get-quote", "match": {"grpc_method": "quotes.v1.Quotes/GetQuote"}, "price": "0.01"},
            {"name": "rest", "match": {"path_prefix": "/paid"}, "price": "0.01"}
        ]
    });
    if let Some(codes) = void_codes {
        config["grpc_void_codes"] = codes;
    }
    let mut host = FakeHost {
        now_nanos: NOW * 1_000_000_000,
        ..FakeHost::default()
    };
    let mut vm = Vm::default();
    vm.on_context_create(ROOT, 0);
    assert!(vm.on_configure(&mut host, ROOT, config.to_string().as_bytes()));
    (vm, host)
}

fn call(vm: &mut Vm, host: &mut FakeHost, ctx: u32, grpc: bool, payment: Option<String>) -> Action {
    vm.on_context_create(ctx, ROOT);
    let mut headers = vec![
        (":method".to_owned(), "POST".to_owned()),
        (":path".to_owned(), METHOD_PATH.to_owned()),
        (":authority".to_owned(), AUTHORITY.to_owned()),
        (":scheme".to_owned(), "http".to_owned()),
    ];
    if grpc {
        headers.push(("content-type".to_owned(), "application/grpc".to_owned()));
    }
    if let Some(p) = payment {
        headers.push(("payment-signature".to_owned(), p));
    }
    host.headers.insert(ctx, headers);
    host.effective = ctx;
    vm.on_request_headers_with_body(host, ctx, true)
}

fn proof(nonce: u8) -> String {
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
            nonce: hex::encode([nonce; 16]),
            valid_before: (NOW + 30).to_string(),
            resource: resource_string("POST", AUTHORITY, METHOD_PATH),
            signature: String::new(),
        },
    };
    p.payload.signature = sign_hex(&key, &p.signed_fields()).unwrap();
    wire::encode_header(&p)
}

fn last_grpc(host: &FakeHost) -> (u32, String, Vec<u8>) {
    match host.grpc_calls().last() {
        Some(Call::Grpc {
            token,
            method,
            message,
            ..
        }) => (*token, method.clone(), message.clone()),
        _ => panic!("no gRPC call"),
    }
}

/// A paid call that settlement authorized as `tx-0`.
fn paid_call(vm: &mut Vm, host: &mut FakeHost, ctx: u32) {
    assert_eq!(call(vm, host, ctx, true, Some(proof(1))), Action::Pause);
    let (token, method, body) = last_grpc(host);
    assert_eq!(method, "Authorize");
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert_eq!(request.items[0].route, "get-quote");
    let answer = AuthorizeResponse {
        results: vec![AuthorizeResult {
            request_id: request.items[0].request_id.clone(),
            outcome: AuthorizeOutcome::Authorized as i32,
            transaction_id: "tx-0".into(),
            held_amount: 10_000,
            payer_account: "payer-1".into(),
            ..AuthorizeResult::default()
        }],
    };
    host.effective = ROOT;
    vm.on_grpc_result(host, token, Ok(answer.encode_to_vec()));
    assert!(host.calls.contains(&Call::Resume { context: ctx }));
}

fn respond(vm: &mut Vm, host: &mut FakeHost, ctx: u32, headers: &[(&str, &str)], end: bool) {
    host.response_headers.insert(
        ctx,
        headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    host.effective = ctx;
    vm.on_response_headers(host, ctx, end);
}

fn trailers(vm: &mut Vm, host: &mut FakeHost, ctx: u32, grpc_status: &str) {
    host.response_trailers.insert(
        ctx,
        vec![("grpc-status".to_owned(), grpc_status.to_owned())],
    );
    host.effective = ctx;
    vm.on_response_trailers(host, ctx);
}

fn end(vm: &mut Vm, host: &mut FakeHost, ctx: u32) {
    host.effective = ctx;
    vm.on_delete(host, ctx);
}

#[test]
fn an_unpaid_grpc_call_gets_unauthenticated_with_the_challenge_in_metadata() {
    let (mut vm, mut host) = vm(None);
    assert_eq!(call(&mut vm, &mut host, 2, true, None), Action::Pause);
    let Some(Call::GrpcReply {
        grpc_status,
        headers,
        message,
        ..
    }) = host.calls.last().cloned()
    else {
        panic!("no gRPC reply: {:?}", host.calls);
    };
    assert_eq!(grpc_status, 16);
    assert!(message.starts_with("payment_required"), "{message}");
    assert!(headers.iter().all(|(k, _)| k != "content-type"));
    let challenge = headers
        .iter()
        .find(|(k, _)| k == "payment-required")
        .map(|(_, v)| v.clone())
        .unwrap();
    let challenge: PaymentRequired = wire::decode_header(&challenge).unwrap();
    assert_eq!(challenge.accepts[0].amount, "10000");
    assert_eq!(
        challenge.resource.url,
        format!("http://{AUTHORITY}{METHOD_PATH}")
    );

    // The same call without the gRPC content type is answered in HTTP.
    call(&mut vm, &mut host, 3, false, None);
    assert!(matches!(
        host.calls.last(),
        Some(Call::LocalReply { status: 402, .. })
    ));
    // A malformed proof is INVALID_ARGUMENT.
    call(&mut vm, &mut host, 4, true, Some("%%%".into()));
    assert!(matches!(
        host.calls.last(),
        Some(Call::GrpcReply { grpc_status: 3, .. })
    ));
}

fn last_void_reason(host: &FakeHost) -> String {
    let (_, method, body) = last_grpc(host);
    assert_eq!(method, "Void");
    VoidRequest::decode(body.as_slice()).unwrap().items[0]
        .reason
        .clone()
}

#[test]
fn an_error_in_the_trailers_voids_the_hold() {
    let (mut vm, mut host) = vm(None);
    paid_call(&mut vm, &mut host, 2);
    respond(
        &mut vm,
        &mut host,
        2,
        &[(":status", "200"), ("content-type", "application/grpc")],
        false,
    );
    trailers(&mut vm, &mut host, 2, "13");
    end(&mut vm, &mut host, 2);
    assert_eq!(last_void_reason(&host), "grpc_internal");
}

#[test]
fn a_trailers_only_error_voids_the_hold() {
    let (mut vm, mut host) = vm(None);
    paid_call(&mut vm, &mut host, 2);
    respond(
        &mut vm,
        &mut host,
        2,
        &[
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "14"),
        ],
        true,
    );
    end(&mut vm, &mut host, 2);
    assert_eq!(last_void_reason(&host), "grpc_unavailable");
}

#[test]
fn ok_in_the_trailers_captures_and_uncounted_codes_capture() {
    for (codes, status) in [(None, "0"), (Some(serde_json::json!(["INTERNAL"])), "5")] {
        let (mut vm, mut host) = vm(codes);
        paid_call(&mut vm, &mut host, 2);
        respond(
            &mut vm,
            &mut host,
            2,
            &[(":status", "200"), ("content-type", "application/grpc")],
            false,
        );
        trailers(&mut vm, &mut host, 2, status);
        end(&mut vm, &mut host, 2);
        let (_, method, body) = last_grpc(&host);
        assert_eq!(method, "Capture", "grpc-status {status}");
        let capture = CaptureRequest::decode(body.as_slice()).unwrap();
        assert_eq!(capture.items[0].amount, 10_000);
    }
}
