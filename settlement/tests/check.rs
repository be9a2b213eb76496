//! The ledger invariant checker finds nothing on a ledger the service wrote, and
//! names the right invariant for each kind of damage done behind the service's
//! back (constraints dropped where the schema would refuse the damage outright).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use x402_proto::settlement::v1::{AuthorizeOutcome, ResolveOutcome};
use x402_settlement::check::{check_ledger, check_paid_responses, CheckOptions, PaidResponse};

async fn violated(h: &Harness) -> Vec<&'static str> {
    let report = check_ledger(&h.pool, CheckOptions::default())
        .await
        .unwrap();
    report.violations.iter().map(|v| v.invariant).collect()
}

async fn exec(h: &Harness, sql: &str) {
    sqlx::query(sql).execute(&h.pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_passes_a_real_ledger_and_names_each_kind_of_damage() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let alice = h.payer("check-alice", 100_000).await;
    let bob = h.payer("check-bob", 100_000).await;

    let captured = h.authorize(paid(&alice, "c1", 10_000)).await;
    assert_eq!(outcome(&captured), AuthorizeOutcome::Authorized);
    assert_eq!(
        resolved(&h.capture(&captured.transaction_id, 7_000).await),
        ResolveOutcome::Captured
    );
    let voided = h.authorize(paid(&alice, "c2", 5_000)).await;
    assert_eq!(
        resolved(&h.void(&voided.transaction_id).await),
        ResolveOutcome::Voided
    );
    let open = h.authorize(paid(&bob, "c3", 3_000)).await;
    assert_eq!(outcome(&open), AuthorizeOutcome::Authorized);

    let report = check_ledger(&h.pool, CheckOptions::default())
        .await
        .unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    assert!(report.invariants.len() >= 10);
    assert_eq!(report.holds, 3);

    // The end-to-end invariant: a receipted capture passes; an open, voided or
    // unknown hold, or one receipt seen twice, does not.
    let paid_ok = PaidResponse {
        transaction: captured.transaction_id.clone(),
        amount: 10_000,
    };
    assert!(
        check_paid_responses(&h.pool, std::slice::from_ref(&paid_ok), false)
            .await
            .unwrap()
            .is_empty()
    );
    for bad in [&open.transaction_id, &voided.transaction_id, "no-such-hold"] {
        let v = check_paid_responses(
            &h.pool,
            &[PaidResponse {
                transaction: bad.to_string(),
                amount: 10_000,
            }],
            true,
        )
        .await
        .unwrap();
        assert_eq!(v.len(), 1, "{bad}: {v:?}");
    }
    let twice = check_paid_responses(&h.pool, &[paid_ok.clone(), paid_ok.clone()], false)
        .await
        .unwrap();
    assert_eq!(twice.len(), 1, "{twice:?}");
    let low_receipt = check_paid_responses(
        &h.pool,
        &[PaidResponse {
            transaction: captured.transaction_id.clone(),
            amount: 6_999,
        }],
        false,
    )
    .await
    .unwrap();
    assert_eq!(low_receipt.len(), 1, "captured more than the receipt said");

    // Damage, one kind at a time; each names its invariant.
    exec(
        &h,
        "UPDATE balances SET debits_must_not_exceed_credits = false WHERE account_id = 'check-bob'",
    )
    .await;
    assert!(violated(&h).await.contains(&"balance_within_bounds"));
    exec(
        &h,
        "UPDATE balances SET debits_must_not_exceed_credits = true WHERE account_id = 'check-bob'",
    )
    .await;
    assert!(violated(&h).await.is_empty());

    exec(
        &h,
        "UPDATE payer_keys SET account_id = 'check-alice' WHERE account_id = 'check-bob'",
    )
    .await;
    assert!(violated(&h).await.contains(&"hold_key_belongs_to_payer"));
    exec(
        &h,
        &format!(
            "UPDATE payer_keys SET account_id = 'check-bob' WHERE public_key = '{}'",
            bob.public_key
        ),
    )
    .await;
    assert!(violated(&h).await.is_empty());

    exec(
        &h,
        &format!(
            "DELETE FROM open_holds WHERE hold_id = '{}'",
            open.transaction_id
        ),
    )
    .await;
    assert!(violated(&h).await.contains(&"hold_resolved_or_unexpired"));
    exec(
        &h,
        &format!(
            "INSERT INTO open_holds SELECT id, expires_at FROM transfers WHERE id = '{}'",
            open.transaction_id
        ),
    )
    .await;
    assert!(violated(&h).await.is_empty());
    exec(
        &h,
        &format!(
            "UPDATE transfers SET expires_at = now() - interval '1 hour' WHERE id = '{}'",
            open.transaction_id
        ),
    )
    .await;
    assert!(violated(&h).await.contains(&"hold_resolved_or_unexpired"));

    exec(&h, "UPDATE balances SET credits_posted = credits_posted + 1 WHERE account_id = 'merchant-demo'").await;
    let v = violated(&h).await;
    assert!(v.contains(&"asset_balanced"), "{v:?}");
    assert!(v.contains(&"balances_match_transfers"), "{v:?}");

    exec(&h, "DROP INDEX transfers_one_resolution").await;
    exec(&h, &format!(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount) \
         VALUES ('void', 'check-alice', 'merchant-demo', 'USD', 10000, '{0}', 10000)",
        captured.transaction_id
    )).await;
    assert!(violated(&h).await.contains(&"hold_resolved_at_most_once"));

    exec(&h, "DROP INDEX transfers_payer_nonce").await;
    exec(&h, &format!(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, request_id, request_hash, \
           payer_key, nonce, expires_at, amount_authorized) \
         SELECT kind, debit_account, credit_account, asset, amount, request_id || '-again', request_hash, \
           payer_key, nonce, expires_at, amount_authorized FROM transfers WHERE id = '{}'",
        voided.transaction_id
    )).await;
    assert!(violated(&h).await.contains(&"nonce_used_once"));

    exec(
        &h,
        &format!(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id) \
         VALUES ('refund', 'merchant-demo', 'check-alice', 'USD', 7001, '{}')",
        captured.transaction_id
    ),
    )
    .await;
    assert!(violated(&h).await.contains(&"refunded_within_captured"));

    exec(
        &h,
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, request_hash) \
              VALUES ('deposit', 'merchant-demo', 'check-alice', 'USD', 1, 'x')",
    )
    .await;
    assert!(violated(&h).await.contains(&"money_flows_right_way"));

    exec(
        &h,
        "ALTER TABLE transfers DROP CONSTRAINT transfers_capture_within_hold",
    )
    .await;
    exec(
        &h,
        "ALTER TABLE transfers DROP CONSTRAINT transfers_pending_fk",
    )
    .await;
    exec(&h, &format!(
        "UPDATE transfers SET amount = 20000, pending_amount = 20000 WHERE kind = 'capture' AND pending_id = '{}'",
        captured.transaction_id
    )).await;
    assert!(violated(&h).await.contains(&"captured_within_held"));
}
