//! The benchmark's payers: deterministic keys, written straight into the ledger in
//! bulk (accounts, keys, balances and the deposit transfers that fund them, so the
//! ledger stays balanced), and the proofs they sign.

use anyhow::{Context, Result};
use rand::Rng;
use sqlx::PgPool;
use x402_client::wire::PaymentRequirements;
use x402_client::PayerKey;
use x402_e2e::stack::{ASSET, MAX_TIMEOUT_SECONDS, MERCHANT, NETWORK, PAID_PRICE};

/// The price of the benchmark's paid route (`/paid` in the default filter config).
pub const PRICE: u64 = PAID_PRICE;
/// Credit of each payer: enough for any run.
const FUNDS: i64 = 10_000_000_000_000;

pub struct Payers {
    keys: Vec<PayerKey>,
}

impl Payers {
    /// `count` payers `bench-payer-0..count`, funded.
    pub async fn seed(pool: &PgPool, count: usize) -> Result<Payers> {
        let keys: Vec<PayerKey> = (0..count)
            .map(|i| {
                let mut seed = [7u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                PayerKey::from_seed(&seed)
            })
            .collect();
        let ids: Vec<String> = (0..count).map(|i| format!("bench-payer-{i}")).collect();
        let publics: Vec<String> = keys.iter().map(PayerKey::public_key_hex).collect();
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO accounts (id, kind) SELECT unnest($1::text[]), 'payer'")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .context("inserting payer accounts")?;
        sqlx::query("INSERT INTO payer_keys (public_key, account_id) SELECT * FROM unnest($1::text[], $2::text[])")
            .bind(&publics)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .context("inserting payer keys")?;
        sqlx::query(
            "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, request_hash) \
             SELECT 'deposit', 'system:credit', a, $2, $3, 'bench-seed' FROM unnest($1::text[]) a",
        )
        .bind(&ids)
        .bind(ASSET)
        .bind(FUNDS)
        .execute(&mut *tx)
        .await
        .context("inserting deposits")?;
        sqlx::query(
            "INSERT INTO balances (account_id, asset, credits_posted, debits_must_not_exceed_credits) \
             SELECT unnest($1::text[]), $2, $3, true",
        )
        .bind(&ids)
        .bind(ASSET)
        .bind(FUNDS)
        .execute(&mut *tx)
        .await
        .context("inserting payer balances")?;
        let total = FUNDS
            .checked_mul(i64::try_from(count)?)
            .context("funds overflow")?;
        sqlx::query(
            "INSERT INTO balances (account_id, asset, debits_posted, debits_must_not_exceed_credits) \
             VALUES ('system:credit', $1, $2, false) ON CONFLICT (account_id, asset) \
             DO UPDATE SET debits_posted = balances.debits_posted + EXCLUDED.debits_posted",
        )
        .bind(ASSET)
        .bind(total)
        .execute(&mut *tx)
        .await
        .context("debiting system:credit")?;
        sqlx::query(
            "INSERT INTO balances (account_id, asset, debits_must_not_exceed_credits) \
             VALUES ($1, $2, false) ON CONFLICT (account_id, asset) DO NOTHING",
        )
        .bind(MERCHANT)
        .bind(ASSET)
        .execute(&mut *tx)
        .await
        .context("merchant balance")?;
        // The ext_authz peer's nonce register (the peer has no holds to keep them in).
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS bench_peer_nonces (account_id text NOT NULL REFERENCES accounts (id), \
             nonce text NOT NULL, PRIMARY KEY (account_id, nonce))",
        )
        .execute(&mut *tx)
        .await
        .context("creating bench_peer_nonces")?;
        tx.commit().await?;
        Ok(Payers { keys })
    }

