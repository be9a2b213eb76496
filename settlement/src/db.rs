//! Connecting to Postgres and applying the schema.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// The schema in `settlement/migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long a request waits for a pooled connection before it is answered
/// UNAVAILABLE: short, because the filter has a deadline of its own.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Set on every pooled connection, each on its own (an engine without one keeps its
/// own behaviour for it).
///
/// `plan_cache_mode`: Postgres plans a prepared statement afresh on each call while it
/// guesses a custom plan is cheaper than a generic one, and for the ledger's batch
/// statements (arrays unnested into CTEs) it keeps guessing so: planning took ~40% of the
/// ledger's statement time on the paid path. Every hot statement looks rows up by a
/// primary or unique key, so one generic plan per connection serves all parameters.
///
/// `enable_seqscan`: that one plan is made when the connection first runs the statement,
/// and a ledger that is still small then (a new deployment, a quiet hour) gets
/// sequential scans of `transfers`, `balances` and `payer_keys`, kept as the tables grow
/// until an ANALYZE replans them: a group read scanned every transfer. Off, the plans
/// use the keys' indexes whatever the tables' size when they were made.
pub const SESSION_SETTINGS: &[&str] = &[
    "SET plan_cache_mode = force_generic_plan",
    "SET enable_seqscan = off",
];

/// Pool options shared by the server and tests.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _| {
            Box::pin(async move {
                use sqlx::Executor;
                // An engine without a setting (older CockroachDB) keeps its own planning.
                for setting in SESSION_SETTINGS {
                    if let Err(e) = conn.execute(*setting).await {
                        tracing::debug!(error = %e, setting, "session setting not applied");
                    }
                }
                Ok(())
            })
        })
}

/// Connects now, so a wrong URL fails at start rather than on the first request.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    pool_options(max_connections).connect(url).await
}

/// Migrations rewritten after release without changing what they do on PostgreSQL,
/// with the SHA-384 (hex) of the text databases applied before: version, old checksum.
/// - `20250201000000_operator.sql`: drops the kind check with `IF EXISTS` under both
///   Postgres' and CockroachDB's generated names instead of Postgres' name only.
pub const REWRITTEN_MIGRATIONS: &[(i64, &str)] = &[(
    20250201000000,
    "f65e04e2a80134ca87ab9df91089c6a948289101a4eca26e85d0a258287d3e16c42f0da4d46ca719656b50041f27de65",
)];

/// Applies pending migrations. A database that applied a rewritten migration's earlier
/// text first gets its recorded checksum moved to the current text's (only from that
/// exact earlier checksum), so sqlx does not refuse it as modified.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    accept_rewritten_migrations(pool)
        .await
        .map_err(sqlx::migrate::MigrateError::Execute)?;
    MIGRATOR.run(pool).await
}

async fn accept_rewritten_migrations(pool: &PgPool) -> Result<(), sqlx::Error> {
    let migrated: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    if !migrated {
        return Ok(());
    }
    for (version, released) in REWRITTEN_MIGRATIONS {
        let Some(current) = MIGRATOR.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 \
             WHERE version = $2 AND checksum = decode($3, 'hex')",
        )
        .bind(current.checksum.as_ref())
        .bind(version)
        .bind(released)
        .execute(pool)
        .await?;
    }
    Ok(())
}
