//! gRPC upstreams end to end: a real tonic client calls a real tonic service through
//! Envoy with the filter, which prices `quotes.v1.Quotes` by gRPC method. An unpaid call
//! gets UNAUTHENTICATED with the x402 challenge in its metadata; the client signs it and
//! calls again with the proof in metadata, and is charged exactly; a call the upstream
//! fails with INTERNAL (trailers-only, or in the trailers after streamed messages) is
//! voided; the ledger checker finds nothing wrong after.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use x402_client::wire::{
    decode_header, encode_header, PaymentRequired, SettleResponse, HEADER_PAYMENT_REQUIRED,
    HEADER_PAYMENT_RESPONSE, HEADER_PAYMENT_SIGNATURE,
};
use x402_client::{random_nonce_hex, resource_for, sign_payment, PayerKey};
use x402_e2e::grpc_upstream::proto::quotes_client::QuotesClient;
use x402_e2e::grpc_upstream::proto::QuoteRequest;
use x402_e2e::grpc_upstream::{GrpcUpstream, FAIL};
use x402_e2e::stack::{unix_now, Stack, ASSET, MERCHANT, NETWORK};
use x402_settlement::check::{check_ledger, CheckOptions};

const GET_QUOTE: &str = "/quotes.v1.Quotes/GetQuote";
const STREAM_QUOTES: &str = "/quotes.v1.Quotes/StreamQuotes";
/// `GetQuote` costs 0.01 USD, every other method of the service 0.002 USD.
const GET_QUOTE_PRICE: u64 = 10_000;
const STREAM_PRICE: u64 = 2_000;

fn filter_config() -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "network": NETWORK,
        "asset": ASSET,
        "pay_to": MERCHANT,
        "routes": [
            { "name": "get-quote", "match": { "grpc_method": "quotes.v1.Quotes/GetQuote" }, "price": "0.01" },
            { "name": "quotes", "match": { "grpc_method": "quotes.v1.Quotes/*" }, "price": "0.002" }
        ]
    })
    .to_string()
}

struct GrpcStack {
    // Envoy goes first (field order is drop order), then the upstream behind it.
    stack: Stack,
    upstream: GrpcUpstream,
    client: QuotesClient<Channel>,
}