    /// `count` past payments of one atomic unit each, spread over the payers, as an
    /// exact price pays them now (a hold with its capture and refund-cap row, balances
    /// posted): the ledger of a seller that has been selling a while, so the paid path is
    /// measured against indexes of a realistic size. Written straight into the tables
    /// in chunks, each its own transaction.
    pub async fn history(&self, pool: &PgPool, count: u64) -> Result<()> {
        const CHUNK: u64 = 100_000;
        let payers = i64::try_from(self.keys.len())?;
        let mut start = 0u64;
        while start < count {
            let n = CHUNK.min(count - start);
            let mut tx = pool.begin().await?;
            sqlx::query(
                "WITH d AS (SELECT g, 'bench-payer-' || (g % $3) AS payer FROM generate_series($1, $1 + $2 - 1) AS g), \
                 hold AS (INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, request_id, \
                     request_hash, payer_key, nonce, route, resource, expires_at, amount_authorized, created_at) \
                   SELECT 'hold', d.payer, $4, $5, 1, 'bench-history-' || d.g, 'h', k.public_key, \
                     'bench-history-' || d.g, '/paid', '/paid', now(), 1, now() - interval '1 day' \
                   FROM d JOIN payer_keys k ON k.account_id = d.payer \
                   RETURNING id, debit_account, credit_account, asset), \
                 cap AS (INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, \
                     pending_amount, reason, created_at) \
                   SELECT 'capture', debit_account, credit_account, asset, 1, id, 1, 'debit', now() - interval '1 day' \
                   FROM hold RETURNING 1), \
                 refundable AS (INSERT INTO payment_refunds (hold_id, captured, fee) SELECT id, 1, 0 FROM hold RETURNING 1), \
                 spent AS (SELECT debit_account AS account, count(*) AS n FROM hold GROUP BY 1), \
                 payers AS (UPDATE balances b SET debits_posted = b.debits_posted + s.n FROM spent s \
                   WHERE b.account_id = s.account AND b.asset = $5 RETURNING 1), \
                 merchant AS (UPDATE balances SET credits_posted = credits_posted + (SELECT count(*) FROM hold) \
                   WHERE account_id = $4 AND asset = $5 RETURNING 1) \
                 SELECT (SELECT count(*) FROM cap), (SELECT count(*) FROM refundable), \
                   (SELECT count(*) FROM payers), (SELECT count(*) FROM merchant)",
            )
            .bind(i64::try_from(start)?)
            .bind(i64::try_from(n)?)
            .bind(payers)
            .bind(MERCHANT)
            .bind(ASSET)
            .execute(&mut *tx)
            .await
            .context("writing past payments")?;
            tx.commit().await?;
            start += n;
        }
        // The ext_authz peer's nonce register gets the same history, so the two ledgers
        // it is compared with start the same size.
        sqlx::query(
            "INSERT INTO bench_peer_nonces (account_id, nonce) \
             SELECT 'bench-payer-' || (g % $2), 'bench-history-' || g FROM generate_series(0, $1 - 1) AS g",
        )
        .bind(i64::try_from(count)?)
        .bind(payers)
        .execute(pool)
        .await
        .context("writing the peer's past nonces")?;
        sqlx::query("VACUUM ANALYZE transfers, payment_refunds, balances, bench_peer_nonces")
            .execute(pool)
            .await
            .context("vacuuming after the past payments")?;
        // Write the history's pages out now, not in a checkpoint spread over the first
        // rounds.
        sqlx::query("CHECKPOINT")
            .execute(pool)
            .await
            .context("checkpoint after the past payments")?;
        Ok(())
    }

    pub fn pick(&self) -> &PayerKey {
        let i = rand::thread_rng().gen_range(0..self.keys.len());
        &self.keys[i]
    }

    /// The payer every hot-account request uses.
    pub fn hot(&self) -> &PayerKey {
        &self.keys[0]
    }
}

/// What the default filter config asks for on `/paid`.
pub fn requirements() -> PaymentRequirements {
    let mut extra = serde_json::Map::new();
    extra.insert("decimals".into(), 6.into());
    extra.insert("name".into(), ASSET.into());
    PaymentRequirements {
        scheme: "exact".into(),
        network: NETWORK.into(),
        amount: PRICE.to_string(),
        asset: ASSET.into(),
        pay_to: MERCHANT.into(),
        max_timeout_seconds: MAX_TIMEOUT_SECONDS,
        extra,
    }
}
