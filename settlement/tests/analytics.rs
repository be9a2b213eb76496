//! Analytics rollups against real Postgres: answers read from the hourly and daily
//! rollups (plus events not yet folded) equal the answers read from minutes alone,
//! for aligned and unaligned ranges and every bucket; ranges widen to whole buckets;
//! rebuilding the rollups from the minutes gives what the fold maintained.
//!
//! `analytics_at_scale` (ignored; `make bench-analytics`) seeds millions of minute
//! rows and prints how long queries over an hour, a day and a week take.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use sqlx::{PgPool, Row};
use x402_proto::settlement::v1::{AnalyticsBucket, AnalyticsRequest};
use x402_settlement::analytics;

async fn database() -> PgPool {
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let pool = x402_settlement::db::connect(&url, 4).await.unwrap();
    x402_settlement::db::migrate(&pool).await.unwrap();
    pool
}

const DAY: i64 = 86_400;
const EVENTS: [&str; 6] = [
    "authorized",
    "refused",
    "captured",
    "voided",
    "expired",
    "refunded",
];

/// `n` events spread over three days from `base`, deterministic, each a row of
/// `analytics_pending`; returns how many of them are requests (authorized or refused).
async fn seed_pending(pool: &PgPool, base: i64, n: i64, salt: i64) -> i64 {
    let mut at = Vec::new();
    let mut event = Vec::new();
    let mut route = Vec::new();
    let mut merchant = Vec::new();
    let mut payer = Vec::new();
    let mut asset = Vec::new();
    let mut amount = Vec::new();
    let mut status = Vec::new();
    let mut micros = Vec::new();
    let mut requests = 0;
    for i in 0..n {
        let k = i * 7919 + salt;
        at.push((base + k.rem_euclid(3 * DAY)) as f64);
        let e = EVENTS[(k % 6) as usize];
        requests += i64::from(matches!(e, "authorized" | "refused"));
        event.push(e.to_string());
        route.push(format!("route-{}", k % 5));
        merchant.push(format!("merchant-{}", k % 3));
        payer.push(format!("payer-{}", k % 11));
        asset.push(if k % 4 == 0 { "EUR" } else { "USD" }.to_string());
        amount.push(k % 97 + 1);
        status.push(if k % 13 == 0 { 502 } else { 200 });
        micros.push(100 + (k * 37) % 400_000);
    }
    sqlx::query(
        "INSERT INTO analytics_pending (at, event, route, merchant, payer, asset, amount, http_status, upstream_micros) \
         SELECT to_timestamp(t), e, r, m, p, a, x, s, u FROM unnest($1::float8[], $2::text[], $3::text[], \
           $4::text[], $5::text[], $6::text[], $7::bigint[], $8::int[], $9::bigint[]) AS k(t, e, r, m, p, a, x, s, u)",
    )
    .bind(&at)
    .bind(&event)
    .bind(&route)
    .bind(&merchant)
    .bind(&payer)
    .bind(&asset)
    .bind(&amount)
    .bind(&status)
    .bind(&micros)
    .execute(pool)
    .await
    .unwrap();
    requests
}

async fn fold_all(pool: &PgPool) {
    for _ in 0..10_000 {
        if analytics::fold_pending(pool, 500).await.unwrap() == 0 {
            return;
        }
    }
    panic!("the fold never drained analytics_pending");
}

/// A fold takes its batch by key, however long the backlog: a plan that joins the
/// batch against every pending row makes each batch cost the whole backlog, and a
/// fold that falls behind then never catches up (and holds back vacuum meanwhile).
#[tokio::test]
async fn a_fold_takes_its_batch_by_key_whatever_the_backlog() {
    let pool = database().await;
    seed_pending(&pool, 1_700_000_000, 20_000, 1).await;
    sqlx::query("ANALYZE analytics_pending")
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "PREPARE take(bigint) AS {}",
        analytics::fold_statement()
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE take(500)")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Cond: (id = ANY"), "{plan}");
    assert!(
        !plan.contains("Join") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    drop(conn);
    // And it takes the oldest events, each once.
    assert_eq!(analytics::fold_pending(&pool, 500).await.unwrap(), 500);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics_pending")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 19_500);
}

fn request(from: i64, to: i64, bucket: AnalyticsBucket) -> AnalyticsRequest {
    AnalyticsRequest {
        from_unix: from,
        to_unix: to,
        bucket: bucket as i32,
        top_payers: 20,
        ..Default::default()
    }
}

async fn rollup_rows(pool: &PgPool) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["analytics_hour", "analytics_day", "analytics_payer_day"] {
        for r in sqlx::query(&format!("SELECT t::text AS t FROM {table} t ORDER BY 1"))
            .fetch_all(pool)
            .await
            .unwrap()
        {
            rows.push(format!("{table} {}", r.get::<String, _>("t")));
        }
    }
    rows
}

