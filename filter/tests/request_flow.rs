//! The filter end to end on the native target: host callbacks go into [`Vm`] and
//! the recording [`FakeHost`] shows what Envoy would have been asked to do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use prost::Message;
use x402_filter::dispatcher::{
    MAX_AUTHORIZE_IN_FLIGHT, MAX_RESOLVE_ATTEMPTS, RETRY_BACKOFF_NANOS, SERVICE,
};
use x402_filter::host::{Call, FakeHost, Host};
use x402_filter::plugin::{Action, Vm};
use x402_filter::request::State;
use x402_proto::settlement::v1::{
    AuthorizeOutcome, AuthorizeRequest, AuthorizeResponse, AuthorizeResult, CaptureRequest,
    CaptureResponse, ResolveOutcome, ResolveResult, VoidRequest, VoidResponse,
};
use x402_proto::signing::{public_key_hex, resource_string, sign_hex, SigningKey};
use x402_proto::wire::{
    self, ErrorBody, PaymentAuthorization, PaymentPayload, PaymentRequired, PaymentRequirements,
    SettleResponse,
};

const ROOT: u32 = 1;
const NOW: u64 = 1_800_000_000;
const AUTHORITY: &str = "127.0.0.1:10000";

/// Status, headers and body of a local reply.
type LocalReply = (u16, Vec<(String, String)>, Vec<u8>);

struct Harness {
    vm: Vm,
    host: FakeHost,
}

fn config(verify: bool) -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "verify_signatures_in_filter": verify,
        "routes": [
            {"name": "report", "match": {"method": "POST", "path_exact": "/paid/report"}, "price": "0.25"},
            {"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01", "description": "quote"},
            {"name": "n", "match": {"route_name": "named"}, "price": "0.02"}
        ]
    })
    .to_string()
}

impl Harness {
    fn new(verify: bool) -> Harness {
        Harness::with_config(&config(verify))
    }

    /// [`config`] with exact prices held and captured after the response.
    fn two_phase() -> Harness {
        let mut config: serde_json::Value = serde_json::from_str(&config(false)).unwrap();
        config["one_phase_exact"] = false.into();
        Harness::with_config(&config.to_string())
    }

    fn with_config(config: &str) -> Harness {
        let mut h = Harness {
            vm: Vm::default(),
            host: FakeHost {
                now_nanos: NOW * 1_000_000_000,
                ..FakeHost::default()
            },
        };
        h.vm.on_context_create(ROOT, 0);
        assert!(h.vm.on_configure(&mut h.host, ROOT, config.as_bytes()));
        h
    }

    /// The same host with a new, empty VM configured as before: Envoy's reload after
    /// the VM trapped.
    fn reloaded(self) -> Harness {
        let mut h = Harness {
            vm: Vm::default(),
            host: self.host,
        };
        h.vm.on_context_create(ROOT, 0);
        assert!(h
            .vm
            .on_configure(&mut h.host, ROOT, config(false).as_bytes()));
        h
    }

    /// [`Harness::reloaded`], then the new VM ticks: while the old one might only be
    /// slow it takes nothing over (nothing is sent), after
    /// [`x402_filter::journal::ORPHAN_AFTER_NANOS`] it takes the old one's journal.
    fn taken_over(self) -> Harness {
        let sent = self.host.grpc_calls().len();
        let mut h = self.reloaded();
        h.host.now_nanos += x402_filter::journal::ORPHAN_AFTER_NANOS / 2;
        h.vm.on_tick(&mut h.host, ROOT);
        assert_eq!(h.host.grpc_calls().len(), sent, "taken over too early");
        h.host.now_nanos += x402_filter::journal::ORPHAN_AFTER_NANOS;
        h.vm.on_tick(&mut h.host, ROOT);
        h
    }

    fn request(&mut self, ctx: u32, method: &str, path: &str, payment: Option<String>) -> Action {
        self.request_headers(ctx, method, path, payment, false)
    }

    /// Request headers; `body_follows` when they do not end the stream.
    fn request_headers(
        &mut self,
        ctx: u32,
        method: &str,
        path: &str,
        payment: Option<String>,
        body_follows: bool,
    ) -> Action {
        self.vm.on_context_create(ctx, ROOT);
        let mut headers = vec![
            (":method".to_owned(), method.to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), AUTHORITY.to_owned()),
            (":scheme".to_owned(), "http".to_owned()),
            ("x-request-id".to_owned(), format!("req-{ctx}")),
        ];
        if let Some(p) = payment {
            headers.push(("payment-signature".to_owned(), p));
        }
        self.host.headers.insert(ctx, headers);
        self.host.effective = ctx;
        self.vm
            .on_request_headers_with_body(&mut self.host, ctx, body_follows)
    }

    /// A request body callback; `body` is everything buffered so far.
    fn request_body(&mut self, ctx: u32, body: &[u8], end_of_stream: bool) -> Action {
        self.host.request_bodies.insert(ctx, body.to_vec());
        self.host.effective = ctx;
        self.vm
            .on_request_body(&mut self.host, ctx, body.len(), end_of_stream)
    }

    fn respond(&mut self, ctx: u32, status: u16, end_of_stream: bool) {
        self.host
            .response_headers
            .insert(ctx, vec![(":status".to_owned(), status.to_string())]);
        self.host.effective = ctx;
        assert_eq!(
            self.vm
                .on_response_headers(&mut self.host, ctx, end_of_stream),
            Action::Continue
        );
    }

    fn end(&mut self, ctx: u32) {
        self.host.effective = ctx;
        self.vm.on_delete(&mut self.host, ctx);
    }

    fn grpc_ok(&mut self, token: u32, body: Vec<u8>) {
        self.host.effective = ROOT;
        self.vm.on_grpc_result(&mut self.host, token, Ok(body));
    }

    fn grpc_fail(&mut self, token: u32, status: u32) {
        self.host.effective = ROOT;
        self.vm.on_grpc_result(&mut self.host, token, Err(status));
    }

    /// The last gRPC call: (token, context it was made on, method, body).
    fn last_grpc(&self) -> (u32, u32, String, Vec<u8>) {
        match self.host.grpc_calls().last() {
            Some(Call::Grpc {
                token,
                context,
                method,
                message,
                service,
                cluster,
                ..
            }) => {
                assert_eq!(service, SERVICE);
                assert_eq!(cluster, "settlement");
                (*token, *context, method.clone(), message.clone())
            }
            _ => panic!("no gRPC call"),
        }
    }

    fn reply_to(&self, ctx: u32) -> Option<LocalReply> {
        self.host.calls.iter().rev().find_map(|c| match c {
            Call::LocalReply {
                context,
                status,
                headers,
                body,
            } if *context == ctx => Some((*status, headers.clone(), body.clone())),
            _ => None,
        })
    }

    fn challenge_error(&self, ctx: u32) -> String {
        let (status, headers, body) = self.reply_to(ctx).expect("a local reply");
        assert_eq!(status, 402);
        let header = headers
            .iter()
            .find(|(k, _)| k == "payment-required")
            .map(|(_, v)| v.clone())
            .expect("payment-required");
        let from_header: PaymentRequired = wire::decode_header(&header).unwrap();
        let from_body: PaymentRequired = serde_json::from_slice(&body).unwrap();
        assert_eq!(from_header, from_body);
        from_body.error.unwrap()
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn payload(method: &str, path: &str, nonce_byte: u8) -> PaymentPayload {
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
            payer: public_key_hex(&key()),
            nonce: hex::encode([nonce_byte; 16]),
            valid_before: (NOW + 30).to_string(),
            resource: resource_string(method, AUTHORITY, path),
            signature: String::new(),
        },
    };
    sign(&mut p);
    p
}

