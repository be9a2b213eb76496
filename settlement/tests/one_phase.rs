//! Exact prices captured as their holds are placed (`AuthorizeItem.capture`) against a
//! real PostgreSQL: one write posts the payment, its fee and its refund cap; a Void
//! refunds it once; a later fee applies; items that run alone fall back to a hold; and
//! the ledger checker finds nothing wrong after any of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use x402_proto::settlement::v1::*;
use x402_settlement::check::{check_paid_responses, PaidResponse};

fn captured(item: AuthorizeItem) -> AuthorizeItem {
    AuthorizeItem {
        capture: true,
        ..item
    }
}

async fn open_holds(h: &Harness, tx: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM open_holds WHERE hold_id = $1")
        .bind(tx)
        .fetch_one(&h.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_payment_captured_at_authorize_posts_once_and_a_void_refunds_it_once() {
    let h = start().await;
    h.merchant_with_fee(MERCHANT, 250).await;
    let p = h.payer("dee", 10_000).await;
    // One call, two items: one captured as it is held, one held as before.
    let results = h
        .data
        .clone()
        .authorize(AuthorizeRequest {
            items: vec![captured(paid(&p, "dee-1", 4_000)), paid(&p, "dee-2", 1_000)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let (debit, hold) = (&results[0], &results[1]);
    assert_eq!(
        outcome(debit),
        AuthorizeOutcome::Authorized,
        "{}",
        debit.message
    );
    assert_eq!(
        outcome(hold),
        AuthorizeOutcome::Authorized,
        "{}",
        hold.message
    );
    assert!(debit.captured);
    assert!(!hold.captured);
    assert_eq!(debit.held_amount, 4_000);
    assert_eq!(open_holds(&h, &debit.transaction_id).await, 0);
    assert_eq!(open_holds(&h, &hold.transaction_id).await, 1);

    let payer = h.balance("dee").await;
    assert_eq!(
        (payer.debits_posted, payer.debits_pending, payer.available),
        (4_000, 1_000, 5_000)
    );
    let merchant = h.balance(MERCHANT).await;
    // 2.5 % of 4 000 goes to the platform.
    assert_eq!(
        (
            merchant.credits_posted,
            merchant.debits_posted,
            merchant.credits_pending
        ),
        (4_000, 100, 1_000)
    );
    assert_eq!(h.balance_of("system:platform").await.credits_posted, 100);
    let payment = h.payment(&debit.transaction_id).await;
    assert_eq!(
        (payment.status.as_str(), payment.captured, payment.fee),
        ("captured", 4_000, 100)
    );
    h.assert_clean().await;
    let receipt = [PaidResponse {
        transaction: debit.transaction_id.clone(),
        amount: 4_000,
    }];
    let receipted = || check_paid_responses(&h.pool, &receipt, false);
    assert!(
        receipted().await.unwrap().is_empty(),
        "a paid response, captured once"
    );

    // A capture of it (a replayed answer, say) posts nothing more.
    let again = h.capture(&debit.transaction_id, 4_000).await;
    assert_eq!(resolved(&again), ResolveOutcome::Captured);
    assert_eq!(h.balance("dee").await.debits_posted, 4_000);

    // The upstream failed: the Void refunds all of it, fee included.
    let void = h.void(&debit.transaction_id).await;
    assert_eq!(resolved(&void), ResolveOutcome::Voided, "{}", void.message);
    assert_eq!(void.amount, 4_000);
    let refunded = || async {
        (
            h.balance("dee").await.available,
            h.balance(MERCHANT).await.posted,
            h.balance_of("system:platform").await.posted,
        )
    };
    assert_eq!(refunded().await, (9_000, 0, 0), "only dee-2's hold is left");
    assert_eq!(h.payment(&debit.transaction_id).await.refunded, 4_000);
    // Had the response been paid for, the refund would be a violation.
    assert_eq!(receipted().await.unwrap().len(), 1);
    // Sent again, it moves nothing.
    let twice = h.void(&debit.transaction_id).await;
    assert_eq!(resolved(&twice), ResolveOutcome::Voided);
    assert_eq!(refunded().await, (9_000, 0, 0));
    // The hold of the other item still captures as before.
    let c = h.capture(&hold.transaction_id, 600).await;
    assert_eq!(resolved(&c), ResolveOutcome::Captured);
    assert_eq!(h.balance("dee").await.available, 9_400);
    h.assert_clean().await;
}

#[tokio::test]
async fn a_payment_captured_at_authorize_pays_the_merchants_fee_of_the_moment() {
    let h = start().await;
    h.merchant_with_fee(MERCHANT, 100).await;
    let p = h.payer("fay", 100_000).await;
    let first = h.authorize(captured(paid(&p, "fay-1", 10_000))).await;
    assert!(first.captured, "{}", first.message);
    assert_eq!(h.payment(&first.transaction_id).await.fee, 100);
    // The payer's key and the merchant's fee are now known, so the next group writes
    // without reading; the fee changed meanwhile, and the write notices.
    sqlx::query("UPDATE accounts SET fee_bps = 500 WHERE id = $1")
        .bind(MERCHANT)
        .execute(&h.pool)
        .await
        .unwrap();
    let second = h.authorize(captured(paid(&p, "fay-2", 10_000))).await;
    assert!(second.captured, "{}", second.message);
    assert_eq!(h.payment(&second.transaction_id).await.fee, 500);
    assert_eq!(h.balance_of("system:platform").await.credits_posted, 600);
    // And the next one, with the new fee remembered, too.
    let third = h.authorize(captured(paid(&p, "fay-3", 10_000))).await;
    assert_eq!(h.payment(&third.transaction_id).await.fee, 500);
    h.assert_clean().await;
}

#[tokio::test]
async fn only_exact_proofs_in_a_group_are_captured_the_rest_are_held() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("gus", 100_000).await;
    // Volume tiers are quoted on settlement's one-item path: held, not captured.
    let mut tiered = captured(paid(&p, "gus-1", 2_000));
    tiered.volume_tiers = vec![
        VolumeTier {
            from_requests: 0,
            price: 2_000,
        },
        VolumeTier {
            from_requests: 10,
            price: 1_000,
        },
    ];
    let r = h.authorize(tiered).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::Authorized, "{}", r.message);
    assert!(!r.captured);
    assert_eq!(open_holds(&h, &r.transaction_id).await, 1);
    // An `upto` proof is never captured at authorize, whatever the item asks.
    let mut t = terms(3_000, "gus-upto");
    t.scheme = "upto".into();
    let r = h
        .authorize(captured(item("gus-2", signed_proof(&p, &t), 3_000)))
        .await;
    assert_eq!(outcome(&r), AuthorizeOutcome::Authorized, "{}", r.message);
    assert!(!r.captured);
    assert_eq!(h.payment(&r.transaction_id).await.status, "held");
    assert_eq!(h.balance("gus").await.debits_pending, 5_000);
    h.assert_clean().await;
}

#[tokio::test]
async fn a_refused_item_captures_nothing() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("hal", 1_000).await;
    let r = h.authorize(captured(paid(&p, "hal-1", 2_000))).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::InsufficientFunds);
    assert!(!r.captured);
    let ok = h.authorize(captured(paid(&p, "hal-2", 1_000))).await;
    assert!(ok.captured);
    // Its nonce is spent: the same proof again is refused, and charges nothing.
    let t = terms(1_000, "hal-hal-2");
    let again = h
        .authorize(captured(item("hal-3", signed_proof(&p, &t), 1_000)))
        .await;
    assert_eq!(outcome(&again), AuthorizeOutcome::NonceReused);
    let b = h.balance("hal").await;
    assert_eq!((b.debits_posted, b.available), (1_000, 0));
    h.assert_clean().await;
}

/// A payment captured as it is authorized is one analytics event that counts as a paid
/// request and a capture, and `Watch` still announces its authorization and then its
/// capture; the recorder adds nothing for it (a refusal in the same call still counts).
#[tokio::test]
async fn a_payment_captured_at_authorize_counts_and_announces_once() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("ann", 10_000).await;
    // Every analytics event written, whoever writes it.
    for statement in [
        "CREATE TABLE events_written (event text NOT NULL)",
        "CREATE FUNCTION log_event() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO events_written VALUES (NEW.event); RETURN NEW; END $$",
        "CREATE TRIGGER log_event AFTER INSERT ON analytics_pending \
         FOR EACH ROW EXECUTE FUNCTION log_event()",
    ] {
        sqlx::query(statement).execute(&h.pool).await.unwrap();
    }
    let mut stream = h.watch_merchant(MERCHANT).await;
    // The listener subscribes asynchronously: pay until the stream shows a payment.
    let mut seen: Vec<PaymentEvent> = Vec::new();
    let mut paid_txs = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !seen.iter().any(|e| e.r#type == "captured") {
        assert!(std::time::Instant::now() < deadline, "no events: {seen:?}");
        let r = h
            .authorize(captured(paid(&p, &format!("ann-{}", paid_txs.len()), 700)))
            .await;
        assert!(r.captured, "{}", r.message);
        paid_txs.push(r.transaction_id);
        while let Ok(Ok(Some(e))) =
            tokio::time::timeout(std::time::Duration::from_millis(300), stream.message()).await
        {
            seen.push(e);
        }
    }
    let first = seen.iter().find(|e| e.r#type == "captured").unwrap();
    let of_it: Vec<&str> = seen
        .iter()
        .filter(|e| e.transaction_id == first.transaction_id)
        .map(|e| e.r#type.as_str())
        .collect();
    assert_eq!(of_it, ["authorized", "captured"]);
    let authorized = seen
        .iter()
        .find(|e| e.transaction_id == first.transaction_id)
        .unwrap();
    assert_eq!(
        (
            authorized.amount,
            authorized.payer_account.as_str(),
            authorized.route.as_str()
        ),
        (700, "ann", "quote")
    );

    let refused = h
        .authorize(captured(paid(&p, "ann-too-much", 1_000_000)))
        .await;
    assert_eq!(outcome(&refused), AuthorizeOutcome::InsufficientFunds);
    let n = paid_txs.len() as u64;
    // The recorder writes in call order and the fold folds in write order: once the
    // refusal is counted, anything the recorder wrote for the payments is too.
    let a = h
        .wait_for_analytics(|a| {
            a.totals
                .as_ref()
                .is_some_and(|t| t.refused == 1 && t.captures == n)
        })
        .await;
    let t = a.totals.unwrap();
    assert_eq!((t.requests, t.paid, t.revenue), (n + 1, n, 700 * n));
    assert_eq!(a.top_payers[0].spent, 700 * n);
    let mut written: Vec<String> = sqlx::query_scalar("SELECT event FROM events_written")
        .fetch_all(&h.pool)
        .await
        .unwrap();
    written.sort();
    let mut expected = vec!["debited".to_owned(); paid_txs.len()];
    expected.push("refused".to_owned());
    assert_eq!(
        written, expected,
        "one event per payment, one for the refusal"
    );
    h.assert_clean().await;
}

/// One item of a call fails on its own path after the group placed the others: the call
/// still answers each item, so the payment made is known to the caller (a failed call
/// would read as "nothing held", and the payer would be charged for a refused request).
#[tokio::test]
async fn a_call_answers_the_payments_it_made_when_another_of_its_items_fails() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("ida", 10_000).await;
    let q = h.payer("ike", 10_000).await;
    // Items with a global limit run alone, after the group; make that path fail.
    sqlx::raw_sql(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'test: rate window unavailable'; END $$; \
         CREATE TRIGGER test_refuse BEFORE INSERT OR UPDATE ON rate_windows \
           FOR EACH ROW EXECUTE FUNCTION test_refuse();",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    let limited = |item: AuthorizeItem| AuthorizeItem {
        global_limit: Some(GlobalLimit {
            max_requests: 100,
            window_seconds: 60,
            client_address: String::new(),
        }),
        ..item
    };
    let failing = limited(paid(&q, "ike-1", 1_000));
    let results = h
        .data
        .clone()
        .authorize(AuthorizeRequest {
            items: vec![captured(paid(&p, "ida-1", 4_000)), failing.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(outcome(&results[0]), AuthorizeOutcome::Authorized);
    assert!(results[0].captured);
    assert_eq!(results[1].request_id, "ike-1");
    assert_eq!(outcome(&results[1]), AuthorizeOutcome::Unavailable);
    assert_eq!(h.balance("ida").await.debits_posted, 4_000);
    let ike = h.balance("ike").await;
    assert_eq!((ike.debits_pending, ike.debits_posted), (0, 0));

    // A call whose items all fail still fails as a whole.
    let whole = h
        .data
        .clone()
        .authorize(AuthorizeRequest {
            items: vec![failing.clone()],
        })
        .await
        .unwrap_err();
    assert_ne!(whole.code(), tonic::Code::Ok);

    // Nothing was held for the failed item: sent again once the path works, it is placed.
    sqlx::raw_sql("DROP TRIGGER test_refuse ON rate_windows")
        .execute(&h.pool)
        .await
        .unwrap();
    let again = h.authorize(failing).await;
    assert_eq!(
        outcome(&again),
        AuthorizeOutcome::Authorized,
        "{}",
        again.message
    );
    assert_eq!(h.balance("ike").await.debits_pending, 1_000);
    h.assert_clean().await;
}

/// Two payments of one payer in one group whose amounts add up past i64::MAX: summed
/// into one balance change they would wrap to a credit of the payer. The group must
/// not write them; each gets the answer it gets alone (the funds do not cover it).
#[tokio::test]
async fn payments_whose_sum_overflows_are_refused_not_wrapped() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("ova", 1_000).await;
    // An earlier payment: the payer's key and the merchant's fee are now known, so the
    // next group writes at once, without reading the funds first.
    let first = h.authorize(captured(paid(&p, "ova-1", 100))).await;
    assert!(first.captured, "{}", first.message);
    let before = h.balance("ova").await;

    let max = i64::MAX as u64;
    let results = h
        .data
        .clone()
        .authorize(AuthorizeRequest {
            items: vec![
                captured(paid(&p, "ova-2", max)),
                captured(paid(&p, "ova-3", max - 48)),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    for r in &results {
        assert_eq!(
            outcome(r),
            AuthorizeOutcome::InsufficientFunds,
            "{}: {}",
            r.request_id,
            r.message
        );
        assert!(!r.captured);
    }
    let after = h.balance("ova").await;
    assert_eq!(
        (after.debits_posted, after.debits_pending, after.available),
        (before.debits_posted, 0, 900)
    );
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_posted, m.credits_pending), (100, 0));
    h.assert_clean().await;
}

/// A Void of a payment captured at authorize refunds what is left of it through the
/// refund path: after refunds of one unit each, the last unit carries its share of
/// the fee, never the whole fee still to return.
#[tokio::test]
async fn a_void_after_small_refunds_returns_the_last_unit() {
    let h = start().await;
    h.merchant_with_fee(MERCHANT, 5_000).await;
    let p = h.payer("uli", 1_000).await;
    let r = h.authorize(captured(paid(&p, "uli-1", 10))).await;
    assert!(r.captured, "{}", r.message);
    let tx = r.transaction_id;
    assert_eq!(h.payment(&tx).await.fee, 5);
    for i in 0..9 {
        h.op.clone()
            .refund(RefundRequest {
                transaction_id: tx.clone(),
                amount: 1,
                reason: "one unit".into(),
                idempotency_key: format!("uli-{i}"),
            })
            .await
            .unwrap_or_else(|e| panic!("refund {i}: {e}"));
    }
    let void = h.void(&tx).await;
    assert_eq!(
        (resolved(&void), void.amount),
        (ResolveOutcome::Voided, 1),
        "{}",
        void.message
    );
    let payment = h.payment(&tx).await;
    assert_eq!((payment.refunded, payment.fee), (10, 5));
    assert_eq!(h.balance("uli").await.available, 1_000);
    assert_eq!(h.balance(MERCHANT).await.posted, 0);
    assert_eq!(h.balance_of("system:platform").await.posted, 0);
    h.assert_clean().await;
}
