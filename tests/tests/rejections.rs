//! Proofs that must be refused, end to end: tampered signed fields, expired proofs,
//! unknown and revoked keys (402 with the right error code) and malformed headers (400).
//! None of them may reach the upstream or move any money.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use x402_client::wire::PaymentPayload;
use x402_client::{sign_payment, PayerKey};
use x402_e2e::stack::{unix_now, Stack, MERCHANT, PAID_PRICE};
use x402_proto::wire::encode_header;

const PATH: &str = "/paid/quote?sym=ABC";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tampered_signed_field_is_refused_with_its_code() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let (other_payer, other_key) = stack.new_payer(funds).await.unwrap();
    let unregistered = PayerKey::generate();
    let authority = stack.envoy.authority();

    type Tamper = Box<dyn Fn(&mut PaymentPayload)>;
    let other_pub = other_key.public_key_hex();
    let stranger_pub = unregistered.public_key_hex();
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "scheme",
            Box::new(|p| p.accepted.scheme = "upto".into()),
            "wrong_scheme",
        ),
        (
            "network",
            Box::new(|p| p.accepted.network = "402x-elsewhere".into()),
            "wrong_network",
        ),
        (
            "asset",
            Box::new(|p| p.accepted.asset = "EUR".into()),
            "wrong_asset",
        ),
        (
            "amount lowered",
            Box::new(|p| p.accepted.amount = (PAID_PRICE - 1).to_string()),
            "amount_below_price",
        ),
        // A larger amount passes the price check, so only the signature catches it.
        (
            "amount raised",
            Box::new(|p| p.accepted.amount = (PAID_PRICE * 2).to_string()),
            "invalid_signature",
        ),
        (
            "payTo",
            Box::new(|p| p.accepted.pay_to = "merchant-other".into()),
            "wrong_pay_to",
        ),
        (
            "resource",
            Box::new(move |p| p.payload.resource = format!("GET {authority}/paid/other")),
            "wrong_resource",
        ),
        (
            "nonce",
            Box::new(|p| {
                p.payload.nonce.replace_range(
                    0..2,
                    if p.payload.nonce.starts_with("00") {
                        "01"
                    } else {
                        "00"
                    },
                )
            }),
            "invalid_signature",
        ),
        (
            "validBefore slightly later",
            Box::new(|p| {
                p.payload.valid_before =
                    (p.payload.valid_before.parse::<u64>().unwrap() + 1).to_string()
            }),
            "invalid_signature",
        ),
        (
            "validBefore far in the future",
            Box::new(|p| p.payload.valid_before = (unix_now() + 100_000).to_string()),
            "validity_too_long",
        ),
        (
            "payer swapped to another payer's key",
            Box::new(move |p| p.payload.payer = other_pub.clone()),
            "invalid_signature",
        ),
        (
            "payer swapped to an unknown key",
            Box::new(move |p| p.payload.payer = stranger_pub.clone()),
            "unknown_key",
        ),
    ];

    let mut failures = Vec::new();
    for (what, tamper, expected) in &cases {
        let mut proof = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
        tamper(&mut proof);
        let answer = stack.send_with_payment("GET", PATH, &proof).await.unwrap();
        if answer.status != 402 || answer.error_code().as_deref() != Some(*expected) {
            failures.push(format!(
                "{what}: expected 402 {expected}, got {} {}",
                answer.status,
                answer.body_text()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        stack.logs()
    );

    // A correctly signed proof for another resource is refused too.
    let elsewhere = stack
        .signed_proof(&key, "GET", "/paid/other", PAID_PRICE)
        .unwrap();
    let answer = stack
        .send_with_payment("GET", PATH, &elsewhere)
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.error_code().as_deref()),
        (402, Some("wrong_resource"))
    );
    // ... and one for the same path with another method.
    let post = stack.signed_proof(&key, "POST", PATH, PAID_PRICE).unwrap();
    let answer = stack.send_with_payment("GET", PATH, &post).await.unwrap();
    assert_eq!(
        (answer.status, answer.error_code().as_deref()),
        (402, Some("wrong_resource"))
    );

    assert_eq!(
        stack.upstream.served().total(),
        0,
        "a refused proof reached the upstream"
    );
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
    stack
        .wait_for_settled_balance(&other_payer, funds as i64)
        .await
        .unwrap();
    stack.wait_for_settled_balance(MERCHANT, 0).await.unwrap();
    assert!(stack
        .settlement
        .payments_of(&payer)
        .await
        .unwrap()
        .is_empty());

    // The untampered proof still pays: the refusals above burned nothing it needs.
    let good = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
    let answer = stack.send_with_payment("GET", PATH, &good).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_unknown_and_revoked_payers_are_refused() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    // Expired well beyond the allowed clock skew.
    let resource = x402_client::resource_for("GET", &stack.parsed_url(PATH).unwrap()).unwrap();
    let expired = sign_payment(
        &key,
        &stack.requirements(PAID_PRICE),
        &resource,
        &x402_client::random_nonce_hex(),
        unix_now() - 600,
    )
    .unwrap();
    let answer = stack
        .send_with_payment("GET", PATH, &expired)
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.error_code().as_deref()),
        (402, Some("expired")),
        "{}",
        answer.body_text()
    );

    // A key no payer registered.
    let stranger = PayerKey::generate();
    let answer = stack.pay_get(&stranger, PATH).await.unwrap();
    assert_eq!(answer.status.as_u16(), 402);
    assert_eq!(answer.error_code().as_deref(), Some("unknown_key"));

    // A revoked key stops paying from the next request on.
    let (revoked_payer, revoked_key) = stack.new_payer(funds).await.unwrap();
    let before = stack.pay_get(&revoked_key, PATH).await.unwrap();
    assert_eq!(
        before.status.as_u16(),
        200,
        "{}",
        String::from_utf8_lossy(&before.body)
    );
    stack
        .settlement
        .revoke_key(&revoked_key.public_key_hex())
        .await
        .unwrap();
    let after = stack.pay_get(&revoked_key, PATH).await.unwrap();
    assert_eq!(after.status.as_u16(), 402);
    assert_eq!(after.error_code().as_deref(), Some("key_revoked"));

    assert_eq!(
        stack.upstream.served().total(),
        1,
        "only the request paid before revocation was served"
    );
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
    stack
        .wait_for_settled_balance(&revoked_payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payment_headers_are_answered_400() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let good = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();

    let mut wrong_version = good.clone();
    wrong_version.x402_version = 1;
    let mut negative = good.clone();
    negative.accepted.amount = "-10000".into();
    let mut fractional = good.clone();
    fractional.accepted.amount = "10000.5".into();
    let mut bad_key = good.clone();
    bad_key.payload.payer = "zz".repeat(32);

    let cases = [
        ("not base64", "%%% this is not base64 %%%".to_string()),
        (
            "base64 of something that is not JSON",
            STANDARD.encode("definitely { not json"),
        ),
        ("wrong x402Version", encode_header(&wrong_version)),
        ("negative amount", encode_header(&negative)),
        ("fractional amount", encode_header(&fractional)),
        ("payer key not hex", encode_header(&bad_key)),
    ];
    let mut failures = Vec::new();
    for (what, header) in &cases {
        let answer = stack.send_with_header("GET", PATH, header).await.unwrap();
        let body: Option<x402_proto::wire::ErrorBody> = serde_json::from_slice(&answer.body).ok();
        let ok = answer.status == 400
            && body
                .as_ref()
                .is_some_and(|b| b.error == "malformed_payment" && !b.message.is_empty());
        if !ok {
            failures.push(format!(
                "{what}: expected 400 malformed_payment, got {} {}",
                answer.status,
                answer.body_text()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        stack.logs()
    );

    // The alias header is read the same way.
    let alias = stack
        .http
        .get(stack.url(PATH))
        .header(x402_proto::wire::HEADER_PAYMENT_SIGNATURE_ALIAS, "%%%")
        .send()
        .await
        .unwrap();
    assert_eq!(alias.status().as_u16(), 400);

    assert_eq!(stack.upstream.served().total(), 0);
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnormalized_paths_to_a_priced_route_are_not_served_unpaid() {
    let stack = Stack::start_default().await.unwrap();
    // reqwest's URL parser would already clean some of these, so they go out raw.
    for path in [
        "//paid/quote?sym=ABC",
        "/./paid/quote?sym=ABC",
        "/%70aid/quote?sym=ABC",
        "/free/../paid/quote?sym=ABC",
    ] {
        let (status, answer) = get_raw(&stack, path).await;
        assert_eq!(status, 402, "{path}: {answer}\n{}", stack.logs());
    }
    assert_eq!(
        stack.upstream.served().total(),
        0,
        "an unpaid request reached the upstream"
    );
    // The upstream is sent the path the filter priced.
    let (status, answer) = get_raw(&stack, "/paid/../free/x").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(stack.upstream.served().requests(), ["GET /free/x"]);
}

/// Envoy passes escaped slashes, backslashes and `;` parameters on unchanged (unless
/// `path_with_escaped_slashes_action` says otherwise), and some upstreams read them as
/// separators: a path that is free as sent but priced as such an upstream reads it (or
/// the other way round) is refused, never served unpaid. Paths whose readings agree
/// are priced as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_some_upstreams_read_as_a_priced_route_are_refused() {
    let stack = Stack::start_default().await.unwrap();
    for path in [
        "/free%2F..%2Fpaid/quote?sym=ABC",
        "/free%5c..%5cpaid/quote?sym=ABC",
        "/paid%2F..%2Ffree/x",
    ] {
        let (status, answer) = get_raw(&stack, path).await;
        assert_eq!(status, 400, "{path}: {answer}\n{}", stack.logs());
        assert!(answer.contains("\"invalid_request\""), "{path}: {answer}");
    }
    // Envoy's own normalization already reads `..;` as `..` here: priced.
    let (status, answer) = get_raw(&stack, "/free/..;/paid/quote?sym=ABC").await;
    assert_eq!(status, 402, "{answer}");
    for path in ["/paid;v=1/quote?sym=ABC", "/paid/a%2Fb?sym=ABC"] {
        let (status, answer) = get_raw(&stack, path).await;
        assert_eq!(status, 402, "{path}: {answer}");
    }
    assert_eq!(
        stack.upstream.served().total(),
        0,
        "a refused request reached the upstream"
    );
    let (status, answer) = get_raw(&stack, "/free;session=1/x").await;
    assert_eq!(status, 200, "{answer}");
}

/// GETs `path` over HTTP/1.1 exactly as written and returns the answer's status and text.
async fn get_raw(stack: &Stack, path: &str) -> (u16, String) {
    let head = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        stack.envoy.authority()
    );
    stack
        .send_raw(&[&head], std::time::Duration::ZERO)
        .await
        .unwrap()
}
