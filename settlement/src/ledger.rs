//! Money movements, each in one Postgres transaction: holds, captures, voids,
//! expiry and deposits.
//!
//! Every operation locks the balance rows it changes in sorted `(account, asset)`
//! order, so two operations never wait on each other in a cycle; serialization
//! failures and deadlocks (which Postgres may still report) run the whole
//! transaction again, a bounded number of times. The database, not this code, has
//! the last word on the invariants: a payer's CHECK refuses overdrafts, a partial
//! unique index refuses a second resolution of a hold or a reused nonce.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Row, Transaction};
use x402_proto::settlement::v1::{
    AuthorizeOutcome, AuthorizeResult, ResolveOutcome, ResolveResult,
};

use crate::error::{constraint, is_retryable, sqlstate, LedgerError};
use crate::limits::{self, Take};
use crate::verify::{authorized, own_refusal, refused, unix_now, CheckedAuthorize};

/// Attempts of one operation before a serialization failure or deadlock is
/// reported as unavailable.
const MAX_ATTEMPTS: u32 = 6;

/// The account every deposit is debited from.
pub const SYSTEM_CREDIT_ACCOUNT: &str = "system:credit";

/// Why one attempt of an operation stopped.
pub(crate) enum Attempt {
    /// Run the whole transaction again.
    Retry(sqlx::Error),
    /// Run the whole transaction again at once: what it read has changed (a group
    /// met a concurrent call, or a caller's deadline passed).
    Again,
    Fail(LedgerError),
}

impl From<sqlx::Error> for Attempt {
    fn from(err: sqlx::Error) -> Self {
        if is_retryable(&err) {
            Attempt::Retry(err)
        } else {
            Attempt::Fail(err.into())
        }
    }
}

impl From<LedgerError> for Attempt {
    fn from(err: LedgerError) -> Self {
        Attempt::Fail(err)
    }
}

pub(crate) async fn retrying<T, F, Fut>(mut op: F) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Fail(e)) => return Err(e),
            Err(Attempt::Again) => {
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    return Err(LedgerError::FailedPrecondition(
                        "the transaction kept meeting concurrent changes".into(),
                    ));
                }
            }
            Err(Attempt::Retry(e)) => {
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    return Err(LedgerError::Unavailable(e));
                }
                tracing::debug!(attempt, error = %e, "retrying ledger transaction");
                tokio::time::sleep(Duration::from_millis(2u64 << attempt)).await;
            }
        }
    }
}

/// Signed changes to the four counters of one balance row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) debits_pending: i64,
    pub(crate) debits_posted: i64,
    pub(crate) credits_pending: i64,
    pub(crate) credits_posted: i64,
}

impl Delta {
    /// The sum of two changes, or `None` when a counter would overflow (one amount
    /// may be as large as i64::MAX, so two of them in one group can be).
    fn checked_add(self, o: Delta) -> Option<Delta> {
        Some(Delta {
            debits_pending: self.debits_pending.checked_add(o.debits_pending)?,
            debits_posted: self.debits_posted.checked_add(o.debits_posted)?,
            credits_pending: self.credits_pending.checked_add(o.credits_pending)?,
            credits_posted: self.credits_posted.checked_add(o.credits_posted)?,
        })
    }
}

/// CTEs that lock the balance rows named by parameters `$1`-`$6` (accounts, assets,
/// then the four counter deltas, as [`Moves::columns`] binds them) in key order, the
/// order every ledger operation locks them in, and apply the deltas: `locked` holds
/// the rows locked, `changed` one row per row changed. A CTE with a locking clause is
/// never inlined, so `locked` takes its row locks in its `ORDER BY` order before the
/// update.
macro_rules! balance_moves {
    () => {
        "m AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
           $6::bigint[]) AS m(account_id, asset, dpe, dpo, cpe, cpo)), \
         locked AS (SELECT b.account_id, b.asset FROM balances b \
           JOIN m ON b.account_id = m.account_id AND b.asset = m.asset \
           ORDER BY b.account_id, b.asset FOR UPDATE OF b), \
         changed AS (UPDATE balances b SET debits_pending = b.debits_pending + m.dpe, \
           debits_posted = b.debits_posted + m.dpo, credits_pending = b.credits_pending + m.cpe, \
           credits_posted = b.credits_posted + m.cpo \
           FROM m JOIN locked l ON l.account_id = m.account_id AND l.asset = m.asset \
           WHERE b.account_id = m.account_id AND b.asset = m.asset RETURNING 1)"
    };
}
pub(crate) use balance_moves;

/// The parameters of [`balance_moves!`].
pub(crate) struct MoveColumns<'a> {
    accounts: Vec<&'a str>,
    assets: Vec<&'a str>,
    debits_pending: Vec<i64>,
    debits_posted: Vec<i64>,
    credits_pending: Vec<i64>,
    credits_posted: Vec<i64>,
}