fn sign(p: &mut PaymentPayload) {
    p.payload.signature = sign_hex(&key(), &p.signed_fields()).unwrap();
}

fn header(p: &PaymentPayload) -> String {
    wire::encode_header(p)
}

/// Settlement's answer placing a hold for every item.
fn authorized(request: &AuthorizeRequest, tx_prefix: &str) -> Vec<u8> {
    answer_all(request, tx_prefix, false)
}

/// Settlement's answer authorizing every item; `capture`: capturing those that ask.
fn answer_all(request: &AuthorizeRequest, tx_prefix: &str, capture: bool) -> Vec<u8> {
    AuthorizeResponse {
        results: request
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| AuthorizeResult {
                request_id: item.request_id.clone(),
                outcome: AuthorizeOutcome::Authorized as i32,
                transaction_id: format!("{tx_prefix}{i}"),
                held_amount: item.hold_amount,
                payer_account: "payer-1".into(),
                message: String::new(),
                retry_after_seconds: 0,
                captured: capture && item.capture,
            })
            .collect(),
    }
    .encode_to_vec()
}

#[test]
fn unpriced_routes_pass_untouched() {
    let mut h = Harness::new(false);
    assert_eq!(h.request(2, "GET", "/free", None), Action::Continue);
    assert!(h.host.calls.is_empty());
    assert_eq!(h.host.counter("x402_requests_unpriced"), 1);
}

#[test]
fn a_request_without_proof_gets_the_challenge() {
    let mut h = Harness::new(false);
    assert_eq!(
        h.request(2, "GET", "/paid/quote?sym=ABC", None),
        Action::Pause
    );
    let (_, headers, body) = h.reply_to(2).unwrap();
    assert!(headers.contains(&("content-type".into(), "application/json".into())));
    let challenge: PaymentRequired = serde_json::from_slice(&body).unwrap();
    assert_eq!(challenge.x402_version, 2);
    assert_eq!(
        challenge.resource.url,
        "http://127.0.0.1:10000/paid/quote?sym=ABC"
    );
    assert_eq!(challenge.price.as_deref(), Some("0.01"));
    assert_eq!(challenge.payment_address.as_deref(), Some("merchant-demo"));
    let r = &challenge.accepts[0];
    assert_eq!(
        (
            r.scheme.as_str(),
            r.network.as_str(),
            r.amount.as_str(),
            r.asset.as_str()
        ),
        ("exact", "402x:local", "10000", "USD")
    );
    assert_eq!(r.pay_to, "merchant-demo");
    assert_eq!(r.max_timeout_seconds, 60);
    assert_eq!(
        serde_json::Value::Object(r.extra.clone()),
        serde_json::json!({"decimals": 6, "name": "USD"})
    );
    assert_eq!(h.challenge_error(2), "payment_required");
    assert!(h.host.grpc_calls().is_empty());
    assert_eq!(h.host.counter("x402_requests_challenged"), 1);
}

#[test]
fn the_first_matching_route_sets_the_price() {
    let mut h = Harness::new(false);
    h.request(2, "POST", "/paid/report", None);
    let body: PaymentRequired = serde_json::from_slice(&h.reply_to(2).unwrap().2).unwrap();
    assert_eq!(body.accepts[0].amount, "250000");
    h.host
        .properties
        .insert((3, "xds.route_name".into()), b"named".to_vec());
    h.request(3, "GET", "/named/thing", None);
    let body: PaymentRequired = serde_json::from_slice(&h.reply_to(3).unwrap().2).unwrap();
    assert_eq!(body.accepts[0].amount, "20000");
}

/// Envoy's route name costs ~20 us to read: it is read only when a route that matches
/// on it is reached with its other criteria met.
#[test]
fn the_route_name_is_read_only_when_matching_needs_it() {
    let mut h = Harness::new(false);
    // `/paid` matches the `quote` route by path before the route-name route.
    h.request(2, "GET", "/paid/quote", None);
    assert_eq!(h.reply_to(2).unwrap().0, 402);
    assert!(h.host.property_reads.borrow().is_empty());
    h.host
        .properties
        .insert((3, "xds.route_name".into()), b"named".to_vec());
    h.request(3, "GET", "/named/thing", None);
    assert_eq!(h.reply_to(3).unwrap().0, 402);
    assert_eq!(*h.host.property_reads.borrow(), ["xds.route_name"]);
    // A request no path matches reaches the route-name route: it is read, and unpriced.
    assert_eq!(h.request(4, "GET", "/free/x", None), Action::Continue);
    assert_eq!(h.host.property_reads.borrow().len(), 2);
}

/// The settlement idempotency key (Envoy's request id and random bytes) is made only
/// for a request that carries a proof: a 402 does without those host calls.
#[test]
fn the_settlement_key_is_made_only_for_a_request_with_a_proof() {
    let mut h = Harness::new(false);
    let drawn = h.host.random_counter;
    h.request(2, "GET", "/paid/quote", None);
    assert_eq!(h.reply_to(2).map(|r| r.0), Some(402));
    assert_eq!(h.host.random_counter, drawn, "a 402 drew random bytes");

    h.request(
        3,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 3))),
    );
    let (_, _, _, body) = h.last_grpc();
    let item = &AuthorizeRequest::decode(body.as_slice()).unwrap().items[0];
    assert!(item.request_id.starts_with("req-3."), "{}", item.request_id);
    assert_ne!(h.host.random_counter, drawn);
}

#[test]
fn a_malformed_header_is_a_400() {
    let mut h = Harness::new(false);
    assert_eq!(
        h.request(2, "GET", "/paid/quote", Some("%%%".into())),
        Action::Pause
    );
    let (status, _, body) = h.reply_to(2).unwrap();
    assert_eq!(status, 400);
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(body.error, "malformed_payment");
    assert!(!body.message.is_empty());
    assert!(h.host.grpc_calls().is_empty());
}

#[test]
fn stateless_checks_answer_402_without_a_callout() {
    type Mutation = fn(&mut PaymentPayload);
    let cases: Vec<(&str, Mutation)> = vec![
        ("wrong_scheme", |p| p.accepted.scheme = "upto".into()),
        ("wrong_network", |p| p.accepted.network = "mainnet".into()),
        ("wrong_asset", |p| p.accepted.asset = "EUR".into()),
        ("wrong_pay_to", |p| {
            p.accepted.pay_to = "someone-else".into()
        }),
        ("amount_below_price", |p| p.accepted.amount = "9999".into()),
        ("wrong_resource", |p| {
            p.payload.resource = resource_string("GET", AUTHORITY, "/paid/other")
        }),
        ("expired", |p| p.payload.valid_before = NOW.to_string()),
        ("validity_too_long", |p| {
            p.payload.valid_before = (NOW + 60 + 30 + 1).to_string()
        }),
    ];
    for (i, (code, mutate)) in cases.into_iter().enumerate() {
        let mut h = Harness::new(false);
        let mut p = payload("GET", "/paid/quote", 1);
        mutate(&mut p);
        sign(&mut p);
        let ctx = 10 + u32::try_from(i).unwrap();
        assert_eq!(
            h.request(ctx, "GET", "/paid/quote", Some(header(&p))),
            Action::Pause,
            "{code}"
        );
        assert_eq!(h.challenge_error(ctx), code);
        assert!(h.host.grpc_calls().is_empty(), "{code}");
        assert_eq!(h.host.counter("x402_requests_rejected"), 1);
    }
    // The edges of the validity window are accepted.
    for valid_before in [NOW + 1, NOW + 90] {
        let mut h = Harness::new(false);
        let mut p = payload("GET", "/paid/quote", 1);
        p.payload.valid_before = valid_before.to_string();
        sign(&mut p);
        h.request(2, "GET", "/paid/quote", Some(header(&p)));
        assert_eq!(h.host.grpc_calls().len(), 1, "validBefore {valid_before}");
    }
}

