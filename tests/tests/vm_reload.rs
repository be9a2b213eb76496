//! The filter VM crashes and Envoy's `failure_policy: FAIL_RELOAD` brings it back: the
//! test-only `debug_crash_on_header` switch makes the VM trap on a request carrying
//! that header. The crashing request gets a non-2xx answer in bounded time, the
//! paywall never opens (unpaid requests during and after the reload are refused),
//! paid requests work again without restarting Envoy, the payer is charged exactly
//! the successful paid requests, a proof sent with the crashing request is not
//! consumed, and the ledger invariant checker finds nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use x402_e2e::stack::{default_filter_config, Stack, PAID_PRICE};
use x402_proto::wire::{encode_header, HEADER_PAYMENT_SIGNATURE};
use x402_settlement::check::{check_ledger, check_paid_responses, CheckOptions, PaidResponse};

const CRASH_HEADER: &str = "x-debug-crash";
const PATH: &str = "/paid/quote?sym=ABC";
/// Any request without an answer after this is a hang.
const ANSWER_LIMIT: Duration = Duration::from_secs(15);
/// How long the VM may take to come back after the crash.
const RELOAD_LIMIT: Duration = Duration::from_secs(30);

fn crashing_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config()).unwrap();
    config["debug_crash_on_header"] = CRASH_HEADER.into();
    config.to_string()
}

/// Sends GET `PATH` with `headers`; `Ok(status)`, or `Err` when the connection was
/// refused or reset instead of answered. Panics if nothing came within the limit.
async fn send(stack: &Stack, headers: &[(&str, String)]) -> Result<u16, String> {
    let mut request = stack.http.get(stack.url(PATH));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let started = Instant::now();
    match tokio::time::timeout(ANSWER_LIMIT, request.send()).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            // Read the body too: the answer is complete, not just its headers.
            let _ = tokio::time::timeout(ANSWER_LIMIT, response.bytes()).await;
            Ok(status)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => panic!(
            "no answer within {ANSWER_LIMIT:?} (sent {:?} ago)\n{}",
            started.elapsed(),
            stack.logs()
        ),
    }
}

