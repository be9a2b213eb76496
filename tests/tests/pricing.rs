//! Every pricing model end to end: real Envoy with the filter, real settlement on real
//! PostgreSQL, the real upstream's metered endpoints. After each paid request the
//! payer's balance is exactly the amount this test computes on its own from the
//! configured prices, and metered captures are checked by transaction id.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reqwest::header::HeaderMap;
use reqwest::Method;
use x402_client::{PaidResponse, PayerKey};
use x402_e2e::stack::{Stack, ASSET, MERCHANT, NETWORK};

const FUNDS: u64 = 10_000_000;

fn pricing_config() -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "network": NETWORK,
        "asset": ASSET,
        "asset_decimals": 6,
        "pay_to": MERCHANT,
        "routes": [
            { "name": "tokens-header", "match": { "path_prefix": "/metered/tokens/header" },
              "pricing": { "per_token": { "unit_price": "0.00002", "max_units": 1000, "tokens_from": { "header": "x-usage-tokens" } } } },
            { "name": "tokens-json", "match": { "path_prefix": "/metered/tokens/json" },
              "pricing": { "per_token": { "unit_price": "0.0000015", "max_units": 4000, "tokens_from": { "json_pointer": "/usage/completion_tokens" } } } },
            { "name": "chat-openai", "match": { "path_prefix": "/metered/openai" },
              "pricing": { "per_token": { "unit_price": "0.00001", "max_units": 500, "tokens_from": "openai_usage" } } },
            { "name": "chat-stream", "match": { "path_prefix": "/metered/sse" },
              "pricing": { "per_token": { "unit_price": "0.00001", "max_units": 500, "tokens_from": "sse_usage" } } },
            { "name": "download", "match": { "path_prefix": "/metered/bytes" },
              "pricing": { "per_kb": { "unit_price": "0.0001", "max_units": 1000 } } },
            { "name": "detect", "match": { "path_prefix": "/metered/items" },
              "pricing": { "per_item": { "unit_price": "0.002", "max_units": 50, "items_pointer": "/objects" } } },
            { "name": "compute", "match": { "path_prefix": "/metered/slow" },
              "pricing": { "per_second": { "unit_price": "0.001", "max_units": 30 } } },
            { "name": "transcribe", "match": { "method": "POST", "path_exact": "/paid/transcribe" },
              "pricing": { "expression": { "expr": "audioDuration / 60 * 0.10" } },
              "validate": [ { "field": "audioDuration", "required": true } ],
              "max_request_body_bytes": 4096 },
            { "name": "image", "match": { "method": "POST", "path_exact": "/paid/image" },
              "pricing": { "expression": { "expr": "width * height * steps / 1000000 * 0.001" } } },
            { "name": "pages", "match": { "path_exact": "/paid/pages" },
              "pricing": { "expression": { "expr": "query(\"pages\") * 0.01" } } },
            { "name": "graphql", "match": { "method": "POST", "path_exact": "/paid/graphql" },
              "pricing": { "graphql": { "fields": { "Query.user": "0.001", "Query.posts": "0.002", "Mutation.createPost": "0.01" } } } },
            { "name": "generate", "match": { "method": "POST", "path_exact": "/paid/generate" },
              "price": "0.005",
              "validate": [
                  { "field": "prompt", "required": true, "max_length": 20 },
                  { "field": "size", "allowed": ["small", "large"] }
              ],
              "max_request_body_bytes": 1024 },
            { "name": "volume", "match": { "path_prefix": "/paid/volume" },
              "pricing": { "volume": { "tiers": [ { "from_requests": 0, "price": "0.01" }, { "from_requests": 2, "price": "0.004" } ] } } },
            { "name": "by-hour", "match": { "path_prefix": "/paid/by-hour" },
              "price": "0.004",
              "pricing": { "time_of_day": { "windows": [ { "from_hour": 0, "to_hour": 12, "price": "0.003" } ] } } }
        ]
    })
    .to_string()
}

