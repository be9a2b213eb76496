//! Accounts, payer keys, balances and payment reports: everything the operator API
//! reads or sets that is not a money movement.

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use x402_proto::settlement::v1::{Account, AccountKind, Balance, PayerKey, Payment};

use crate::error::LedgerError;

/// Most payments in one page, and the page size when the caller sends 0.
pub const MAX_PAGE_SIZE: u32 = 500;
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// Account ids: 1-64 of `[A-Za-z0-9_.:-]` (the migration's CHECK says the same).
pub fn check_account_id(id: &str) -> Result<(), LedgerError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::InvalidArgument(
            "account_id must be 1-64 of [A-Za-z0-9_.:-]".into(),
        ))
    }
}

pub fn check_asset(asset: &str) -> Result<(), LedgerError> {
    let ok = (1..=x402_proto::wire::MAX_SHORT_FIELD).contains(&asset.len())
        && !asset.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(LedgerError::InvalidArgument(
            "asset must be 1-128 characters".into(),
        ))
    }
}

/// A public key must be 32 bytes of lowercase hex that decode to a curve point
/// `verify_strict` would accept.
pub fn check_public_key(hex_key: &str) -> Result<(), LedgerError> {
    let bad = || {
        LedgerError::InvalidArgument(
            "public_key must be 64 lowercase hex digits of an ed25519 key".into(),
        )
    };
    if hex_key.len() != 64
        || !hex_key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).map_err(|_| bad())?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
    if key.is_weak() {
        return Err(bad());
    }
    Ok(())
}

fn kind_name(kind: AccountKind) -> Option<&'static str> {
    match kind {
        AccountKind::Payer => Some("payer"),
        AccountKind::Merchant => Some("merchant"),
        AccountKind::System => Some("system"),
        AccountKind::Unspecified => None,
    }
}

fn kind_from_name(name: &str) -> AccountKind {
    match name {
        "payer" => AccountKind::Payer,
        "merchant" => AccountKind::Merchant,
        "system" => AccountKind::System,
        _ => AccountKind::Unspecified,
    }
}

fn account_from_row(row: &PgRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        account_id: row.try_get("id")?,
        kind: kind_from_name(&row.try_get::<String, _>("kind")?) as i32,
        created_at_unix: row.try_get("created_unix")?,
        ..Account::default()
    })
}

const ACCOUNT_COLUMNS: &str = "id, kind, extract(epoch FROM created_at)::bigint AS created_unix";

/// Creates a payer or merchant account; creating it again with the same kind
/// returns it, with another kind is ALREADY_EXISTS.
pub async fn create_account(
    pool: &PgPool,
    id: &str,
    kind: AccountKind,
) -> Result<Account, LedgerError> {
    check_account_id(id)?;
    let name = match kind {
        AccountKind::Payer | AccountKind::Merchant => kind_name(kind).unwrap_or_default(),
        _ => {
            return Err(LedgerError::InvalidArgument(
                "kind must be payer or merchant".into(),
            ))
        }
    };
    sqlx::query("INSERT INTO accounts (id, kind) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .bind(name)
        .execute(pool)
        .await?;
    let account = get_account(pool, id).await?;
    if account.kind != kind as i32 {
        return Err(LedgerError::AlreadyExists(format!(
            "account {id} exists with another kind"
        )));
    }
    Ok(account)
}

pub async fn get_account(pool: &PgPool, id: &str) -> Result<Account, LedgerError> {
    let row = sqlx::query(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| LedgerError::NotFound(format!("account {id} does not exist")))?;
    Ok(account_from_row(&row)?)
}

fn key_from_row(row: &PgRow) -> Result<PayerKey, sqlx::Error> {
    Ok(PayerKey {
        account_id: row.try_get("account_id")?,
        public_key: row.try_get("public_key")?,
        revoked: row.try_get("revoked")?,
    })
}

/// Registers a key for a payer account. Adding the same key to the same account
/// again returns it; a key belongs to one account for good, and a revoked key
/// stays revoked.
pub async fn add_key(
    pool: &PgPool,
    account_id: &str,
    public_key: &str,
) -> Result<PayerKey, LedgerError> {
    check_public_key(public_key)?;
    let account = get_account(pool, account_id).await?;
    if account.kind != AccountKind::Payer as i32 {
        return Err(LedgerError::FailedPrecondition(
            "keys belong to payer accounts".into(),
        ));
    }
    let row = sqlx::query(
        "WITH ins AS (INSERT INTO payer_keys (public_key, account_id) VALUES ($1, $2) \
           ON CONFLICT (public_key) DO NOTHING RETURNING public_key, account_id, revoked_at) \
         SELECT public_key, account_id, revoked_at IS NOT NULL AS revoked FROM ins \
         UNION ALL \
         SELECT public_key, account_id, revoked_at IS NOT NULL FROM payer_keys WHERE public_key = $1 \
         LIMIT 1",
    )
    .bind(public_key)
    .bind(account_id)
    .fetch_one(pool)
    .await?;
    let key = key_from_row(&row)?;
    if key.account_id != account_id {
        return Err(LedgerError::AlreadyExists(
            "public key is registered to another account".into(),
        ));
    }
    if key.revoked {
        return Err(LedgerError::FailedPrecondition(
            "public key was revoked and cannot be added again".into(),
        ));
    }
    Ok(key)
}

pub async fn revoke_key(pool: &PgPool, public_key: &str) -> Result<PayerKey, LedgerError> {
    let row = sqlx::query(
        "UPDATE payer_keys SET revoked_at = coalesce(revoked_at, now()) WHERE public_key = $1 \
         RETURNING public_key, account_id, true AS revoked",
    )
    .bind(public_key)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| LedgerError::NotFound("public key is not registered".into()))?;
    Ok(key_from_row(&row)?)
}

