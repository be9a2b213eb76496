//! Operator features beyond the basic ledger: idempotent operator calls, account
//! listing, metadata and closing, key rotation, assets, adjustments, refunds and
//! webhook endpoints.

use std::collections::HashMap;
use std::future::Future;

use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use x402_proto::settlement::v1::{
    Account, AccountKind, Asset, PayerKey, RefundResponse, Webhook, WebhookDelivery,
};

use crate::accounts::{check_account_id, check_public_key, get_account};
use crate::error::{constraint, sqlstate, LedgerError};
use crate::events::PLATFORM_ACCOUNT;

/// The account operator adjustments are balanced against.
pub const ADJUST_ACCOUNT: &str = "system:adjust";

/// Most characters of an idempotency key or reason.
const MAX_KEY_LEN: usize = 128;

/// sha256 of `request` encoded with its idempotency key cleared by `clear`.
pub fn request_hash<M: Message + Clone>(request: &M, clear: impl FnOnce(&mut M)) -> String {
    let mut r = request.clone();
    clear(&mut r);
    hex::encode(Sha256::digest(r.encode_to_vec()))
}

/// Runs `op` once per idempotency key: a repeat with the same method and request
/// returns the stored answer, with another request it is ALREADY_EXISTS. Meant for
/// mutations that are safe to run twice (accounts, keys, metadata, webhooks); money
/// movements keep their key inside their own transaction instead.
pub async fn idempotent<R, F, Fut>(
    pool: &PgPool,
    key: &str,
    method: &str,
    hash: &str,
    op: F,
) -> Result<R, LedgerError>
where
    R: Message + Default,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<R, LedgerError>>,
{
    if key.is_empty() {
        return op().await;
    }
    if key.len() > MAX_KEY_LEN {
        return Err(LedgerError::InvalidArgument(
            "idempotency_key is too long".into(),
        ));
    }
    if let Some(stored) = stored_answer::<R>(pool, key, method, hash).await? {
        return Ok(stored);
    }
    let answer = op().await?;
    let inserted = sqlx::query(
        "INSERT INTO operator_requests (idempotency_key, method, request_hash, response) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(key)
    .bind(method)
    .bind(hash)
    .bind(answer.encode_to_vec())
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        // A concurrent call with the same key stored first: answer what it answered.
        if let Some(stored) = stored_answer::<R>(pool, key, method, hash).await? {
            return Ok(stored);
        }
    }
    Ok(answer)
}

async fn stored_answer<R: Message + Default>(
    pool: &PgPool,
    key: &str,
    method: &str,
    hash: &str,
) -> Result<Option<R>, LedgerError> {
    let Some(row) = sqlx::query(
        "SELECT method, request_hash, response FROM operator_requests WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let (m, h): (String, String) = (row.try_get("method")?, row.try_get("request_hash")?);
    if m != method || h != hash {
        return Err(LedgerError::AlreadyExists(
            "idempotency_key was already used for a different request".into(),
        ));
    }
    let bytes: Vec<u8> = row.try_get("response")?;
    R::decode(bytes.as_slice())
        .map(Some)
        .map_err(|_| LedgerError::FailedPrecondition("stored answer is unreadable".into()))
}

fn check_metadata(metadata: &HashMap<String, String>) -> Result<(), LedgerError> {
    if metadata.len() > 64
        || metadata
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
    {
        return Err(LedgerError::InvalidArgument(
            "metadata: at most 64 entries, keys 1-128 and values up to 1024 bytes".into(),
        ));
    }
    Ok(())
}

/// Sets metadata and fee of a freshly created (or replayed) account.
pub async fn configure_account(
    pool: &PgPool,
    id: &str,
    metadata: &HashMap<String, String>,
    fee_bps: u32,
) -> Result<(), LedgerError> {
    check_metadata(metadata)?;
    if fee_bps > 10_000 {
        return Err(LedgerError::InvalidArgument(
            "fee_bps must be 0-10000".into(),
        ));
    }
    sqlx::query("UPDATE accounts SET metadata = $2, fee_bps = $3 WHERE id = $1")
        .bind(id)
        .bind(serde_json::to_value(metadata).unwrap_or_default())
        .bind(i32::try_from(fee_bps).unwrap_or(0))
        .execute(pool)
        .await?;
    Ok(())
}

/// The extra columns of an account (metadata, closed, fee) added to `account`.
pub async fn with_details(pool: &PgPool, mut account: Account) -> Result<Account, LedgerError> {
    let row = sqlx::query(
        "SELECT metadata, closed_at IS NOT NULL AS closed, fee_bps FROM accounts WHERE id = $1",
    )
    .bind(&account.account_id)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        fill_details(&mut account, &row)?;
    }
    Ok(account)
}