impl<'a> MoveColumns<'a> {
    /// Binds the six columns as the next parameters of `query` (`$1`-`$6` when first).
    pub(crate) fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.accounts)
            .bind(&self.assets)
            .bind(&self.debits_pending)
            .bind(&self.debits_posted)
            .bind(&self.credits_pending)
            .bind(&self.credits_posted)
    }
}

/// Balance changes of one transaction, applied in sorted key order.
#[derive(Debug, Default)]
pub(crate) struct Moves(pub(crate) BTreeMap<(String, String), Delta>);

impl Moves {
    /// Adds `delta` to the change of `(account, asset)`. Changes that add up past
    /// the range of a counter are refused, so a wrapped sum is never written (a
    /// group that meets this fails, and its items run alone).
    pub(crate) fn push(
        &mut self,
        account: &str,
        asset: &str,
        delta: Delta,
    ) -> Result<(), LedgerError> {
        let sum = self
            .0
            .entry((account.to_owned(), asset.to_owned()))
            .or_default();
        *sum = sum.checked_add(delta).ok_or_else(|| {
            LedgerError::InvalidArgument("amounts add up past the largest balance".into())
        })?;
        Ok(())
    }

    /// The changes as the six array parameters of [`balance_moves!`].
    pub(crate) fn columns(&self) -> MoveColumns<'_> {
        let n = self.0.len();
        let mut c = MoveColumns {
            accounts: Vec::with_capacity(n),
            assets: Vec::with_capacity(n),
            debits_pending: Vec::with_capacity(n),
            debits_posted: Vec::with_capacity(n),
            credits_pending: Vec::with_capacity(n),
            credits_posted: Vec::with_capacity(n),
        };
        for ((account, asset), d) in &self.0 {
            c.accounts.push(account.as_str());
            c.assets.push(asset.as_str());
            c.debits_pending.push(d.debits_pending);
            c.debits_posted.push(d.debits_posted);
            c.credits_pending.push(d.credits_pending);
            c.credits_posted.push(d.credits_posted);
        }
        c
    }

    /// Applies every change; returns the accounts whose balance row is missing.
    async fn apply(&self, tx: &mut Transaction<'_, Postgres>) -> Result<Vec<String>, sqlx::Error> {
        let mut missing = Vec::new();
        for ((account, asset), d) in &self.0 {
            let done = sqlx::query(
                "UPDATE balances SET debits_pending = debits_pending + $3, debits_posted = debits_posted + $4, \
                 credits_pending = credits_pending + $5, credits_posted = credits_posted + $6 \
                 WHERE account_id = $1 AND asset = $2",
            )
            .bind(account)
            .bind(asset)
            .bind(d.debits_pending)
            .bind(d.debits_posted)
            .bind(d.credits_pending)
            .bind(d.credits_posted)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                missing.push(account.clone());
            }
        }
        Ok(missing)
    }
}

/// How a hold that is no longer open was resolved: the kind and amount of its final
/// row (capture, void or expire), and whether it was captured as it was placed.
async fn final_resolution(
    tx: &mut Transaction<'_, Postgres>,
    hold_id: &str,
) -> Result<(String, u64, bool), Attempt> {
    let prior = sqlx::query(
        "SELECT kind, amount, kind = 'capture' AND reason IS NOT DISTINCT FROM $2 AS debit FROM transfers \
         WHERE pending_id = $1 AND kind IN ('capture', 'void', 'expire')",
    )
    .bind(hold_id)
    .bind(DEBIT_REASON)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(prior) = prior else {
        return Err(
            LedgerError::FailedPrecondition("hold is neither open nor resolved".into()).into(),
        );
    };
    Ok((
        prior.try_get("kind")?,
        to_u64(prior.try_get("amount")?),
        prior.try_get("debit")?,
    ))
}

/// The `reason` of a capture made in the transaction that placed its hold (an
/// authorize item with `capture`): a Void of it refunds the payment.
pub(crate) const DEBIT_REASON: &str = "debit";

/// What a Void of a payment captured at authorize refunds it under.
pub const VOID_REFUND_KEY_PREFIX: &str = "void:";

/// The idempotency key of the refund a Void makes of `hold_id`.
pub fn void_refund_key(hold_id: &str) -> String {
    format!("{VOID_REFUND_KEY_PREFIX}{hold_id}")
}

/// The message for a resolution that finds its hold resolved as `kind`.
fn already_resolved(kind: &str) -> &'static str {
    match kind {
        "capture" => "hold was already captured",
        "void" => "hold was already voided",
        _ => "hold has expired",
    }
}

/// Creates the balance row of `(account, asset)` if it does not exist yet; payers
/// get the overdraft guard.
pub(crate) async fn ensure_balance(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
    asset: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO balances (account_id, asset, debits_must_not_exceed_credits) \
         SELECT id, $2, kind = 'payer' FROM accounts WHERE id = $1 \
         ON CONFLICT (account_id, asset) DO NOTHING",
    )
    .bind(account)
    .bind(asset)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(crate) fn to_i64(v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::InvalidArgument("amount is too large".into()))
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// What a resolution of a hold does.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// Post `amount` (at most the hold) to the merchant; the rest returns to the payer.
    Capture {
        amount: u64,
        http_status: u32,
        upstream_micros: u64,
    },
    /// Release the hold in full.
    Void { reason: String },
}