#[test]
fn signatures_are_checked_in_the_filter_only_when_configured() {
    let mut p = payload("GET", "/paid/quote", 1);
    p.payload.signature = "00".repeat(64);
    let mut h = Harness::new(true);
    h.request(2, "GET", "/paid/quote", Some(header(&p)));
    assert_eq!(h.challenge_error(2), "invalid_signature");
    assert!(h.host.grpc_calls().is_empty());
    let mut h = Harness::new(false);
    h.request(2, "GET", "/paid/quote", Some(header(&p)));
    assert_eq!(h.host.grpc_calls().len(), 1);
    let mut h = Harness::new(true);
    h.request(
        2,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 1))),
    );
    assert_eq!(h.host.grpc_calls().len(), 1);
}

#[test]
fn a_paid_request_is_authorized_resumed_receipted_and_captured() {
    let mut h = Harness::new(false);
    let p = payload("GET", "/paid/quote?sym=ABC", 1);
    assert_eq!(
        h.request(2, "GET", "/paid/quote?sym=ABC", Some(header(&p))),
        Action::Pause
    );
    let (token, on_context, method, body) = h.last_grpc();
    assert_eq!(on_context, ROOT, "callouts belong to the root context");
    assert_eq!(method, "Authorize");
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert_eq!(request.items.len(), 1);
    let item = &request.items[0];
    assert!(item.request_id.starts_with("req-2."), "{}", item.request_id);
    assert_eq!(item.hold_amount, 10_000);
    assert_eq!(item.route, "quote");
    assert_eq!(item.hold_ttl_seconds, 300);
    let proof = item.proof.as_ref().unwrap();
    assert_eq!(proof.signature, p.payload.signature);
    assert_eq!(proof.resource, "GET 127.0.0.1:10000/paid/quote?sym=ABC");
    assert_eq!(proof.payer, p.payload.payer);

    h.grpc_ok(token, authorized(&request, "tx-"));
    assert!(h.host.calls.contains(&Call::Resume { context: 2 }));
    assert!(h.host.calls.contains(&Call::RemoveRequestHeader {
        context: 2,
        name: "payment-signature".into()
    }));
    assert!(h.host.calls.contains(&Call::RemoveRequestHeader {
        context: 2,
        name: "x-402-payment".into()
    }));
    assert_eq!(h.host.request_header("payment-signature"), None);

    h.respond(2, 200, false);
    let receipt = h
        .host
        .calls
        .iter()
        .find_map(|c| match c {
            Call::SetResponseHeader {
                context: 2,
                name,
                value,
            } if name == "payment-response" => Some(value.clone()),
            _ => None,
        })
        .unwrap();
    let receipt: SettleResponse = wire::decode_header(&receipt).unwrap();
    assert!(receipt.success);
    assert_eq!(
        (
            receipt.transaction.as_str(),
            receipt.network.as_str(),
            receipt.amount.as_str()
        ),
        ("tx-0", "402x:local", "10000")
    );
    assert_eq!(receipt.payer, p.payload.payer);

    h.vm.on_response_data(&mut h.host, 2, true);
    h.end(2);
    let (_, on_context, method, body) = h.last_grpc();
    assert_eq!((on_context, method.as_str()), (ROOT, "Capture"));
    let capture = CaptureRequest::decode(body.as_slice()).unwrap();
    assert_eq!(capture.items.len(), 1);
    assert_eq!(
        (
            capture.items[0].transaction_id.as_str(),
            capture.items[0].amount,
            capture.items[0].http_status
        ),
        ("tx-0", 10_000, 200)
    );
    assert_eq!(h.host.counter("x402_requests_paid"), 1);
}

#[test]
fn an_exact_price_captured_at_authorize_is_never_captured_again() {
    let mut h = Harness::new(false);
    let p = payload("GET", "/paid/quote", 1);
    h.request(2, "GET", "/paid/quote", Some(header(&p)));
    let (token, _, _, body) = h.last_grpc();
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert!(
        request.items[0].capture,
        "exact prices ask for it by default"
    );
    h.grpc_ok(token, answer_all(&request, "tx-", true));
    assert!(h.host.calls.contains(&Call::Resume { context: 2 }));
    // Counted as captured when settlement says so.
    assert_eq!(h.host.counter("x402_captures"), 1);
    assert_eq!(h.host.counter("x402_revenue_atomic"), 10_000);
    let calls = h.host.grpc_calls().len();
    finish(&mut h, 2);
    h.host.now_nanos += 1_000_000_000;
    h.vm.on_tick(&mut h.host, ROOT);
    assert_eq!(h.host.grpc_calls().len(), calls, "no Capture follows");
    assert!(capture_calls(&h).is_empty());

    // A failed upstream voids it (settlement refunds it).
    let p = payload("GET", "/paid/quote", 3);
    h.request(3, "GET", "/paid/quote", Some(header(&p)));
    let (token, _, _, body) = h.last_grpc();
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    h.grpc_ok(token, answer_all(&request, "tx-3-", true));
    h.respond(3, 503, true);
    h.end(3);
    assert_eq!(last_void(&h), ("tx-3-0".into(), "upstream_5xx".into()));

    // Turned off, exact prices are held and captured like any other.
    let mut h = Harness::two_phase();
    let p = payload("GET", "/paid/quote", 4);
    h.request(4, "GET", "/paid/quote", Some(header(&p)));
    let (_, _, _, body) = h.last_grpc();
    assert!(!AuthorizeRequest::decode(body.as_slice()).unwrap().items[0].capture);
}