fn fill_details(account: &mut Account, row: &PgRow) -> Result<(), sqlx::Error> {
    let metadata: serde_json::Value = row.try_get("metadata")?;
    account.metadata = serde_json::from_value(metadata).unwrap_or_default();
    account.closed = row.try_get("closed")?;
    account.fee_bps = u32::try_from(row.try_get::<i32, _>("fee_bps")?).unwrap_or(0);
    Ok(())
}

fn kind_from_name(name: &str) -> AccountKind {
    match name {
        "payer" => AccountKind::Payer,
        "merchant" => AccountKind::Merchant,
        "system" => AccountKind::System,
        _ => AccountKind::Unspecified,
    }
}

/// Accounts by id, after `page_token` (the last id of the previous page).
pub async fn list_accounts(
    pool: &PgPool,
    kind: AccountKind,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<Account>, String), LedgerError> {
    let size = page_size_or_default(page_size);
    let kind = match kind {
        AccountKind::Payer => Some("payer"),
        AccountKind::Merchant => Some("merchant"),
        AccountKind::System => Some("system"),
        AccountKind::Unspecified => None,
    };
    let rows = sqlx::query(
        "SELECT id, kind, extract(epoch FROM created_at)::bigint AS created_unix, metadata, \
           closed_at IS NOT NULL AS closed, fee_bps FROM accounts \
         WHERE ($1::text IS NULL OR kind = $1) AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(kind)
    .bind(page_token)
    .bind(i64::from(size) + 1)
    .fetch_all(pool)
    .await?;
    let mut accounts = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut a = Account {
            account_id: row.try_get("id")?,
            kind: kind_from_name(&row.try_get::<String, _>("kind")?) as i32,
            created_at_unix: row.try_get("created_unix")?,
            ..Default::default()
        };
        fill_details(&mut a, row)?;
        accounts.push(a);
    }
    let next = if accounts.len() > size as usize {
        accounts.truncate(size as usize);
        accounts
            .last()
            .map(|a| a.account_id.clone())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((accounts, next))
}

fn page_size_or_default(page_size: u32) -> u32 {
    match page_size {
        0 => crate::accounts::DEFAULT_PAGE_SIZE,
        n => n.min(crate::accounts::MAX_PAGE_SIZE),
    }
}

pub async fn set_metadata(
    pool: &PgPool,
    id: &str,
    metadata: &HashMap<String, String>,
) -> Result<Account, LedgerError> {
    check_metadata(metadata)?;
    let done = sqlx::query("UPDATE accounts SET metadata = $2 WHERE id = $1 AND kind <> 'system'")
        .bind(id)
        .bind(serde_json::to_value(metadata).unwrap_or_default())
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(LedgerError::NotFound(format!(
            "account {id} does not exist"
        )));
    }
    with_details(pool, get_account(pool, id).await?).await
}

