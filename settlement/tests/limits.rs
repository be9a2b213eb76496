//! Global rate limits counted in Postgres: the window's row starts at a multiple of
//! the window on the database clock, counts exactly the authorizations it let
//! through, and refuses the next one with the seconds left in the window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use x402_proto::settlement::v1::{AuthorizeOutcome, GlobalLimit};

/// Not a divisor of a day or a week, so only an epoch-aligned start is a multiple.
const WINDOW: u32 = 3 * 86_400 + 7;

#[tokio::test]
async fn a_global_limit_counts_in_one_epoch_aligned_window_and_refuses_the_next() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("lena", 100_000).await;
    // A window boundary passing mid-test splits the count; then try on a new route.
    for attempt in 0..3 {
        let route = format!("limited-{attempt}");
        let mut outcomes = Vec::new();
        for i in 0..3 {
            let mut item = paid(&p, &format!("limit-{attempt}-{i}"), 100);
            item.route = route.clone();
            item.global_limit = Some(GlobalLimit {
                max_requests: 2,
                window_seconds: WINDOW,
                client_address: String::new(),
            });
            outcomes.push(h.authorize(item).await);
        }
        let rows: Vec<(i64, i32, i32, i64)> = sqlx::query_as(
            "SELECT window_start, window_seconds, taken, floor(extract(epoch FROM now()))::bigint \
             FROM rate_windows WHERE route = $1",
        )
        .bind(&route)
        .fetch_all(&h.pool)
        .await
        .unwrap();
        if rows.len() != 1 {
            continue;
        }
        let (start, seconds, taken, now) = rows[0];
        assert_eq!(seconds, i32::try_from(WINDOW).unwrap());
        assert_eq!(start % i64::from(WINDOW), 0, "window starts at {start}");
        assert!(
            start <= now && now < start + i64::from(WINDOW),
            "{start} {now}"
        );
        assert_eq!(taken, 2);
        let got: Vec<_> = outcomes.iter().map(outcome).collect();
        assert_eq!(
            got,
            [
                AuthorizeOutcome::Authorized,
                AuthorizeOutcome::Authorized,
                AuthorizeOutcome::RateLimited
            ]
        );
        let retry = i64::from(outcomes[2].retry_after_seconds);
        assert!(
            (1..=i64::from(WINDOW)).contains(&retry) && start + i64::from(WINDOW) - now <= retry,
            "{retry}"
        );
        // Nothing was held for the refused one.
        let holds: i64 =
            sqlx::query_scalar("SELECT count(*) FROM transfers WHERE kind = 'hold' AND route = $1")
                .bind(&route)
                .fetch_one(&h.pool)
                .await
                .unwrap();
        assert_eq!(holds, 2);
        return;
    }
    panic!("three window boundaries passed during the test");
}