#[test]
fn a_payment_whose_authorize_answer_was_lost_is_found_and_refunded() {
    // The Authorize call fails (a timeout, a reset) after settlement may have placed
    // the payment: the request is answered 503, so a payment captured as it was placed
    // must not stay charged.
    let mut h = Harness::new(false);
    let p = payload("GET", "/paid/quote", 2);
    h.request(2, "GET", "/paid/quote", Some(header(&p)));
    let (token, _, _, body) = h.last_grpc();
    let first = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert!(first.items[0].capture);
    h.grpc_fail(token, 14);
    assert_eq!(h.reply_to(2).unwrap().0, 503);
    let calls = h.host.grpc_calls().len();
    h.vm.on_tick(&mut h.host, ROOT);
    assert_eq!(h.host.grpc_calls().len(), calls, "not sent again at once");
    h.host.now_nanos += RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    let (token, _, method, body) = h.last_grpc();
    assert_eq!(method, "Authorize");
    assert_eq!(
        AuthorizeRequest::decode(body.as_slice()).unwrap(),
        first,
        "the same item: settlement answers with the payment its request id placed"
    );
    // A resend that fails is sent again after its backoff.
    h.grpc_fail(token, 14);
    h.host.now_nanos += x402_filter::dispatcher::MAX_RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    let (token, _, method, _) = h.last_grpc();
    assert_eq!(method, "Authorize");
    h.grpc_ok(token, answer_all(&first, "tx-", true));
    assert_eq!(
        last_void(&h),
        (
            "tx-0".into(),
            x402_filter::dispatcher::VOID_UNANSWERED.into()
        )
    );
    let calls = h.host.grpc_calls().len();
    h.host.now_nanos += x402_filter::dispatcher::MAX_RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    assert!(
        h.host.grpc_calls()[calls..]
            .iter()
            .all(|c| !matches!(c, Call::Grpc { method, .. } if method == "Authorize")),
        "found: not sent again"
    );

    // Sent again and refused (nothing was placed under its request id): nothing to undo.
    let p = payload("GET", "/paid/quote", 3);
    h.request(3, "GET", "/paid/quote", Some(header(&p)));
    let (token, _, _, body) = h.last_grpc();
    let lost = AuthorizeRequest::decode(body.as_slice()).unwrap();
    h.grpc_fail(token, 14);
    h.host.now_nanos += RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    let (token, _, method, _) = h.last_grpc();
    assert_eq!(method, "Authorize");
    let expired = AuthorizeResponse {
        results: vec![AuthorizeResult {
            request_id: lost.items[0].request_id.clone(),
            outcome: AuthorizeOutcome::Expired as i32,
            ..Default::default()
        }],
    };
    h.grpc_ok(token, expired.encode_to_vec());
    let calls = h.host.grpc_calls().len();
    h.host.now_nanos += x402_filter::dispatcher::MAX_RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    assert_eq!(h.host.grpc_calls().len(), calls, "no void, no resend");

    // A hold (not captured at once) whose answer is lost expires on its own.
    let mut h = Harness::two_phase();
    let p = payload("GET", "/paid/quote", 4);
    h.request(4, "GET", "/paid/quote", Some(header(&p)));
    let (token, ..) = h.last_grpc();
    h.grpc_fail(token, 14);
    let calls = h.host.grpc_calls().len();
    h.host.now_nanos += x402_filter::dispatcher::MAX_RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    assert_eq!(h.host.grpc_calls().len(), calls);
}

/// A paid request on an exact price, captured at authorize (`tx-0`), whose upstream
/// answers 503: the filter voids it, which refunds it.
fn refused_upstream_after_capture(h: &mut Harness, ctx: u32) {
    paid_at_authorize(h, ctx);
    h.respond(ctx, 503, true);
    h.end(ctx);
}

/// A paid request on an exact price, captured at authorize (`tx-0`) and let through.
fn paid_at_authorize(h: &mut Harness, ctx: u32) {
    let p = payload("GET", "/paid/quote", u8::try_from(ctx).unwrap());
    h.request(ctx, "GET", "/paid/quote", Some(header(&p)));
    let (token, _, _, body) = h.last_grpc();
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    h.grpc_ok(token, answer_all(&request, "tx-", true));
}

fn paid_request(h: &mut Harness, ctx: u32) {
    h.request(
        ctx,
        "GET",
        "/paid/quote",
        Some(header(&payload(
            "GET",
            "/paid/quote",
            u8::try_from(ctx).unwrap(),
        ))),
    );
    let (token, _, _, body) = h.last_grpc();
    h.grpc_ok(
        token,
        authorized(&AuthorizeRequest::decode(body.as_slice()).unwrap(), "tx-"),
    );
}

fn last_void(h: &Harness) -> (String, String) {
    let (_, _, method, body) = h.last_grpc();
    assert_eq!(method, "Void");
    let v = VoidRequest::decode(body.as_slice()).unwrap();
    assert_eq!(v.items.len(), 1);
    (v.items[0].transaction_id.clone(), v.items[0].reason.clone())
}

#[test]
fn upstream_failures_void_the_hold() {
    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    h.respond(2, 503, true);
    h.end(2);
    assert_eq!(last_void(&h), ("tx-0".into(), "upstream_5xx".into()));

    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    h.end(2); // no response at all: reset
    assert_eq!(last_void(&h), ("tx-0".into(), "upstream_reset".into()));

    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    h.respond(2, 200, false);
    h.end(2); // the body never finished
    assert_eq!(last_void(&h), ("tx-0".into(), "incomplete_response".into()));
}

#[test]
fn refusals_are_402_with_the_settlement_reason() {
    for (outcome, code) in [
        (AuthorizeOutcome::InsufficientFunds, "insufficient_funds"),
        (AuthorizeOutcome::UnknownKey, "unknown_key"),
        (AuthorizeOutcome::KeyRevoked, "key_revoked"),
        (AuthorizeOutcome::NonceReused, "nonce_reused"),
        (AuthorizeOutcome::InvalidSignature, "invalid_signature"),
        (AuthorizeOutcome::Expired, "expired"),
    ] {
        let mut h = Harness::new(false);
        h.request(
            2,
            "GET",
            "/paid/quote",
            Some(header(&payload("GET", "/paid/quote", 1))),
        );
        let (token, _, _, body) = h.last_grpc();
        let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
        let response = AuthorizeResponse {
            results: vec![AuthorizeResult {
                request_id: request.items[0].request_id.clone(),
                outcome: outcome as i32,
                ..Default::default()
            }],
        };
        h.grpc_ok(token, response.encode_to_vec());
        assert_eq!(h.challenge_error(2), code);
        assert!(!h.host.calls.contains(&Call::Resume { context: 2 }));
    }
}

#[test]
fn a_closed_merchant_is_a_503_with_its_reason_and_nothing_resumes() {
    let mut h = Harness::new(false);
    h.request(
        2,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 1))),
    );
    let (token, _, _, body) = h.last_grpc();
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    let response = AuthorizeResponse {
        results: vec![AuthorizeResult {
            request_id: request.items[0].request_id.clone(),
            outcome: AuthorizeOutcome::MerchantClosed as i32,
            ..Default::default()
        }],
    };
    h.grpc_ok(token, response.encode_to_vec());
    let (status, _, body) = h.reply_to(2).unwrap();
    assert_eq!(status, 503);
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(body.error, "merchant_closed");
    assert!(body.message.contains("closed"), "{}", body.message);
    assert!(!h.host.calls.contains(&Call::Resume { context: 2 }));
}

