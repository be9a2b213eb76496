//! `BENCH_PG_STATEMENTS=1`: where Postgres spends its time during the rounds, per
//! statement (planning and execution, from `pg_stat_statements`), for reading next to the
//! CPU per request. Not part of the default run: tracking costs a little on every call.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

async fn pool(database_url: &str) -> Result<sqlx::PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?)
}

async fn execute(database_url: &str, sql: &str) -> Result<()> {
    let pool = pool(database_url).await?;
    sqlx::query(sql).execute(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Creates the extension in the benchmark's database (the server preloads the library).
pub async fn install(database_url: &str) -> Result<()> {
    execute(
        database_url,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    )
    .await
}

/// Forgets the set-up's statements, so the table covers the rounds only.
pub async fn reset(database_url: &str) -> Result<()> {
    execute(database_url, "SELECT pg_stat_statements_reset()").await
}

/// Writes the 30 statements with the most planning + execution time as a Markdown table.
pub async fn write(database_url: &str, path: &Path) -> Result<()> {
    let pool = pool(database_url).await?;
    let rows: Vec<(i64, i64, f64, f64, i64, String)> = sqlx::query_as(
        "SELECT calls, plans, total_plan_time, total_exec_time, rows, \
           left(regexp_replace(query, '\\s+', ' ', 'g'), 160) \
         FROM pg_stat_statements ORDER BY total_plan_time + total_exec_time DESC LIMIT 30",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let mut out = String::from(
        "| calls | plans | plan ms | exec ms | rows | statement |\n| ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for (calls, plans, plan, exec, n, query) in rows {
        let query = query.replace('|', "\\|");
        let _ = writeln!(
            out,
            "| {calls} | {plans} | {plan:.1} | {exec:.1} | {n} | `{query}` |"
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, out)?;
    Ok(())
}
