//! Traffic policy through the whole filter on the native target: two [`Vm`]s (two
//! Envoy workers) share one [`FakeHost`]'s shared data, as they share Envoy's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use x402_filter::dispatcher::MAX_AUTHORIZE_IN_FLIGHT;
use x402_filter::host::{Call, FakeHost};
use x402_filter::plugin::{Action, Vm};
use x402_proto::signing::{public_key_hex, resource_string, sign_hex, SigningKey};
use x402_proto::wire::{
    self, ErrorBody, PaymentAuthorization, PaymentPayload, PaymentRequirements,
};

const ROOT: u32 = 1;
const NOW: u64 = 1_800_000_000;
const AUTHORITY: &str = "127.0.0.1:10000";

/// Status, headers and body of a local reply.
type LocalReply = (u16, Vec<(String, String)>, Vec<u8>);

struct Workers {
    vms: [Vm; 2],
    host: FakeHost,
}

fn config(routes: serde_json::Value) -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "clock_skew_seconds": 10,
        "routes": routes,
    })
    .to_string()
}

impl Workers {
    fn new(routes: serde_json::Value) -> Workers {
        let mut w = Workers {
            vms: [Vm::default(), Vm::default()],
            host: FakeHost {
                now_nanos: NOW * 1_000_000_000,
                ..FakeHost::default()
            },
        };
        let config = config(routes);
        for vm in &mut w.vms {
            vm.on_context_create(ROOT, 0);
            assert!(vm.on_configure(&mut w.host, ROOT, config.as_bytes()));
        }
        w
    }

    /// Request `ctx` on worker `ctx % 2` from `client`, with extra headers.
    fn request(
        &mut self,
        ctx: u32,
        path: &str,
        client: &str,
        payment: Option<String>,
        extra: &[(&str, &str)],
    ) -> Action {
        let vm = &mut self.vms[(ctx % 2) as usize];
        vm.on_context_create(ctx, ROOT);
        let mut headers = vec![
            (":method".to_owned(), "GET".to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), AUTHORITY.to_owned()),
            (":scheme".to_owned(), "http".to_owned()),
        ];
        if let Some(p) = payment {
            headers.push(("payment-signature".to_owned(), p));
        }
        for (k, v) in extra {
            headers.push(((*k).to_owned(), (*v).to_owned()));
        }
        self.host.headers.insert(ctx, headers);
        self.host.properties.insert(
            (ctx, "source.address".to_owned()),
            format!("{client}:{}", 40_000 + ctx).into_bytes(),
        );
        self.host.effective = ctx;
        vm.on_request_headers(&mut self.host, ctx)
    }

    fn respond(&mut self, ctx: u32, status: u16) {
        self.host
            .response_headers
            .insert(ctx, vec![(":status".to_owned(), status.to_string())]);
        self.host.effective = ctx;
        let vm = &mut self.vms[(ctx % 2) as usize];
        vm.on_response_headers(&mut self.host, ctx, true);
        vm.on_delete(&mut self.host, ctx);
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

    fn response_header(&self, ctx: u32, name: &str) -> Option<String> {
        self.host.calls.iter().rev().find_map(|c| match c {
            Call::SetResponseHeader {
                context,
                name: n,
                value,
            } if *context == ctx && n == name => Some(value.clone()),
            _ => None,
        })
    }

    fn grpc_count(&self) -> usize {
        self.host.grpc_calls().len()
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn proof(seed: u8, path: &str, nonce: u8, valid_for: u64) -> String {
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
            payer: public_key_hex(&key(seed)),
            nonce: hex::encode([nonce; 16]),
            valid_before: (NOW + valid_for).to_string(),
            resource: resource_string("GET", AUTHORITY, path),
            signature: String::new(),
        },
    };
    p.payload.signature = sign_hex(&key(seed), &p.signed_fields()).unwrap();
    wire::encode_header(&p)
}