#[test]
fn settlement_trouble_is_a_503() {
    let check_503 = |h: &Harness| {
        let (status, _, body) = h.reply_to(2).unwrap();
        assert_eq!(status, 503);
        assert_eq!(
            serde_json::from_slice::<ErrorBody>(&body).unwrap().error,
            "settlement_unavailable"
        );
    };
    // Timeout or unreachable: a non-OK gRPC status.
    let mut h = Harness::new(false);
    h.request(
        2,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 1))),
    );
    let (token, ..) = h.last_grpc();
    h.grpc_fail(token, 14);
    check_503(&h);
    assert_eq!(h.host.counter("x402_requests_unavailable"), 1);
    assert_eq!(h.host.counter("x402_callout_failures"), 1);
    // The call cannot even start.
    let mut h = Harness::new(false);
    h.host.fail_grpc = true;
    assert_eq!(
        h.request(
            2,
            "GET",
            "/paid/quote",
            Some(header(&payload("GET", "/paid/quote", 1)))
        ),
        Action::Pause
    );
    check_503(&h);
    // An answer that does not fit the request.
    let mut h = Harness::new(false);
    h.request(
        2,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 1))),
    );
    let (token, ..) = h.last_grpc();
    h.grpc_ok(token, b"\xff\xff".to_vec());
    check_503(&h);
    let mut h = Harness::new(false);
    h.request(
        2,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 1))),
    );
    let (token, ..) = h.last_grpc();
    let response = AuthorizeResponse {
        results: vec![AuthorizeResult {
            request_id: "someone-else".into(),
            outcome: AuthorizeOutcome::Authorized as i32,
            transaction_id: "tx".into(),
            ..Default::default()
        }],
    };
    h.grpc_ok(token, response.encode_to_vec());
    check_503(&h);
}