/// A hold as stored.
pub(crate) struct Hold {
    payer: String,
    merchant: String,
    asset: String,
    amount: i64,
}

/// Handle on the ledger tables.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: PgPool,
    /// The accounts of payer keys that authorize groups have read. A key belongs to
    /// one account for good (keys are added once and only ever revoked, which a
    /// group's write checks under lock), so a group whose keys are all known can write
    /// at once, without reading first.
    pub(crate) key_accounts: std::sync::Arc<Remembered<String>>,
    /// The fee (basis points) of merchants that authorize groups have read, for
    /// payments captured as they are placed. A fee can change, so the write checks
    /// that it is still the one used.
    pub(crate) merchant_fees: std::sync::Arc<Remembered<i32>>,
}

/// Most entries a [`Remembered`] keeps; past that it starts over.
const MAX_REMEMBERED: usize = 100_000;

/// Values the ledger has read, by key, kept to skip reading them again.
#[derive(Debug)]
pub(crate) struct Remembered<V>(std::sync::Mutex<std::collections::HashMap<String, V>>);

impl<V> Default for Remembered<V> {
    fn default() -> Self {
        Remembered(std::sync::Mutex::default())
    }
}

impl<V: Clone + PartialEq> Remembered<V> {
    /// The value of every key, or `None` when one is not known.
    pub(crate) fn all(&self, keys: &[&str]) -> Option<Vec<V>> {
        let known = self.0.lock().ok()?;
        keys.iter().map(|k| known.get(*k).cloned()).collect()
    }

    pub(crate) fn learn(&self, key: &str, value: &V) {
        if let Ok(mut known) = self.0.lock() {
            if known.get(key) == Some(value) {
                return;
            }
            if known.len() >= MAX_REMEMBERED && !known.contains_key(key) {
                known.clear();
            }
            known.insert(key.to_owned(), value.clone());
        }
    }

    pub(crate) fn forget(&self, key: &str) {
        if let Ok(mut known) = self.0.lock() {
            known.remove(key);
        }
    }
}