#[test]
fn the_rate_limit_is_shared_by_both_workers_and_answers_429_without_a_callout() {
    let mut w = Workers::new(serde_json::json!([{
        "name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01",
        "rate_limit": {"max_requests": 3, "window_seconds": 60, "message": "slow down"}
    }]));
    // Three unpaid requests from one client, alternating workers: three 402s.
    for ctx in 2..5 {
        assert_eq!(
            w.request(ctx, "/paid", "10.0.0.1", None, &[]),
            Action::Pause
        );
        assert_eq!(w.reply_to(ctx).unwrap().0, 402);
    }
    // The fourth is over the limit on either worker.
    w.request(5, "/paid", "10.0.0.1", None, &[]);
    let (status, headers, body) = w.reply_to(5).unwrap();
    assert_eq!(status, 429);
    assert_eq!(header_of(&headers, "retry-after"), Some("20"));
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (body.error.as_str(), body.message.as_str()),
        ("rate_limited", "slow down")
    );
    // A paid request of a payer has its own bucket; a proof over the limit costs no callout.
    for ctx in 6..9 {
        w.request(
            ctx,
            "/paid",
            "10.0.0.1",
            Some(proof(1, "/paid", ctx as u8, 30)),
            &[],
        );
    }
    // Worker 0 has two of them (its calls go out at once up to the in-flight limit),
    // worker 1 one.
    let calls = 1 + MAX_AUTHORIZE_IN_FLIGHT.min(2);
    assert_eq!(w.grpc_count(), calls, "authorize calls of both workers");
    w.request(9, "/paid", "10.0.0.1", Some(proof(1, "/paid", 9, 30)), &[]);
    assert_eq!(w.reply_to(9).unwrap().0, 429);
    assert_eq!(w.grpc_count(), calls);
    // Another client is not affected; twenty seconds later one token is back.
    w.request(10, "/paid", "10.0.0.2", None, &[]);
    assert_eq!(w.reply_to(10).unwrap().0, 402);
    w.host.now_nanos += 20 * 1_000_000_000;
    w.request(11, "/paid", "10.0.0.1", None, &[]);
    assert_eq!(w.reply_to(11).unwrap().0, 402);
    assert_eq!(w.host.counter("x402_requests_rate_limited"), 2);
}

#[test]
fn a_free_tier_lets_the_first_requests_through_and_says_how_many_are_left() {
    let mut w = Workers::new(serde_json::json!([{
        "name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01",
        "free_tier": {"requests": 2, "window_seconds": 3600}
    }]));
    for (ctx, left) in [(2, "1"), (3, "0")] {
        assert_eq!(
            w.request(ctx, "/paid", "10.0.0.1", None, &[]),
            Action::Continue
        );
        assert!(w.reply_to(ctx).is_none());
        w.respond(ctx, 200);
        assert_eq!(
            w.response_header(ctx, "x-402-free-remaining").as_deref(),
            Some(left)
        );
    }
    w.request(4, "/paid", "10.0.0.1", None, &[]);
    let (status, headers, _) = w.reply_to(4).unwrap();
    assert_eq!(status, 402);
    assert_eq!(header_of(&headers, "x-402-free-remaining"), Some("0"));
    // Then the normal price applies, and nothing free was ever sent to settlement.
    w.request(5, "/paid", "10.0.0.1", Some(proof(1, "/paid", 5, 30)), &[]);
    assert_eq!(w.grpc_count(), 1);
    // Another client has its own free requests; a new window starts afresh.
    assert_eq!(
        w.request(6, "/paid", "10.0.0.2", None, &[]),
        Action::Continue
    );
    w.host.now_nanos += 3600 * 1_000_000_000;
    assert_eq!(
        w.request(7, "/paid", "10.0.0.1", None, &[]),
        Action::Continue
    );
    assert_eq!(w.host.counter("x402_requests_free"), 4);
}

