//! The paid path under failure and load: settlement going away and coming back behind
//! a running Envoy, and many concurrent payments racing for one payer's last funds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use x402_e2e::stack::{default_filter_config, Stack, ASSET, MERCHANT, PAID_PRICE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_down_fails_closed_with_503_and_recovers_without_restarting_envoy() {
    let mut stack = Stack::start_default().await.unwrap();
    let funds = 100_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    stack.settlement.stop();
    let down = stack.pay_get(&key, "/paid/quote").await.unwrap();
    assert_eq!(
        down.status.as_u16(),
        503,
        "{}",
        String::from_utf8_lossy(&down.body)
    );
    let body: x402_proto::wire::ErrorBody =
        serde_json::from_slice(&down.body).expect("a JSON error body");
    assert_eq!(body.error, "settlement_unavailable");
    assert!(down.receipt.is_none());
    assert_eq!(
        stack.upstream.served().total(),
        0,
        "fails closed: nothing reaches the upstream"
    );
    // Challenges need no settlement: unpaid requests are still answered 402.
    assert_eq!(
        stack
            .send_unpaid("GET", "/paid/quote")
            .await
            .unwrap()
            .status,
        402
    );

    stack.settlement.restart().await.unwrap();
    assert!(stack.envoy.exited().is_none());
    // Envoy reconnects to the same address on its own; allow it a bounded while.
    let start = Instant::now();
    let paid = loop {
        let response = stack.pay_get(&key, "/paid/quote").await.unwrap();
        if response.status.as_u16() == 200 || start.elapsed() > Duration::from_secs(30) {
            break response;
        }
        assert_eq!(
            response.status.as_u16(),
            503,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        paid.status.as_u16(),
        200,
        "{}\n{}",
        String::from_utf8_lossy(&paid.body),
        stack.logs()
    );
    assert!(paid.receipt.is_some());
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
    assert_eq!(stack.upstream.served().total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_payments_never_overdraw_a_payer() {
    // A generous callout timeout: this test is about the ledger, not the clock, and a
    // slow machine must not turn a slow authorization into a 503.
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config()).unwrap();
    config["settlement_timeout_ms"] = 20_000.into();
    let stack = Arc::new(Stack::start(&config.to_string()).await.unwrap());
    const AFFORDABLE: u64 = 100;
    const ATTEMPTS: usize = 200;
    let (payer, key) = stack.new_payer(AFFORDABLE * PAID_PRICE).await.unwrap();

    // Watch the balance while the requests race: it must never go below zero.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stack = stack.clone();
        let payer = payer.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut lowest = i64::MAX;
            while !done.load(Ordering::Relaxed) {
                let balance = stack.settlement.balance(&payer, ASSET).await.unwrap();
                lowest = lowest.min(balance.available);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lowest
        })
    };

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..ATTEMPTS {
        let path = format!("/paid/quote?n={i}");
        let proof = stack.signed_proof(&key, "GET", &path, PAID_PRICE).unwrap();
        let stack = stack.clone();
        requests.spawn(async move { stack.send_with_payment("GET", &path, &proof).await });
    }
    let (mut paid, mut refused, mut other) = (0u64, 0u64, Vec::new());
    while let Some(joined) = requests.join_next().await {
        let answer = joined.unwrap().unwrap();
        match (answer.status, answer.error_code()) {
            (200, _) => paid += 1,
            (402, Some(code)) if code == "insufficient_funds" => refused += 1,
            (status, code) => other.push(format!("{status} {code:?}")),
        }
    }
    done.store(true, Ordering::Relaxed);
    let lowest = watcher.await.unwrap();

    assert!(
        other.is_empty(),
        "unexpected answers: {other:?}\n{}",
        stack.logs()
    );
    assert_eq!(paid, AFFORDABLE);
    assert_eq!(refused, ATTEMPTS as u64 - AFFORDABLE);
    assert!(lowest >= 0, "available balance went negative: {lowest}");
    stack.wait_for_settled_balance(&payer, 0).await.unwrap();
    stack
        .wait_for_settled_balance(MERCHANT, (AFFORDABLE * PAID_PRICE) as i64)
        .await
        .unwrap();
    assert_eq!(
        stack.upstream.served().count_path_prefix("/paid/quote"),
        AFFORDABLE as usize
    );
}