async fn start() -> GrpcStack {
    let upstream = GrpcUpstream::start().unwrap();
    let port = upstream.port();
    let stack = Stack::start_with(&filter_config(), |o| o.grpc_upstream_port = Some(port))
        .await
        .unwrap();
    let channel = Channel::from_shared(stack.url(""))
        .unwrap()
        .timeout(std::time::Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    GrpcStack {
        stack,
        upstream,
        client: QuotesClient::new(channel),
    }
}

fn request(symbol: &str, count: u32, proof: Option<&str>) -> Request<QuoteRequest> {
    let mut request = Request::new(QuoteRequest {
        symbol: symbol.to_owned(),
        count,
    });
    if let Some(proof) = proof {
        request.metadata_mut().insert(
            HEADER_PAYMENT_SIGNATURE,
            MetadataValue::try_from(proof).unwrap(),
        );
    }
    request
}

/// The x402 challenge a gRPC status carries in its `payment-required` metadata.
fn challenge_of(status: &Status) -> PaymentRequired {
    let header = status
        .metadata()
        .get(HEADER_PAYMENT_REQUIRED)
        .unwrap_or_else(|| panic!("no payment-required metadata on {status:?}"))
        .to_str()
        .unwrap();
    decode_header(header).unwrap()
}

/// What a paying gRPC client does with the challenge: sign its first offer for this
/// method (POST, the authority it called, the method path).
fn pay(g: &GrpcStack, key: &PayerKey, challenge: &PaymentRequired, path: &str) -> String {
    let resource = resource_for("POST", &g.stack.parsed_url(path).unwrap()).unwrap();
    let proof = sign_payment(
        key,
        &challenge.accepts[0],
        &resource,
        &random_nonce_hex(),
        unix_now() + 30,
    )
    .unwrap();
    encode_header(&proof)
}

async fn unpaid_get_quote(g: &mut GrpcStack, symbol: &str) -> Status {
    g.client
        .get_quote(request(symbol, 0, None))
        .await
        .expect_err("an unpaid call must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_is_challenged_pays_and_is_charged_exactly() {
    let mut g = start().await;
    let funds = 100_000;
    let (payer, key) = g.stack.new_payer(funds).await.unwrap();

    // Unpaid: a gRPC status, not an HTTP 402, with the challenge in the metadata.
    let status = unpaid_get_quote(&mut g, "ACME").await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().starts_with("payment_required"),
        "{status:?}"
    );
    let challenge = challenge_of(&status);
    assert_eq!(challenge.error.as_deref(), Some("payment_required"));
    assert_eq!(challenge.accepts[0].amount, GET_QUOTE_PRICE.to_string());
    assert_eq!(challenge.accepts[0].scheme, "exact");
    assert_eq!(challenge.resource.url, g.stack.url(GET_QUOTE));
    assert_eq!(g.upstream.calls(), 0, "an unpaid call reached the upstream");

    // Paid: served, the receipt in the response metadata, charged exactly the price.
    let proof = pay(&g, &key, &challenge, GET_QUOTE);
    let response = g
        .client
        .get_quote(request("ACME", 0, Some(&proof)))
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", g.stack.logs()));
    let receipt: SettleResponse = decode_header(
        response
            .metadata()
            .get(HEADER_PAYMENT_RESPONSE)
            .expect("a receipt in the response metadata")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert!(receipt.success);
    assert_eq!(receipt.amount, GET_QUOTE_PRICE.to_string());
    let quote = response.into_inner();
    assert_eq!(quote.symbol, "ACME");
    assert!(!quote.saw_payment_header, "the proof reached the upstream");
    assert_eq!(g.upstream.calls(), 1);
    let after = (funds - GET_QUOTE_PRICE) as i64;
    g.stack
        .wait_for_settled_balance(&payer, after)
        .await
        .unwrap();
    g.stack
        .wait_for_settled_balance(MERCHANT, GET_QUOTE_PRICE as i64)
        .await
        .unwrap();

    // The same proof again: refused as a payable problem, still a gRPC status.
    let replay = g
        .client
        .get_quote(request("ACME", 0, Some(&proof)))
        .await
        .expect_err("a replayed proof must be refused");
    assert_eq!(replay.code(), Code::Unauthenticated, "{replay:?}");
    assert_eq!(challenge_of(&replay).error.as_deref(), Some("nonce_reused"));
    // A garbled proof is INVALID_ARGUMENT.
    let garbled = g
        .client
        .get_quote(request("ACME", 0, Some("not-base64!")))
        .await
        .expect_err("a garbled proof must be refused");
    assert_eq!(garbled.code(), Code::InvalidArgument, "{garbled:?}");
    assert_eq!(g.upstream.calls(), 1);
    g.stack
        .wait_for_settled_balance(&payer, after)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_upstream_fails_is_voided() {
    let mut g = start().await;
    let funds = 100_000;
    let (payer, key) = g.stack.new_payer(funds).await.unwrap();

    // INTERNAL as a trailers-only response (grpc-status in the headers).
    let challenge = challenge_of(&unpaid_get_quote(&mut g, FAIL).await);
    let proof = pay(&g, &key, &challenge, GET_QUOTE);
    let failed = g
        .client
        .get_quote(request(FAIL, 0, Some(&proof)))
        .await
        .expect_err("the upstream fails this call");
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    assert_eq!(failed.message(), "the quote engine failed");
    assert_eq!(g.upstream.calls(), 1);

    // INTERNAL in the trailers, after three streamed quotes.
    let status = g
        .client
        .stream_quotes(request(FAIL, 3, None))
        .await
        .expect_err("an unpaid stream must be refused");
    let challenge = challenge_of(&status);
    assert_eq!(challenge.accepts[0].amount, STREAM_PRICE.to_string());
    let proof = pay(&g, &key, &challenge, STREAM_QUOTES);
    let mut stream = g
        .client
        .stream_quotes(request(FAIL, 3, Some(&proof)))
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", g.stack.logs()))
        .into_inner();
    let mut received = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(received, 3);
    assert_eq!(end.code(), Code::Internal, "{end:?}");
    assert_eq!(g.upstream.calls(), 2);

    // Both holds released: the payer has everything, the merchant nothing.
    g.stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
    g.stack.wait_for_settled_balance(MERCHANT, 0).await.unwrap();

    // A good stream on the same service is captured at the service's price.
    let challenge = challenge_of(
        &g.client
            .stream_quotes(request("ACME", 2, None))
            .await
            .expect_err("unpaid"),
    );
    let proof = pay(&g, &key, &challenge, STREAM_QUOTES);
    let mut stream = g
        .client
        .stream_quotes(request("ACME", 2, Some(&proof)))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while let Some(quote) = stream.message().await.unwrap() {
        assert!(!quote.saw_payment_header);
        received += 1;
    }
    assert_eq!(received, 2);
    g.stack
        .wait_for_settled_balance(&payer, (funds - STREAM_PRICE) as i64)
        .await
        .unwrap();

    let pool = x402_settlement::db::connect(g.stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}