impl Ledger {
    pub fn new(pool: PgPool) -> Self {
        Ledger {
            pool,
            key_accounts: std::sync::Arc::default(),
            merchant_fees: std::sync::Arc::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Places a hold for a checked authorize item, or says why not. The outcome
    /// order: idempotent replay, merchant, key known, key active, signature,
    /// expiry, hold within the authorized amount, nonce, funds.
    #[tracing::instrument(skip(self, item), fields(request_id = %item.request_id))]
    pub async fn authorize_hold(
        &self,
        item: &CheckedAuthorize,
    ) -> Result<AuthorizeResult, LedgerError> {
        retrying(|| self.try_authorize_hold(item)).await
    }

    async fn try_authorize_hold(
        &self,
        item: &CheckedAuthorize,
    ) -> Result<AuthorizeResult, Attempt> {
        let no = |outcome: AuthorizeOutcome, m: &str| Ok(refused(&item.request_id, outcome, m));
        let accepted = &item.payload.accepted;
        let auth = &item.payload.payload;
        let mut tx = self.pool.begin().await?;

        if let Some(row) = sqlx::query(
            "SELECT id, request_hash, amount, debit_account FROM transfers WHERE request_id = $1 AND kind = 'hold'",
        )
        .bind(&item.request_id)
        .fetch_optional(&mut *tx)
        .await?
        {
            let hash: String = row.try_get("request_hash")?;
            if hash != item.request_hash {
                return no(
                    AuthorizeOutcome::IdempotencyConflict,
                    "request_id was already used for a different request",
                );
            }
            return Ok(authorized(
                &item.request_id,
                row.try_get("id")?,
                to_u64(row.try_get("amount")?),
                row.try_get("debit_account")?,
            ));
        }

        // A close racing this call may still see the hold placed; it then resolves
        // (capture, void, expiry) like any other.
        let merchant: Option<(String, bool)> =
            sqlx::query_as("SELECT kind, closed_at IS NOT NULL FROM accounts WHERE id = $1")
                .bind(&accepted.pay_to)
                .fetch_optional(&mut *tx)
                .await?;
        match merchant {
            Some((kind, closed)) if kind == "merchant" => {
                if closed {
                    return no(
                        AuthorizeOutcome::MerchantClosed,
                        "payTo is a closed merchant account",
                    );
                }
            }
            _ => {
                return no(
                    AuthorizeOutcome::UnknownMerchant,
                    "payTo is not a merchant account",
                )
            }
        }

        // FOR SHARE: a revocation that commits before this hold does stops it.
        let key = sqlx::query("SELECT account_id, revoked_at IS NOT NULL AS revoked FROM payer_keys WHERE public_key = $1 FOR SHARE")
            .bind(&auth.payer)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(key) = key else {
            return no(AuthorizeOutcome::UnknownKey, "payer key is not registered");
        };
        let payer_account: String = key.try_get("account_id")?;
        if key.try_get::<bool, _>("revoked")? {
            return no(AuthorizeOutcome::KeyRevoked, "payer key was revoked");
        }
        if let Some(refusal) = own_refusal(item, unix_now()) {
            return Ok(refusal);
        }

        let nonce_used: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM transfers WHERE kind = 'hold' AND debit_account = $1 AND nonce = $2",
        )
        .bind(&payer_account)
        .bind(&auth.nonce)
        .fetch_optional(&mut *tx)
        .await?;
        if nonce_used.is_some() {
            return no(AuthorizeOutcome::NonceReused, "nonce was already used");
        }

        let mut hold_amount = item.hold_amount;
        if !item.volume_tiers.is_empty() {
            // The payer's captured payments on this route since the start of this
            // calendar month (UTC) pick the tier.
            let used: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM transfers c JOIN transfers h ON h.id = c.pending_id \
                 WHERE c.kind = 'capture' AND h.debit_account = $1 AND h.route = $2 \
                   AND c.created_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            )
            .bind(&payer_account)
            .bind(&item.route)
            .fetch_one(&mut *tx)
            .await?;
            let used = u64::try_from(used).unwrap_or(0);
            hold_amount = item
                .volume_tiers
                .iter()
                .rev()
                .find(|(from, _)| *from <= used)
                .map_or(item.hold_amount, |(_, price)| *price);
        }
        if let Some(limit) = &item.global_limit {
            let identity = limit.identity(&payer_account);
            if let Take::Limited {
                retry_after_seconds,
            } = limits::take(&mut tx, &item.route, &identity, limit).await?
            {
                return Ok(AuthorizeResult {
                    retry_after_seconds,
                    ..refused(
                        &item.request_id,
                        AuthorizeOutcome::RateLimited,
                        "over the route's global rate limit",
                    )
                });
            }
        }
        let amount = to_i64(hold_amount)?;
        ensure_balance(&mut tx, &accepted.pay_to, &accepted.asset).await?;
        // The hold row goes in before the balance rows are locked, so the locks (the
        // payer's, and the merchant's that every hold shares) are held only for the
        // two counter updates and the commit.
        let inserted = sqlx::query_scalar::<_, String>(
            "WITH hold AS ( \
               INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, request_id, request_hash, \
                 payer_key, nonce, route, resource, expires_at, amount_authorized) \
               VALUES ('hold', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11 * interval '1 second', $12) \
               RETURNING id, expires_at) \
             INSERT INTO open_holds (hold_id, expires_at) SELECT id, expires_at FROM hold RETURNING hold_id",
        )
        .bind(&payer_account)
        .bind(&accepted.pay_to)
        .bind(&accepted.asset)
        .bind(amount)
        .bind(&item.request_id)
        .bind(&item.request_hash)
        .bind(&auth.payer)
        .bind(&auth.nonce)
        .bind(&item.route)
        .bind(&auth.resource)
        .bind(i32::try_from(item.hold_ttl_seconds).unwrap_or(i32::MAX))
        .bind(to_i64(item.amount_authorized)?)
        .fetch_one(&mut *tx)
        .await;
        let transaction_id = match inserted {
            Ok(id) => id,
            Err(e) if constraint(&e) == Some("transfers_payer_nonce") => {
                return no(AuthorizeOutcome::NonceReused, "nonce was already used");
            }
            // A concurrent call with the same request_id won: the next attempt replays it.
            Err(e) if constraint(&e) == Some("transfers_request_id_key") => {
                return Err(Attempt::Retry(e))
            }
            Err(e) => return Err(e.into()),
        };
        let mut moves = Moves::default();
        moves.push(
            &payer_account,
            &accepted.asset,
            Delta {
                debits_pending: amount,
                ..Delta::default()
            },
        )?;
        moves.push(
            &accepted.pay_to,
            &accepted.asset,
            Delta {
                credits_pending: amount,
                ..Delta::default()
            },
        )?;
        match moves.apply(&mut tx).await {
            Ok(missing) if missing.is_empty() => {}
            Ok(_) => return no(AuthorizeOutcome::InsufficientFunds, "insufficient funds"),
            Err(e) if is_overdraft(&e) => {
                return no(AuthorizeOutcome::InsufficientFunds, "insufficient funds")
            }
            Err(e) => return Err(e.into()),
        }

        tx.commit().await?;
        tracing::debug!(%transaction_id, amount, "hold placed");
        Ok(authorized(
            &item.request_id,
            transaction_id,
            hold_amount,
            payer_account,
        ))
    }