#[test]
fn authorizations_arriving_during_a_call_share_the_next_one() {
    let mut h = Harness::new(false);
    // Up to MAX_AUTHORIZE_IN_FLIGHT authorizations go out at once, each in its own call.
    let n = u32::try_from(MAX_AUTHORIZE_IN_FLIGHT).unwrap();
    let mut first = Vec::new();
    for ctx in 2..2 + n {
        h.request(
            ctx,
            "GET",
            "/paid/quote",
            Some(header(&payload(
                "GET",
                "/paid/quote",
                u8::try_from(ctx).unwrap(),
            ))),
        );
        let (token, _, _, body) = h.last_grpc();
        first.push((token, body));
    }
    assert_eq!(h.host.grpc_calls().len(), MAX_AUTHORIZE_IN_FLIGHT);
    // The next ones gather while those are in flight.
    let gathered: Vec<u32> = (2 + n..5 + n).collect();
    for &ctx in &gathered {
        h.request(
            ctx,
            "GET",
            "/paid/quote",
            Some(header(&payload(
                "GET",
                "/paid/quote",
                u8::try_from(ctx).unwrap(),
            ))),
        );
    }
    assert_eq!(
        h.host.grpc_calls().len(),
        MAX_AUTHORIZE_IN_FLIGHT,
        "at most MAX_AUTHORIZE_IN_FLIGHT Authorize calls in flight"
    );
    let (token, body) = first.remove(0);
    h.grpc_ok(
        token,
        authorized(&AuthorizeRequest::decode(body.as_slice()).unwrap(), "a"),
    );
    assert!(h.host.calls.contains(&Call::Resume { context: 2 }));
    assert_eq!(h.host.grpc_calls().len(), MAX_AUTHORIZE_IN_FLIGHT + 1);
    let (second, _, method, body) = h.last_grpc();
    assert_eq!(method, "Authorize");
    let batch = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert_eq!(batch.items.len(), 3);
    let ids: Vec<_> = batch
        .items
        .iter()
        .map(|i| i.request_id.split('.').next().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = gathered.iter().map(|c| format!("req-{c}")).collect();
    assert_eq!(ids, expected);
    // Answers reach their own contexts: the first and last pay, the middle one is short
    // of funds.
    let [pays, short, pays_too] = [gathered[0], gathered[1], gathered[2]];
    let mut response = AuthorizeResponse::decode(authorized(&batch, "b").as_slice()).unwrap();
    response.results[1].outcome = AuthorizeOutcome::InsufficientFunds as i32;
    response.results[1].transaction_id.clear();
    h.grpc_ok(second, response.encode_to_vec());
    assert!(h.host.calls.contains(&Call::Resume { context: pays }));
    assert!(h.host.calls.contains(&Call::Resume { context: pays_too }));
    assert!(!h.host.calls.contains(&Call::Resume { context: short }));
    assert_eq!(h.challenge_error(short), "insufficient_funds");
    assert!(matches!(h.vm.state(pays_too), Some(State::Paid(p)) if p.transaction == "b2"));
    // The calls still in flight answer their own requests.
    for (i, (token, body)) in first.into_iter().enumerate() {
        h.grpc_ok(
            token,
            authorized(&AuthorizeRequest::decode(body.as_slice()).unwrap(), "c"),
        );
        let ctx = 3 + u32::try_from(i).unwrap();
        assert!(h.host.calls.contains(&Call::Resume { context: ctx }));
    }
}

#[test]
fn a_hold_for_a_request_that_went_away_is_voided() {
    let mut h = Harness::new(false);
    h.request(
        2,
        "GET",
        "/paid/quote",
        Some(header(&payload("GET", "/paid/quote", 1))),
    );
    let (token, _, _, body) = h.last_grpc();
    h.end(2); // client disconnected while paused
    h.grpc_ok(
        token,
        authorized(&AuthorizeRequest::decode(body.as_slice()).unwrap(), "tx-"),
    );
    assert!(!h
        .host
        .calls
        .iter()
        .any(|c| matches!(c, Call::Resume { .. } | Call::LocalReply { .. })));
    assert_eq!(last_void(&h), ("tx-0".into(), "abandoned".into()));
}

#[test]
fn failed_captures_are_retried_then_left_to_expire() {
    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    h.respond(2, 200, true);
    h.end(2);
    let mut sends = 0;
    loop {
        let (token, _, method, body) = h.last_grpc();
        assert_eq!(method, "Capture");
        assert_eq!(
            CaptureRequest::decode(body.as_slice()).unwrap().items[0].transaction_id,
            "tx-0"
        );
        sends += 1;
        h.grpc_fail(token, 14);
        // Not resent before its backoff.
        let calls = h.host.grpc_calls().len();
        h.vm.on_tick(&mut h.host, ROOT);
        assert_eq!(h.host.grpc_calls().len(), calls);
        h.host.now_nanos += RETRY_BACKOFF_NANOS * u64::from(MAX_RESOLVE_ATTEMPTS);
        h.vm.on_tick(&mut h.host, ROOT);
        if h.host.grpc_calls().len() == calls {
            break;
        }
    }
    assert_eq!(sends, MAX_RESOLVE_ATTEMPTS);
    assert_eq!(h.host.counter("x402_resolutions_dropped"), 1);
}

/// A void of a payment captured at authorize is the payer's refund, with no expiry to
/// fall back on: it is resent (with the same backoff) until settlement answers.
#[test]
fn failed_voids_are_resent_until_settlement_answers() {
    let mut h = Harness::new(false);
    refused_upstream_after_capture(&mut h, 2);
    for _ in 0..MAX_RESOLVE_ATTEMPTS + 3 {
        let (token, _, method, _) = h.last_grpc();
        assert_eq!(method, "Void");
        assert_eq!(last_void(&h), ("tx-0".into(), "upstream_5xx".into()));
        h.grpc_fail(token, 14);
        let calls = h.host.grpc_calls().len();
        h.host.now_nanos += x402_filter::dispatcher::MAX_RETRY_BACKOFF_NANOS;
        h.vm.on_tick(&mut h.host, ROOT);
        assert_eq!(
            h.host.grpc_calls().len(),
            calls + 1,
            "resent after its backoff"
        );
    }
    assert_eq!(h.host.counter("x402_resolutions_dropped"), 0);
    let (token, ..) = h.last_grpc();
    let answer = VoidResponse {
        results: vec![ResolveResult {
            transaction_id: "tx-0".into(),
            outcome: ResolveOutcome::Voided as i32,
            amount: 10_000,
            message: "refunded".into(),
        }],
    };
    h.grpc_ok(token, answer.encode_to_vec());
    let calls = h.host.grpc_calls().len();
    h.host.now_nanos += x402_filter::dispatcher::MAX_RETRY_BACKOFF_NANOS;
    h.vm.on_tick(&mut h.host, ROOT);
    assert_eq!(h.host.grpc_calls().len(), calls, "answered: not sent again");
}

#[test]
fn captures_of_a_crashed_vm_are_sent_by_the_vm_that_replaces_it() {
    let mut h = Harness::new(false);
    // One capture in flight, one queued behind it: both only in the VM's memory.
    for ctx in [2, 3] {
        h.request(
            ctx,
            "GET",
            "/paid/quote",
            Some(header(&payload("GET", "/paid/quote", ctx as u8))),
        );
        let (token, _, _, body) = h.last_grpc();
        let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
        h.grpc_ok(token, authorized(&request, &format!("tx-{ctx}-")));
        h.respond(ctx, 200, true);
        h.end(ctx);
    }
    let captures = |h: &Harness| {
        h.host
            .grpc_calls()
            .iter()
            .filter(|c| matches!(c, Call::Grpc { method, .. } if method == "Capture"))
            .count()
    };
    assert_eq!(captures(&h), 1);

    // The VM traps; Envoy starts a new one, with empty memory, for the same plugin.
    // The old VM may only be slow: nothing is taken over while it might still tick.
    let mut h = h.taken_over();
    let (token, context, method, body) = h.last_grpc();
    assert_eq!((context, method.as_str()), (ROOT, "Capture"));
    let items = CaptureRequest::decode(body.as_slice()).unwrap().items;
    let ids: Vec<&str> = items.iter().map(|i| i.transaction_id.as_str()).collect();
    assert_eq!(ids, ["tx-2-0", "tx-3-0"]);
    assert!(items
        .iter()
        .all(|i| i.amount == 10_000 && i.http_status == 200));
    assert_eq!(h.host.counter("x402_captures_recovered"), 2);

    // Answered: nothing is owed any more, by this VM or any other.
    let answer = CaptureResponse {
        results: items
            .iter()
            .map(|i| ResolveResult {
                transaction_id: i.transaction_id.clone(),
                outcome: ResolveOutcome::Captured as i32,
                amount: i.amount,
                ..Default::default()
            })
            .collect(),
    };
    h.grpc_ok(token, answer.encode_to_vec());
    let sent = h.host.grpc_calls().len();
    let other = h.taken_over();
    assert_eq!(other.host.grpc_calls().len(), sent);
    assert_eq!(other.host.counter("x402_captures_recovered"), 2);
}

/// A payment captured at authorize whose upstream failed is refunded by a Void; one the
/// VM could not send (settlement unreachable) when it crashed is sent by the next VM,
/// from the journal, so the payer is not charged for the failed response.
#[test]
fn a_refund_the_crashed_vm_still_owed_is_sent_by_the_next_one() {
    let mut h = Harness::new(false);
    refused_upstream_after_capture(&mut h, 2);
    assert_eq!(last_void(&h), ("tx-0".into(), "upstream_5xx".into()));
    let (token, ..) = h.last_grpc();
    h.vm.on_grpc_result(&mut h.host, token, Err(14));
    let sent = h.host.grpc_calls().len();

    // The VM traps; Envoy starts a new one, with empty memory, for the same plugin.
    let h = h.taken_over();
    assert!(h.host.grpc_calls().len() > sent);
    let (_, context, method, _) = h.last_grpc();
    assert_eq!((context, method.as_str()), (ROOT, "Void"));
    assert_eq!(last_void(&h), ("tx-0".into(), "upstream_5xx".into()));
}

/// A payment captured as it was placed whose Authorize answer the VM never had (it
/// trapped with the call in flight, and Envoy never lets the request through) is found
/// by the next VM, from the journal, and refunded: it sends the item again under its
/// request id and voids the payment settlement answers with.
#[test]
fn a_payment_the_crashed_vm_never_had_answered_is_refunded_by_the_next_one() {
    let mut h = Harness::new(false);
    let p = payload("GET", "/paid/quote", 3);
    h.request(3, "GET", "/paid/quote", Some(header(&p)));
    let (_, _, method, body) = h.last_grpc();
    assert_eq!(method, "Authorize");
    let unanswered = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert!(unanswered.items[0].capture);

    // The VM traps; the new one waits until the old one cannot be only slow.
    let mut h = h.taken_over();
    let (token, context, method, body) = h.last_grpc();
    assert_eq!((context, method.as_str()), (ROOT, "Authorize"));
    let resent = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert_eq!(resent.items, unanswered.items);
    assert_eq!(h.host.counter("x402_captures_recovered"), 1);

    // Settlement had placed it: refunded.
    h.grpc_ok(token, answer_all(&resent, "tx-", true));
    assert_eq!(
        last_void(&h),
        ("tx-0".into(), "authorize_unanswered".into())
    );
    // Checked once: the void is what is owed now.
    let other = h.taken_over();
    let (_, _, method, _) = other.last_grpc();
    assert_eq!(method, "Void");
}

/// A payment captured at authorize is in the journal until its request ends: as the
/// item to check again while its answer is awaited, then as the refund owed if the VM
/// stops (Envoy ends the request with an error), written before the request is let
/// through. A VM that stops after the request ended leaves nothing to refund.
#[test]
fn a_payment_is_refunded_if_its_vm_stops_before_its_request_ends() {
    let mut h = Harness::new(false);
    paid_at_authorize(&mut h, 2);
    assert!(h.host.calls.contains(&Call::Resume { context: 2 }));
    let at_resume = h.host.shared_data_at_resume.pop().unwrap();
    h.respond(2, 200, true);
    h.end(2);
    let after_end = h.host.shared_data.clone();
    let sent = h.host.grpc_calls().len();

    // The VM traps as it lets the request through: the next one refunds the payment.
    h.host.shared_data = at_resume;
    let mut next = h.taken_over();
    assert_eq!(next.host.grpc_calls().len(), sent + 1);
    assert_eq!(
        last_void(&next),
        ("tx-0".into(), "filter_vm_stopped".into())
    );

    // The VM traps once the request has ended: nothing is refunded.
    next.host.shared_data = after_end;
    let sent = next.host.grpc_calls().len();
    let later = next.taken_over();
    assert_eq!(
        later.host.grpc_calls().len(),
        sent,
        "{:?}",
        later.host.grpc_calls()
    );
}

/// New prices reach Envoy as a new plugin configuration (LDS or ECDS): a second root
/// context in the same VM. The old one is deleted once its last request is gone, with
/// Envoy cancelling its calls; the captures it still owed are sent by the new one.
#[test]
fn captures_owed_by_a_replaced_configuration_are_sent_by_the_new_one() {
    const NEW_ROOT: u32 = ROOT + 100;
    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    h.respond(2, 200, true);
    h.end(2);
    // The capture's call fails (settlement unreachable): it is owed, waiting for a resend.
    let (token, context, method, _) = h.last_grpc();
    assert_eq!((context, method.as_str()), (ROOT, "Capture"));
    h.vm.on_grpc_result(&mut h.host, token, Err(14));

    // The new configuration doubles the quote's price.
    let repriced = config(false).replace("\"0.01\"", "\"0.02\"");
    h.vm.on_context_create(NEW_ROOT, 0);
    assert!(h
        .vm
        .on_configure(&mut h.host, NEW_ROOT, repriced.as_bytes()));
    h.vm.on_delete(&mut h.host, ROOT);
    assert!(
        h.host
            .logs
            .borrow()
            .iter()
            .any(|l| l.contains("a replaced configuration left captures or voids to its journal")),
        "{:?}",
        h.host.logs.borrow()
    );
    let sent = h.host.grpc_calls().len();
    h.host.now_nanos += x402_filter::journal::ORPHAN_AFTER_NANOS / 2;
    h.vm.on_tick(&mut h.host, NEW_ROOT);
    assert_eq!(h.host.grpc_calls().len(), sent, "taken over too early");

    h.host.now_nanos += x402_filter::journal::ORPHAN_AFTER_NANOS;
    h.vm.on_tick(&mut h.host, NEW_ROOT);
    let (_, context, method, body) = h.last_grpc();
    assert_eq!((context, method.as_str()), (NEW_ROOT, "Capture"));
    let items = CaptureRequest::decode(body.as_slice()).unwrap().items;
    let captured: Vec<(&str, u64)> = items
        .iter()
        .map(|i| (i.transaction_id.as_str(), i.amount))
        .collect();
    // At the price the client was charged under, not the new one.
    assert_eq!(captured, [("tx-0", 10_000)]);
    assert_eq!(h.host.counter("x402_captures_recovered"), 1);
}

#[test]
fn captured_revenue_is_counted() {
    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    h.respond(2, 200, true);
    h.end(2);
    let (token, ..) = h.last_grpc();
    let response = CaptureResponse {
        results: vec![ResolveResult {
            transaction_id: "tx-0".into(),
            outcome: ResolveOutcome::Captured as i32,
            amount: 10_000,
            message: String::new(),
        }],
    };
    h.grpc_ok(token, response.encode_to_vec());
    assert_eq!(h.host.counter("x402_captures"), 1);
    assert_eq!(h.host.counter("x402_revenue_atomic"), 10_000);
}

#[test]
fn the_alias_header_is_accepted() {
    let mut h = Harness::new(false);
    h.vm.on_context_create(2, ROOT);
    h.host.headers.insert(
        2,
        vec![
            (":method".into(), "GET".into()),
            (":path".into(), "/paid/quote".into()),
            (":authority".into(), AUTHORITY.into()),
            (
                "x-402-payment".into(),
                header(&payload("GET", "/paid/quote", 1)),
            ),
        ],
    );
    h.host.effective = 2;
    assert_eq!(h.vm.on_request_headers(&mut h.host, 2), Action::Pause);
    assert_eq!(h.last_grpc().2, "Authorize");
    // Without x-request-id the key is still unique per request.
    let item = AuthorizeRequest::decode(h.last_grpc().3.as_slice())
        .unwrap()
        .items
        .remove(0);
    assert_eq!(item.request_id.len(), 24);
}

#[test]
fn a_bad_configuration_is_refused_and_logged() {
    let mut vm = Vm::default();
    let mut host = FakeHost::default();
    vm.on_context_create(ROOT, 0);
    assert!(!vm.on_configure(&mut host, ROOT, br#"{"pay_to":"m","routes":[]}"#));
    assert!(host
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("settlement_cluster")));
    assert!(vm.plugin(ROOT).is_none());
}

#[test]
fn a_call_the_host_never_finishes_is_given_up_and_the_queue_moves_on() {
    let mut h = Harness::new(false);
    // Calls the host never finishes fill the in-flight limit; one more waits.
    let n = u32::try_from(MAX_AUTHORIZE_IN_FLIGHT).unwrap();
    let waiting = 2 + n;
    for ctx in 2..=waiting {
        h.request(
            ctx,
            "GET",
            "/paid/quote",
            Some(header(&payload(
                "GET",
                "/paid/quote",
                u8::try_from(ctx).unwrap(),
            ))),
        );
    }
    assert_eq!(h.host.grpc_calls().len(), MAX_AUTHORIZE_IN_FLIGHT);
    h.vm.on_tick(&mut h.host, ROOT);
    assert!(h.reply_to(2).is_none(), "not before the timeout and grace");
    h.host.now_nanos += 2_000_000_000 + x402_filter::dispatcher::STALE_GRACE_NANOS + 1;
    h.vm.on_tick(&mut h.host, ROOT);
    for ctx in 2..waiting {
        assert_eq!(h.reply_to(ctx).unwrap().0, 503);
    }
    assert_eq!(
        h.host.grpc_calls().len(),
        MAX_AUTHORIZE_IN_FLIGHT + 1,
        "the waiting authorization is sent"
    );
    let (token, _, _, body) = h.last_grpc();
    h.grpc_ok(
        token,
        authorized(&AuthorizeRequest::decode(body.as_slice()).unwrap(), "tx-"),
    );
    assert!(h.host.calls.contains(&Call::Resume { context: waiting }));
}

/// The Capture calls made so far, decoded.
fn capture_calls(h: &Harness) -> Vec<CaptureRequest> {
    h.host
        .grpc_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Grpc {
                method, message, ..
            } if method == "Capture" => Some(CaptureRequest::decode(message.as_slice()).unwrap()),
            _ => None,
        })
        .collect()
}

