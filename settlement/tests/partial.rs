//! Partial captures of long requests, through the gRPC API against a real
//! PostgreSQL: each names the running total, posts only what it adds, keeps the
//! hold open; the final capture, void or expiry settles the rest exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use x402_proto::settlement::v1::*;
use x402_settlement::server::ServerConfig;

impl Harness {
    /// (debits pending, debits posted) of a payer.
    async fn payer_counters(&self, account: &str) -> (u64, u64) {
        let b = self.balance(account).await;
        (b.debits_pending, b.debits_posted)
    }
}

#[tokio::test]
async fn partial_captures_post_the_running_total_once_and_the_final_capture_the_rest() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("pia", 10_000).await;
    let tx = h.authorize(paid(&p, "long", 1_000)).await.transaction_id;

    let first = h.partial(&tx, 300).await;
    assert_eq!(
        (resolved(&first), first.amount),
        (ResolveOutcome::Captured, 300)
    );
    assert_eq!(h.payer_counters("pia").await, (700, 300));
    assert_eq!(h.payment(&tx).await.status, "held", "the hold stays open");

    // A retry of the same total, and a late one below it, post nothing.
    for total in [300, 300, 200, 0] {
        let again = h.partial(&tx, total).await;
        assert_eq!(
            (resolved(&again), again.amount),
            (ResolveOutcome::Captured, 300)
        );
    }
    assert_eq!(h.payer_counters("pia").await, (700, 300));

    // Above the hold: refused, nothing moves.
    assert_eq!(
        resolved(&h.partial(&tx, 1_001).await),
        ResolveOutcome::ExceedsHold
    );
    assert_eq!(h.payer_counters("pia").await, (700, 300));

    assert_eq!(h.partial(&tx, 650).await.amount, 650);
    assert_eq!(h.payer_counters("pia").await, (350, 650));
    let open = h.payment(&tx).await;
    assert_eq!((open.status.as_str(), open.captured), ("held", 650));
    h.assert_clean().await;

    // The final capture names the total: 250 more is posted, 100 goes back.
    let fin = h.capture(&tx, 900).await;
    assert_eq!(
        (resolved(&fin), fin.amount),
        (ResolveOutcome::Captured, 900)
    );
    assert_eq!(h.payer_counters("pia").await, (0, 900));
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (0, 900));
    assert_eq!(h.balance("pia").await.available, 9_100);

    // Repeating the final capture answers it again; a late partial posts nothing.
    assert_eq!(
        resolved(&h.capture(&tx, 900).await),
        ResolveOutcome::Captured
    );
    assert_eq!(
        resolved(&h.partial(&tx, 950).await),
        ResolveOutcome::AlreadyResolved
    );
    assert_eq!(h.payer_counters("pia").await, (0, 900));
    let refundable: i64 =
        sqlx::query_scalar("SELECT captured FROM payment_refunds WHERE hold_id = $1")
            .bind(&tx)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(refundable, 900);
    h.assert_clean().await;
}

#[tokio::test]
async fn a_final_capture_below_the_partial_total_takes_nothing_back() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("quin", 5_000).await;
    let tx = h.authorize(paid(&p, "long", 1_000)).await.transaction_id;
    h.partial(&tx, 600).await;
    let fin = h.capture(&tx, 400).await;
    assert_eq!(
        (resolved(&fin), fin.amount),
        (ResolveOutcome::Captured, 600)
    );
    assert_eq!(h.payer_counters("quin").await, (0, 600));
    h.assert_clean().await;
}