async fn pay(
    stack: &Stack,
    key: &PayerKey,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> PaidResponse {
    stack
        .client(key)
        .unwrap()
        .request(
            method,
            stack.parsed_url(path).unwrap(),
            HeaderMap::new(),
            body.map(|b| b.as_bytes().to_vec()),
        )
        .await
        .unwrap()
}

/// Pays `path`, checks the receipt holds `hold`, and that settlement captured
/// exactly `capture` for the transaction and the payer's balance followed.
#[allow(clippy::too_many_arguments)]
async fn pay_metered(
    stack: &Stack,
    account: &str,
    key: &PayerKey,
    path: &str,
    hold: u64,
    capture: u64,
    balance: &mut u64,
) -> PaidResponse {
    let response = pay(stack, key, Method::GET, path, None).await;
    assert_eq!(
        response.status.as_u16(),
        200,
        "{path}: {}",
        String::from_utf8_lossy(&response.body)
    );
    let receipt = response.receipt.clone().expect("a receipt");
    assert_eq!(
        receipt.amount,
        hold.to_string(),
        "{path}: the receipt carries the hold"
    );
    *balance -= capture;
    stack
        .wait_for_settled_balance(account, i64::try_from(*balance).unwrap())
        .await
        .unwrap();
    let payment = stack
        .settlement
        .payment(&receipt.transaction)
        .await
        .unwrap();
    assert_eq!(payment.held, hold, "{path}");
    assert_eq!(payment.captured, capture, "{path}");
    assert_eq!(payment.status, "captured", "{path}");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metered_routes_hold_the_maximum_and_capture_what_was_used() {
    let stack = Stack::start(&pricing_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let mut balance = FUNDS;

    // The challenge states the scheme, the maximum and the meter.
    let challenge = stack
        .send_unpaid("GET", "/metered/tokens/header?n=1")
        .await
        .unwrap()
        .challenge()
        .unwrap();
    let offer = &challenge.accepts[0];
    assert_eq!(offer.scheme, "upto");
    assert_eq!(offer.amount, "20000", "1000 tokens × 0.00002 USD");
    assert_eq!(offer.extra["unit"], "token");
    assert_eq!(offer.extra["unitPrice"], "0.00002");
    assert_eq!(offer.extra["maxUnits"], 1000);
    assert_eq!(challenge.price.as_deref(), Some("0.02"));

    // Per token from a response header: 250 × 20 atomic units.
    pay_metered(
        &stack,
        &account,
        &key,
        "/metered/tokens/header?n=250",
        20_000,
        5_000,
        &mut balance,
    )
    .await;
    // Zero tokens cost nothing.
    pay_metered(
        &stack,
        &account,
        &key,
        "/metered/tokens/header?n=0",
        20_000,
        0,
        &mut balance,
    )
    .await;
    // More than the maximum: exactly the hold, never more.
    pay_metered(
        &stack,
        &account,
        &key,
        "/metered/tokens/header?n=1500",
        20_000,
        20_000,
        &mut balance,
    )
    .await;
    // Per token from a JSON pointer: 333 × 1.5 = 499.5, rounded half up.
    pay_metered(
        &stack,
        &account,
        &key,
        "/metered/tokens/json?n=333",
        6_000,
        500,
        &mut balance,
    )
    .await;
    // Per token from the final usage event of a server-sent-events stream.
    let streamed = pay_metered(
        &stack,
        &account,
        &key,
        "/metered/sse?n=42",
        5_000,
        420,
        &mut balance,
    )
    .await;
    let text = String::from_utf8_lossy(&streamed.body);
    assert!(
        text.contains("\"completion_tokens\":42") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // `openai_usage` reads the usage object of a JSON answer, and of a streamed one.
    for (path, captured) in [
        ("/metered/openai/json?n=7", 70),
        ("/metered/openai/sse?n=42", 420),
    ] {
        pay_metered(&stack, &account, &key, path, 5_000, captured, &mut balance).await;
    }
    // Per KB of a body far larger than one chunk: 200_500 bytes × 100 atomic per 1000 bytes.
    let download = pay_metered(
        &stack,
        &account,
        &key,
        "/metered/bytes?n=200500",
        100_000,
        20_050,
        &mut balance,
    )
    .await;
    assert_eq!(download.body.len(), 200_500);
    // Per item: 7 objects × 2000.
    pay_metered(
        &stack,
        &account,
        &key,
        "/metered/items?n=7",
        100_000,
        14_000,
        &mut balance,
    )
    .await;

    // Per second of upstream time: at least the 1.2 s the upstream slept, at most the
    // hold; the payer pays exactly what settlement captured.
    let response = pay(&stack, &key, Method::GET, "/metered/slow?ms=1200", None).await;
    assert_eq!(response.status.as_u16(), 200);
    let receipt = response.receipt.unwrap();
    assert_eq!(receipt.amount, "30000");
    let mut payment = stack
        .settlement
        .payment(&receipt.transaction)
        .await
        .unwrap();
    for _ in 0..100 {
        if payment.status != "held" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        payment = stack
            .settlement
            .payment(&receipt.transaction)
            .await
            .unwrap();
    }
    assert_eq!(payment.status, "captured");
    assert!(
        (1_200..=30_000).contains(&payment.captured),
        "1.2 s at 0.001 USD/s is at least 1200: {payment:?}"
    );
    assert_eq!(
        payment.captured,
        (payment.upstream_micros + 500) / 1_000,
        "{payment:?}"
    );
    balance -= payment.captured;
    stack
        .wait_for_settled_balance(&account, i64::try_from(balance).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_computed_from_the_request_are_exact_and_bad_requests_cost_nothing() {
    let stack = Stack::start(&pricing_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let mut balance = FUNDS;
    let mut expect = |amount: u64| {
        balance -= amount;
        i64::try_from(balance).unwrap()
    };

    // audioDuration / 60 × 0.10 for 90 s = 0.15 USD.
    let body = r#"{"audioDuration": 90, "language": "en"}"#;
    let challenge = stack
        .http
        .post(stack.url("/paid/transcribe"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status().as_u16(), 402);
    let challenge: serde_json::Value = challenge.json().await.unwrap();
    assert_eq!(challenge["accepts"][0]["scheme"], "exact");
    assert_eq!(challenge["accepts"][0]["amount"], "150000");
    assert_eq!(challenge["price"], "0.15");
    let paid = pay(&stack, &key, Method::POST, "/paid/transcribe", Some(body)).await;
    assert_eq!(
        paid.status.as_u16(),
        200,
        "{}",
        String::from_utf8_lossy(&paid.body)
    );
    let echo: serde_json::Value = serde_json::from_slice(&paid.body).unwrap();
    assert_eq!(
        echo["body_bytes"],
        body.len(),
        "the buffered body reaches the upstream"
    );
    stack
        .wait_for_settled_balance(&account, expect(150_000))
        .await
        .unwrap();

    // 1024 × 1024 × 50 / 10^6 × 0.001 = 0.0524288 USD, rounded half up to 52429.
    let image = r#"{"width": 1024, "height": 1024, "steps": 50}"#;
    let paid = pay(&stack, &key, Method::POST, "/paid/image", Some(image)).await;
    assert_eq!(paid.status.as_u16(), 200);
    assert_eq!(paid.receipt.unwrap().amount, "52429");
    stack
        .wait_for_settled_balance(&account, expect(52_429))
        .await
        .unwrap();

    // From a query parameter: 7 pages × 0.01.
    let paid = pay(&stack, &key, Method::GET, "/paid/pages?pages=7", None).await;
    assert_eq!(paid.status.as_u16(), 200);
    stack
        .wait_for_settled_balance(&account, expect(70_000))
        .await
        .unwrap();

    // GraphQL: user + posts + user again under an alias = 0.001 + 0.002 + 0.001.
    let query = serde_json::json!({"query": "query { me: user(id: 1) { name } posts(first: 2) { id } other: user(id: 2) { name } }"}).to_string();
    let paid = pay(&stack, &key, Method::POST, "/paid/graphql", Some(&query)).await;
    assert_eq!(paid.status.as_u16(), 200);
    stack
        .wait_for_settled_balance(&account, expect(4_000))
        .await
        .unwrap();
    let mutation =
        serde_json::json!({"query": "mutation { createPost(title: \"hi\") { id } }"}).to_string();
    let paid = pay(&stack, &key, Method::POST, "/paid/graphql", Some(&mutation)).await;
    assert_eq!(paid.status.as_u16(), 200);
    stack
        .wait_for_settled_balance(&account, expect(10_000))
        .await
        .unwrap();

    // Time of day: 0.003 before noon UTC, 0.004 after.
    let hour_before = (x402_e2e::stack::unix_now() % 86_400) / 3_600;
    let paid = pay(&stack, &key, Method::GET, "/paid/by-hour", None).await;
    let hour_after = (x402_e2e::stack::unix_now() % 86_400) / 3_600;
    let price_at = |hour: u64| if hour < 12 { 3_000 } else { 4_000 };
    let charged: u64 = paid.receipt.unwrap().amount.parse().unwrap();
    assert!(
        charged == price_at(hour_before) || charged == price_at(hour_after),
        "{charged}"
    );
    stack
        .wait_for_settled_balance(&account, expect(charged))
        .await
        .unwrap();

    // Volume tiers quoted by settlement: the first two paid requests this month cost
    // 0.01, from the third on 0.004; the challenge states the most it can cost.
    let challenge = stack
        .send_unpaid("GET", "/paid/volume")
        .await
        .unwrap()
        .challenge()
        .unwrap();
    assert_eq!(challenge.accepts[0].amount, "10000");
    for tier_price in [10_000u64, 10_000, 4_000, 4_000] {
        let paid = pay(&stack, &key, Method::GET, "/paid/volume", None).await;
        assert_eq!(paid.status.as_u16(), 200);
        assert_eq!(paid.receipt.unwrap().amount, tier_price.to_string());
        stack
            .wait_for_settled_balance(&account, expect(tier_price))
            .await
            .unwrap();
    }

    // Refusals before any charge: each names the field, and nothing is held.
    let payments_before = stack.settlement.payments_of(&account).await.unwrap().len();
    for (path, body, status, needle) in [
        (
            "/paid/transcribe",
            r#"{"language": "en"}"#,
            400,
            "audioDuration",
        ),
        (
            "/paid/transcribe",
            r#"{"audioDuration": "long"}"#,
            400,
            "audioDuration",
        ),
        ("/paid/transcribe", "not json", 400, "JSON"),
        (
            "/paid/image",
            r#"{"width": 1, "height": 1, "steps": 1e40}"#,
            400,
            "steps",
        ),
        (
            "/paid/graphql",
            r#"{"query": "{ admin { id } }"}"#,
            400,
            "Query.admin",
        ),
        ("/paid/generate", r#"{"size": "small"}"#, 400, "prompt"),
        (
            "/paid/generate",
            r#"{"prompt": "a prompt that is far too long"}"#,
            400,
            "prompt",
        ),
        (
            "/paid/generate",
            r#"{"prompt": "cat", "size": "huge"}"#,
            400,
            "size",
        ),
    ] {
        let answer = stack
            .http
            .post(stack.url(path))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), status, "{path} {body}");
        let error: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(error["error"], "invalid_request", "{error}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
    }
    // A body over the route's limit: 413, nothing held.
    let large = format!(r#"{{"prompt": "cat", "pad": "{}"}}"#, "x".repeat(2_000));
    let answer = pay(&stack, &key, Method::POST, "/paid/generate", Some(&large)).await;
    assert_eq!(answer.status.as_u16(), 413);
    assert!(answer.receipt.is_none());
    // A valid request to the validated route costs its flat price.
    let paid = pay(
        &stack,
        &key,
        Method::POST,
        "/paid/generate",
        Some(r#"{"prompt": "cat", "size": "large"}"#),
    )
    .await;
    assert_eq!(paid.status.as_u16(), 200);
    assert_eq!(
        stack.settlement.payments_of(&account).await.unwrap().len(),
        payments_before + 1,
        "refused requests never placed a hold"
    );
    stack
        .wait_for_settled_balance(&account, expect(5_000))
        .await
        .unwrap();
    assert!(
        stack
            .settlement
            .payments_of(&account)
            .await
            .unwrap()
            .iter()
            .all(|p| p.status == "captured"),
        "no refusal left a hold"
    );
}

/// [`pricing_config`] with the request headers of body-priced routes held until paid.
fn held_headers_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&pricing_config()).unwrap();
    config["hold_request_headers"] = true.into();
    config.to_string()
}

/// How many requests for `path` reached the upstream: headers arrived, served.
fn upstream_saw(stack: &Stack, path: &str) -> (usize, usize) {
    let line = format!("POST {path}");
    let served = stack.upstream.served();
    let count = |lines: Vec<String>| lines.iter().filter(|l| **l == line).count();
    (count(served.arrived()), count(served.requests()))
}

/// POSTs `body` over a raw connection, the body 100 ms after the headers (so an
/// upstream that is sent the headers early has them well before any answer), and
/// returns the answer's status and text.
async fn post(stack: &Stack, path: &str, body: &str) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        stack.envoy.authority(),
        body.len()
    );
    stack
        .send_raw(&[&head, body], std::time::Duration::from_millis(100))
        .await
        .unwrap()
}

/// POSTs `body` over HTTP/2 (cleartext, prior knowledge) with request trailers after
/// it, so the body never ends with `end_of_stream`, and returns the answer's status
/// and text.
async fn post_with_trailers(
    stack: &Stack,
    path: &str,
    body: &str,
    payment: Option<&str>,
) -> (u16, String) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let tcp = tokio::net::TcpStream::connect(stack.envoy.authority())
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-body-digest", "sha-256=test".parse().unwrap());
    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(bytes::Bytes::from(body.to_owned()))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut request = hyper::Request::post(format!("http://{}{path}", stack.envoy.authority()))
        .header("content-type", "application/json");
    if let Some(payment) = payment {
        request = request.header(x402_client::wire::HEADER_PAYMENT_SIGNATURE, payment);
    }
    let request = request
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        sender.send_request(request),
    )
    .await
    .unwrap()
    .unwrap();
    let status = response.status().as_u16();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_ends_with_trailers_is_priced_and_held_until_paid() {
    // Over HTTP/2 a body may end with trailers instead of end_of_stream; Envoy lets a
    // request go on at trailers a filter does not stop, held headers and body included.
    let stack = Stack::start(&held_headers_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let body = r#"{"audioDuration": 90}"#;
    let (status, text) = post_with_trailers(&stack, "/paid/transcribe", body, None).await;
    assert_eq!(status, 402, "{text}");
    assert_eq!(
        upstream_saw(&stack, "/paid/transcribe"),
        (0, 0),
        "the upstream saw nothing of an unpaid request"
    );

    let proof = stack
        .signed_proof(&key, "POST", "/paid/transcribe", 150_000)
        .unwrap();
    let header = x402_client::wire::encode_header(&proof);
    let (status, text) = post_with_trailers(&stack, "/paid/transcribe", body, Some(&header)).await;
    assert_eq!(status, 200, "{text}\n{}", stack.logs());
    let echo: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(echo["body_bytes"], body.len());
    assert_eq!(upstream_saw(&stack, "/paid/transcribe"), (1, 1));
    stack
        .wait_for_settled_balance(&account, i64::try_from(FUNDS - 150_000).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_priced_request_reaches_the_upstream_only_once_paid() {
    let stack = Stack::start(&held_headers_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let body = r#"{"audioDuration": 90}"#;
    let (status, text) = post(&stack, "/paid/transcribe", body).await;
    assert_eq!(status, 402, "{text}");
    let (status, text) = post(&stack, "/paid/transcribe", r#"{"language": "en"}"#).await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        upstream_saw(&stack, "/paid/transcribe"),
        (0, 0),
        "the upstream saw nothing of an unpaid request, not even its headers"
    );

    let paid = pay(&stack, &key, Method::POST, "/paid/transcribe", Some(body)).await;
    assert_eq!(paid.status.as_u16(), 200, "{}", stack.logs());
    let echo: serde_json::Value = serde_json::from_slice(&paid.body).unwrap();
    assert_eq!(echo["body_bytes"], body.len());
    assert_eq!(echo["payment_header_seen"], false);
    assert_eq!(upstream_saw(&stack, "/paid/transcribe"), (1, 1));
    stack
        .wait_for_settled_balance(&account, i64::try_from(FUNDS - 150_000).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_headers_go_first_where_envoy_does_not_allow_holding_them() {
    // An Envoy without `allow_on_headers_stop_iteration` (or an Istio WasmPlugin, which
    // cannot set it) holds the body with the headers: the filter finds out on the first
    // body-priced request, lets its headers go and warns; later ones send their headers
    // first. Nothing hangs, and no unpaid body reaches the upstream.
    let stack = Stack::start_with(&held_headers_config(), |o| {
        o.headers_stop_iteration = false;
    })
    .await
    .unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let body = r#"{"audioDuration": 90}"#;
    let (status, text) = post(&stack, "/paid/transcribe", body).await;
    assert_eq!(status, 402, "{text}");
    let (status, text) = post(&stack, "/paid/transcribe", body).await;
    assert_eq!(status, 402, "{text}");
    stack
        .envoy
        .wait_for_log(
            "allow_on_headers_stop_iteration",
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    // As without the setting: the refused bodies never reached the upstream.
    assert_eq!(upstream_saw(&stack, "/paid/transcribe").1, 0);
    let paid = pay(&stack, &key, Method::POST, "/paid/transcribe", Some(body)).await;
    assert_eq!(paid.status.as_u16(), 200, "{}", stack.logs());
    stack
        .wait_for_settled_balance(&account, i64::try_from(FUNDS - 150_000).unwrap())
        .await
        .unwrap();
}
