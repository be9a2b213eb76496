//! Prices change while Envoy runs. An operator (or Istio, for a `WasmPlugin`) pushes a
//! new filter configuration; Envoy builds a new plugin (a new root context in the
//! filter's VM) for the new listener and drains the old one. Here the listener comes
//! from a file Envoy watches (LDS), as from a control plane: new requests are quoted
//! and charged the new price without a restart, and a capture the old configuration
//! still owed when it was torn down is sent by the new one, so the merchant is paid
//! for a response the client saw as paid, exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use x402_e2e::stack::{default_filter_config, Answer, Stack, PAID_PRICE};
use x402_settlement::check::{check_ledger, check_paid_responses, CheckOptions, PaidResponse};

const PATH: &str = "/paid/quote?sym=ABC";
/// Any request without an answer after this is a hang.
const ANSWER_LIMIT: Duration = Duration::from_secs(15);
/// How long Envoy may take to drain and delete the old configuration (drain time 1 s).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// The new price of `/paid`: 0.03 USD.
const NEW_PRICE: u64 = 30_000;

/// The default prices, with exact prices held and captured after the response (not at
/// authorize), so a capture is owed at the end of every paid response.
fn two_phase_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config()).unwrap();
    config["one_phase_exact"] = false.into();
    config.to_string()
}

fn repriced_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&two_phase_config()).unwrap();
    let routes = config["routes"].as_array_mut().unwrap();
    let quote = routes
        .iter_mut()
        .find(|r| r["name"] == "quote")
        .expect("the default config prices /paid as `quote`");
    quote["price"] = "0.03".into();
    config.to_string()
}

fn receipt_of(answer: &x402_client::PaidResponse) -> PaidResponse {
    let receipt = answer
        .receipt
        .clone()
        .expect("a paid 200 carries a receipt");
    PaidResponse::from_receipt(receipt).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_prices_apply_at_once_and_captures_owed_under_the_old_ones_are_sent() {
    let mut stack = Stack::start_with(&two_phase_config(), |o| {
        o.concurrency = 1;
        o.listener_from_file = true;
    })
    .await
    .unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    // A paid request under the old price whose capture is still owed when the
    // configuration goes: settlement stops while the request is upstream, so the
    // capture due at the end of the response waits in the old plugin for a resend.
    let answer = stack
        .pay_then_stop_settlement(&key, "/paid/quote?sym=ABC&delay_ms=2000", ANSWER_LIMIT)
        .await
        .unwrap();
    assert_eq!(answer.status.as_u16(), 200, "{}", stack.logs());
    let old = receipt_of(&answer);
    assert_eq!(old.amount, PAID_PRICE);

    // The new prices. Envoy takes the new listener, drains the old one and deletes its
    // plugin, which owes the capture.
    stack.envoy.reconfigure(&repriced_config()).await.unwrap();
    // A new connection meets the new listener (pooled ones finish on the old one).
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(ANSWER_LIMIT)
        .build()
        .unwrap();
    let unpaid = Answer::read(fresh.get(stack.url(PATH)).send().await.unwrap())
        .await
        .unwrap();
    assert_eq!(unpaid.status, 402, "{}", unpaid.body_text());
    let challenge = unpaid.challenge().expect("a 402 carries the challenge");
    assert_eq!(challenge.accepts[0].amount, NEW_PRICE.to_string());
    if let Err(e) = stack
        .envoy
        .wait_for_log(
            "a replaced configuration left captures or voids to its journal",
            DRAIN_LIMIT,
        )
        .await
    {
        panic!(
            "the old configuration was not deleted: {e}\n{}",
            stack.logs()
        );
    }

    // Settlement is back: the new configuration sends the old one's capture (from its
    // journal) and charges the new price for new requests.
    stack.settlement.restart().await.unwrap();
    let answer = tokio::time::timeout(ANSWER_LIMIT, stack.pay_get(&key, PATH))
        .await
        .expect("the paid request hung")
        .unwrap();
    assert_eq!(answer.status.as_u16(), 200, "{}", stack.logs());
    let new = receipt_of(&answer);
    assert_eq!(new.amount, NEW_PRICE);

    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE - NEW_PRICE) as i64)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let violations = check_paid_responses(&pool, &[old, new], false)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:?}\n{}", stack.logs());
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}