#[tokio::test]
async fn concurrent_retries_of_one_partial_capture_post_it_once() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("ria", 10_000).await;
    let tx = h.authorize(paid(&p, "long", 2_000)).await.transaction_id;
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let data = h.data.clone();
        let tx = tx.clone();
        // Totals 500 and 800, six times each, in any order.
        let total = if i % 2 == 0 { 500 } else { 800 };
        tasks.push(tokio::spawn(async move {
            let mut data = data;
            data.capture_partial(CaptureRequest {
                items: vec![CaptureItem {
                    transaction_id: tx,
                    amount: total,
                    upstream_micros: 0,
                    http_status: 0,
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0)
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(resolved(&r), ResolveOutcome::Captured);
        assert!(r.amount == 500 || r.amount == 800, "{r:?}");
    }
    assert_eq!(h.payer_counters("ria").await, (1_200, 800));
    let steps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transfers WHERE pending_id = $1 AND kind = 'partial_capture'",
    )
    .bind(&tx)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert!((1..=2).contains(&steps), "{steps} partial capture rows");
    h.assert_clean().await;
}

#[tokio::test]
async fn a_void_after_partial_captures_releases_the_rest_once() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("sid", 10_000).await;
    let tx = h.authorize(paid(&p, "long", 1_000)).await.transaction_id;
    h.partial(&tx, 400).await;
    let v = h.void(&tx).await;
    assert_eq!((resolved(&v), v.amount), (ResolveOutcome::Voided, 600));
    let again = h.void(&tx).await;
    assert_eq!(
        (resolved(&again), again.amount),
        (ResolveOutcome::Voided, 600)
    );
    assert_eq!(h.payer_counters("sid").await, (0, 400));
    assert_eq!(h.balance("sid").await.available, 9_600);
    let payment = h.payment(&tx).await;
    assert_eq!(
        (payment.status.as_str(), payment.captured, payment.voided),
        ("voided", 400, 600)
    );
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (0, 400));
    assert_eq!(
        resolved(&h.capture(&tx, 1_000).await),
        ResolveOutcome::AlreadyResolved
    );
    assert_eq!(h.payer_counters("sid").await, (0, 400));
    h.assert_clean().await;
}

#[tokio::test]
async fn expiry_after_partial_captures_releases_the_rest() {
    let h = start_with(ServerConfig {
        hold_sweep_interval: Duration::from_millis(100),
        ..ServerConfig::default()
    })
    .await;
    h.merchant(MERCHANT).await;
    let p = h.payer("tia", 10_000).await;
    let mut short = paid(&p, "short", 2_500);
    short.hold_ttl_seconds = 2;
    let tx = h.authorize(short).await.transaction_id;
    let step = h.partial(&tx, 1_000).await;
    assert_eq!(resolved(&step), ResolveOutcome::Captured);

    let deadline = Instant::now() + Duration::from_secs(30);
    while h.payment(&tx).await.status != "expired" {
        assert!(Instant::now() < deadline, "hold was not expired in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.payer_counters("tia").await, (0, 1_000));
    assert_eq!(h.balance("tia").await.available, 9_000);
    let released: i64 = sqlx::query_scalar(
        "SELECT amount FROM transfers WHERE pending_id = $1 AND kind = 'expire'",
    )
    .bind(&tx)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(released, 1_500);
    h.assert_clean().await;
}

#[tokio::test]
async fn the_database_keeps_the_captured_total_within_the_hold() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("uma", 10_000).await;
    let tx = h.authorize(paid(&p, "long", 1_000)).await.transaction_id;
    h.partial(&tx, 100).await;
    let over = sqlx::query("UPDATE open_holds SET captured = 1001 WHERE hold_id = $1")
        .bind(&tx)
        .execute(&h.pool)
        .await
        .unwrap_err();
    assert!(
        over.to_string().contains("open_holds_captured_within_held"),
        "{over}"
    );
    // A second row for the same step is refused, and so is a step past the hold.
    let twice = sqlx::query(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, \
           pending_amount, captured_before) \
         SELECT 'partial_capture', debit_account, credit_account, asset, 50, id, amount, 0 \
         FROM transfers WHERE id = $1",
    )
    .bind(&tx)
    .execute(&h.pool)
    .await
    .unwrap_err();
    assert!(
        twice.to_string().contains("transfers_partial_capture_once"),
        "{twice}"
    );
    let past = sqlx::query(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, \
           pending_amount, captured_before) \
         SELECT 'partial_capture', debit_account, credit_account, asset, 901, id, amount, 100 \
         FROM transfers WHERE id = $1",
    )
    .bind(&tx)
    .execute(&h.pool)
    .await
    .unwrap_err();
    assert!(
        past.to_string()
            .contains("transfers_partial_capture_within_hold"),
        "{past}"
    );
    h.assert_clean().await;
}

