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
