//! Traffic policy end to end: real Envoy with two worker threads (two wasm VMs that
//! must share every counter), real settlement and Postgres. Rate limits and free tiers
//! are exact under 200 concurrent requests; allow-listed callers pass unpaid; routes
//! fail open or closed when settlement is gone; one proof pays at most once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use x402_client::{resource_for, sign_payment};
use x402_e2e::stack::{unix_now, Answer, Stack, ASSET, MERCHANT, NETWORK, PAID_PRICE};

const WORKERS: u32 = 2;
const CONCURRENT: usize = 200;
const RATE_LIMIT: usize = 50;
const FREE_REQUESTS: usize = 30;
const MAX_TIMEOUT_SECONDS: u64 = 60;
const CLOCK_SKEW_SECONDS: u64 = 5;

fn policy_config() -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "settlement_timeout_ms": 2000,
        "network": NETWORK,
        "asset": ASSET,
        "asset_decimals": 6,
        "pay_to": MERCHANT,
        "max_timeout_seconds": MAX_TIMEOUT_SECONDS,
        "clock_skew_seconds": CLOCK_SKEW_SECONDS,
        "routes": [
            // Windows of an hour: no token comes back while the test runs.
            { "name": "limited", "match": { "path_prefix": "/paid/limited" }, "price": "0.01",
              "rate_limit": { "max_requests": RATE_LIMIT, "window_seconds": 3600, "message": "50 an hour" } },
            { "name": "free", "match": { "path_prefix": "/paid/free" }, "price": "0.01",
              "free_tier": { "requests": FREE_REQUESTS, "window_seconds": 3600 } },
            { "name": "partner", "match": { "path_prefix": "/paid/partner" }, "price": "0.01",
              "allow": { "headers": [{ "name": "x-partner-key", "values": ["k-123"] }] } },
            { "name": "open", "match": { "path_prefix": "/paid/open" }, "price": "0.01",
              "failure_mode": "open", "timeout_ms": 1000 },
            { "name": "paid", "match": { "path_prefix": "/paid" }, "price": "0.01" },
            { "name": "flaky", "match": { "path_prefix": "/flaky" }, "price": "0.01" }
        ]
    })
    .to_string()
}

async fn start() -> Stack {
    Stack::start_with(&policy_config(), |o| o.concurrency = WORKERS)
        .await
        .unwrap()
}

/// Sends `CONCURRENT` unpaid GETs of `path` at once.
async fn burst(stack: &Arc<Stack>, path: &str) -> Vec<Answer> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let stack = Arc::clone(stack);
        let path = path.to_owned();
        tasks.spawn(async move { stack.send_unpaid("GET", &path).await.unwrap() });
    }
    let mut answers = Vec::with_capacity(CONCURRENT);
    while let Some(answer) = tasks.join_next().await {
        answers.push(answer.unwrap());
    }
    answers
}

