//! Analytics over incremental aggregates.
//!
//! The paid path appends one row per event to `analytics_pending`; [`fold_pending`]
//! (run by a background task every few hundred milliseconds) moves them into
//! per-minute rows of `analytics_minute` and per-hour payer rows of
//! `analytics_payer_hour` in one transaction, so each event counts exactly once. A
//! query ([`query`]) reads the minutes of its range plus whatever is still pending,
//! so answers are exact and their cost depends on the range and the number of
//! routes, not on how many payments the ledger holds.
//!
//! Upstream latency is kept as a histogram per minute with buckets a factor √2 apart
//! from 100 µs; percentiles report the upper bound of the bucket they fall in.

use std::collections::BTreeMap;

use sqlx::{PgPool, Row};
use x402_proto::settlement::v1::{
    AnalyticsBucket, AnalyticsPoint, AnalyticsRequest, AnalyticsResponse, PayerStats, RouteStats,
};

use crate::error::LedgerError;

/// Number of latency buckets; the last one also takes everything slower.
pub const LATENCY_BUCKETS: usize = 40;

/// Upper bound of latency bucket `i`, in microseconds: 100·√2^i.
pub fn bucket_bound(i: usize) -> u64 {
    let whole = 100u64 << (i / 2);
    if i.is_multiple_of(2) {
        whole
    } else {
        // ×√2, in integers: 1.41421356
        whole.saturating_mul(141_421_356) / 100_000_000
    }
}

pub fn bucket_of(micros: u64) -> usize {
    (0..LATENCY_BUCKETS)
        .find(|&i| micros <= bucket_bound(i))
        .unwrap_or(LATENCY_BUCKETS - 1)
}

/// Counters of one (minute, route, merchant, asset) cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub requests: i64,
    pub paid: i64,
    pub refused: i64,
    pub captures: i64,
    pub revenue: i64,
    pub fees: i64,
    pub voids: i64,
    pub expiries: i64,
    pub upstream_errors: i64,
    pub refunds: i64,
    pub refunded: i64,
    pub latency: Vec<i64>,
}

impl Default for Cell {
    fn default() -> Self {
        Cell {
            requests: 0,
            paid: 0,
            refused: 0,
            captures: 0,
            revenue: 0,
            fees: 0,
            voids: 0,
            expiries: 0,
            upstream_errors: 0,
            refunds: 0,
            refunded: 0,
            latency: vec![0; LATENCY_BUCKETS],
        }
    }
}

impl Cell {
    fn add(&mut self, o: &Cell) {
        self.requests += o.requests;
        self.paid += o.paid;
        self.refused += o.refused;
        self.captures += o.captures;
        self.revenue += o.revenue;
        self.fees += o.fees;
        self.voids += o.voids;
        self.expiries += o.expiries;
        self.upstream_errors += o.upstream_errors;
        self.refunds += o.refunds;
        self.refunded += o.refunded;
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            *a += b;
        }
    }

    /// Counts one event.
    fn apply(&mut self, e: &PendingEvent) {
        match e.event.as_str() {
            "authorized" => {
                self.requests += 1;
                self.paid += 1;
            }
            "refused" => {
                self.requests += 1;
                self.refused += 1;
            }
            "captured" => {
                self.captures += 1;
                self.revenue += e.amount;
                self.fees += e.fee;
                if e.http_status.unwrap_or(0) >= 500 {
                    self.upstream_errors += 1;
                }
                if let Some(m) = e.upstream_micros {
                    let b = bucket_of(u64::try_from(m).unwrap_or(0));
                    if let Some(slot) = self.latency.get_mut(b) {
                        *slot += 1;
                    }
                }
            }
            "voided" => {
                self.voids += 1;
                self.upstream_errors += 1;
            }
            "expired" => self.expiries += 1,
            "refunded" => {
                self.refunds += 1;
                self.refunded += e.amount;
            }
            _ => {}
        }
    }

    /// The upper bound of the bucket holding quantile `q` (0 when empty).
    fn percentile(&self, q_per_mille: i64) -> u64 {
        let total: i64 = self.latency.iter().sum();
        if total == 0 {
            return 0;
        }
        // ceil(total * q): the rank of the quantile sample, 1-based.
        let rank = (total * q_per_mille + 999) / 1000;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank.max(1) {
                return bucket_bound(i);
            }
        }
        bucket_bound(LATENCY_BUCKETS - 1)
    }

    fn point(&self, start_unix: i64) -> AnalyticsPoint {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        let ratio = |a: i64, b: i64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        AnalyticsPoint {
            start_unix,
            requests: u(self.requests),
            paid: u(self.paid),
            refused: u(self.refused),
            captures: u(self.captures),
            revenue: u(self.revenue),
            fees: u(self.fees),
            voids: u(self.voids),
            expiries: u(self.expiries),
            upstream_errors: u(self.upstream_errors),
            refunds: u(self.refunds),
            refunded: u(self.refunded),
            latency_p50_micros: self.percentile(500),
            latency_p95_micros: self.percentile(950),
            latency_p99_micros: self.percentile(990),
            error_rate: ratio(
                self.refused + self.upstream_errors,
                self.requests.max(self.paid),
            ),
            refund_rate: ratio(self.refunds, self.captures),
        }
    }
}

