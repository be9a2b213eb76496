//! Analytics over incremental aggregates.
//!
//! The paid path appends one row per event to `analytics_pending`; [`fold_pending`]
//! (run by a background task every few hundred milliseconds) moves them into the
//! per-minute, per-hour and per-day rows of `analytics_minute`, `analytics_hour` and
//! `analytics_day` and the payer rows of `analytics_payer_hour` and
//! `analytics_payer_day`, in one transaction, so each event counts exactly once in
//! each. A query ([`query`]) reads the level of its bucket over whole buckets plus
//! whatever is still pending, so answers are exact and their cost depends on the
//! number of points and routes, not on how many payments the ledger holds.
//!
//! Upstream latency is kept as a histogram per cell with buckets a factor √2 apart
//! from 100 µs (summed as the cells roll up); percentiles report the upper bound of
//! the bucket they fall in.

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

    /// A request that was paid for.
    fn count_paid(&mut self) {
        self.requests += 1;
        self.paid += 1;
    }

    /// A capture's money (its upstream's status and time are the caller's).
    fn count_capture(&mut self, e: &PendingEvent) {
        self.captures += 1;
        self.revenue += e.amount;
        self.fees += e.fee;
    }

    /// Counts one event.
    fn apply(&mut self, e: &PendingEvent) {
        match e.event.as_str() {
            "authorized" => self.count_paid(),
            "refused" => {
                self.requests += 1;
                self.refused += 1;
            }
            // A payment captured as it was authorized: both events in one, with no
            // upstream status or time (the response came later).
            "debited" => {
                self.count_paid();
                self.count_capture(e);
            }
            "captured" => {
                self.count_capture(e);
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
            "captured" | "debited" => Some((1, e.amount)),
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

/// The aggregate tables, finest first, with the width of their buckets in seconds.
const LEVELS: [(&str, i64); 3] = [
    ("analytics_minute", 60),
    ("analytics_hour", 3600),
    ("analytics_day", 86_400),
];

/// `cells` regrouped into buckets of `width` seconds.
fn coarsen(cells: &BTreeMap<CellKey, Cell>, width: i64) -> BTreeMap<CellKey, Cell> {
    let mut out: BTreeMap<CellKey, Cell> = BTreeMap::new();
    for ((start, route, merchant, asset), c) in cells {
        out.entry((
            start - start.rem_euclid(width),
            route.clone(),
            merchant.clone(),
            asset.clone(),
        ))
        .or_default()
        .add(c);
    }
    out
}

/// Adds `cells` to the aggregate `table` in one statement. The latency histograms
/// travel as one flat array, [`LATENCY_BUCKETS`] entries per cell.
async fn upsert_cells(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    cells: &BTreeMap<CellKey, Cell>,
) -> Result<(), sqlx::Error> {
    if cells.is_empty() {
        return Ok(());
    }
    let key = if table == "analytics_minute" {
        "minute"
    } else {
        "start"
    };
    let mut starts = Vec::with_capacity(cells.len());
    let (mut routes, mut merchants, mut assets) = (Vec::new(), Vec::new(), Vec::new());
    let mut counters: [Vec<i64>; 11] = Default::default();
    let mut latency = Vec::with_capacity(cells.len() * LATENCY_BUCKETS);
    for ((start, route, merchant, asset), c) in cells {
        starts.push(*start as f64);
        routes.push(route.as_str());
        merchants.push(merchant.as_str());
        assets.push(asset.as_str());
        let values = [
            c.requests,
            c.paid,
            c.refused,
            c.captures,
            c.revenue,
            c.fees,
            c.voids,
            c.expiries,
            c.upstream_errors,
            c.refunds,
            c.refunded,
        ];
        for (column, v) in counters.iter_mut().zip(values) {
            column.push(v);
        }
        let mut histogram = c.latency.clone();
        histogram.resize(LATENCY_BUCKETS, 0);
        latency.extend(histogram);
    }
    const SUMMED: [&str; 11] = [
        "requests",
        "paid",
        "refused",
        "captures",
        "revenue",
        "fees",
        "voids",
        "expiries",
        "upstream_errors",
        "refunds",
        "refunded",
    ];
    let updates: Vec<String> = SUMMED
        .iter()
        .map(|c| format!("{c} = {table}.{c} + EXCLUDED.{c}"))
        .collect();
    let sql = format!(
        "INSERT INTO {table} ({key}, route, merchant, asset, {cols}, latency) \
         SELECT to_timestamp(k.t), k.route, k.merchant, k.asset, {kcols}, \
           ($16::bigint[])[(k.n - 1) * {LATENCY_BUCKETS} + 1 : k.n * {LATENCY_BUCKETS}] \
         FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], \
           $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], \
           $13::bigint[], $14::bigint[], $15::bigint[]) \
           WITH ORDINALITY AS k(t, route, merchant, asset, {cols}, n) \
         ON CONFLICT ({key}, route, merchant, asset) DO UPDATE SET {updates}, \
           latency = ARRAY(SELECT a + b FROM unnest({table}.latency, EXCLUDED.latency) AS x(a, b))",
        cols = SUMMED.join(", "),
        kcols = SUMMED.map(|c| format!("k.{c}")).join(", "),
        updates = updates.join(", "),
    );
    let mut q = sqlx::query(&sql)
        .bind(&starts)
        .bind(&routes)
        .bind(&merchants)
        .bind(&assets);
    for column in &counters {
        q = q.bind(column);
    }
    q.bind(&latency).execute(&mut **tx).await?;
    Ok(())
}

/// Adds payer totals to `table` (keyed by `key`: hour or day) in one statement.
async fn upsert_payers(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    key: &str,
    payers: &BTreeMap<PayerKey, (i64, i64)>,
) -> Result<(), sqlx::Error> {
    if payers.is_empty() {
        return Ok(());
    }
    let starts: Vec<f64> = payers.keys().map(|k| k.0 as f64).collect();
    let ids: Vec<&str> = payers.keys().map(|k| k.1.as_str()).collect();
    let merchants: Vec<&str> = payers.keys().map(|k| k.2.as_str()).collect();
    let assets: Vec<&str> = payers.keys().map(|k| k.3.as_str()).collect();
    let counts: Vec<i64> = payers.values().map(|v| v.0).collect();
    let spent: Vec<i64> = payers.values().map(|v| v.1).collect();
    sqlx::query(&format!(
        "INSERT INTO {table} ({key}, payer, merchant, asset, payments, spent) \
         SELECT to_timestamp(t), p, m, a, n, s \
         FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[]) \
           AS k(t, p, m, a, n, s) \
         ON CONFLICT ({key}, payer, merchant, asset) DO UPDATE SET \
           payments = {table}.payments + EXCLUDED.payments, \
           spent = {table}.spent + EXCLUDED.spent"
    ))
    .bind(&starts)
    .bind(&ids)
    .bind(&merchants)
    .bind(&assets)
    .bind(&counts)
    .bind(&spent)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The statement that takes the oldest `$1` pending events for a fold. The ids are
/// collected first (`ARRAY(...)`) and then deleted by key: written as `id IN
/// (SELECT ...)`, the plan joined the batch against every pending row, so a fold that
/// fell behind scanned the whole backlog for each batch, ran for minutes and held back
/// vacuum for the whole database meanwhile.
pub fn fold_statement() -> String {
    format!(
        "DELETE FROM analytics_pending WHERE id = ANY (ARRAY( \
           SELECT id FROM analytics_pending ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
         RETURNING {PENDING_COLUMNS}"
    )
}

/// Folds up to `limit` pending events into the aggregates (minutes, hours, days and
/// payer hours and days, all in one transaction); returns how many.
pub async fn fold_pending(pool: &PgPool, limit: i64) -> Result<usize, LedgerError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(&fold_statement())
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
    for (table, width) in LEVELS {
        upsert_cells(&mut tx, table, &coarsen(&cells, width)).await?;
    }
    upsert_payers(&mut tx, "analytics_payer_hour", "hour", &payers).await?;
    let mut days: BTreeMap<PayerKey, (i64, i64)> = BTreeMap::new();
    for ((hour, payer, merchant, asset), (n, spent)) in &payers {
        let e = days
            .entry((
                hour - hour.rem_euclid(86_400),
                payer.clone(),
                merchant.clone(),
                asset.clone(),
            ))
            .or_default();
        e.0 += n;
        e.1 += spent;
    }
    upsert_payers(&mut tx, "analytics_payer_day", "day", &days).await?;
    tx.commit().await?;
    Ok(events.len())
}

/// Recomputes the hourly and daily rollups from the minutes and payer hours, in one
/// transaction (the same statements the migration that added them backfilled with).
/// For repair after editing the minutes by hand; the fold keeps them in step otherwise.
pub async fn rebuild_rollups(pool: &PgPool) -> Result<(), LedgerError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE analytics_minute, analytics_payer_hour IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM analytics_hour")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM analytics_day")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM analytics_payer_day")
        .execute(&mut *tx)
        .await?;
    for (target, width, source, column) in [
        ("analytics_hour", 3600, "analytics_minute", "minute"),
        ("analytics_day", 86_400, "analytics_hour", "start"),
    ] {
        sqlx::query(&format!(
            "INSERT INTO {target} \
             SELECT to_timestamp(floor(extract(epoch FROM {column}) / {width}) * {width}), route, merchant, asset, \
               sum(requests), sum(paid), sum(refused), sum(captures), sum(revenue), sum(fees), sum(voids), \
               sum(expiries), sum(upstream_errors), sum(refunds), sum(refunded), \
               (SELECT array_agg(s ORDER BY i) FROM ( \
                  SELECT ((n - 1) % {LATENCY_BUCKETS}) + 1 AS i, sum(v)::bigint AS s \
                  FROM unnest(array_agg(latency)) WITH ORDINALITY AS u(v, n) GROUP BY 1) AS per_bucket) \
             FROM {source} GROUP BY 1, 2, 3, 4"
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO analytics_payer_day \
         SELECT to_timestamp(floor(extract(epoch FROM hour) / 86400) * 86400), payer, merchant, asset, \
           sum(payments), sum(spent) \
         FROM analytics_payer_hour GROUP BY 1, 2, 3, 4",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
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
///
/// Buckets are whole: the range widens to bucket boundaries (minutes, hours or UTC
/// days), and the answer's `from_unix`/`to_unix` say what was counted. So each
/// query reads the aggregate level of its bucket only — a week by day reads seven
/// day rows per cell, a day by hour 24 hour rows per cell — and its cost depends on
/// the number of points and routes, not on the number of payments. The reads share
/// one snapshot, so an event being folded meanwhile counts exactly once.
pub async fn query(pool: &PgPool, r: &AnalyticsRequest) -> Result<AnalyticsResponse, LedgerError> {
    query_levels(pool, r, LEVELS.len()).await
}

/// The same answer as [`query`] computed from minutes alone (no rollups): slower on
/// long ranges, for checking that the rollups agree with the minutes.
pub async fn query_from_minutes(
    pool: &PgPool,
    r: &AnalyticsRequest,
) -> Result<AnalyticsResponse, LedgerError> {
    query_levels(pool, r, 1).await
}

fn cell_from_row(row: &sqlx::postgres::PgRow) -> Result<Cell, sqlx::Error> {
    let mut latency: Vec<i64> = row.try_get("latency")?;
    latency.resize(LATENCY_BUCKETS, 0);
    Ok(Cell {
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
    })
}

async fn query_levels(
    pool: &PgPool,
    r: &AnalyticsRequest,
    levels: usize,
) -> Result<AnalyticsResponse, LedgerError> {
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
    let floor = |t: i64, w: i64| t - t.rem_euclid(w);
    let ceil = |t: i64, w: i64| t + (w - t.rem_euclid(w)) % w;
    let (first, end) = (floor(from, bucket), ceil(to, bucket));
    if (end - first) / bucket > MAX_POINTS {
        return Err(LedgerError::InvalidArgument(format!(
            "at most {MAX_POINTS} buckets per query: widen the bucket or shorten the range"
        )));
    }
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let merchant = opt(&r.merchant);
    let asset = opt(&r.asset);
    // The finest level whose buckets tile the range (the bucket's own, or minutes).
    let (table, _) = LEVELS
        .iter()
        .take(levels)
        .rev()
        .find(|(_, w)| bucket % w == 0)
        .unwrap_or(&LEVELS[0]);
    // Payer totals are kept by hour and day: for minute buckets a partial hour at
    // either edge counts whole.
    let payer_width = bucket.max(3600);
    let (payer_from, payer_to) = (floor(from, payer_width), ceil(to, payer_width));
    let (payer_table, payer_column) = if payer_width == 86_400 && levels > 1 {
        ("analytics_payer_day", "day")
    } else {
        ("analytics_payer_hour", "hour")
    };

    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let column = if *table == "analytics_minute" {
        "minute"
    } else {
        "start"
    };
    let rows = sqlx::query(&format!(
        "SELECT extract(epoch FROM {column})::bigint AS start, route, merchant, asset, requests, \
           paid, refused, captures, revenue, fees, voids, expiries, upstream_errors, refunds, \
           refunded, latency \
         FROM {table} WHERE {column} >= to_timestamp($1) AND {column} < to_timestamp($2) \
           AND ($3::text IS NULL OR merchant = $3) AND ($4::text IS NULL OR asset = $4)"
    ))
    .bind(first as f64)
    .bind(end as f64)
    .bind(&merchant)
    .bind(&asset)
    .fetch_all(&mut *tx)
    .await?;
    let mut cells: BTreeMap<CellKey, Cell> = BTreeMap::new();
    for row in &rows {
        let cell = cell_from_row(row)?;
        cells
            .entry((
                row.try_get("start")?,
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
    .bind(payer_from as f64)
    .bind(payer_to as f64)
    .bind(&merchant)
    .bind(&asset)
    .fetch_all(&mut *tx)
    .await?;
    let pending = pending
        .iter()
        .map(pending_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    // Pending payer totals over the payer range, pending cells over the points'
    // range, as they will count once folded.
    let (_, pending_payers) = fold(&pending);
    let in_range: Vec<PendingEvent> = pending
        .into_iter()
        .filter(|e| e.minute >= first && e.minute < end)
        .collect();
    let (pending_cells, _) = fold(&in_range);
    for (k, c) in &pending_cells {
        cells.entry(k.clone()).or_default().add(c);
    }
    let payer_rows = sqlx::query(&format!(
        "SELECT payer, asset, sum(payments)::bigint AS payments, sum(spent)::bigint AS spent \
         FROM {payer_table} WHERE {payer_column} >= to_timestamp($1) AND {payer_column} < to_timestamp($2) \
           AND ($3::text IS NULL OR merchant = $3) AND ($4::text IS NULL OR asset = $4) \
         GROUP BY payer, asset"
    ))
    .bind(payer_from as f64)
    .bind(payer_to as f64)
    .bind(&merchant)
    .bind(&asset)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut points: BTreeMap<i64, Cell> = BTreeMap::new();
    let mut start = first;
    while start < end {
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
        from_unix: first,
        to_unix: end,
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
            ev(180, "debited", 7),
        ]);
        let a = &cells[&(60, "quote".into(), "m".into(), "USD".into())];
        assert_eq!((a.requests, a.paid, a.captures, a.revenue), (1, 1, 1, 10));
        let b = &cells[&(120, "quote".into(), "m".into(), "USD".into())];
        assert_eq!((b.requests, b.refused, b.refunded), (1, 1, 4));
        // Captured as it was authorized: a paid request and a capture in one event.
        let c = &cells[&(180, "quote".into(), "m".into(), "USD".into())];
        assert_eq!(
            (
                c.requests,
                c.paid,
                c.captures,
                c.revenue,
                c.latency.iter().sum::<i64>()
            ),
            (1, 1, 1, 7, 0)
        );
        assert_eq!(payers[&(0, "p".into(), "m".into(), "USD".into())], (2, 13));
    }
}
