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