fn by_status(answers: &[Answer]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.status).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_and_free_tiers_are_exact_across_workers_and_allow_lists_pass_unpaid() {
    let stack = Arc::new(start().await);

    // Rate limit: exactly 50 of 200 get past the limit (to their 402), the rest are 429.
    let answers = burst(&stack, "/paid/limited").await;
    let counts = by_status(&answers);
    assert_eq!(
        counts,
        BTreeMap::from([(402, RATE_LIMIT), (429, CONCURRENT - RATE_LIMIT)]),
        "{}",
        stack.logs()
    );
    for limited in answers.iter().filter(|a| a.status == 429) {
        let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
        assert!(retry_after >= 1);
        let json = limited.json().unwrap();
        assert_eq!(json["error"], "rate_limited");
        assert_eq!(json["message"], "50 an hour");
        assert!(limited.header("payment-required").is_none());
    }

    // Free tier: exactly 30 pass free, each told a distinct number left; 170 are asked
    // to pay and told that none is left.
    let answers = burst(&stack, "/paid/free").await;
    let counts = by_status(&answers);
    assert_eq!(
        counts,
        BTreeMap::from([(200, FREE_REQUESTS), (402, CONCURRENT - FREE_REQUESTS)]),
        "{}",
        stack.logs()
    );
    let mut left: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.header("x-402-free-remaining").unwrap().parse().unwrap())
        .collect();
    left.sort_unstable();
    assert_eq!(left, (0..FREE_REQUESTS as u64).collect::<Vec<_>>());
    for charged in answers.iter().filter(|a| a.status == 402) {
        assert_eq!(charged.header("x-402-free-remaining"), Some("0"));
        assert_eq!(charged.error_code().as_deref(), Some("payment_required"));
        // The challenge itself says so, in the body and in PAYMENT-REQUIRED.
        assert_eq!(charged.json().unwrap()["freeRemaining"], 0);
        let challenge: serde_json::Value =
            x402_proto::wire::decode_header(charged.header("payment-required").unwrap()).unwrap();
        assert_eq!(challenge["freeRemaining"], 0);
    }
    assert_eq!(
        stack.upstream.served().count_path_prefix("/paid/free"),
        FREE_REQUESTS
    );
    assert_eq!(
        stack.upstream.served().count_path_prefix("/paid/limited"),
        0
    );

    // Both workers took connections, so the counts above were shared between two VMs.
    let stats = stack
        .http
        .get(format!(
            "http://127.0.0.1:{}/stats?filter=worker_.\\.downstream_cx_total",
            stack.envoy.admin_port()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for worker in ["worker_0", "worker_1"] {
        let accepted: u64 = stats
            .lines()
            .filter(|l| l.starts_with("listener.") && l.contains(worker))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(accepted > 0, "{worker} took no connection:\n{stats}");
    }

    // Allow-list by header: passes unpaid with the right value only.
    let partner = stack
        .http
        .get(stack.url("/paid/partner"))
        .header("x-partner-key", "k-123")
        .send()
        .await
        .unwrap();
    assert_eq!(partner.status().as_u16(), 200);
    assert!(partner.headers().get("payment-response").is_none());
    let stranger = stack
        .http
        .get(stack.url("/paid/partner"))
        .header("x-partner-key", "k-999")
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status().as_u16(), 402);
    assert_eq!(
        stack.upstream.served().count_path_prefix("/paid/partner"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_down_fails_open_or_closed_per_route_and_charges_nothing() {
    let mut stack = start().await;
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    stack.settlement.stop();
    let open = stack.pay_get(&key, "/paid/open/report").await.unwrap();
    assert_eq!(open.status.as_u16(), 200, "{}", stack.logs());
    assert!(open.receipt.is_none(), "nothing was charged, so no receipt");
    let closed = stack.pay_get(&key, "/paid/closed").await.unwrap();
    assert_eq!(closed.status.as_u16(), 503);
    let body: serde_json::Value = serde_json::from_slice(&closed.body).unwrap();
    assert_eq!(body["error"], "settlement_unavailable");
    assert_eq!(stack.upstream.served().count_path_prefix("/paid/open"), 1);
    assert_eq!(stack.upstream.served().count_path_prefix("/paid/closed"), 0);
    // Free tiers and allow-lists need no settlement at all.
    let free = stack.send_unpaid("GET", "/paid/free").await.unwrap();
    assert_eq!(free.status, 200);
    assert_eq!(
        free.header("x-402-free-remaining"),
        Some(&*(FREE_REQUESTS - 1).to_string())
    );
    let partner = stack
        .http
        .get(stack.url("/paid/partner"))
        .header("x-partner-key", "k-123")
        .send()
        .await
        .unwrap();
    assert_eq!(partner.status().as_u16(), 200);
    // Recorded for review: counted (and logged as a warning).
    let stats = stack
        .http
        .get(format!(
            "http://127.0.0.1:{}/stats?filter=x402_requests_failed_open",
            stack.envoy.admin_port()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(stats.contains("x402_requests_failed_open: 1"), "{stats}");

    // Settlement that accepts connections and never answers: each route's timeout
    // ends the wait (open after its own 1 s, closed after the plugin's 2 s).
    let hole = std::net::TcpListener::bind(("127.0.0.1", stack.settlement.port())).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = std::thread::spawn({
        let done = Arc::clone(&done);
        move || {
            let mut connections = Vec::new();
            hole.set_nonblocking(true).unwrap();
            // Bounded: at most a minute even if the test fails before `done`.
            for _ in 0..2400 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if let Ok((c, _)) = hole.accept() {
                    connections.push(c);
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
        }
    });
    let open = stack.pay_get(&key, "/paid/open/slow").await.unwrap();
    assert_eq!(open.status.as_u16(), 200, "{}", stack.logs());
    let closed = stack.pay_get(&key, "/paid/closed/slow").await.unwrap();
    assert_eq!(closed.status.as_u16(), 503);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    held.join().unwrap();

    stack.settlement.restart().await.unwrap();
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_proof_pays_once_and_a_failed_upstream_leaves_the_client_free_to_retry() {
    let stack = Arc::new(start().await);
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    // The same proof twice at once: exactly one proceeds, the other is refused.
    let proof = stack
        .signed_proof(&key, "GET", "/paid/once", PAID_PRICE)
        .unwrap();
    let (a, b) = tokio::join!(
        stack.send_with_payment("GET", "/paid/once", &proof),
        stack.send_with_payment("GET", "/paid/once", &proof)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert!(
        statuses == [200, 402] || statuses == [200, 409],
        "{statuses:?}\n{}",
        stack.logs()
    );
    let refused = if a.status == 200 { &b } else { &a };
    if refused.status == 402 {
        assert_eq!(refused.error_code().as_deref(), Some("nonce_reused"));
    }
    // Replayed later, still refused.
    let replay = stack
        .send_with_payment("GET", "/paid/once", &proof)
        .await
        .unwrap();
    assert_eq!(replay.status, 402);
    assert_eq!(replay.error_code().as_deref(), Some("nonce_reused"));
    assert_eq!(stack.upstream.served().count_path_prefix("/paid/once"), 1);
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();

    // The upstream fails once: the hold is voided; the client signs a new proof for
    // the retry and pays once in total.
    let first = stack
        .signed_proof(&key, "GET", "/flaky/1/x", PAID_PRICE)
        .unwrap();
    let failed = stack
        .send_with_payment("GET", "/flaky/1/x", &first)
        .await
        .unwrap();
    assert_eq!(failed.status, 503);
    let retry = stack
        .signed_proof(&key, "GET", "/flaky/1/x", PAID_PRICE)
        .unwrap();
    let ok = stack
        .send_with_payment("GET", "/flaky/1/x", &retry)
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", stack.logs());
    // Reusing the voided proof is refused: its nonce is spent even though nothing was charged.
    let reuse = stack
        .send_with_payment("GET", "/flaky/1/x", &first)
        .await
        .unwrap();
    assert_eq!(reuse.status, 402);
    stack
        .wait_for_settled_balance(&payer, (funds - 2 * PAID_PRICE) as i64)
        .await
        .unwrap();

    // Proof lifetime: up to maxTimeoutSeconds + clock_skew_seconds ahead is accepted.
    let sign_valid_for = |seconds: u64| {
        let resource = resource_for("GET", &stack.parsed_url("/paid/lifetime").unwrap()).unwrap();
        sign_payment(
            &key,
            &stack.requirements(PAID_PRICE),
            &resource,
            &x402_client::random_nonce_hex(),
            unix_now() + seconds,
        )
        .unwrap()
    };
    let too_long = sign_valid_for(MAX_TIMEOUT_SECONDS + CLOCK_SKEW_SECONDS + 30);
    let refused = stack
        .send_with_payment("GET", "/paid/lifetime", &too_long)
        .await
        .unwrap();
    assert_eq!(refused.status, 402);
    assert_eq!(refused.error_code().as_deref(), Some("validity_too_long"));
    let within = sign_valid_for(MAX_TIMEOUT_SECONDS);
    let accepted = stack
        .send_with_payment("GET", "/paid/lifetime", &within)
        .await
        .unwrap();
    assert_eq!(accepted.status, 200);
    stack
        .wait_for_settled_balance(&payer, (funds - 3 * PAID_PRICE) as i64)
        .await
        .unwrap();
}

/// base64url without padding, as JWTs use it.
fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An EdDSA JWT for `sub` from `issuer`, signed by `key`.
fn jwt(key: &ed25519_dalek::SigningKey, issuer: &str, sub: &str) -> String {
    use ed25519_dalek::Signer;
    let header = b64url(br#"{"alg":"EdDSA","typ":"JWT","kid":"test"}"#);
    let claims = serde_json::json!({ "iss": issuer, "sub": sub, "exp": unix_now() + 600 });
    let payload = b64url(claims.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let signature = b64url(&key.sign(signed.as_bytes()).to_bytes());
    format!("{signed}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_jwt_claim_in_metadata_passes_unpaid_as_with_istio() {
    // Envoy's jwt_authn configured the way Istio's RequestAuthentication does it: the
    // verified payload goes to dynamic metadata under the issuer; no token is allowed
    // (and charged), a bad token is refused.
    const ISSUER: &str = "https://auth.test";
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let jwks = serde_json::json!({ "keys": [{
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "test",
        "x": b64url(key.verifying_key().as_bytes())
    }]});
    let jwt_authn = serde_json::json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": { "partners": {
                "issuer": ISSUER,
                "local_jwks": { "inline_string": jwks.to_string() },
                "payload_in_metadata": ISSUER
            }},
            "rules": [{ "match": { "prefix": "/" }, "requires": { "requires_any": { "requirements": [
                { "provider_name": "partners" }, { "allow_missing": {} }
            ]}}}]
        }
    });
    let config = serde_json::json!({
        "settlement_cluster": "settlement",
        "network": NETWORK, "asset": ASSET, "pay_to": MERCHANT,
        "routes": [{ "name": "paid", "match": { "path_prefix": "/paid" }, "price": "0.01",
            "allow": { "metadata": [{ "filter": "envoy.filters.http.jwt_authn",
                "path": [ISSUER, "sub"], "values": ["partner-1"] }] } }]
    })
    .to_string();
    let stack = Stack::start_with(&config, |o| {
        o.concurrency = WORKERS;
        o.filters_before_x402 = vec![jwt_authn];
    })
    .await
    .unwrap();
    let get = |token: Option<String>| {
        let mut request = stack.http.get(stack.url("/paid/report"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        get(Some(jwt(&key, ISSUER, "partner-1"))).await,
        200,
        "{}",
        stack.logs()
    );
    // Another subject, no token: the price applies.
    assert_eq!(get(Some(jwt(&key, ISSUER, "someone-else"))).await, 402);
    assert_eq!(get(None).await, 402);
    // A token signed by another key never reaches the filter.
    let forged = jwt(
        &ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]),
        ISSUER,
        "partner-1",
    );
    assert_eq!(get(Some(forged)).await, 401);
    assert_eq!(stack.upstream.served().count_path_prefix("/paid/report"), 1);
}