fn finish(h: &mut Harness, ctx: u32) {
    h.respond(ctx, 200, false);
    h.vm.on_response_data(&mut h.host, ctx, true);
    h.end(ctx);
}

/// Paid requests 2 and 3; 2 finishes while 3 is in progress, so its capture waits for
/// company (the default 10 ms window).
fn first_of_two_finished() -> Harness {
    let mut h = Harness::new(false);
    paid_request(&mut h, 2);
    paid_request(&mut h, 3);
    finish(&mut h, 2);
    assert!(capture_calls(&h).is_empty());
    h
}

#[test]
fn captures_of_requests_that_finish_together_share_one_call() {
    let mut h = first_of_two_finished();
    // 3 was the last request that could add one: one call carries both.
    finish(&mut h, 3);
    let calls = capture_calls(&h);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].items.len(), 2);
}

#[test]
fn a_waiting_capture_is_sent_once_its_window_is_over() {
    let mut h = first_of_two_finished();
    h.host.now_nanos += 9_000_000;
    h.respond(3, 200, false);
    assert!(capture_calls(&h).is_empty(), "sent before the 10 ms window");
    h.host.now_nanos += 1_000_000;
    // The next callback (here an unpaid request) sends it, though 3 is in progress.
    h.request(4, "GET", "/paid/quote", None);
    let calls = capture_calls(&h);
    assert_eq!(calls.len(), 1, "2 waited long enough");
    assert_eq!(calls[0].items.len(), 1);
}

