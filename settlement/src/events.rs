//! What a money movement leaves behind besides balances, written in the same
//! transaction so it commits (or not) with the money: the platform fee, the refund
//! cap row, an analytics event, a webhook outbox row and a `NOTIFY` for `Watch`.
//! Authorizations are recorded and announced in batches after they commit
//! ([`record_authorizations`]).
//!
//! Also the listener that turns those notifications into a broadcast for `Watch`
//! streams; notifications are sent on commit, so a watcher never sees an event that
//! rolled back, and every replica of settlement sees the events of all of them.

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{broadcast, watch};
use x402_proto::settlement::v1::PaymentEvent;

/// The Postgres channel payment events are announced on.
pub const CHANNEL: &str = "x402_events";

/// The account platform fees are credited to.
pub const PLATFORM_ACCOUNT: &str = "system:platform";

/// Basis points in one whole.
const BPS: i128 = 10_000;

/// A payment event as announced: the fields of [`PaymentEvent`].
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub kind: &'a str,
    pub transaction_id: &'a str,
    pub payer: &'a str,
    pub merchant: &'a str,
    pub asset: &'a str,
    pub route: &'a str,
    pub amount: i64,
}

impl Event<'_> {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "type": self.kind,
            "transaction_id": self.transaction_id,
            "payer_account": self.payer,
            "merchant_account": self.merchant,
            "asset": self.asset,
            "route": self.route,
            "amount": self.amount,
            "at_unix_ms": unix_ms(),
        })
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The platform's share of `posted` at `bps` basis points, rounded down (so the fee
/// never exceeds the merchant's basis points).
pub fn fee_of(posted: i64, bps: i32) -> i64 {
    i64::try_from(i128::from(posted) * i128::from(bps) / BPS).unwrap_or(0)
}

/// The fee of one capture step of `step` that brings a payment's fee at today's rate
/// to `total_fee`, when its earlier steps took `taken`. The merchant's rate may have
/// changed since those steps: a lower one would make this negative (no transfer gives
/// a fee back), a higher one more than the step (the merchant would pay for earlier
/// steps again). So it is never below zero nor above the step.
pub fn step_fee(total_fee: i64, taken: i64, step: i64) -> i64 {
    total_fee.saturating_sub(taken).min(step).max(0)
}

/// The platform's share of a capture of `posted` for `merchant`, in atomic units
/// (rounded down, so the fee never exceeds the merchant's basis points). Creates the
/// platform's balance row when there is a fee.
pub async fn capture_fee(
    tx: &mut Transaction<'_, Postgres>,
    merchant: &str,
    asset: &str,
    posted: i64,
) -> Result<i64, sqlx::Error> {
    let bps: Option<i32> = sqlx::query_scalar("SELECT fee_bps FROM accounts WHERE id = $1")
        .bind(merchant)
        .fetch_optional(&mut **tx)
        .await?;
    let fee = fee_of(posted, bps.unwrap_or(0));
    if fee > 0 {
        sqlx::query(
            "INSERT INTO balances (account_id, asset, debits_must_not_exceed_credits) \
             VALUES ($1, $2, false) ON CONFLICT (account_id, asset) DO NOTHING",
        )
        .bind(PLATFORM_ACCOUNT)
        .bind(asset)
        .execute(&mut **tx)
        .await?;
    }
    Ok(fee)
}

/// Records a capture: the fee transfer, the refund-cap row, analytics, webhook, notify.
/// `posted` is the payment's total, `step` what this capture added to what partial
/// captures posted before it, and `fee` the fee of that step.
#[allow(clippy::too_many_arguments)]
pub async fn after_capture(
    tx: &mut Transaction<'_, Postgres>,
    hold_id: &str,
    payer: &str,
    merchant: &str,
    asset: &str,
    posted: i64,
    step: i64,
    fee: i64,
    http_status: i32,
    upstream_micros: i64,
) -> Result<(), sqlx::Error> {
    if fee > 0 {
        sqlx::query(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, reason) \
             VALUES ('fee', $1, $2, $3, $4, $5, 'platform_fee')",
        )
        .bind(merchant)
        .bind(PLATFORM_ACCOUNT)
        .bind(asset)
        .bind(fee)
        .bind(hold_id)
        .execute(&mut **tx)
        .await?;
    }
    add_refundable(tx, hold_id, step, fee).await?;
    let route: Option<String> =
        sqlx::query_scalar("SELECT coalesce(route, '') FROM transfers WHERE id = $1")
            .bind(hold_id)
            .fetch_optional(&mut **tx)
            .await?;
    let route = route.unwrap_or_default();
    sqlx::query(
        "INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount, fee, http_status, upstream_micros) \
         VALUES ('captured', $1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&route)
    .bind(merchant)
    .bind(payer)
    .bind(asset)
    .bind(posted)
    .bind(fee)
    .bind(http_status)
    .bind(upstream_micros)
    .execute(&mut **tx)
    .await?;
    let event = Event {
        kind: "captured",
        transaction_id: hold_id,
        payer,
        merchant,
        asset,
        route: &route,
        amount: posted,
    };
    let mut body = event.json();
    body["fee"] = json!(fee);
    body["http_status"] = json!(http_status);
    announce(tx, merchant, "payment.captured", &body).await
}