#[test]
fn a_per_payer_free_tier_needs_a_genuine_signature_and_spends_no_nonce() {
    let mut w = Workers::new(serde_json::json!([{
        "name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01",
        "free_tier": {"requests": 1, "window_seconds": 3600, "per": "payer"}
    }]));
    // No proof: no payer to count for, so the challenge.
    w.request(2, "/paid", "10.0.0.1", None, &[]);
    assert_eq!(w.reply_to(2).unwrap().0, 402);
    // A forged signature gets nothing for free: it goes to settlement like any proof.
    let mut forged: PaymentPayload = wire::decode_header(&proof(1, "/paid", 3, 30)).unwrap();
    forged.payload.signature = "00".repeat(64);
    w.request(
        3,
        "/paid",
        "10.0.0.1",
        Some(wire::encode_header(&forged)),
        &[],
    );
    assert_eq!(w.grpc_count(), 1);
    // A genuine one is free, and its payment header does not reach the upstream.
    assert_eq!(
        w.request(4, "/paid", "10.0.0.9", Some(proof(1, "/paid", 4, 30)), &[]),
        Action::Continue
    );
    assert!(w.host.headers[&4]
        .iter()
        .all(|(k, _)| k != "payment-signature"));
    assert_eq!(w.grpc_count(), 1);
    // The second from the same payer (any address) is charged (worker 0 has no call
    // in flight, so the authorization goes out at once).
    w.request(6, "/paid", "10.0.0.8", Some(proof(1, "/paid", 6, 30)), &[]);
    assert_eq!(w.grpc_count(), 2);
}

#[test]
fn allow_listed_identities_pass_unpaid_and_unlimited() {
    let mut w = Workers::new(serde_json::json!([{
        "name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01",
        "rate_limit": {"max_requests": 1, "window_seconds": 60},
        "allow": {
            "headers": [{"name": "X-Partner-Key", "values": ["k-123"]}],
            "source_principals": ["spiffe://cluster.local/ns/ops/sa/monitor"],
            "metadata": [{"filter": "envoy.filters.http.jwt_authn", "path": ["jwt_payload", "sub"], "values": ["partner-1"]}]
        }
    }]));
    for ctx in 2..5 {
        assert_eq!(
            w.request(
                ctx,
                "/paid",
                "10.0.0.1",
                None,
                &[("x-partner-key", "k-123")]
            ),
            Action::Continue
        );
    }
    w.host.properties.insert(
        (5, "source.principal".to_owned()),
        b"spiffe://cluster.local/ns/ops/sa/monitor".to_vec(),
    );
    assert_eq!(
        w.request(5, "/paid", "10.0.0.1", None, &[]),
        Action::Continue
    );
    w.host.properties.insert(
        (
            6,
            "metadata.filter_metadata.envoy.filters.http.jwt_authn.jwt_payload.sub".to_owned(),
        ),
        b"partner-1".to_vec(),
    );
    assert_eq!(
        w.request(6, "/paid", "10.0.0.1", None, &[]),
        Action::Continue
    );
    assert_eq!(w.host.counter("x402_requests_allowed"), 5);
    // A wrong value is a stranger: one 402, then the limit.
    w.request(7, "/paid", "10.0.0.1", None, &[("x-partner-key", "k-999")]);
    assert_eq!(w.reply_to(7).unwrap().0, 402);
    w.request(8, "/paid", "10.0.0.1", None, &[]);
    assert_eq!(w.reply_to(8).unwrap().0, 429);
    assert_eq!(w.grpc_count(), 0);
}