#[test]
fn a_zero_capture_window_sends_each_capture_at_once() {
    let config = serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "capture_window_ms": 0,
        "routes": [{"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"}]
    });
    let mut h = Harness::new(false);
    assert!(h
        .vm
        .on_configure(&mut h.host, ROOT, config.to_string().as_bytes()));
    paid_request(&mut h, 2);
    paid_request(&mut h, 3);
    finish(&mut h, 2);
    assert_eq!(capture_calls(&h).len(), 1);
}

/// `config(false)` with `hold_request_headers` and a route priced from the body first.
fn body_priced_config(hold: bool) -> String {
    let mut c: serde_json::Value = serde_json::from_str(&config(false)).unwrap();
    c["hold_request_headers"] = hold.into();
    let route = serde_json::json!({"name": "units", "match": {"method": "POST", "path_exact": "/paid/units"},
        "pricing": {"expression": {"expr": "units * 0.01"}}});
    c["routes"].as_array_mut().unwrap().insert(0, route);
    c.to_string()
}

fn resumed(h: &Harness, ctx: u32) -> bool {
    h.host.calls.contains(&Call::Resume { context: ctx })
}

#[test]
fn held_headers_wait_with_the_body_until_the_request_is_paid() {
    let mut h = Harness::with_config(&body_priced_config(true));
    let p = payload("POST", "/paid/units", 1);
    let proof = Some(header(&p));
    assert_eq!(
        h.request_headers(2, "POST", "/paid/units", proof, true),
        Action::Pause,
        "the headers wait for the body"
    );
    assert_eq!(h.host.request_header("payment-signature"), None);
    assert_eq!(h.request_body(2, br#"{"un"#, false), Action::Pause);
    assert!(
        h.host.grpc_calls().is_empty(),
        "priced only once the body is whole"
    );
    assert_eq!(h.request_body(2, br#"{"units": 1}"#, true), Action::Pause);
    let (token, _, method, body) = h.last_grpc();
    assert_eq!(method, "Authorize");
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert_eq!(request.items[0].hold_amount, 10_000);
    assert!(
        !resumed(&h, 2),
        "nothing goes upstream before settlement answers"
    );
    h.grpc_ok(token, authorized(&request, "tx-"));
    assert!(resumed(&h, 2));

    // Without a proof the whole request is answered 402 and never resumed.
    assert_eq!(
        h.request_headers(3, "POST", "/paid/units", None, true),
        Action::Pause
    );
    assert_eq!(h.request_body(3, br#"{"units": 2}"#, true), Action::Pause);
    assert_eq!(h.challenge_error(3), "payment_required");
    assert!(!resumed(&h, 3));
}

#[test]
fn trailers_end_a_body_priced_request_and_hold_it_like_its_last_chunk() {
    // A body that ends with trailers never comes with end_of_stream. Envoy would let
    // the held headers and body go at trailers the filter does not stop.
    let mut h = Harness::with_config(&body_priced_config(true));
    assert_eq!(
        h.request_headers(2, "POST", "/paid/units", None, true),
        Action::Pause
    );
    assert_eq!(h.request_body(2, br#"{"units": 2}"#, false), Action::Pause);
    h.host.effective = 2;
    assert_eq!(h.vm.on_request_trailers(&mut h.host, 2), Action::Pause);
    assert_eq!(h.challenge_error(2), "payment_required");
    assert!(!resumed(&h, 2));

    // Paid: priced from the whole body at the trailers, held until settlement answers.
    let p = payload("POST", "/paid/units", 1);
    assert_eq!(
        h.request_headers(3, "POST", "/paid/units", Some(header(&p)), true),
        Action::Pause
    );
    assert_eq!(h.request_body(3, br#"{"units": 1}"#, false), Action::Pause);
    assert!(h.host.grpc_calls().is_empty());
    h.host.effective = 3;
    assert_eq!(h.vm.on_request_trailers(&mut h.host, 3), Action::Pause);
    let (token, _, method, body) = h.last_grpc();
    assert_eq!(method, "Authorize");
    let request = AuthorizeRequest::decode(body.as_slice()).unwrap();
    assert_eq!(request.items[0].hold_amount, 10_000);
    assert!(
        !resumed(&h, 3),
        "nothing goes upstream before settlement answers"
    );
    h.grpc_ok(token, authorized(&request, "tx-"));
    assert!(resumed(&h, 3));

    // A flat-priced request's trailers wait for its authorization as its body does.
    let p = payload("POST", "/paid/quote", 1);
    assert_eq!(
        h.request_headers(4, "POST", "/paid/quote", Some(header(&p)), true),
        Action::Pause
    );
    h.host.effective = 4;
    assert_eq!(h.vm.on_request_trailers(&mut h.host, 4), Action::Pause);
}

#[test]
fn without_the_setting_body_priced_headers_go_first() {
    let mut h = Harness::with_config(&body_priced_config(false));
    assert_eq!(
        h.request_headers(2, "POST", "/paid/units", None, true),
        Action::Continue
    );
    assert_eq!(h.request_body(2, br#"{"units": 2}"#, true), Action::Pause);
    assert_eq!(h.challenge_error(2), "payment_required");
}

#[test]
fn a_paid_request_body_waits_for_settlement_under_flow_control() {
    // With held headers Envoy delivers the body of a flat-priced request while its
    // authorization is in flight: it is held without Envoy's buffer limit (no 413).
    let mut h = Harness::with_config(&body_priced_config(true));
    let p = payload("POST", "/paid/quote", 1);
    assert_eq!(
        h.request_headers(2, "POST", "/paid/quote", Some(header(&p)), true),
        Action::Pause
    );
    assert_eq!(h.request_body(2, &[0; 4096], false), Action::PauseWatermark);
}

#[test]
fn held_headers_are_let_go_when_envoy_delivers_no_body() {
    let mut h = Harness::with_config(&body_priced_config(true));
    assert_eq!(
        h.request_headers(2, "POST", "/paid/units", None, true),
        Action::Pause
    );
    h.host.now_nanos += 1_900_000_000;
    h.vm.on_tick(&mut h.host, ROOT);
    assert!(!resumed(&h, 2), "a body may still come");
    h.host.now_nanos += 200_000_000;
    h.vm.on_tick(&mut h.host, ROOT);
    assert!(
        resumed(&h, 2),
        "Envoy holds the body with the headers: let them go"
    );
    assert!(h
        .host
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("allow_on_headers_stop_iteration")));
    // Envoy then delivers the body; the request is priced as without the setting.
    assert_eq!(h.request_body(2, br#"{"units": 2}"#, true), Action::Pause);
    assert_eq!(h.challenge_error(2), "payment_required");
    // Later body-priced requests send their headers first at once.
    assert_eq!(
        h.request_headers(3, "POST", "/paid/units", None, true),
        Action::Continue
    );
}

#[test]
fn once_a_held_request_got_its_body_slow_bodies_are_waited_for() {
    let mut h = Harness::with_config(&body_priced_config(true));
    h.request_headers(2, "POST", "/paid/units", None, true);
    h.request_body(2, br#"{"units": 2}"#, true);
    assert_eq!(
        h.request_headers(3, "POST", "/paid/units", None, true),
        Action::Pause
    );
    h.host.now_nanos += 30_000_000_000;
    h.vm.on_tick(&mut h.host, ROOT);
    assert!(!resumed(&h, 3), "a slow client's headers stay held");
    assert!(!h
        .host
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("allow_on_headers_stop_iteration")));
}