/// Adds a captured step and its fee to the payment's refund cap.
pub async fn add_refundable(
    tx: &mut Transaction<'_, Postgres>,
    hold_id: &str,
    step: i64,
    fee: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payment_refunds (hold_id, captured, fee) VALUES ($1, $2, $3) \
         ON CONFLICT (hold_id) DO UPDATE SET captured = payment_refunds.captured + EXCLUDED.captured, \
           fee = payment_refunds.fee + EXCLUDED.fee",
    )
    .bind(hold_id)
    .bind(step)
    .bind(fee)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records a void of one hold: analytics, webhook-free (a void is the filter's own
/// decision), notify.
pub async fn after_void(
    tx: &mut Transaction<'_, Postgres>,
    hold_id: &str,
    payer: &str,
    merchant: &str,
    asset: &str,
    amount: i64,
) -> Result<(), sqlx::Error> {
    let route: Option<String> =
        sqlx::query_scalar("SELECT coalesce(route, '') FROM transfers WHERE id = $1")
            .bind(hold_id)
            .fetch_optional(&mut **tx)
            .await?;
    let route = route.unwrap_or_default();
    sqlx::query(
        "INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount) \
         VALUES ('voided', $1, $2, $3, $4, $5)",
    )
    .bind(&route)
    .bind(merchant)
    .bind(payer)
    .bind(asset)
    .bind(amount)
    .execute(&mut **tx)
    .await?;
    let event = Event {
        kind: "voided",
        transaction_id: hold_id,
        payer,
        merchant,
        asset,
        route: &route,
        amount,
    };
    notify(tx, &event.json()).await
}

/// Records the expiry of a batch of holds: analytics, `payment.hold_expired`
/// webhooks, notifies. Set-based, so a large sweep stays a few statements. The
/// holds are found by id alone (`hold_ids` are holds): a `kind = 'hold'` filter lets
/// the planner scan a partial index of every hold.
pub async fn after_expire(
    tx: &mut Transaction<'_, Postgres>,
    hold_ids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount) \
         SELECT 'expired', coalesce(route, ''), credit_account, debit_account, asset, amount \
         FROM transfers WHERE id = ANY($1)",
    )
    .bind(hold_ids)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "WITH ev AS ( \
           SELECT t.credit_account AS merchant, jsonb_build_object( \
             'type', 'expired', 'transaction_id', t.id, 'payer_account', t.debit_account, \
             'merchant_account', t.credit_account, 'asset', t.asset, 'route', coalesce(t.route, ''), \
             'amount', t.amount, 'at_unix_ms', (extract(epoch FROM clock_timestamp()) * 1000)::bigint) AS body \
           FROM transfers t WHERE t.id = ANY($1)), \
         hooks AS ( \
           INSERT INTO webhook_outbox (merchant, event_type, payload) \
           SELECT ev.merchant, 'payment.hold_expired', ev.body FROM ev \
           JOIN webhook_endpoints w ON w.merchant = ev.merchant RETURNING 1) \
         SELECT count(pg_notify($2, ev.body::text)) FROM ev",
    )
    .bind(hold_ids)
    .bind(CHANNEL)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records a refund: analytics, `payment.refunded` webhook, notify.
#[allow(clippy::too_many_arguments)]
pub async fn after_refund(
    tx: &mut Transaction<'_, Postgres>,
    hold_id: &str,
    payer: &str,
    merchant: &str,
    asset: &str,
    route: &str,
    amount: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount) \
         VALUES ('refunded', $1, $2, $3, $4, $5)",
    )
    .bind(route)
    .bind(merchant)
    .bind(payer)
    .bind(asset)
    .bind(amount)
    .execute(&mut **tx)
    .await?;
    let event = Event {
        kind: "refunded",
        transaction_id: hold_id,
        payer,
        merchant,
        asset,
        route,
        amount,
    };
    let mut body = event.json();
    body["reason"] = json!(reason);
    announce(tx, merchant, "payment.refunded", &body).await
}

/// Queues the webhook of `merchant` (when it has one) and notifies watchers.
async fn announce(
    tx: &mut Transaction<'_, Postgres>,
    merchant: &str,
    event_type: &str,
    body: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_outbox (merchant, event_type, payload) \
         SELECT merchant, $2, $3 FROM webhook_endpoints WHERE merchant = $1",
    )
    .bind(merchant)
    .bind(event_type)
    .bind(body)
    .execute(&mut **tx)
    .await?;
    notify(tx, body).await
}