#[test]
fn failure_mode_open_serves_unpaid_and_closed_answers_503() {
    let routes = serde_json::json!([
        {"name": "cheap", "match": {"path_prefix": "/cheap"}, "price": "0.01", "failure_mode": "open"},
        {"name": "dear", "match": {"path_prefix": "/dear"}, "price": "0.01"}
    ]);
    // The call fails after it started (settlement down or too slow).
    let mut w = Workers::new(routes.clone());
    assert_eq!(
        w.request(
            2,
            "/cheap",
            "10.0.0.1",
            Some(proof(1, "/cheap", 2, 30)),
            &[]
        ),
        Action::Pause
    );
    let token = match w.host.grpc_calls().last() {
        Some(Call::Grpc { token, .. }) => *token,
        _ => panic!("no call"),
    };
    w.host.effective = ROOT;
    w.vms[0].on_grpc_result(&mut w.host, token, Err(14));
    assert!(w.host.calls.contains(&Call::Resume { context: 2 }));
    assert!(w.reply_to(2).is_none());
    assert_eq!(w.host.counter("x402_requests_failed_open"), 1);
    assert!(w
        .host
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("failed open")));
    // The call cannot start: the request continues inline, never resumed twice.
    let mut w = Workers::new(routes);
    w.host.fail_grpc = true;
    assert_eq!(
        w.request(
            2,
            "/cheap",
            "10.0.0.1",
            Some(proof(1, "/cheap", 2, 30)),
            &[]
        ),
        Action::Continue
    );
    assert!(!w.host.calls.contains(&Call::Resume { context: 2 }));
    w.respond(2, 200);
    assert!(w.response_header(2, "payment-response").is_none());
    // Closed (the default): 503 JSON.
    w.request(4, "/dear", "10.0.0.1", Some(proof(1, "/dear", 4, 30)), &[]);
    let (status, _, body) = w.reply_to(4).unwrap();
    assert_eq!(status, 503);
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(body.error, "settlement_unavailable");
}

#[test]
fn proofs_valid_too_far_ahead_are_refused_with_the_configured_skew() {
    let mut w = Workers::new(serde_json::json!([
        {"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"}
    ]));
    // maxTimeoutSeconds 60 + clock_skew_seconds 10.
    w.request(2, "/paid", "10.0.0.1", Some(proof(1, "/paid", 2, 70)), &[]);
    assert!(w.reply_to(2).is_none());
    assert_eq!(w.grpc_count(), 1);
    w.request(3, "/paid", "10.0.0.1", Some(proof(1, "/paid", 3, 71)), &[]);
    let (status, _, body) = w.reply_to(3).unwrap();
    assert_eq!(status, 402);
    let challenge: wire::PaymentRequired = serde_json::from_slice(&body).unwrap();
    assert_eq!(challenge.error.as_deref(), Some("validity_too_long"));
    assert_eq!(w.grpc_count(), 1);
}

#[test]
fn a_route_timeout_bounds_the_settlement_call() {
    let mut w = Workers::new(serde_json::json!([
        {"name": "fast", "match": {"path_prefix": "/fast"}, "price": "0.01", "timeout_ms": 300},
        {"name": "slow", "match": {"path_prefix": "/slow"}, "price": "0.01"}
    ]));
    let timeout_of_last_call = |w: &Workers| match w.host.grpc_calls().last() {
        Some(Call::Grpc { timeout_ms, .. }) => *timeout_ms,
        _ => panic!("no call"),
    };
    w.request(2, "/fast", "10.0.0.1", Some(proof(1, "/fast", 2, 30)), &[]);
    assert_eq!(timeout_of_last_call(&w), 300);
    w.request(3, "/slow", "10.0.0.1", Some(proof(1, "/slow", 3, 30)), &[]);
    assert_eq!(timeout_of_last_call(&w), 2000);
}