#[tokio::test]
async fn rollups_answer_exactly_what_the_minutes_do() {
    let pool = database().await;
    let now = i64::try_from(x402_e2e::stack::unix_now()).unwrap();
    let base = now - now.rem_euclid(DAY) - 4 * DAY;
    let folded = seed_pending(&pool, base, 6000, 0).await;
    fold_all(&pool).await;
    // Events not folded yet count too, exactly once.
    let pending = seed_pending(&pool, base, 1500, 3).await;

    let whole = analytics::query(&pool, &request(base, base + 3 * DAY, AnalyticsBucket::Day))
        .await
        .unwrap();
    let totals = whole.totals.unwrap();
    assert_eq!(totals.requests as i64, folded + pending);
    assert_eq!(whole.points.len(), 3);
    // An unaligned range counts whole days, and says so.
    let widened = analytics::query(
        &pool,
        &request(base + 5, base + 2 * DAY + 7, AnalyticsBucket::Day),
    )
    .await
    .unwrap();
    assert_eq!((widened.from_unix, widened.to_unix), (base, base + 3 * DAY));
    assert_eq!(widened.totals, whole.totals);
    assert!(totals.latency_p99_micros > 0 && !whole.top_payers.is_empty());

    let ranges = [
        (base, base + 3 * DAY, AnalyticsBucket::Day),
        (base, base + 3 * DAY, AnalyticsBucket::Hour),
        (base + 1234, base + 3 * DAY - 77, AnalyticsBucket::Day),
        (base + 1234, base + 3 * DAY - 77, AnalyticsBucket::Hour),
        (
            base + DAY - 1800,
            base + DAY + 5400 + 30,
            AnalyticsBucket::Minute,
        ),
        (
            base + DAY - 1800,
            base + DAY + 5400 + 30,
            AnalyticsBucket::Hour,
        ),
        (base + 3599, base + 7201, AnalyticsBucket::Hour),
        (base + 61, base + 119, AnalyticsBucket::Minute),
        (base - DAY, base + 5 * DAY, AnalyticsBucket::Day),
    ];
    for (from, to, bucket) in ranges {
        let r = request(from, to, bucket);
        let fast = analytics::query(&pool, &r).await.unwrap();
        let slow = analytics::query_from_minutes(&pool, &r).await.unwrap();
        assert_eq!(
            fast,
            slow,
            "{bucket:?} from base+{} to base+{}",
            from - base,
            to - base
        );
        for merchant in ["merchant-1", "nobody"] {
            let r = AnalyticsRequest {
                merchant: merchant.into(),
                asset: "USD".into(),
                ..r.clone()
            };
            let fast = analytics::query(&pool, &r).await.unwrap();
            let slow = analytics::query_from_minutes(&pool, &r).await.unwrap();
            assert_eq!(
                fast,
                slow,
                "{merchant} {bucket:?} from base+{}",
                from - base
            );
        }
    }

    // Rebuilding the rollups from the minutes gives what the fold maintained.
    fold_all(&pool).await;
    let maintained = rollup_rows(&pool).await;
    assert!(maintained.len() > 3 * 24);
    analytics::rebuild_rollups(&pool).await.unwrap();
    assert_eq!(rollup_rows(&pool).await, maintained);
}

/// Seeds `X402_ANALYTICS_ROWS` (default 1.7 million) minute rows over a week — about
/// 170 route cells a minute — and prints query times over an hour by minute, a day by
/// hour and a week by day, from the rollups and from minutes alone.
#[tokio::test]
#[ignore = "seeds millions of rows; run with `make bench-analytics`"]
async fn analytics_at_scale() {
    let rows: i64 = std::env::var("X402_ANALYTICS_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_700_000);
    let pool = database().await;
    let now = i64::try_from(x402_e2e::stack::unix_now()).unwrap();
    let minutes = 7 * DAY / 60;
    let cells = (rows / minutes).max(1);
    let end = now - now.rem_euclid(60);
    let start = end - minutes * 60;
    let seeding = Instant::now();
    sqlx::query(
        "INSERT INTO analytics_minute (minute, route, merchant, asset, requests, paid, refused, captures, \
           revenue, fees, voids, expiries, upstream_errors, refunds, refunded, latency) \
         SELECT to_timestamp($1 + m * 60), 'route-' || c, 'merchant-' || (c % 7), 'USD', \
           10 + c % 5, 9, 1, 9, 9000 + c, 90, 0, 0, c % 2, 0, 0, \
           ARRAY(SELECT CASE WHEN b BETWEEN 8 AND 12 THEN 1 + (m + b) % 3 ELSE 0 END::bigint \
                 FROM generate_series(1, 40) b) \
         FROM generate_series(0, $2 - 1) m, generate_series(0, $3 - 1) c",
    )
    .bind(start as f64)
    .bind(minutes)
    .bind(cells)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO analytics_payer_hour (hour, payer, merchant, asset, payments, spent) \
         SELECT to_timestamp($1 + h * 3600), 'payer-' || p, 'merchant-' || (p % 7), 'USD', 30, 30000 + p \
         FROM generate_series(0, 7 * 24 - 1) h, generate_series(0, 999) p",
    )
    .bind((start - start.rem_euclid(3600)) as f64)
    .execute(&pool)
    .await
    .unwrap();
    analytics::rebuild_rollups(&pool).await.unwrap();
    sqlx::query("VACUUM ANALYZE").execute(&pool).await.unwrap();
    let seeded: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics_minute")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "seeded {seeded} minute rows ({cells} cells a minute, 1000 payers) in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let cases = [
        ("1 hour by minute", end - 3600 + 17, AnalyticsBucket::Minute),
        ("1 day by hour", end - DAY + 17, AnalyticsBucket::Hour),
        ("1 week by day", start + 17, AnalyticsBucket::Day),
        ("1 week by hour", start + 17, AnalyticsBucket::Hour),
    ];
    for (name, from, bucket) in cases {
        let r = request(from, end + 1, bucket);
        let mut times = Vec::new();
        let mut answers = Vec::new();
        for minutes_only in [false, true] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                let a = if minutes_only {
                    analytics::query_from_minutes(&pool, &r).await.unwrap()
                } else {
                    analytics::query(&pool, &r).await.unwrap()
                };
                best = best.min(t.elapsed().as_secs_f64());
                answers.push(a);
            }
            times.push(best);
        }
        assert_eq!(
            answers[0], answers[5],
            "{name}: rollups and minutes disagree"
        );
        println!(
            "{name}: {:.3} s with rollups, {:.3} s from minutes (best of 3)",
            times[0], times[1]
        );
    }
}
