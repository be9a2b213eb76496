//! Migrations keep working on databases migrated before a migration was rewritten for
//! portability: `db::migrate` accepts the checksum such a database recorded for the
//! rewritten migration's earlier text, and a fresh database gets the rewritten text.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use x402_settlement::db::{self, MIGRATOR};

/// `20250201000000_operator.sql` as first released (and applied by existing databases).
const OPERATOR_AS_RELEASED: &str = include_str!("fixtures/20250201000000_operator.released.sql");
const OPERATOR_VERSION: i64 = 20250201000000;

async fn fresh_pool() -> sqlx::PgPool {
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    db::connect(&url, 2).await.unwrap()
}

async fn recorded_checksum(pool: &sqlx::PgPool, version: i64) -> Vec<u8> {
    sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = $1")
        .bind(version)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The kind check of `transfers` exists under its explicit name and allows the kinds
/// the operator migration added.
async fn assert_kind_checked(pool: &sqlx::PgPool) {
    let definition: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = 'transfers'::regclass AND conname = 'transfers_kind_check'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(definition.contains("'adjust'"), "{definition}");
}

#[tokio::test]
async fn a_database_migrated_with_the_released_text_keeps_migrating() {
    let pool = fresh_pool().await;
    // What an existing database went through: every migration up to the operator one,
    // the operator migration with its released text.
    let released: Vec<Migration> = MIGRATOR
        .iter()
        .filter(|m| m.version <= OPERATOR_VERSION)
        .map(|m| {
            if m.version == OPERATOR_VERSION {
                Migration::new(
                    m.version,
                    m.description.clone(),
                    MigrationType::Simple,
                    Cow::Borrowed(OPERATOR_AS_RELEASED),
                    false,
                )
            } else {
                m.clone()
            }
        })
        .collect();
    let old = Migrator {
        migrations: Cow::Owned(released),
        ..Migrator::DEFAULT
    };
    old.run(&pool).await.unwrap();
    let current = MIGRATOR
        .iter()
        .find(|m| m.version == OPERATOR_VERSION)
        .unwrap();
    assert_ne!(
        recorded_checksum(&pool, OPERATOR_VERSION).await,
        current.checksum.to_vec(),
        "the fixture must be the released text, not the current one"
    );
    // Without the acceptance this is sqlx's VersionMismatch; with it, it migrates
    // (twice, as two replicas starting one after the other would).
    db::migrate(&pool).await.unwrap();
    db::migrate(&pool).await.unwrap();
    assert_eq!(
        recorded_checksum(&pool, OPERATOR_VERSION).await,
        current.checksum.to_vec()
    );
    assert_kind_checked(&pool).await;
}

#[tokio::test]
async fn a_fresh_database_migrates_with_the_current_text() {
    let pool = fresh_pool().await;
    db::migrate(&pool).await.unwrap();
    db::migrate(&pool).await.unwrap();
    for m in MIGRATOR.iter() {
        assert_eq!(
            recorded_checksum(&pool, m.version).await,
            m.checksum.to_vec()
        );
    }
    assert_kind_checked(&pool).await;
}

/// Migrations never drop a constraint by a name only Postgres generates: a drop says
/// `IF EXISTS` (engines name unnamed constraints differently), and the constraints later
/// migrations may change are created with explicit names.
#[test]
fn migrations_drop_constraints_portably() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let sql = std::fs::read_to_string(&path).unwrap().to_ascii_uppercase();
        for (at, _) in sql.match_indices("DROP CONSTRAINT") {
            assert!(
                sql[at..].starts_with("DROP CONSTRAINT IF EXISTS"),
                "{}: a DROP CONSTRAINT without IF EXISTS",
                path.display()
            );
        }
    }
}