/// The counters of `(account, asset)`; all zero when nothing has moved yet.
pub async fn balance(pool: &PgPool, account_id: &str, asset: &str) -> Result<Balance, LedgerError> {
    check_asset(asset)?;
    get_account(pool, account_id).await?;
    let row = sqlx::query(
        "SELECT debits_pending, debits_posted, credits_pending, credits_posted FROM balances \
         WHERE account_id = $1 AND asset = $2",
    )
    .bind(account_id)
    .bind(asset)
    .fetch_optional(pool)
    .await?;
    let (dp, dpo, cp, cpo) = match row {
        Some(r) => (
            r.try_get::<i64, _>("debits_pending")?,
            r.try_get::<i64, _>("debits_posted")?,
            r.try_get::<i64, _>("credits_pending")?,
            r.try_get::<i64, _>("credits_posted")?,
        ),
        None => (0, 0, 0, 0),
    };
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let kind: Option<String> = sqlx::query_scalar("SELECT kind FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_optional(pool)
        .await?;
    let decimals: Option<i32> = sqlx::query_scalar("SELECT decimals FROM assets WHERE code = $1")
        .bind(asset)
        .fetch_optional(pool)
        .await?;
    let held = if kind.as_deref() == Some("payer") {
        dp
    } else {
        cp
    };
    Ok(Balance {
        held: u(held),
        posted: i64::try_from(i128::from(cpo) - i128::from(dpo)).unwrap_or(i64::MIN),
        decimals: decimals.and_then(|d| u32::try_from(d).ok()).unwrap_or(0),
        account_id: account_id.to_owned(),
        asset: asset.to_owned(),
        debits_pending: u(dp),
        debits_posted: u(dpo),
        credits_pending: u(cp),
        credits_posted: u(cpo),
        available: i64::try_from(i128::from(cpo) - i128::from(dpo) - i128::from(dp))
            .unwrap_or(i64::MIN),
    })
}

const PAYMENT_SELECT: &str = "SELECT h.id, h.debit_account, h.credit_account, h.asset, \
      coalesce(h.route, '') AS route, coalesce(h.resource, '') AS resource, h.amount, \
      coalesce(h.payer_key, '') AS payer_key, coalesce(h.nonce, '') AS nonce, \
      extract(epoch FROM h.created_at)::bigint AS created_unix, r.kind AS resolution, r.amount AS resolved, \
      r.http_status, r.upstream_micros, pr.refunded, pr.fee, pr.captured AS captured_so_far \
    FROM transfers h \
    LEFT JOIN transfers r ON r.pending_id = h.id AND r.kind IN ('capture', 'void', 'expire') \
    LEFT JOIN payment_refunds pr ON pr.hold_id = h.id";

fn payment_from_row(row: &PgRow) -> Result<Payment, sqlx::Error> {
    let held = u64::try_from(row.try_get::<i64, _>("amount")?).unwrap_or(0);
    let resolution: Option<String> = row.try_get("resolution")?;
    let resolved = row
        .try_get::<Option<i64>, _>("resolved")?
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0);
    // What partial captures posted counts as captured while the hold is open and
    // after a void or expiry released the rest.
    let partial = opt_u64(row.try_get("captured_so_far")?);
    let (status, captured, voided) = match resolution.as_deref() {
        Some("capture") => ("captured", resolved, held.saturating_sub(resolved)),
        Some("void") => ("voided", partial, resolved),
        Some(_) => ("expired", partial, resolved),
        None => ("held", partial, 0),
    };
    Ok(Payment {
        transaction_id: row.try_get("id")?,
        payer_account: row.try_get("debit_account")?,
        merchant_account: row.try_get("credit_account")?,
        asset: row.try_get("asset")?,
        route: row.try_get("route")?,
        resource: row.try_get("resource")?,
        held,
        captured,
        voided,
        status: status.to_owned(),
        created_at_unix: row.try_get("created_unix")?,
        payer_key: row.try_get("payer_key")?,
        nonce: row.try_get("nonce")?,
        refunded: opt_u64(row.try_get("refunded")?),
        fee: opt_u64(row.try_get("fee")?),
        http_status: row
            .try_get::<Option<i32>, _>("http_status")?
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
        upstream_micros: opt_u64(row.try_get("upstream_micros")?),
    })
}