async fn notify(
    tx: &mut Transaction<'_, Postgres>,
    body: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(body.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records authorize outcomes for analytics and announces the authorizations on the
/// event channel (for `Watch`), in one statement per batch. They are written by the
/// recorder, off the paid path: a notification per authorization in the paid
/// transaction doubled its work at full load, a batch of them here costs one round
/// trip. An authorization is announced once its hold has committed (the recorder sees
/// it after the answer); a refusal is counted but not announced (no money moved).
pub async fn record_authorizations(pool: &PgPool, items: &[Authorization]) {
    if items.is_empty() {
        return;
    }
    let col = |f: fn(&Authorization) -> String| items.iter().map(f).collect::<Vec<_>>();
    let events = col(|a| a.event.to_owned());
    let routes = col(|a| a.route.clone());
    let merchants = col(|a| a.merchant.clone());
    let payers = col(|a| a.payer.clone());
    let assets = col(|a| a.asset.clone());
    let transactions = col(|a| a.transaction_id.clone());
    let amounts: Vec<i64> = items.iter().map(|a| a.amount).collect();
    let inserted = sqlx::query(
        "WITH k AS ( \
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::text[]) AS k(event, route, merchant, payer, asset, amount, tx)), \
         ins AS ( \
           INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount) \
           SELECT event, route, merchant, payer, asset, amount FROM k RETURNING 1) \
         SELECT (SELECT count(*) FROM ins), count(pg_notify($8, jsonb_build_object( \
             'type', 'authorized', 'transaction_id', k.tx, 'payer_account', k.payer, \
             'merchant_account', k.merchant, 'asset', k.asset, 'route', k.route, 'amount', k.amount, \
             'at_unix_ms', (extract(epoch FROM clock_timestamp()) * 1000)::bigint)::text)) \
         FROM k WHERE k.event = 'authorized'",
    )
    .bind(&events)
    .bind(&routes)
    .bind(&merchants)
    .bind(&payers)
    .bind(&assets)
    .bind(&amounts)
    .bind(&transactions)
    .bind(CHANNEL)
    .execute(pool)
    .await;
    if let Err(e) = inserted {
        tracing::warn!(error = %e, "recording authorize analytics failed");
    }
}

/// Most authorize outcomes waiting for the recorder; beyond it they are dropped
/// from analytics (with a warning) rather than slowing the paid path.
pub const RECORDER_QUEUE: usize = 100_000;

/// Writes authorize outcomes in batches, one statement pair per batch, so the
/// analytics of the paid path cost one connection however busy it is. Ends when all
/// senders are gone, after writing what they sent.
pub async fn run_recorder(pool: PgPool, mut queue: tokio::sync::mpsc::Receiver<Authorization>) {
    let mut batch = Vec::with_capacity(1000);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < 1000 {
            match queue.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        record_authorizations(&pool, &batch).await;
        batch.clear();
    }
}

/// One authorize outcome for [`record_authorizations`].
#[derive(Debug, Clone)]
pub struct Authorization {
    /// "authorized" or "refused".
    pub event: &'static str,
    pub transaction_id: String,
    pub route: String,
    pub merchant: String,
    pub payer: String,
    pub asset: String,
    pub amount: i64,
}

/// Listens on [`CHANNEL`] and republishes every event on `sender` until `stop`.
/// Reconnects after a lost connection (events sent meanwhile are missed: `Watch` is a
/// live feed; the ledger and webhooks are the durable record).
pub async fn listen(
    pool: PgPool,
    sender: broadcast::Sender<PaymentEvent>,
    mut stop: watch::Receiver<bool>,
) {
    // LISTEN holds its connection for good: take it from a pool of its own so the
    // request pool keeps every connection it was sized with.
    let options = (*pool.connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "event listener cannot connect");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "event listener cannot LISTEN");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = stop.changed() => return,
            }
        }
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(n) => {
                        if let Some(event) = parse_event(n.payload()) {
                            crate::metrics::METRICS.event(&event);
                            let _ = sender.send(event);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener lost its connection");
                        break;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }
}

fn parse_event(payload: &str) -> Option<PaymentEvent> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Some(PaymentEvent {
        r#type: s("type"),
        transaction_id: s("transaction_id"),
        payer_account: s("payer_account"),
        merchant_account: s("merchant_account"),
        asset: s("asset"),
        route: s("route"),
        amount: v["amount"].as_u64().unwrap_or(0),
        at_unix_ms: v["at_unix_ms"].as_i64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_fee_stays_within_zero_and_the_step() {
        // The rate did not change: the fee of the total less what was taken.
        assert_eq!(step_fee(fee_of(600, 1_000), fee_of(500, 1_000), 100), 10);
        // Lowered from 10 % to 0.01 %: nothing is given back.
        assert_eq!(step_fee(fee_of(600, 1), 50, 100), 0);
        // Raised from 0.01 % to 50 %: at most the step.
        assert_eq!(step_fee(fee_of(600, 5_000), 0, 100), 100);
        assert_eq!(step_fee(i64::MAX, i64::MIN, 7), 7);
        assert_eq!(step_fee(5, 0, 0), 0);
    }

    #[test]
    fn events_round_trip_through_their_json() {
        let e = Event {
            kind: "captured",
            transaction_id: "t1",
            payer: "alice",
            merchant: "m",
            asset: "USD",
            route: "quote",
            amount: 10_000,
        };
        let parsed = parse_event(&e.json().to_string()).unwrap_or_default();
        assert_eq!(parsed.r#type, "captured");
        assert_eq!(parsed.amount, 10_000);
        assert_eq!(parsed.route, "quote");
        assert!(parsed.at_unix_ms > 0);
    }
}