/// The unique keys of `transfers` index only the rows that carry them (a paid
/// request's capture and fee rows add no NULL entries), a resolution is indexed by its
/// hold once, and duplicates are still refused under the names the code matches.
#[tokio::test]
async fn transfers_index_only_the_rows_that_carry_each_key() {
    let pool = fresh_pool().await;
    db::migrate(&pool).await.unwrap();
    for (index, predicate) in [
        ("transfers_request_id_key", "request_id IS NOT NULL"),
        (
            "transfers_idempotency_key_key",
            "idempotency_key IS NOT NULL",
        ),
        ("transfers_by_pending", "<> ALL"),
    ] {
        let definition: String = sqlx::query_scalar("SELECT pg_get_indexdef($1::regclass)")
            .bind(index)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(definition.contains(predicate), "{definition}");
    }
    sqlx::query(
        "INSERT INTO accounts (id, kind) VALUES ('payer:m', 'payer'), ('merchant:m', 'merchant')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let deposit = "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, \
                   idempotency_key, request_hash) \
                   VALUES ('deposit', 'system:credit', 'payer:m', 'USD', 5, 'dep-1', 'h')";
    let hold = "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, \
                request_id, request_hash, payer_key, nonce, expires_at, amount_authorized) \
                VALUES ('hold', 'payer:m', 'merchant:m', 'USD', 5, 'req-1', 'h', 'k', $1, now(), 5)";
    sqlx::query(deposit).execute(&pool).await.unwrap();
    sqlx::query(hold).bind("n1").execute(&pool).await.unwrap();
    let violated = |e: sqlx::Error| {
        e.as_database_error()
            .and_then(|d| d.constraint().map(str::to_owned))
    };
    let again = sqlx::query(deposit).execute(&pool).await.unwrap_err();
    assert_eq!(
        violated(again).as_deref(),
        Some("transfers_idempotency_key_key")
    );
    let again = sqlx::query(hold)
        .bind("n2")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(violated(again).as_deref(), Some("transfers_request_id_key"));
}

/// Transfer ids start with the time they were made (UUID version 7), so ids made later
/// sort after earlier ones and a paid request's rows go to the right edge of the
/// indexes keyed by them; they stay distinct and in UUID form.
#[tokio::test]
async fn transfer_ids_sort_in_the_order_they_were_made() {
    let pool = fresh_pool().await;
    db::migrate(&pool).await.unwrap();
    sqlx::query("INSERT INTO accounts (id, kind) VALUES ('payer:t', 'payer')")
        .execute(&pool)
        .await
        .unwrap();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let before_ms = now_ms();
    let mut ids = Vec::new();
    for i in 0..6 {
        // One statement per millisecond or more, each inserting three rows.
        let made: Vec<String> = sqlx::query_scalar(
            "WITH w AS (SELECT pg_sleep(0.002)) \
             INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, \
               idempotency_key, request_hash) \
             SELECT 'deposit', 'system:credit', 'payer:t', 'USD', 1, $1 || '-' || n, 'h' \
             FROM w, generate_series(1, 3) AS n RETURNING id",
        )
        .bind(format!("dep-{i}"))
        .fetch_all(&pool)
        .await
        .unwrap();
        ids.push(made);
    }
    let after_ms = now_ms();
    for (earlier, later) in ids.iter().zip(ids.iter().skip(1)) {
        let newest_earlier = earlier.iter().max().unwrap();
        let oldest_later = later.iter().min().unwrap();
        assert!(newest_earlier < oldest_later, "{earlier:?} then {later:?}");
    }
    let all: Vec<&String> = ids.iter().flatten().collect();
    let distinct: std::collections::HashSet<&&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len());
    for id in all {
        let hex: String = id.chars().filter(|c| *c != '-').collect();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "7", "version 7: {id}");
        assert!("89ab".contains(&id[19..20]), "RFC variant: {id}");
        let ms = u128::from_str_radix(&hex[..12], 16).unwrap();
        assert!(
            (before_ms..=after_ms).contains(&ms),
            "{id} made at {ms} ms, between {before_ms} and {after_ms}"
        );
    }
}
