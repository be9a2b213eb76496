//! Global rate limits: a fixed-window counter in Postgres per route and identity, so a
//! limit holds across every Envoy and every settlement replica.
//!
//! Authorize takes a slot inside the transaction that places the hold ([`take`]): the
//! upsert increments the window's row only while it is below the limit, and row locks
//! make concurrent takers of one key queue behind each other, so the count is exact.
//! A refused authorization rolls back and takes nothing. Items with a global limit
//! take the one-item path of [`crate::Ledger::authorize_hold`], not group commit
//! ([`crate::group`]), so the window's row lock never holds up a whole group. Windows are aligned to the
//! Unix epoch on the database's clock, the one clock all replicas share.

use sqlx::{PgPool, Postgres, Transaction};

/// A global limit of one authorize item, checked by [`crate::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimit {
    pub max_requests: u32,
    pub window_seconds: u32,
    /// The client address to count by; `None`: count by the payer account.
    pub client_address: Option<String>,
}

impl GlobalLimit {
    /// The counter's identity for a request by `payer_account`.
    pub fn identity(&self, payer_account: &str) -> String {
        match &self.client_address {
            Some(address) => format!("client:{address}"),
            None => format!("payer:{payer_account}"),
        }
    }
}

/// What [`take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Taken,
    /// The window is full; it ends in this many seconds (at least 1).
    Limited {
        retry_after_seconds: u32,
    },
}

/// Takes one slot of `limit` for `identity` on `route` in the current window.
pub async fn take(
    tx: &mut Transaction<'_, Postgres>,
    route: &str,
    identity: &str,
    limit: &GlobalLimit,
) -> Result<Take, sqlx::Error> {
    let window = i64::from(limit.window_seconds);
    // The window's start by `%`, not `/ $4 * $4`: integer `/` is exact division
    // on CockroachDB, which would start a window every second.
    let taken: Option<i32> = sqlx::query_scalar(
        "INSERT INTO rate_windows (route, identity, window_seconds, window_start, taken) \
         VALUES ($1, $2, $3, floor(extract(epoch FROM now()))::bigint \
           - floor(extract(epoch FROM now()))::bigint % $4, 1) \
         ON CONFLICT (route, identity, window_seconds, window_start) \
         DO UPDATE SET taken = rate_windows.taken + 1 WHERE rate_windows.taken < $5 \
         RETURNING taken",
    )
    .bind(route)
    .bind(identity)
    .bind(i32::try_from(limit.window_seconds).unwrap_or(i32::MAX))
    .bind(window)
    .bind(i32::try_from(limit.max_requests).unwrap_or(i32::MAX))
    .fetch_optional(&mut **tx)
    .await?;
    if taken.is_some() {
        return Ok(Take::Taken);
    }
    let left: i64 =
        sqlx::query_scalar("SELECT $1 - (floor(extract(epoch FROM now()))::bigint % $1)")
            .bind(window)
            .fetch_one(&mut **tx)
            .await?;
    Ok(Take::Limited {
        retry_after_seconds: u32::try_from(left.max(1)).unwrap_or(limit.window_seconds),
    })
}

/// Deletes the counters of windows that are over; returns how many.
pub async fn prune_ended_windows(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM rate_windows WHERE window_start + window_seconds < floor(extract(epoch FROM now()))::bigint",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