fn opt_u64(v: Option<i64>) -> u64 {
    v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

pub async fn get_payment(pool: &PgPool, transaction_id: &str) -> Result<Payment, LedgerError> {
    let row = sqlx::query(&format!(
        "{PAYMENT_SELECT} WHERE h.id = $1 AND h.kind = 'hold'"
    ))
    .bind(transaction_id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| LedgerError::NotFound("no such payment".into()))?;
    Ok(payment_from_row(&row)?)
}

/// Filters of [`list_payments`]; empty strings and zeros mean "any".
#[derive(Debug, Default, Clone)]
pub struct PaymentFilter {
    pub payer: String,
    pub merchant: String,
    pub route: String,
    /// held, captured, voided, expired or refunded (captured with refunds).
    pub status: String,
    pub from_unix: i64,
    pub to_unix: i64,
}

/// Payments newest first. The page token is the id of the last payment of the
/// previous page (keyset pagination on `(created_at, id)`).
pub async fn list_payments(
    pool: &PgPool,
    payer: &str,
    merchant: &str,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<Payment>, String), LedgerError> {
    let filter = PaymentFilter {
        payer: payer.to_owned(),
        merchant: merchant.to_owned(),
        ..PaymentFilter::default()
    };
    list_payments_filtered(pool, &filter, page_size, page_token).await
}

pub async fn list_payments_filtered(
    pool: &PgPool,
    filter: &PaymentFilter,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<Payment>, String), LedgerError> {
    let size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let status_sql = match filter.status.as_str() {
        "" => "",
        "held" => " AND r.kind IS NULL",
        "captured" => " AND r.kind = 'capture'",
        "voided" => " AND r.kind = 'void'",
        "expired" => " AND r.kind = 'expire'",
        "refunded" => {
            " AND EXISTS (SELECT 1 FROM payment_refunds pr WHERE pr.hold_id = h.id AND pr.refunded > 0)"
        }
        _ => {
            return Err(LedgerError::InvalidArgument(
                "status must be held, captured, voided, expired or refunded".into(),
            ))
        }
    };
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let time = |t: i64| (t > 0).then_some(t as f64);
    let rows = sqlx::query(&format!(
        "{PAYMENT_SELECT} WHERE h.kind = 'hold' \
           AND ($1::text IS NULL OR h.debit_account = $1) \
           AND ($2::text IS NULL OR h.credit_account = $2) \
           AND ($3::text IS NULL OR (h.created_at, h.id) < \
                (SELECT c.created_at, c.id FROM transfers c WHERE c.id = $3 AND c.kind = 'hold')) \
           AND ($5::text IS NULL OR h.route = $5) \
           AND ($6::float8 IS NULL OR h.created_at >= to_timestamp($6)) \
           AND ($7::float8 IS NULL OR h.created_at < to_timestamp($7)){status_sql} \
         ORDER BY h.created_at DESC, h.id DESC LIMIT $4"
    ))
    .bind(opt(&filter.payer))
    .bind(opt(&filter.merchant))
    .bind(opt(page_token))
    .bind(i64::from(size) + 1)
    .bind(opt(&filter.route))
    .bind(time(filter.from_unix))
    .bind(time(filter.to_unix))
    .fetch_all(pool)
    .await?;
    let mut payments = rows
        .iter()
        .map(payment_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = if payments.len() > size as usize {
        payments.truncate(size as usize);
        payments
            .last()
            .map(|p| p.transaction_id.clone())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((payments, next))
}