impl Harness {
    /// (credits posted, debits posted) of the merchant and the platform.
    async fn fee_counters(&self) -> ((u64, u64), (u64, u64)) {
        let m = self.balance(MERCHANT).await;
        let p = self.balance_of("system:platform").await;
        (
            (m.credits_posted, m.debits_posted),
            (p.credits_posted, p.debits_posted),
        )
    }

    /// The sum of the fee transfers of a payment.
    async fn fee_rows(&self, tx: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(sum(amount), 0)::bigint FROM transfers WHERE pending_id = $1 AND kind = 'fee'",
        )
        .bind(tx)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// The merchant's fee is lowered between two partial captures: the fee of the running
/// total at the new rate is below what the first step already took. A step never
/// gives a fee back (there is no transfer that would), so the later steps take none,
/// and the balances still add up to the transfers.
#[tokio::test]
async fn a_fee_lowered_between_partial_captures_takes_nothing_back() {
    let h = start().await;
    h.merchant_with_fee(MERCHANT, 1_000).await;
    let p = h.payer("val", 10_000).await;
    let tx = h.authorize(paid(&p, "long", 1_000)).await.transaction_id;
    assert_eq!(h.partial(&tx, 500).await.amount, 500);
    assert_eq!(h.fee_counters().await, ((500, 50), (50, 0)));
    // Part of it refunded: 20 of the fee goes back with 200.
    let refund =
        h.op.clone()
            .refund(RefundRequest {
                transaction_id: tx.clone(),
                amount: 200,
                reason: "partly refunded".into(),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(refund.amount, 200);
    assert_eq!(h.fee_counters().await, ((500, 230), (50, 20)));

    h.merchant_with_fee(MERCHANT, 1).await;
    let step = h.partial(&tx, 600).await;
    assert_eq!(
        (resolved(&step), step.amount),
        (ResolveOutcome::Captured, 600),
        "{}",
        step.message
    );
    assert_eq!(h.fee_counters().await, ((600, 230), (50, 20)));
    h.assert_clean().await;

    let fin = h.capture(&tx, 1_000).await;
    assert_eq!(
        (resolved(&fin), fin.amount),
        (ResolveOutcome::Captured, 1_000),
        "{}",
        fin.message
    );
    assert_eq!(h.fee_counters().await, ((1_000, 230), (50, 20)));
    assert_eq!(h.fee_rows(&tx).await, 50);
    let payment = h.payment(&tx).await;
    assert_eq!(
        (payment.captured, payment.fee, payment.refunded),
        (1_000, 50, 200)
    );
    assert_eq!(h.balance("val").await.available, 9_200);
    h.assert_clean().await;
}

/// The merchant's fee is raised between two partial captures: the fee of the running
/// total at the new rate is more than the step adds. A step's fee is at most the step,
/// so no capture leaves the merchant with less than it had.
#[tokio::test]
async fn a_fee_raised_between_partial_captures_takes_at_most_the_step() {
    let h = start().await;
    h.merchant_with_fee(MERCHANT, 1).await;
    let p = h.payer("wes", 10_000).await;
    let tx = h.authorize(paid(&p, "long", 1_000)).await.transaction_id;
    assert_eq!(h.partial(&tx, 500).await.amount, 500);
    assert_eq!(h.fee_counters().await, ((500, 0), (0, 0)));

    h.merchant_with_fee(MERCHANT, 5_000).await;
    // Half of 600 is 300, but this step adds 100: it takes 100.
    assert_eq!(h.partial(&tx, 600).await.amount, 600);
    assert_eq!(h.fee_counters().await, ((600, 100), (100, 0)));
    assert_eq!(h.fee_rows(&tx).await, 100);
    h.assert_clean().await;

    // Half of 1 000 less the 100 taken is 400: all of the last step.
    let fin = h.capture(&tx, 1_000).await;
    assert_eq!(
        (resolved(&fin), fin.amount),
        (ResolveOutcome::Captured, 1_000),
        "{}",
        fin.message
    );
    assert_eq!(h.fee_counters().await, ((1_000, 500), (500, 0)));
    assert_eq!(h.fee_rows(&tx).await, 500);
    assert_eq!(h.payment(&tx).await.fee, 500);
    h.assert_clean().await;
}