/// Pays for `PATH` once; the receipt when the answer was a paid 200.
async fn paid_once(stack: &Stack, key: &x402_client::PayerKey) -> Option<PaidResponse> {
    let answer = tokio::time::timeout(ANSWER_LIMIT, stack.pay_get(key, PATH))
        .await
        .unwrap_or_else(|_| panic!("paid request hung\n{}", stack.logs()));
    let answer = answer.ok()?;
    if answer.status.as_u16() != 200 {
        // A failed request must not have been charged.
        assert!(answer.paid.is_none(), "{:?}", answer.status);
        return None;
    }
    let receipt = answer.receipt.expect("a paid 200 carries a receipt");
    Some(PaidResponse::from_receipt(receipt).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_is_reloaded_and_nothing_is_charged_twice_or_lost() {
    let stack = Stack::start(&crashing_config()).await.unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let mut paid: Vec<PaidResponse> = Vec::new();

    // Before the crash: the paywall and the paid path work.
    assert_eq!(send(&stack, &[]).await, Ok(402), "{}", stack.logs());
    paid.push(
        paid_once(&stack, &key)
            .await
            .unwrap_or_else(|| panic!("paid request failed\n{}", stack.logs())),
    );

    // The crash, with a valid proof on it, and an unpaid request at the same time.
    let proof = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
    let crash_headers = [
        (CRASH_HEADER, "1".to_owned()),
        (HEADER_PAYMENT_SIGNATURE, encode_header(&proof)),
    ];
    let (crashed, unpaid_during) = tokio::join!(send(&stack, &crash_headers), send(&stack, &[]));
    eprintln!("crashing request: {crashed:?}; unpaid request beside it: {unpaid_during:?}");
    if let Ok(status) = crashed {
        assert!(
            !(200..300).contains(&status),
            "the crashing request was let through: {status}"
        );
    }
    if let Ok(status) = unpaid_during {
        assert!(
            !(200..300).contains(&status),
            "an unpaid request got through during the crash: {status}"
        );
    }

    // After the reload: unpaid requests are challenged again (never let through while
    // the VM comes back), and paid requests succeed, without restarting Envoy.
    let started = Instant::now();
    let mut unpaid_statuses = Vec::new();
    loop {
        let status = send(&stack, &[]).await;
        unpaid_statuses.push(status.clone());
        if let Ok(s) = status {
            assert!(
                !(200..300).contains(&s),
                "an unpaid request got through after the crash: {unpaid_statuses:?}"
            );
        }
        if status == Ok(402) {
            break;
        }
        assert!(
            started.elapsed() < RELOAD_LIMIT,
            "the filter did not come back: {unpaid_statuses:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut attempts = 0;
    let after = loop {
        attempts += 1;
        if let Some(receipt) = paid_once(&stack, &key).await {
            break receipt;
        }
        assert!(
            started.elapsed() < RELOAD_LIMIT,
            "paid requests did not work again after {attempts} attempts\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    paid.push(after);
    eprintln!(
        "reloaded: unpaid answers {unpaid_statuses:?}, paid after {attempts} attempt(s), {:?} after the crash",
        started.elapsed()
    );

    // The proof the crashed VM saw was never held: it pays, once, now.
    let reused = tokio::time::timeout(ANSWER_LIMIT, stack.send_with_payment("GET", PATH, &proof))
        .await
        .unwrap_or_else(|_| panic!("reused proof hung\n{}", stack.logs()))
        .unwrap();
    assert_eq!(
        reused.status,
        200,
        "{}\n{}",
        reused.body_text(),
        stack.logs()
    );
    let receipt = x402_client::parse_receipt(&reused.headers).expect("a receipt");
    paid.push(PaidResponse::from_receipt(receipt).unwrap());

    // Exactly the successful paid requests are charged, each once.
    stack
        .wait_for_settled_balance(&payer, (funds - paid.len() as u64 * PAID_PRICE) as i64)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    let violations = check_paid_responses(&pool, &paid, false).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
}

/// Crashes the VM, which owes a call that failed while settlement was down, brings
/// settlement back, and waits (bounded) until a reloaded VM answers again.
async fn crash_then_reload(stack: &mut Stack) {
    let crashed = send(stack, &[(CRASH_HEADER, "1".to_owned())]).await;
    if let Ok(status) = crashed {
        assert!(!(200..300).contains(&status), "let through: {status}");
    }
    stack.settlement.restart().await.unwrap();
    // Traffic brings the VM back (Envoy reloads it on the next request).
    wait_for_reload(stack).await;
}

/// A capture the crashed VM still owed is sent by the VM that replaces it. Settlement
/// is killed while a paid request is upstream, so its capture, due when the response
/// has gone to the client with its receipt, waits in the VM for a resend; the VM then
/// crashes. The new VM finds the old one's journal in Envoy's shared data and sends
/// the capture once settlement is back: the merchant is paid for the response the
/// client saw as paid, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_the_crashed_vm_still_owed_is_sent_by_the_next_one() {
    // Exact prices held and captured after the response, not at authorize, so the
    // paid response leaves a capture owed.
    let mut config: serde_json::Value = serde_json::from_str(&crashing_config()).unwrap();
    config["one_phase_exact"] = false.into();
    // One worker, so the crash hits the VM that owes the capture.
    let mut stack = Stack::start_with(&config.to_string(), |o| o.concurrency = 1)
        .await
        .unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    // Settlement goes away while the request is upstream.
    let answer = stack
        .pay_then_stop_settlement(&key, "/paid/quote?sym=ABC&delay_ms=2000", ANSWER_LIMIT)
        .await
        .unwrap();
    assert_eq!(answer.status.as_u16(), 200, "{}", stack.logs());
    let receipt = answer.receipt.expect("a paid 200 carries a receipt");
    let paid = PaidResponse::from_receipt(receipt).unwrap();

    // The capture failed (settlement is down) and waits for its resend.
    crash_then_reload(&mut stack).await;

    // Captured once, for the receipt's amount; the payer is charged exactly that.
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let violations = check_paid_responses(&pool, &[paid], false).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}\n{}", stack.logs());
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}

/// A payment captured at authorize (an exact price, the default) whose upstream fails is
/// refunded by a Void. Settlement is killed while such a request is upstream, so its
/// Void, due when the 503 has gone to the client, waits in the VM for a resend; the VM
/// then crashes. The new VM finds the Void in the old one's journal and sends it once
/// settlement is back: the payer gets back what it paid for the failed response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_the_crashed_vm_still_owed_is_sent_by_the_next_one() {
    let mut stack = Stack::start_with(&crashing_config(), |o| o.concurrency = 1)
        .await
        .unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let answer = stack
        .pay_then_stop_settlement(&key, "/status/503?delay_ms=2000", ANSWER_LIMIT)
        .await
        .unwrap();
    assert_eq!(answer.status.as_u16(), 503, "{}", stack.logs());

    // The refund failed (settlement is down) and waits for its resend.
    crash_then_reload(&mut stack).await;

    // Charged at authorize, refunded in full: the payer has all its funds back.
    refunded_in_full(&stack, &payer, funds).await;
}

/// A payment captured as it was placed whose answer the VM never had: settlement placed
/// it, its answer was held on the way back, and the VM crashed with the call in flight.
/// Envoy never lets that request through; the VM that takes over the crashed one's
/// journal sends the item again, learns the payment and refunds it: the payer is
/// charged nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_placed_for_a_crashed_vm_is_refunded_by_the_next_one() {
    let mut config: serde_json::Value = serde_json::from_str(&crashing_config()).unwrap();
    // Long enough that the call is still in flight when the VM crashes.
    config["settlement_timeout_ms"] = 20_000.into();
    // One worker, so the crash hits the VM that waits for the answer.
    let (stack, proxy) = Stack::start_stallable(&config.to_string(), |o| o.concurrency = 1)
        .await
        .unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();

    proxy.stall_answers(true);
    let paying = async {
        // Paused by the crashed VM, the request ends with Envoy's request timeout.
        tokio::time::timeout(Duration::from_secs(40), stack.pay_get(&key, PATH))
            .await
            .unwrap_or_else(|_| panic!("paid request hung\n{}", stack.logs()))
    };
    let crashing = async {
        let started = Instant::now();
        while stack
            .settlement
            .payments_of(&payer)
            .await
            .unwrap()
            .is_empty()
        {
            assert!(started.elapsed() < ANSWER_LIMIT, "{}", stack.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Placed and captured: the payer is charged, and its answer is held.
        assert_eq!(
            stack.balance(&payer).await.unwrap(),
            (funds - PAID_PRICE) as i64
        );
        let crashed = send(&stack, &[(CRASH_HEADER, "1".to_owned())]).await;
        proxy.stall_answers(false);
        crashed
    };
    let (paid, crashed) = tokio::join!(paying, crashing);
    neither_served(paid, crashed);

    // Traffic brings the VM back; it takes over the journal and refunds the payment.
    wait_for_reload(&stack).await;
    refunded_in_full(&stack, &payer, funds).await;
}

/// The crashing request and the paid one it took down with the VM: neither got a
/// success, nor a receipt.
fn neither_served(paid: anyhow::Result<x402_client::PaidResponse>, crashed: Result<u16, String>) {
    if let Ok(status) = crashed {
        assert!(!(200..300).contains(&status), "let through: {status}");
    }
    match paid {
        Ok(answer) => {
            assert!(!answer.status.is_success(), "{}", answer.status);
            assert!(answer.receipt.is_none());
        }
        Err(e) => eprintln!("paid request ended without an answer: {e}"),
    }
}

/// Sends unpaid requests until a reloaded VM answers 402 again (bounded).
async fn wait_for_reload(stack: &Stack) {
    let reloaded = Instant::now();
    while send(stack, &[]).await != Ok(402) {
        assert!(reloaded.elapsed() < RELOAD_LIMIT, "{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until `payer` has all its `funds` back by one refund, and checks
/// the ledger.
async fn refunded_in_full(stack: &Stack, payer: &str, funds: u64) {
    stack
        .wait_for_settled_balance(payer, funds as i64)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let refunds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transfers WHERE kind = 'refund' AND credit_account = $1",
    )
    .bind(payer)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(refunds, 1);
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}

/// A payment captured at authorize whose request is upstream when the VM crashes:
/// Envoy answers the client 503 (the VM is gone), so the payment is refunded by the VM
/// that takes over the crashed one's journal, as the filter refunds a failed response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_request_was_upstream_when_the_vm_crashed_is_refunded() {
    let stack = Stack::start_with(&crashing_config(), |o| o.concurrency = 1)
        .await
        .unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let before = stack.upstream.served().count_path_prefix("/paid/quote");
    let paying = async {
        let path = "/paid/quote?sym=ABC&delay_ms=2000";
        tokio::time::timeout(ANSWER_LIMIT, stack.pay_get(&key, path))
            .await
            .unwrap_or_else(|_| panic!("paid request hung\n{}", stack.logs()))
    };
    let crashing = async {
        let started = Instant::now();
        while stack.upstream.served().count_path_prefix("/paid/quote") == before {
            assert!(started.elapsed() < ANSWER_LIMIT, "{}", stack.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            stack.balance(&payer).await.unwrap(),
            (funds - PAID_PRICE) as i64
        );
        send(&stack, &[(CRASH_HEADER, "1".to_owned())]).await
    };
    let (paid, crashed) = tokio::join!(paying, crashing);
    neither_served(paid, crashed);
    wait_for_reload(&stack).await;
    refunded_in_full(&stack, &payer, funds).await;
}