#[test]
fn junk_proofs_in_a_payers_name_spend_the_senders_limit_not_the_payers() {
    let mut w = Workers::new(serde_json::json!([{
        "name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01",
        "rate_limit": {"max_requests": 2, "window_seconds": 60}
    }]));
    let forged = |nonce: u8| {
        let mut p: PaymentPayload = wire::decode_header(&proof(1, "/paid", nonce, 30)).unwrap();
        p.payload.signature = "00".repeat(64);
        wire::encode_header(&p)
    };
    // The attacker's address runs out of tokens...
    for ctx in [2, 4] {
        w.request(ctx, "/paid", "10.6.6.6", Some(forged(ctx as u8)), &[]);
    }
    w.request(6, "/paid", "10.6.6.6", Some(forged(6)), &[]);
    assert_eq!(w.reply_to(6).unwrap().0, 429);
    // ...while the payer whose key it used still has its own two.
    for ctx in [8, 10] {
        w.request(
            ctx,
            "/paid",
            "10.0.0.1",
            Some(proof(1, "/paid", ctx as u8, 30)),
            &[],
        );
        assert!(w.reply_to(ctx).is_none());
    }
}

#[test]
fn a_global_limit_rides_on_authorize_and_settlements_refusal_is_a_429() {
    use prost::Message;
    use x402_proto::settlement::v1::{
        AuthorizeOutcome, AuthorizeRequest, AuthorizeResponse, AuthorizeResult,
    };
    let routes = serde_json::json!([
        {"name": "payer", "match": {"path_prefix": "/payer"}, "price": "0.01",
         "global_limit": {"max_requests": 100, "window_seconds": 3600, "message": "100 an hour"}},
        {"name": "client", "match": {"path_prefix": "/client"}, "price": "0.01",
         "global_limit": {"max_requests": 5, "key": "client"}}
    ]);
    let mut w = Workers::new(routes);
    // An unpaid request is challenged without a callout.
    w.request(2, "/payer", "10.0.0.1", None, &[]);
    assert_eq!(w.reply_to(2).unwrap().0, 402);
    assert_eq!(w.grpc_count(), 0);

    let sent = |w: &Workers| match w.host.grpc_calls().last() {
        Some(Call::Grpc { token, message, .. }) => (
            *token,
            AuthorizeRequest::decode(message.as_slice()).unwrap(),
        ),
        _ => panic!("no call"),
    };
    // Per payer: the limit goes to settlement with no client address.
    w.request(
        3,
        "/payer",
        "10.0.0.1",
        Some(proof(1, "/payer", 3, 30)),
        &[],
    );
    let (token, request) = sent(&w);
    let limit = request.items[0].global_limit.clone().unwrap();
    assert_eq!((limit.max_requests, limit.window_seconds), (100, 3600));
    assert_eq!(limit.client_address, "");
    // Settlement says the window is full: 429 with its Retry-After, nothing resumed.
    let response = AuthorizeResponse {
        results: vec![AuthorizeResult {
            request_id: request.items[0].request_id.clone(),
            outcome: AuthorizeOutcome::RateLimited as i32,
            retry_after_seconds: 42,
            ..Default::default()
        }],
    };
    w.host.effective = ROOT;
    w.vms[1].on_grpc_result(&mut w.host, token, Ok(response.encode_to_vec()));
    let (status, headers, body) = w.reply_to(3).unwrap();
    assert_eq!(status, 429);
    assert_eq!(header_of(&headers, "retry-after"), Some("42"));
    assert!(header_of(&headers, "payment-response").is_none());
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (body.error.as_str(), body.message.as_str()),
        ("rate_limited", "100 an hour")
    );
    assert!(!w.host.calls.contains(&Call::Resume { context: 3 }));
    assert_eq!(w.host.counter("x402_requests_rate_limited"), 1);

    // Per client: the client address, without its port, goes along.
    w.request(
        4,
        "/client",
        "10.0.0.9",
        Some(proof(1, "/client", 4, 30)),
        &[],
    );
    let (_, request) = sent(&w);
    let limit = request.items[0].global_limit.clone().unwrap();
    assert_eq!((limit.max_requests, limit.window_seconds), (5, 60));
    assert_eq!(limit.client_address, "10.0.0.9");
}