    /// Captures or voids a hold. Repeating the resolution a hold already has returns
    /// the same outcome; any other resolution of a resolved hold is ALREADY_RESOLVED.
    #[tracing::instrument(skip(self))]
    pub async fn resolve(
        &self,
        transaction_id: &str,
        resolution: &Resolution,
    ) -> Result<ResolveResult, LedgerError> {
        retrying(|| self.try_resolve(transaction_id, resolution)).await
    }

    /// Voids a payment captured as its hold was placed: the upstream failed after the
    /// payer was debited, so all of it that is not refunded yet goes back, once
    /// (the refund's idempotency key is the payment's).
    async fn refund_debit(
        &self,
        transaction_id: &str,
        reason: &str,
    ) -> Result<ResolveResult, Attempt> {
        let key = void_refund_key(transaction_id);
        Ok(
            match crate::operator::refund(&self.pool, transaction_id, 0, reason, &key).await {
                Ok((_, amount)) => {
                    resolve_result(transaction_id, ResolveOutcome::Voided, amount, "refunded")
                }
                Err(LedgerError::AlreadyExists(_) | LedgerError::FailedPrecondition(_)) => {
                    resolve_result(
                        transaction_id,
                        ResolveOutcome::AlreadyResolved,
                        0,
                        "payment was already refunded",
                    )
                }
                Err(e) => return Err(e.into()),
            },
        )
    }

