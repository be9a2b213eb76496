//! The paid path end to end: real Envoy with the filter, real settlement on real
//! PostgreSQL, a real upstream. Challenge, payment, receipt, capture, void, refusal of
//! replays and of unfunded payers, and the operator CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use x402_client::{sign_payment, PayerKey};
use x402_e2e::settlement::Settlement;
use x402_e2e::stack::{fresh_database, Stack, ASSET, MERCHANT, NAMED_PRICE, NETWORK, PAID_PRICE};
use x402_proto::wire::{decode_header, encode_header, PaymentRequired, HEADER_PAYMENT_REQUIRED};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_requests_get_a_challenge_and_never_reach_the_upstream() {
    let stack = Stack::start_default().await.unwrap();

    let answer = stack
        .send_unpaid("GET", "/paid/quote?sym=ABC")
        .await
        .unwrap();
    assert_eq!(answer.status, 402, "{}", answer.body_text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let challenge = answer
        .challenge()
        .expect("the client library parses the challenge");
    assert_eq!(challenge.x402_version, 2);
    assert_eq!(challenge.error.as_deref(), Some("payment_required"));
    assert!(
        challenge
            .resource
            .url
            .starts_with(&format!("http://{}/paid/quote", stack.envoy.authority())),
        "{:?}",
        challenge.resource
    );
    assert_eq!(challenge.price.as_deref(), Some("0.01"));
    assert_eq!(challenge.payment_address.as_deref(), Some(MERCHANT));
    let offer = challenge.accepts.first().expect("one offer");
    assert_eq!(offer.scheme, "exact");
    assert_eq!(offer.network, NETWORK);
    assert_eq!(offer.amount, PAID_PRICE.to_string());
    assert_eq!(offer.asset, ASSET);
    assert_eq!(offer.pay_to, MERCHANT);
    assert_eq!(offer.max_timeout_seconds, 60);
    assert_eq!(offer.extra.get("decimals"), Some(&serde_json::json!(6)));
    assert_eq!(offer.extra.get("name"), Some(&serde_json::json!("USD")));
    // The header and the body carry the same challenge.
    let from_header: PaymentRequired =
        decode_header(answer.header(HEADER_PAYMENT_REQUIRED).unwrap()).unwrap();
    let from_body: PaymentRequired = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(from_header, from_body);

    // A route matched by Envoy route name has its own price.
    let named = stack.send_unpaid("GET", "/named/thing").await.unwrap();
    assert_eq!(named.status, 402, "{}", named.body_text());
    assert_eq!(
        named.challenge().unwrap().accepts[0].amount,
        NAMED_PRICE.to_string()
    );

    assert_eq!(
        stack.upstream.served().total(),
        0,
        "an unpaid request reached the upstream"
    );

    // An unpriced route passes untouched.
    let free = stack
        .send_unpaid("GET", "/free/weather?city=Oslo")
        .await
        .unwrap();
    assert_eq!(free.status, 200, "{}", free.body_text());
    assert!(free.header(HEADER_PAYMENT_REQUIRED).is_none());
    assert_eq!(free.json().unwrap()["query"], "city=Oslo");
    assert_eq!(
        stack.upstream.served().requests(),
        vec!["GET /free/weather?city=Oslo".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_request_is_served_with_a_receipt_and_charged_exactly_the_price() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    let response = stack.pay_get(&key, "/paid/quote?sym=ABC").await.unwrap();
    assert_eq!(
        response.status.as_u16(),
        200,
        "{}\n{}",
        String::from_utf8_lossy(&response.body),
        stack.logs()
    );
    let receipt = response.receipt.clone().expect("payment-response receipt");
    assert!(receipt.success);
    assert!(!receipt.transaction.is_empty());
    assert_eq!(receipt.network, NETWORK);
    assert_eq!(receipt.payer, key.public_key_hex());
    assert_eq!(receipt.amount, PAID_PRICE.to_string());
    // The upstream saw the request, without the payment header.
    let echo: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(echo["path"], "/paid/quote");
    assert_eq!(echo["payment_header_seen"], false);
    assert_eq!(stack.upstream.served().count_path_prefix("/paid/quote"), 1);

    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
    stack
        .wait_for_settled_balance(MERCHANT, PAID_PRICE as i64)
        .await
        .unwrap();
    let payment = stack
        .settlement
        .payment(&receipt.transaction)
        .await
        .unwrap();
    assert_eq!(payment.status, "captured");
    assert_eq!(payment.captured, PAID_PRICE);
    assert_eq!(payment.payer_account, payer);
    assert_eq!(payment.merchant_account, MERCHANT);

    // A second request is a second, separate payment.
    let again = stack.pay_get(&key, "/paid/quote?sym=XYZ").await.unwrap();
    assert_eq!(again.status.as_u16(), 200);
    assert_ne!(again.receipt.unwrap().transaction, receipt.transaction);
    stack
        .wait_for_settled_balance(&payer, (funds - 2 * PAID_PRICE) as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfunded_payer_is_refused_and_nothing_is_charged() {
    let stack = Stack::start_default().await.unwrap();
    let funds = PAID_PRICE - 1;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    let response = stack.pay_get(&key, "/paid/quote").await.unwrap();
    assert_eq!(
        response.status.as_u16(),
        402,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error_code().as_deref(), Some("insufficient_funds"));
    assert!(response.receipt.is_none());
    // A refusal still carries a fresh challenge to pay with.
    assert_eq!(
        response.challenge().unwrap().accepts[0].amount,
        PAID_PRICE.to_string()
    );
    assert_eq!(stack.upstream.served().total(), 0);
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_proof_is_refused_and_charged_once() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let proof = stack
        .signed_proof(&key, "GET", "/paid/quote", PAID_PRICE)
        .unwrap();

    let first = stack
        .send_with_payment("GET", "/paid/quote", &proof)
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{}\n{}", first.body_text(), stack.logs());
    let second = stack
        .send_with_payment("GET", "/paid/quote", &proof)
        .await
        .unwrap();
    assert_eq!(second.status, 402, "{}", second.body_text());
    assert_eq!(second.error_code().as_deref(), Some("nonce_reused"));

    assert_eq!(stack.upstream.served().total(), 1);
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
    assert_eq!(stack.settlement.payments_of(&payer).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failure_refunds_the_payment_and_a_client_error_is_still_charged() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    let failed = stack.pay_get(&key, "/status/500").await.unwrap();
    assert_eq!(
        failed.status.as_u16(),
        500,
        "{}",
        String::from_utf8_lossy(&failed.body)
    );
    assert_eq!(stack.upstream.served().count_path_prefix("/status/500"), 1);
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
    // An exact price is captured as it is authorized (`one_phase_exact`), so the
    // failure's Void refunds it in full.
    let payments = stack.settlement.payments_of(&payer).await.unwrap();
    assert_eq!(payments.len(), 1);
    assert_eq!(
        (
            payments[0].status.as_str(),
            payments[0].captured,
            payments[0].refunded
        ),
        ("captured", PAID_PRICE, PAID_PRICE)
    );

    // Below capture_below_status (500) the answer is paid for, even a 404.
    let not_found = stack.pay_get(&key, "/status/404").await.unwrap();
    assert_eq!(not_found.status.as_u16(), 404);
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
    stack
        .wait_for_settled_balance(MERCHANT, PAID_PRICE as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_x402_cli_pays_through_envoy() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let dir = x402_e2e::process::ScratchDir::new("cli-key").unwrap();
    let key_file = dir.path().join("payer.key");
    key.save(&key_file).unwrap();

    let out = tokio::process::Command::new(x402_e2e::paths::client_bin().unwrap())
        .arg("pay")
        .arg("--key")
        .arg(&key_file)
        .arg(stack.url("/paid/quote?sym=CLI"))
        .env_remove("X402_PAYER_KEY")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "x402 pay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["quote"]["symbol"], "CLI");
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();

    // Over the --max budget nothing is signed and nothing is charged.
    let out = tokio::process::Command::new(x402_e2e::paths::client_bin().unwrap())
        .args(["pay", "--max", "1", "--key"])
        .arg(&key_file)
        .arg(stack.url("/paid/quote"))
        .env_remove("X402_PAYER_KEY")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stack.upstream.served().total(), 1);
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
}

/// The published vectors: this client signs each vector's payload byte for byte.
#[test]
fn the_client_signs_the_published_vectors_identically() {
    let vectors = x402_proto::vectors::vectors().unwrap();
    assert!(vectors.len() >= 5);
    for v in vectors {
        let key = PayerKey::from_hex_seed(&v.seed).unwrap();
        assert_eq!(key.public_key_hex(), v.public_key, "{}", v.name);
        let valid_before: u64 = v.payload.payload.valid_before.parse().unwrap();
        let signed = sign_payment(
            &key,
            &v.payload.accepted,
            &v.payload.payload.resource,
            &v.payload.payload.nonce,
            valid_before,
        )
        .unwrap();
        assert_eq!(signed, v.payload, "{}", v.name);
        assert_eq!(encode_header(&signed), v.header, "{}", v.name);
        assert_eq!(
            String::from_utf8(signed.signed_fields().canonical_bytes().unwrap()).unwrap(),
            v.canonical,
            "{}",
            v.name
        );
    }
}

/// True when `value` holds `n` anywhere, as a JSON number or a decimal string.
fn mentions_amount(value: &serde_json::Value, n: u64) -> bool {
    match value {
        serde_json::Value::Number(x) => {
            x.as_u64() == Some(n) || x.as_i64() == i64::try_from(n).ok()
        }
        serde_json::Value::String(s) => s == &n.to_string(),
        serde_json::Value::Array(items) => items.iter().any(|v| mentions_amount(v, n)),
        serde_json::Value::Object(map) => map.values().any(|v| mentions_amount(v, n)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_creates_funds_and_reports_accounts() {
    let database_url = fresh_database().unwrap();
    let settlement = Settlement::start(&database_url).await.unwrap();
    let key = PayerKey::generate();
    let pubkey = key.public_key_hex();

    let run = |args: &[&str]| {
        let out = settlement.cli(args).unwrap();
        assert!(
            out.status.success(),
            "x402-settlement {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "--json output of {args:?} is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        json
    };
    let created = run(&[
        "account",
        "create",
        "--id",
        "cli-payer",
        "--kind",
        "payer",
        "--json",
    ]);
    assert!(created.to_string().contains("cli-payer"), "{created}");
    let added = run(&[
        "key",
        "add",
        "--account",
        "cli-payer",
        "--public-key",
        &pubkey,
        "--json",
    ]);
    assert!(added.to_string().contains(&pubkey), "{added}");
    let deposited = run(&[
        "deposit",
        "--account",
        "cli-payer",
        "--asset",
        ASSET,
        "--amount",
        "5000",
        "--json",
    ]);
    assert!(mentions_amount(&deposited, 5000), "{deposited}");
    let balance = run(&[
        "balance",
        "--account",
        "cli-payer",
        "--asset",
        ASSET,
        "--json",
    ]);
    assert!(mentions_amount(&balance, 5000), "{balance}");

    // What the CLI did is what the service holds.
    let held = settlement.balance("cli-payer", ASSET).await.unwrap();
    assert_eq!(held.available, 5000);
    assert_eq!(held.credits_posted, 5000);

    // Errors are reported with a non-zero exit code.
    let missing = settlement
        .cli(&[
            "balance",
            "--account",
            "no-such-account",
            "--asset",
            ASSET,
            "--json",
        ])
        .unwrap();
    assert!(!missing.status.success());
    let bad_kind = settlement
        .cli(&["account", "create", "--id", "x", "--kind", "wizard"])
        .unwrap();
    assert!(!bad_kind.status.success());
}