/// One row of `analytics_pending`.
#[derive(Debug, Clone)]
struct PendingEvent {
    minute: i64,
    event: String,
    route: String,
    merchant: String,
    payer: String,
    asset: String,
    amount: i64,
    fee: i64,
    http_status: Option<i32>,
    upstream_micros: Option<i64>,
}

const PENDING_COLUMNS: &str = "extract(epoch FROM date_trunc('minute', at))::bigint AS minute, \
    event, route, merchant, payer, asset, amount, fee, http_status, upstream_micros";

fn pending_from_row(r: &sqlx::postgres::PgRow) -> Result<PendingEvent, sqlx::Error> {
    Ok(PendingEvent {
        minute: r.try_get("minute")?,
        event: r.try_get("event")?,
        route: r.try_get("route")?,
        merchant: r.try_get("merchant")?,
        payer: r.try_get("payer")?,
        asset: r.try_get("asset")?,
        amount: r.try_get("amount")?,
        fee: r.try_get("fee")?,
        http_status: r.try_get("http_status")?,
        upstream_micros: r.try_get("upstream_micros")?,
    })
}

type CellKey = (i64, String, String, String);
type PayerKey = (i64, String, String, String);

fn fold(events: &[PendingEvent]) -> (BTreeMap<CellKey, Cell>, BTreeMap<PayerKey, (i64, i64)>) {
    let mut cells: BTreeMap<CellKey, Cell> = BTreeMap::new();
    let mut payers: BTreeMap<PayerKey, (i64, i64)> = BTreeMap::new();
    for e in events {
        cells
            .entry((
                e.minute,
                e.route.clone(),
                e.merchant.clone(),
                e.asset.clone(),
            ))
            .or_default()
            .apply(e);
        let spent = match e.event.as_str() {
            "captured" => Some((1, e.amount)),
            "refunded" => Some((0, -e.amount)),
            _ => None,
        };
        if let Some((n, amount)) = spent {
            let hour = e.minute - e.minute.rem_euclid(3600);
            let entry = payers
                .entry((hour, e.payer.clone(), e.merchant.clone(), e.asset.clone()))
                .or_default();
            entry.0 += n;
            entry.1 += amount;
        }
    }
    (cells, payers)
}