    async fn try_resolve(
        &self,
        transaction_id: &str,
        resolution: &Resolution,
    ) -> Result<ResolveResult, Attempt> {
        let result = |outcome: ResolveOutcome, amount: u64, message: &str| {
            resolve_result(transaction_id, outcome, amount, message)
        };
        let mut tx = self.pool.begin().await?;
        let Some(hold) = self.find_hold(&mut tx, transaction_id).await? else {
            return Ok(result(ResolveOutcome::NotFound, 0, "no such hold"));
        };
        let hold_amount = to_u64(hold.amount);
        let (kind, posted) = match resolution {
            Resolution::Capture { amount, .. } => {
                if *amount > hold_amount {
                    return Ok(result(
                        ResolveOutcome::ExceedsHold,
                        hold_amount,
                        "capture amount exceeds the hold",
                    ));
                }
                ("capture", *amount)
            }
            Resolution::Void { .. } => ("void", hold_amount),
        };

        // Deleting the open-hold row is the lock every resolution (and the sweeper)
        // takes: whoever deletes it resolves the hold; the others see the result.
        // Its `captured` is what partial captures already posted.
        let open: Option<i64> =
            sqlx::query_scalar("DELETE FROM open_holds WHERE hold_id = $1 RETURNING captured")
                .bind(transaction_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(captured_before) = open else {
            let (prior_kind, prior_amount, debit) =
                final_resolution(&mut tx, transaction_id).await?;
            if let (true, Resolution::Void { reason }) = (debit, resolution) {
                drop(tx);
                return self.refund_debit(transaction_id, reason).await;
            }
            return Ok(match (prior_kind.as_str(), resolution) {
                ("capture", Resolution::Capture { amount, .. }) if *amount == prior_amount => {
                    result(ResolveOutcome::Captured, prior_amount, "")
                }
                ("void", Resolution::Void { .. }) => {
                    result(ResolveOutcome::Voided, prior_amount, "")
                }
                (k, _) => result(
                    ResolveOutcome::AlreadyResolved,
                    prior_amount,
                    already_resolved(k),
                ),
            });
        };

        // After partial captures, a capture names the final total (never below what
        // they posted) and posts the difference; a void releases what they left held.
        let (posted, step, released) = match resolution {
            Resolution::Capture { .. } => {
                let total = to_i64(posted)?.max(captured_before);
                (
                    to_u64(total),
                    total - captured_before,
                    hold.amount - captured_before,
                )
            }
            Resolution::Void { .. } => {
                let rest = hold.amount - captured_before;
                (to_u64(rest), 0, rest)
            }
        };
        let posted_i64 = to_i64(posted)?;
        let mut moves = Moves::default();
        // The platform's share moves in the same locked update as the capture: the
        // fee of the total less the fees of the partial captures, within the step.
        let fee = match resolution {
            Resolution::Capture { .. } => {
                let total_fee =
                    crate::events::capture_fee(&mut tx, &hold.merchant, &hold.asset, posted_i64)
                        .await?;
                crate::events::step_fee(
                    total_fee,
                    partial_fees(&mut tx, transaction_id, captured_before).await?,
                    step,
                )
            }
            Resolution::Void { .. } => 0,
        };
        if fee > 0 {
            moves.push(
                &hold.merchant,
                &hold.asset,
                Delta {
                    debits_posted: fee,
                    ..Delta::default()
                },
            )?;
            moves.push(
                crate::events::PLATFORM_ACCOUNT,
                &hold.asset,
                Delta {
                    credits_posted: fee,
                    ..Delta::default()
                },
            )?;
        }
        moves.push(
            &hold.payer,
            &hold.asset,
            Delta {
                debits_pending: -released,
                debits_posted: step,
                ..Delta::default()
            },
        )?;
        moves.push(
            &hold.merchant,
            &hold.asset,
            Delta {
                credits_pending: -released,
                credits_posted: step,
                ..Delta::default()
            },
        )?;
        let missing = moves.apply(&mut tx).await?;
        if !missing.is_empty() {
            return Err(LedgerError::FailedPrecondition(
                "balance of a held account is missing".into(),
            )
            .into());
        }
        let (reason, http_status, upstream_micros) = match resolution {
            Resolution::Capture {
                http_status,
                upstream_micros,
                ..
            } => (
                None,
                Some(i32::try_from(*http_status).unwrap_or(i32::MAX)),
                Some(i64::try_from(*upstream_micros).unwrap_or(i64::MAX)),
            ),
            Resolution::Void { reason } => (Some(reason.as_str()), None, None),
        };
        let inserted = sqlx::query(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount, \
               reason, http_status, upstream_micros, captured_before) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULLIF($11, 0))",
        )
        .bind(kind)
        .bind(&hold.payer)
        .bind(&hold.merchant)
        .bind(&hold.asset)
        .bind(posted_i64)
        .bind(transaction_id)
        .bind(hold.amount)
        .bind(reason)
        .bind(http_status)
        .bind(upstream_micros)
        .bind(captured_before)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if constraint(&e) == Some("transfers_one_resolution") => {
                return Err(Attempt::Retry(e))
            }
            Err(e) => return Err(e.into()),
        }
        match resolution {
            Resolution::Capture {
                http_status,
                upstream_micros,
                ..
            } => {
                crate::events::after_capture(
                    &mut tx,
                    transaction_id,
                    &hold.payer,
                    &hold.merchant,
                    &hold.asset,
                    posted_i64,
                    step,
                    fee,
                    i32::try_from(*http_status).unwrap_or(i32::MAX),
                    i64::try_from(*upstream_micros).unwrap_or(i64::MAX),
                )
                .await?
            }
            Resolution::Void { .. } => {
                crate::events::after_void(
                    &mut tx,
                    transaction_id,
                    &hold.payer,
                    &hold.merchant,
                    &hold.asset,
                    released,
                )
                .await?
            }
        }
        tx.commit().await?;
        crate::metrics::METRICS.resolved(kind, posted, fee);
        let outcome = if kind == "capture" {
            ResolveOutcome::Captured
        } else {
            ResolveOutcome::Voided
        };
        Ok(result(outcome, posted, ""))
    }

    /// Posts what a running total adds to a hold's partial captures, keeping the
    /// hold open. A total at or below what is already captured posts nothing and
    /// answers the captured total, so a retried or late partial capture is harmless;
    /// a total above the hold is EXCEEDS_HOLD. The final capture (or void, or
    /// expiry) later settles the rest once.
    #[tracing::instrument(skip(self))]
    pub async fn capture_partial(
        &self,
        transaction_id: &str,
        total: u64,
    ) -> Result<ResolveResult, LedgerError> {
        retrying(|| self.try_capture_partial(transaction_id, total)).await
    }

    async fn try_capture_partial(
        &self,
        transaction_id: &str,
        total: u64,
    ) -> Result<ResolveResult, Attempt> {
        let result = |outcome: ResolveOutcome, amount: u64, message: &str| {
            resolve_result(transaction_id, outcome, amount, message)
        };
        let mut tx = self.pool.begin().await?;
        let Some(hold) = self.find_hold(&mut tx, transaction_id).await? else {
            return Ok(result(ResolveOutcome::NotFound, 0, "no such hold"));
        };
        if total > to_u64(hold.amount) {
            return Ok(result(
                ResolveOutcome::ExceedsHold,
                to_u64(hold.amount),
                "capture amount exceeds the hold",
            ));
        }
        // The open-hold row is the lock: a final resolution deletes it.
        let captured: Option<i64> =
            sqlx::query_scalar("SELECT captured FROM open_holds WHERE hold_id = $1 FOR UPDATE")
                .bind(transaction_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(captured) = captured else {
            let (kind, amount, _) = final_resolution(&mut tx, transaction_id).await?;
            return Ok(result(
                ResolveOutcome::AlreadyResolved,
                amount,
                already_resolved(&kind),
            ));
        };
        let total = to_i64(total)?;
        if total <= captured {
            return Ok(result(ResolveOutcome::Captured, to_u64(captured), ""));
        }
        let step = total - captured;
        let fee = crate::events::step_fee(
            crate::events::capture_fee(&mut tx, &hold.merchant, &hold.asset, total).await?,
            partial_fees(&mut tx, transaction_id, captured).await?,
            step,
        );
        let inserted = sqlx::query(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount, \
               captured_before) VALUES ('partial_capture', $1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&hold.payer)
        .bind(&hold.merchant)
        .bind(&hold.asset)
        .bind(step)
        .bind(transaction_id)
        .bind(hold.amount)
        .bind(captured)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if constraint(&e) == Some("transfers_partial_capture_once") => {
                return Err(Attempt::Retry(e))
            }
            Err(e) => return Err(e.into()),
        }
        sqlx::query("UPDATE open_holds SET captured = $2, held = $3 WHERE hold_id = $1")
            .bind(transaction_id)
            .bind(total)
            .bind(hold.amount)
            .execute(&mut *tx)
            .await?;
        let mut moves = Moves::default();
        moves.push(
            &hold.payer,
            &hold.asset,
            Delta {
                debits_pending: -step,
                debits_posted: step,
                ..Delta::default()
            },
        )?;
        moves.push(
            &hold.merchant,
            &hold.asset,
            Delta {
                credits_pending: -step,
                credits_posted: step,
                debits_posted: fee,
                ..Delta::default()
            },
        )?;
        if fee > 0 {
            moves.push(
                crate::events::PLATFORM_ACCOUNT,
                &hold.asset,
                Delta {
                    credits_posted: fee,
                    ..Delta::default()
                },
            )?;
            sqlx::query(
                "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, reason) \
                 VALUES ('fee', $1, $2, $3, $4, $5, 'platform_fee')",
            )
            .bind(&hold.merchant)
            .bind(crate::events::PLATFORM_ACCOUNT)
            .bind(&hold.asset)
            .bind(fee)
            .bind(transaction_id)
            .execute(&mut *tx)
            .await?;
        }
        let missing = moves.apply(&mut tx).await?;
        if !missing.is_empty() {
            return Err(LedgerError::FailedPrecondition(
                "balance of a held account is missing".into(),
            )
            .into());
        }
        crate::events::add_refundable(&mut tx, transaction_id, step, fee).await?;
        tx.commit().await?;
        tracing::debug!(%transaction_id, total, step, "partial capture");
        Ok(result(ResolveOutcome::Captured, to_u64(total), ""))
    }

    async fn find_hold(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        transaction_id: &str,
    ) -> Result<Option<Hold>, sqlx::Error> {
        let row = sqlx::query("SELECT debit_account, credit_account, asset, amount FROM transfers WHERE id = $1 AND kind = 'hold'")
            .bind(transaction_id)
            .fetch_optional(&mut **tx)
            .await?;
        row.map(|r| {
            Ok(Hold {
                payer: r.try_get("debit_account")?,
                merchant: r.try_get("credit_account")?,
                asset: r.try_get("asset")?,
                amount: r.try_get("amount")?,
            })
        })
        .transpose()
    }

    /// Expires up to `limit` holds past their `expires_at` in one transaction;
    /// returns how many. Holds another transaction is resolving are skipped, not
    /// waited for.
    pub async fn expire_due_holds(&self, limit: i64) -> Result<usize, LedgerError> {
        retrying(|| self.try_expire_due_holds(limit)).await
    }

    async fn try_expire_due_holds(&self, limit: i64) -> Result<usize, Attempt> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "WITH due AS ( \
               SELECT hold_id FROM open_holds WHERE expires_at <= now() \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED), \
             gone AS (DELETE FROM open_holds o USING due WHERE o.hold_id = due.hold_id \
               RETURNING o.hold_id, o.captured) \
             SELECT t.id, t.debit_account, t.credit_account, t.asset, t.amount - gone.captured AS amount, \
               gone.captured \
             FROM transfers t JOIN gone ON gone.hold_id = t.id",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut moves = Moves::default();
        let mut ids = Vec::with_capacity(rows.len());
        let mut captured = Vec::with_capacity(rows.len());
        for r in &rows {
            captured.push(r.try_get::<i64, _>("captured")?);
            let amount: i64 = r.try_get("amount")?;
            let payer: String = r.try_get("debit_account")?;
            let merchant: String = r.try_get("credit_account")?;
            let asset: String = r.try_get("asset")?;
            moves.push(
                &payer,
                &asset,
                Delta {
                    debits_pending: -amount,
                    ..Delta::default()
                },
            )?;
            moves.push(
                &merchant,
                &asset,
                Delta {
                    credits_pending: -amount,
                    ..Delta::default()
                },
            )?;
            ids.push(r.try_get::<String, _>("id")?);
        }
        moves.apply(&mut tx).await?;
        sqlx::query(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount, \
               reason, captured_before) \
             SELECT 'expire', t.debit_account, t.credit_account, t.asset, t.amount - c.captured, t.id, t.amount, \
               'hold_ttl', NULLIF(c.captured, 0) \
             FROM transfers t JOIN unnest($1::text[], $2::bigint[]) AS c(id, captured) ON c.id = t.id \
             WHERE t.kind = 'hold'",
        )
        .bind(&ids)
        .bind(&captured)
        .execute(&mut *tx)
        .await?;
        crate::events::after_expire(&mut tx, &ids).await?;
        tx.commit().await?;
        crate::metrics::METRICS.expired(ids.len());
        tracing::info!(expired = ids.len(), "expired holds");
        Ok(ids.len())
    }

    /// Credits a payer account from `system:credit`. Same idempotency key + same
    /// request returns the first deposit; with another request it is refused.
    #[tracing::instrument(skip(self))]
    pub async fn deposit(
        &self,
        account: &str,
        asset: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> Result<String, LedgerError> {
        if amount == 0 {
            return Err(LedgerError::InvalidArgument(
                "amount must be positive".into(),
            ));
        }
        let amount = to_i64(amount)?;
        crate::accounts::check_asset(asset)?;
        if idempotency_key.len() > crate::verify::MAX_ID_LEN {
            return Err(LedgerError::InvalidArgument(
                "idempotency_key is too long".into(),
            ));
        }
        let hash = {
            use sha2::{Digest, Sha256};
            hex::encode(Sha256::digest(format!(
                "account={account}\nasset={asset}\namount={amount}\n"
            )))
        };
        retrying(|| self.try_deposit(account, asset, amount, idempotency_key, &hash)).await
    }

    async fn try_deposit(
        &self,
        account: &str,
        asset: &str,
        amount: i64,
        key: &str,
        hash: &str,
    ) -> Result<String, Attempt> {
        let mut tx = self.pool.begin().await?;
        if !key.is_empty() {
            if let Some(row) =
                sqlx::query("SELECT id, request_hash FROM transfers WHERE idempotency_key = $1")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?
            {
                let prior: String = row.try_get("request_hash")?;
                if prior != hash {
                    return Err(LedgerError::AlreadyExists(
                        "idempotency_key was already used for a different deposit".into(),
                    )
                    .into());
                }
                return Ok(row.try_get("id")?);
            }
        }
        let kind: Option<String> = sqlx::query_scalar("SELECT kind FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
        match kind.as_deref() {
            None => {
                return Err(
                    LedgerError::NotFound(format!("account {account} does not exist")).into(),
                )
            }
            Some("payer") => {}
            Some(_) => {
                return Err(
                    LedgerError::FailedPrecondition("deposits go to payer accounts".into()).into(),
                )
            }
        }
        ensure_balance(&mut tx, account, asset).await?;
        ensure_balance(&mut tx, SYSTEM_CREDIT_ACCOUNT, asset).await?;
        let mut moves = Moves::default();
        moves.push(
            SYSTEM_CREDIT_ACCOUNT,
            asset,
            Delta {
                debits_posted: amount,
                ..Delta::default()
            },
        )?;
        moves.push(
            account,
            asset,
            Delta {
                credits_posted: amount,
                ..Delta::default()
            },
        )?;
        match moves.apply(&mut tx).await {
            Ok(_) => {}
            Err(e) if sqlstate(&e).as_deref() == Some("22003") => {
                return Err(LedgerError::InvalidArgument(
                    "deposit would overflow the balance".into(),
                )
                .into());
            }
            Err(e) => return Err(e.into()),
        }
        let inserted = sqlx::query_scalar::<_, String>(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, idempotency_key, request_hash) \
             VALUES ('deposit', $1, $2, $3, $4, NULLIF($5, ''), $6) RETURNING id",
        )
        .bind(SYSTEM_CREDIT_ACCOUNT)
        .bind(account)
        .bind(asset)
        .bind(amount)
        .bind(key)
        .bind(hash)
        .fetch_one(&mut *tx)
        .await;
        let id = match inserted {
            Ok(id) => id,
            // A concurrent deposit with the same key won: the next attempt replays it.
            Err(e) if constraint(&e) == Some("transfers_idempotency_key_key") => {
                return Err(Attempt::Retry(e))
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(id)
    }
}

/// Fees the partial captures of a hold took so far (none when nothing was captured).
async fn partial_fees(
    tx: &mut Transaction<'_, Postgres>,
    hold_id: &str,
    captured: i64,
) -> Result<i64, sqlx::Error> {
    if captured == 0 {
        return Ok(0);
    }
    let fee: Option<i64> = sqlx::query_scalar("SELECT fee FROM payment_refunds WHERE hold_id = $1")
        .bind(hold_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(fee.unwrap_or(0))
}

/// The payer's overdraft CHECK (or a counter overflowing) refused a debit.
pub(crate) fn is_overdraft(err: &sqlx::Error) -> bool {
    match sqlstate(err).as_deref() {
        Some("23514") => constraint(err) == Some("balances_debits_within_credits"),
        Some("22003") => true,
        _ => false,
    }
}

/// The answer for one capture, void or partial capture of `transaction_id`.
pub(crate) fn resolve_result(
    transaction_id: &str,
    outcome: ResolveOutcome,
    amount: u64,
    message: &str,
) -> ResolveResult {
    ResolveResult {
        transaction_id: transaction_id.to_owned(),
        outcome: outcome as i32,
        amount,
        message: message.to_owned(),
    }
}