/// Closes a payer or merchant account: revokes its keys and marks it closed. Refused
/// while it has unresolved holds (as payer or merchant).
pub async fn close_account(pool: &PgPool, id: &str) -> Result<Account, LedgerError> {
    let account = get_account(pool, id).await?;
    if account.kind == AccountKind::System as i32 {
        return Err(LedgerError::FailedPrecondition(
            "system accounts cannot be closed".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM open_holds o JOIN transfers t ON t.id = o.hold_id \
         WHERE t.debit_account = $1 OR t.credit_account = $1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if open > 0 {
        return Err(LedgerError::FailedPrecondition(format!(
            "account {id} has {open} unresolved holds"
        )));
    }
    sqlx::query(
        "UPDATE payer_keys SET revoked_at = coalesce(revoked_at, now()) WHERE account_id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE accounts SET closed_at = coalesce(closed_at, now()) WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    with_details(pool, account).await
}

/// Fails when the account is closed (deposits and adjustments are refused then).
pub async fn require_open(pool: &PgPool, id: &str) -> Result<(), LedgerError> {
    let closed: Option<bool> =
        sqlx::query_scalar("SELECT closed_at IS NOT NULL FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    match closed {
        None => Err(LedgerError::NotFound(format!(
            "account {id} does not exist"
        ))),
        Some(true) => Err(LedgerError::FailedPrecondition(format!(
            "account {id} is closed"
        ))),
        Some(false) => Ok(()),
    }
}

pub async fn list_keys(pool: &PgPool, account_id: &str) -> Result<Vec<PayerKey>, LedgerError> {
    get_account(pool, account_id).await?;
    let rows = sqlx::query(
        "SELECT public_key, account_id, revoked_at IS NOT NULL AS revoked FROM payer_keys \
         WHERE account_id = $1 ORDER BY created_at, public_key",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(PayerKey {
                account_id: r.try_get("account_id")?,
                public_key: r.try_get("public_key")?,
                revoked: r.try_get("revoked")?,
            })
        })
        .collect()
}

/// Adds `new_key` to the account and revokes `old_key` (which must be the account's)
/// in one transaction, so there is never a moment with neither or (after) both.
pub async fn rotate_key(
    pool: &PgPool,
    account_id: &str,
    old_key: &str,
    new_key: &str,
) -> Result<(PayerKey, PayerKey), LedgerError> {
    check_public_key(new_key)?;
    let account = get_account(pool, account_id).await?;
    if account.kind != AccountKind::Payer as i32 {
        return Err(LedgerError::FailedPrecondition(
            "keys belong to payer accounts".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    let owner: Option<String> =
        sqlx::query_scalar("SELECT account_id FROM payer_keys WHERE public_key = $1 FOR UPDATE")
            .bind(old_key)
            .fetch_optional(&mut *tx)
            .await?;
    if owner.as_deref() != Some(account_id) {
        return Err(LedgerError::NotFound(
            "old_public_key is not a key of this account".into(),
        ));
    }
    let existing: Option<(String, bool)> = sqlx::query_as(
        "SELECT account_id, revoked_at IS NOT NULL FROM payer_keys WHERE public_key = $1",
    )
    .bind(new_key)
    .fetch_optional(&mut *tx)
    .await?;
    match existing {
        Some((owner, _)) if owner != account_id => {
            return Err(LedgerError::AlreadyExists(
                "new public key is registered to another account".into(),
            ))
        }
        Some((_, true)) => {
            return Err(LedgerError::FailedPrecondition(
                "new public key was revoked and cannot be added again".into(),
            ))
        }
        Some(_) => {}
        None => {
            sqlx::query("INSERT INTO payer_keys (public_key, account_id) VALUES ($1, $2)")
                .bind(new_key)
                .bind(account_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query(
        "UPDATE payer_keys SET revoked_at = coalesce(revoked_at, now()) WHERE public_key = $1",
    )
    .bind(old_key)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((
        PayerKey {
            account_id: account_id.to_owned(),
            public_key: new_key.to_owned(),
            revoked: false,
        },
        PayerKey {
            account_id: account_id.to_owned(),
            public_key: old_key.to_owned(),
            revoked: true,
        },
    ))
}

pub async fn create_asset(pool: &PgPool, code: &str, decimals: u32) -> Result<Asset, LedgerError> {
    let ok = (1..=32).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if !ok {
        return Err(LedgerError::InvalidArgument(
            "code must be 1-32 of [A-Za-z0-9_.:-]".into(),
        ));
    }
    if decimals > 18 {
        return Err(LedgerError::InvalidArgument("decimals must be 0-18".into()));
    }
    let d = i32::try_from(decimals).unwrap_or(0);
    sqlx::query(
        "INSERT INTO assets (code, decimals) VALUES ($1, $2) ON CONFLICT (code) DO NOTHING",
    )
    .bind(code)
    .bind(d)
    .execute(pool)
    .await?;
    let stored: i32 = sqlx::query_scalar("SELECT decimals FROM assets WHERE code = $1")
        .bind(code)
        .fetch_one(pool)
        .await?;
    if stored != d {
        return Err(LedgerError::AlreadyExists(format!(
            "asset {code} exists with {stored} decimals"
        )));
    }
    Ok(Asset {
        code: code.to_owned(),
        decimals,
    })
}

pub async fn list_assets(pool: &PgPool) -> Result<Vec<Asset>, LedgerError> {
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT code, decimals FROM assets ORDER BY code")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(code, d)| Asset {
            code,
            decimals: u32::try_from(d).unwrap_or(0),
        })
        .collect())
}

/// Decimals of a registered asset; INVALID_ARGUMENT for an unknown one.
pub async fn asset_decimals(pool: &PgPool, code: &str) -> Result<u32, LedgerError> {
    let d: Option<i32> = sqlx::query_scalar("SELECT decimals FROM assets WHERE code = $1")
        .bind(code)
        .fetch_optional(pool)
        .await?;
    d.map(|d| u32::try_from(d).unwrap_or(0)).ok_or_else(|| {
        LedgerError::InvalidArgument(format!(
            "asset {code} is not registered (CreateAsset first)"
        ))
    })
}

fn money_hash(parts: &[&str]) -> String {
    hex::encode(Sha256::digest(parts.join("\n")))
}

/// Looks up a money movement by idempotency key: `Some(id)` to replay it, an error
/// when the key named another request.
async fn replay(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: &str,
    hash: &str,
) -> Result<Option<String>, LedgerError> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(LedgerError::InvalidArgument(
            "idempotency_key is too long".into(),
        ));
    }
    let row = sqlx::query("SELECT id, request_hash FROM transfers WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let prior: Option<String> = row.try_get("request_hash")?;
            if prior.as_deref() != Some(hash) {
                return Err(LedgerError::AlreadyExists(
                    "idempotency_key was already used for a different request".into(),
                ));
            }
            Ok(Some(row.try_get("id")?))
        }
    }
}

fn key_conflict(e: &sqlx::Error) -> bool {
    constraint(e) == Some("transfers_idempotency_key_key")
}

/// Credits (amount > 0) or debits (amount < 0) `account` against system:adjust. A
/// payer's overdraft CHECK refuses a debit below zero.
pub async fn adjust(
    pool: &PgPool,
    account: &str,
    asset: &str,
    amount: i64,
    reason: &str,
    key: &str,
) -> Result<String, LedgerError> {
    check_account_id(account)?;
    if amount == 0 || amount == i64::MIN {
        return Err(LedgerError::InvalidArgument(
            "amount must be non-zero".into(),
        ));
    }
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 512 {
        return Err(LedgerError::InvalidArgument(
            "reason is required (at most 512 bytes)".into(),
        ));
    }
    asset_decimals(pool, asset).await?;
    let hash = money_hash(&["adjust", account, asset, &amount.to_string(), reason]);
    for _ in 0..2 {
        let mut tx = pool.begin().await?;
        if let Some(id) = replay(&mut tx, key, &hash).await? {
            return Ok(id);
        }
        let row =
            sqlx::query("SELECT kind, closed_at IS NOT NULL AS closed FROM accounts WHERE id = $1")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    LedgerError::NotFound(format!("account {account} does not exist"))
                })?;
        let kind: String = row.try_get("kind")?;
        if kind == "system" || row.try_get::<bool, _>("closed")? {
            return Err(LedgerError::FailedPrecondition(
                "adjustments go to open payer or merchant accounts".into(),
            ));
        }
        for a in [account, ADJUST_ACCOUNT] {
            sqlx::query(
                "INSERT INTO balances (account_id, asset, debits_must_not_exceed_credits) \
                 SELECT id, $2, kind = 'payer' FROM accounts WHERE id = $1 \
                 ON CONFLICT (account_id, asset) DO NOTHING",
            )
            .bind(a)
            .bind(asset)
            .execute(&mut *tx)
            .await?;
        }
        let (debit, credit, units) = if amount > 0 {
            (ADJUST_ACCOUNT, account, amount)
        } else {
            (account, ADJUST_ACCOUNT, -amount)
        };
        let mut sorted = [(debit, true), (credit, false)];
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        for (acct, is_debit) in sorted {
            let sql = if is_debit {
                "UPDATE balances SET debits_posted = debits_posted + $3 WHERE account_id = $1 AND asset = $2"
            } else {
                "UPDATE balances SET credits_posted = credits_posted + $3 WHERE account_id = $1 AND asset = $2"
            };
            let done = sqlx::query(sql)
                .bind(acct)
                .bind(asset)
                .bind(units)
                .execute(&mut *tx)
                .await;
            match done {
                Ok(_) => {}
                Err(e) if sqlstate(&e).as_deref() == Some("23514") => {
                    return Err(LedgerError::FailedPrecondition(
                        "insufficient funds for this debit".into(),
                    ))
                }
                Err(e) if sqlstate(&e).as_deref() == Some("22003") => {
                    return Err(LedgerError::InvalidArgument(
                        "adjustment would overflow the balance".into(),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let inserted = sqlx::query_scalar::<_, String>(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, idempotency_key, request_hash, reason) \
             VALUES ('adjust', $1, $2, $3, $4, NULLIF($5, ''), $6, $7) RETURNING id",
        )
        .bind(debit)
        .bind(credit)
        .bind(asset)
        .bind(units)
        .bind(key)
        .bind(&hash)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await;
        match inserted {
            Ok(id) => {
                tx.commit().await?;
                return Ok(id);
            }
            Err(e) if key_conflict(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LedgerError::FailedPrecondition(
        "concurrent requests with this idempotency_key".into(),
    ))
}

/// Refunds `amount` (0 = all that is left) of a captured payment to its payer: the
/// merchant returns its part and the platform its fee, pro rata. The refund-cap row's
/// CHECK guarantees refunds never exceed the capture, whatever runs concurrently.
pub async fn refund(
    pool: &PgPool,
    hold_id: &str,
    amount: u64,
    reason: &str,
    key: &str,
) -> Result<(String, u64), LedgerError> {
    let reason = reason.trim();
    if reason.len() > 512 {
        return Err(LedgerError::InvalidArgument(
            "reason is at most 512 bytes".into(),
        ));
    }
    let hash = money_hash(&["refund", hold_id, &amount.to_string(), reason]);
    for _ in 0..2 {
        let mut tx = pool.begin().await?;
        if let Some(id) = replay(&mut tx, key, &hash).await? {
            let amt: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(amount), 0)::bigint FROM transfers \
                 WHERE id = $1 OR (pending_id = $2 AND kind = 'fee_refund' AND reason = $1)",
            )
            .bind(&id)
            .bind(hold_id)
            .fetch_one(&mut *tx)
            .await?;
            return Ok((id, u64::try_from(amt).unwrap_or(0)));
        }
        let hold = sqlx::query(
            "SELECT debit_account, credit_account, asset, coalesce(route, '') AS route FROM transfers \
             WHERE id = $1 AND kind = 'hold'",
        )
        .bind(hold_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| LedgerError::NotFound("no such payment".into()))?;
        let payer: String = hold.try_get("debit_account")?;
        let merchant: String = hold.try_get("credit_account")?;
        let asset: String = hold.try_get("asset")?;
        let route: String = hold.try_get("route")?;
        let cap = sqlx::query(
            "SELECT captured, fee, refunded, fee_refunded FROM payment_refunds WHERE hold_id = $1 FOR UPDATE",
        )
        .bind(hold_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| LedgerError::FailedPrecondition("payment was not captured".into()))?;
        let captured: i64 = cap.try_get("captured")?;
        let fee: i64 = cap.try_get("fee")?;
        let refunded: i64 = cap.try_get("refunded")?;
        let fee_refunded: i64 = cap.try_get("fee_refunded")?;
        let left = captured - refunded;
        let want = if amount == 0 {
            left
        } else {
            i64::try_from(amount)
                .map_err(|_| LedgerError::InvalidArgument("amount is too large".into()))?
        };
        if want == 0 {
            return Err(LedgerError::FailedPrecondition(
                "payment is already refunded in full".into(),
            ));
        }
        if want > left {
            return Err(LedgerError::FailedPrecondition(format!(
                "refund of {want} exceeds the {left} captured and not yet refunded"
            )));
        }
        // The platform returns its fee pro rata over all refunds so far: the share
        // of what is refunded after this one, rounded down, less what earlier ones
        // returned. The refund that empties the payment so returns the fee exactly,
        // and no refund returns more fee than it refunds (rounding each refund's own
        // share down would leave the last one owing more than it is).
        let fee_part = fee_share(refunded + want, fee, captured)
            .saturating_sub(fee_refunded)
            .min(want)
            .max(0);
        let merchant_part = want - fee_part;
        let updated = sqlx::query(
            "UPDATE payment_refunds SET refunded = refunded + $2, fee_refunded = fee_refunded + $3 WHERE hold_id = $1",
        )
        .bind(hold_id)
        .bind(want)
        .bind(fee_part)
        .execute(&mut *tx)
        .await;
        if let Err(e) = updated {
            if sqlstate(&e).as_deref() == Some("23514") {
                return Err(LedgerError::FailedPrecondition(
                    "refunds would exceed the captured amount".into(),
                ));
            }
            return Err(e.into());
        }
        // Balance updates in sorted (account) order, like every ledger operation.
        let mut moves: Vec<(&str, i64, i64)> = vec![(payer.as_str(), 0, want)];
        if merchant_part > 0 {
            moves.push((merchant.as_str(), merchant_part, 0));
        }
        if fee_part > 0 {
            moves.push((PLATFORM_ACCOUNT, fee_part, 0));
        }
        moves.sort_by(|a, b| a.0.cmp(b.0));
        for (acct, debit, credit) in moves {
            sqlx::query(
                "UPDATE balances SET debits_posted = debits_posted + $3, credits_posted = credits_posted + $4 \
                 WHERE account_id = $1 AND asset = $2",
            )
            .bind(acct)
            .bind(&asset)
            .bind(debit)
            .bind(credit)
            .execute(&mut *tx)
            .await?;
        }
        let inserted = sqlx::query_scalar::<_, String>(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, \
               idempotency_key, request_hash, reason) \
             VALUES ('refund', $1, $2, $3, $4, $5, NULLIF($6, ''), $7, $8) RETURNING id",
        )
        .bind(&merchant)
        .bind(&payer)
        .bind(&asset)
        .bind(merchant_part)
        .bind(hold_id)
        .bind(key)
        .bind(&hash)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await;
        let refund_id = match inserted {
            Ok(id) => id,
            Err(e) if key_conflict(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        if fee_part > 0 {
            // Points at the refund through `reason` so a replay can sum both parts.
            sqlx::query(
                "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, reason) \
                 VALUES ('fee_refund', $1, $2, $3, $4, $5, $6)",
            )
            .bind(PLATFORM_ACCOUNT)
            .bind(&payer)
            .bind(&asset)
            .bind(fee_part)
            .bind(hold_id)
            .bind(&refund_id)
            .execute(&mut *tx)
            .await?;
        }
        crate::events::after_refund(
            &mut tx, hold_id, &payer, &merchant, &asset, &route, want, reason,
        )
        .await?;
        tx.commit().await?;
        let want = u64::try_from(want).unwrap_or(0);
        crate::metrics::METRICS.refunded(want);
        return Ok((refund_id, want));
    }
    Err(LedgerError::FailedPrecondition(
        "concurrent requests with this idempotency_key".into(),
    ))
}

/// The part of `fee` that refunds totalling `refunded` of `captured` return, rounded
/// down (all of it once everything is refunded).
fn fee_share(refunded: i64, fee: i64, captured: i64) -> i64 {
    if refunded >= captured {
        return fee;
    }
    i64::try_from(i128::from(refunded) * i128::from(fee) / i128::from(captured.max(1)))
        .unwrap_or(fee)
}

/// Builds the RefundResponse of a refund.
pub async fn refund_response(
    pool: &PgPool,
    hold_id: &str,
    refund_id: String,
    amount: u64,
) -> Result<RefundResponse, LedgerError> {
    Ok(RefundResponse {
        refund_id,
        amount,
        payment: Some(crate::accounts::get_payment(pool, hold_id).await?),
    })
}

pub async fn set_webhook(
    pool: &PgPool,
    merchant: &str,
    url: &str,
    secret: &str,
) -> Result<Webhook, LedgerError> {
    let account = get_account(pool, merchant).await?;
    if account.kind != AccountKind::Merchant as i32 {
        return Err(LedgerError::FailedPrecondition(
            "webhooks belong to merchant accounts".into(),
        ));
    }
    let url_ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() <= 2048
        && !url.chars().any(|c| c.is_control() || c.is_whitespace());
    if !url_ok {
        return Err(LedgerError::InvalidArgument(
            "url must be an http:// or https:// URL".into(),
        ));
    }
    if secret.len() < 16 || secret.len() > 256 {
        return Err(LedgerError::InvalidArgument(
            "secret must be 16-256 bytes".into(),
        ));
    }
    sqlx::query(
        "INSERT INTO webhook_endpoints (merchant, url, secret) VALUES ($1, $2, $3) \
         ON CONFLICT (merchant) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret",
    )
    .bind(merchant)
    .bind(url)
    .bind(secret)
    .execute(pool)
    .await?;
    Ok(Webhook {
        merchant: merchant.to_owned(),
        url: url.to_owned(),
    })
}

pub async fn list_deliveries(
    pool: &PgPool,
    merchant: &str,
    page_size: u32,
) -> Result<Vec<WebhookDelivery>, LedgerError> {
    let rows = sqlx::query(
        "SELECT event_id, event_type, attempts, delivered_at IS NOT NULL AS delivered, \
           coalesce(last_status, 0) AS last_status, coalesce(last_error, '') AS last_error, \
           extract(epoch FROM created_at)::bigint AS created_unix, \
           CASE WHEN next_attempt_at = 'infinity' THEN 0 ELSE extract(epoch FROM next_attempt_at)::bigint END AS next_unix, \
           payload::text AS payload \
         FROM webhook_outbox WHERE merchant = $1 ORDER BY created_at DESC, event_id LIMIT $2",
    )
    .bind(merchant)
    .bind(i64::from(page_size_or_default(page_size)))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(WebhookDelivery {
                event_id: r.try_get("event_id")?,
                event_type: r.try_get("event_type")?,
                attempts: u32::try_from(r.try_get::<i32, _>("attempts")?).unwrap_or(0),
                delivered: r.try_get("delivered")?,
                last_status: u32::try_from(r.try_get::<i32, _>("last_status")?).unwrap_or(0),
                last_error: r.try_get("last_error")?,
                created_at_unix: r.try_get("created_unix")?,
                next_attempt_unix: r.try_get("next_unix")?,
                payload: r.try_get("payload")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(LedgerError::from)
}