/// Folds up to `limit` pending events into the aggregates; returns how many.
pub async fn fold_pending(pool: &PgPool, limit: i64) -> Result<usize, LedgerError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(&format!(
        "DELETE FROM analytics_pending WHERE id IN ( \
           SELECT id FROM analytics_pending ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING {PENDING_COLUMNS}"
    ))
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let events = rows
        .iter()
        .map(pending_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let (cells, payers) = fold(&events);
    // Sorted keys: two folders (replicas) lock cells in the same order.
    for ((minute, route, merchant, asset), c) in &cells {
        sqlx::query(
            "INSERT INTO analytics_minute (minute, route, merchant, asset, requests, paid, refused, captures, \
               revenue, fees, voids, expiries, upstream_errors, refunds, refunded, latency) \
             VALUES (to_timestamp($1), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
             ON CONFLICT (minute, route, merchant, asset) DO UPDATE SET \
               requests = analytics_minute.requests + EXCLUDED.requests, \
               paid = analytics_minute.paid + EXCLUDED.paid, \
               refused = analytics_minute.refused + EXCLUDED.refused, \
               captures = analytics_minute.captures + EXCLUDED.captures, \
               revenue = analytics_minute.revenue + EXCLUDED.revenue, \
               fees = analytics_minute.fees + EXCLUDED.fees, \
               voids = analytics_minute.voids + EXCLUDED.voids, \
               expiries = analytics_minute.expiries + EXCLUDED.expiries, \
               upstream_errors = analytics_minute.upstream_errors + EXCLUDED.upstream_errors, \
               refunds = analytics_minute.refunds + EXCLUDED.refunds, \
               refunded = analytics_minute.refunded + EXCLUDED.refunded, \
               latency = ARRAY(SELECT a + b FROM unnest(analytics_minute.latency, EXCLUDED.latency) AS x(a, b))",
        )
        .bind(*minute as f64)
        .bind(route)
        .bind(merchant)
        .bind(asset)
        .bind(c.requests)
        .bind(c.paid)
        .bind(c.refused)
        .bind(c.captures)
        .bind(c.revenue)
        .bind(c.fees)
        .bind(c.voids)
        .bind(c.expiries)
        .bind(c.upstream_errors)
        .bind(c.refunds)
        .bind(c.refunded)
        .bind(&c.latency)
        .execute(&mut *tx)
        .await?;
    }
    for ((hour, payer, merchant, asset), (n, spent)) in &payers {
        sqlx::query(
            "INSERT INTO analytics_payer_hour (hour, payer, merchant, asset, payments, spent) \
             VALUES (to_timestamp($1), $2, $3, $4, $5, $6) \
             ON CONFLICT (hour, payer, merchant, asset) DO UPDATE SET \
               payments = analytics_payer_hour.payments + EXCLUDED.payments, \
               spent = analytics_payer_hour.spent + EXCLUDED.spent",
        )
        .bind(*hour as f64)
        .bind(payer)
        .bind(merchant)
        .bind(asset)
        .bind(n)
        .bind(spent)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(events.len())
}

fn bucket_seconds(b: AnalyticsBucket) -> i64 {
    match b {
        AnalyticsBucket::Hour => 3600,
        AnalyticsBucket::Day => 86_400,
        AnalyticsBucket::Minute | AnalyticsBucket::Unspecified => 60,
    }
}

/// Most points one answer may have.
const MAX_POINTS: i64 = 10_000;

/// Answers an analytics request from the aggregates plus the pending events.
pub async fn query(pool: &PgPool, r: &AnalyticsRequest) -> Result<AnalyticsResponse, LedgerError> {
    let now = crate::verify::unix_now();
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let to = if r.to_unix > 0 { r.to_unix } else { now + 1 };
    let from = if r.from_unix > 0 {
        r.from_unix
    } else {
        to - 3600
    };
    if from >= to {
        return Err(LedgerError::InvalidArgument(
            "from_unix must be before to_unix".into(),
        ));
    }
    let bucket = bucket_seconds(AnalyticsBucket::try_from(r.bucket).unwrap_or_default());
    let first = from - from.rem_euclid(bucket);
    if (to - first) / bucket > MAX_POINTS {
        return Err(LedgerError::InvalidArgument(format!(
            "at most {MAX_POINTS} buckets per query: widen the bucket or shorten the range"
        )));
    }
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let merchant = opt(&r.merchant);
    let asset = opt(&r.asset);
    // Minutes overlapping [from, to): a partial minute counts whole.
    let from_minute = from - from.rem_euclid(60);
    let rows = sqlx::query(
        "SELECT extract(epoch FROM minute)::bigint AS minute, route, merchant, asset, requests, paid, refused, \
           captures, revenue, fees, voids, expiries, upstream_errors, refunds, refunded, latency \
         FROM analytics_minute WHERE minute >= to_timestamp($1) AND minute < to_timestamp($2) \
           AND ($3::text IS NULL OR merchant = $3) AND ($4::text IS NULL OR asset = $4)",
    )
    .bind(from_minute as f64)
    .bind(to as f64)
    .bind(&merchant)
    .bind(&asset)
    .fetch_all(pool)
    .await?;
    let mut cells: BTreeMap<CellKey, Cell> = BTreeMap::new();
    for row in &rows {
        let mut latency: Vec<i64> = row.try_get("latency")?;
        latency.resize(LATENCY_BUCKETS, 0);
        let cell = Cell {
            requests: row.try_get("requests")?,
            paid: row.try_get("paid")?,
            refused: row.try_get("refused")?,
            captures: row.try_get("captures")?,
            revenue: row.try_get("revenue")?,
            fees: row.try_get("fees")?,
            voids: row.try_get("voids")?,
            expiries: row.try_get("expiries")?,
            upstream_errors: row.try_get("upstream_errors")?,
            refunds: row.try_get("refunds")?,
            refunded: row.try_get("refunded")?,
            latency,
        };
        cells
            .entry((
                row.try_get("minute")?,
                row.try_get("route")?,
                row.try_get("merchant")?,
                row.try_get("asset")?,
            ))
            .or_default()
            .add(&cell);
    }
    let pending = sqlx::query(&format!(
        "SELECT {PENDING_COLUMNS} FROM analytics_pending \
         WHERE at >= to_timestamp($1) AND at < to_timestamp($2) \
           AND ($3::text IS NULL OR merchant = $3) AND ($4::text IS NULL OR asset = $4)"
    ))
    .bind(from_minute as f64)
    .bind(to as f64)
    .bind(&merchant)
    .bind(&asset)
    .fetch_all(pool)
    .await?;
    let pending = pending
        .iter()
        .map(pending_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let (pending_cells, pending_payers) = fold(&pending);
    for (k, c) in &pending_cells {
        cells.entry(k.clone()).or_default().add(c);
    }

    let mut points: BTreeMap<i64, Cell> = BTreeMap::new();
    let mut start = first;
    while start < to {
        points.insert(start, Cell::default());
        start += bucket;
    }
    let mut routes: BTreeMap<(String, String), Cell> = BTreeMap::new();
    let mut totals = Cell::default();
    for ((minute, route, _merchant, asset), c) in &cells {
        let b = minute - minute.rem_euclid(bucket);
        points.entry(b.max(first)).or_default().add(c);
        routes
            .entry((route.clone(), asset.clone()))
            .or_default()
            .add(c);
        totals.add(c);
    }

    let top_n = match r.top_payers {
        0 => 10,
        n => n.min(100),
    };
    let from_hour = from - from.rem_euclid(3600);
    let payer_rows = sqlx::query(
        "SELECT payer, asset, sum(payments)::bigint AS payments, sum(spent)::bigint AS spent \
         FROM analytics_payer_hour WHERE hour >= to_timestamp($1) AND hour < to_timestamp($2) \
           AND ($3::text IS NULL OR merchant = $3) AND ($4::text IS NULL OR asset = $4) \
         GROUP BY payer, asset",
    )
    .bind(from_hour as f64)
    .bind(to as f64)
    .bind(&merchant)
    .bind(&asset)
    .fetch_all(pool)
    .await?;
    let mut payers: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for row in &payer_rows {
        let e = payers
            .entry((row.try_get("payer")?, row.try_get("asset")?))
            .or_default();
        e.0 += row.try_get::<i64, _>("payments")?;
        e.1 += row.try_get::<i64, _>("spent")?;
    }
    for ((_, payer, _, asset), (n, spent)) in &pending_payers {
        let e = payers.entry((payer.clone(), asset.clone())).or_default();
        e.0 += n;
        e.1 += spent;
    }
    let mut top: Vec<_> = payers.into_iter().filter(|(_, (n, _))| *n > 0).collect();
    top.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(top_n as usize);
    let u = |v: i64| u64::try_from(v).unwrap_or(0);

    Ok(AnalyticsResponse {
        points: points.iter().map(|(s, c)| c.point(*s)).collect(),
        routes: routes
            .iter()
            .map(|((route, asset), c)| RouteStats {
                route: route.clone(),
                asset: asset.clone(),
                requests: u(c.requests),
                paid: u(c.paid),
                revenue: u(c.revenue),
                fees: u(c.fees),
                net_revenue: c.revenue - c.fees - c.refunded,
                refunded: u(c.refunded),
                latency_p50_micros: c.percentile(500),
                latency_p95_micros: c.percentile(950),
            })
            .collect(),
        top_payers: top
            .into_iter()
            .map(|((payer, asset), (n, spent))| PayerStats {
                payer_account: payer,
                asset,
                payments: u(n),
                spent: u(spent),
            })
            .collect(),
        totals: Some(totals.point(first)),
        from_unix: from,
        to_unix: to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_grow_by_root_two_and_percentiles_use_upper_bounds() {
        assert_eq!(bucket_bound(0), 100);
        assert_eq!(bucket_bound(1), 141);
        assert_eq!(bucket_bound(2), 200);
        assert_eq!(bucket_of(100), 0);
        assert_eq!(bucket_of(101), 1);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        let mut c = Cell::default();
        for micros in [150u64, 150, 150, 150, 150, 150, 150, 150, 150, 5000] {
            c.latency[bucket_of(micros)] += 1;
        }
        assert_eq!(c.percentile(500), 200);
        assert_eq!(c.percentile(990), bucket_bound(bucket_of(5000)));
        assert!(bucket_bound(bucket_of(5000)) >= 5000);
    }

    #[test]
    fn folding_counts_each_event_in_its_minute_and_payer_hour() {
        let ev = |minute: i64, event: &str, amount: i64| PendingEvent {
            minute,
            event: event.into(),
            route: "quote".into(),
            merchant: "m".into(),
            payer: "p".into(),
            asset: "USD".into(),
            amount,
            fee: 0,
            http_status: Some(200),
            upstream_micros: Some(1000),
        };
        let (cells, payers) = fold(&[
            ev(60, "authorized", 10),
            ev(60, "captured", 10),
            ev(120, "refused", 0),
            ev(120, "refunded", 4),
        ]);
        let a = &cells[&(60, "quote".into(), "m".into(), "USD".into())];
        assert_eq!((a.requests, a.paid, a.captures, a.revenue), (1, 1, 1, 10));
        let b = &cells[&(120, "quote".into(), "m".into(), "USD".into())];
        assert_eq!((b.requests, b.refused, b.refunded), (1, 1, 4));
        assert_eq!(payers[&(0, "p".into(), "m".into(), "USD".into())], (1, 6));
    }
}
