//! Scenario 7: settlement alone. A native gRPC client runs authorize + capture pairs
//! from `concurrency` tasks, each sending `batch` items per call as the filter's
//! batches do (one Authorize call of `batch` items, then one Capture call of them),
//! next to `pgbench` running the peer's single statement at the same concurrency; and
//! one-phase payments (an Authorize call whose items are captured as they are held, as
//! the filter sends exact prices), the same work as that statement.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::{Channel, Endpoint};
use x402_client::{sign_payment, PayerKey};
use x402_proto::settlement::v1::data_plane_client::DataPlaneClient;
use x402_proto::settlement::v1::{
    AuthorizeItem, AuthorizeOutcome, AuthorizeRequest, CaptureItem, CaptureRequest, PaymentProof,
    ResolveOutcome,
};

use crate::load::Measured;
use crate::payers::{requirements, Payers, PRICE};

pub async fn channel(port: u16) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await?)
}

fn proof_of(key: &PayerKey, resource: &str) -> Result<PaymentProof> {
    let p = sign_payment(
        key,
        &requirements(),
        resource,
        &x402_client::random_nonce_hex(),
        x402_e2e::stack::unix_now() + 60,
    )?;
    Ok(p.into())
}

/// Authorize + capture pairs for `duration` after `warmup`, `batch` pairs per
/// Authorize and per Capture call; `hot` puts every pair on the first payer;
/// `one_phase` captures each at authorize instead (no Capture call). Counts payments;
/// a latency is one batch's round trips.
#[allow(clippy::too_many_arguments)]
pub async fn run_pairs(
    channels: &[Channel],
    payers: &Arc<Payers>,
    hot: bool,
    one_phase: bool,
    concurrency: usize,
    batch: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured> {
    let batch = batch.max(1);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = DataPlaneClient::new(channels[i % channels.len()].clone());
        let payers = payers.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Measured::default();
            let mut seq = 0u64;
            while Instant::now() < end {
                let mut items = Vec::with_capacity(batch);
                for _ in 0..batch {
                    seq += 1;
                    let key = if hot { payers.hot() } else { payers.pick() };
                    let proof = proof_of(key, "POST bench.local/settle")?;
                    items.push((proof, format!("bench-{i}-{seq}-{}", proof_id())));
                }
                let sent = Instant::now();
                let result = pairs(&mut client, items, one_phase).await;
                let done = Instant::now();
                let inside = sent >= measure_from && done <= end;
                if result.is_ok() {
                    out.ok_all += batch as u64;
                }
                match result {
                    Ok(()) if inside => {
                        out.ok += batch as u64;
                        let us = done.duration_since(sent).as_micros();
                        out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if inside {
                            out.errors += 1;
                        }
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut total = Measured::default();
    for t in tasks {
        total.merge(t.await.context("settlement load task failed")??);
    }
    total.seconds = duration.as_secs_f64();
    total.latencies_us.sort_unstable();
    Ok(total)
}

fn proof_id() -> String {
    x402_client::random_nonce_hex()[..8].to_owned()
}

// `..Default::default()` stays valid whether or not the proto has grown new fields.
#[allow(clippy::needless_update)]
async fn pairs(
    client: &mut DataPlaneClient<Channel>,
    items: Vec<(PaymentProof, String)>,
    one_phase: bool,
) -> Result<()> {
    let n = items.len();
    let answer = client
        .authorize(AuthorizeRequest {
            items: items
                .into_iter()
                .map(|(proof, request_id)| AuthorizeItem {
                    request_id,
                    proof: Some(proof),
                    hold_amount: PRICE,
                    route: "bench".into(),
                    hold_ttl_seconds: 300,
                    capture: one_phase,
                    // Fields added later (volume tiers, ...) keep their defaults.
                    ..Default::default()
                })
                .collect(),
        })
        .await?
        .into_inner();
    if answer.results.len() != n {
        bail!(
            "authorize answered {} results for {n} items",
            answer.results.len()
        );
    }
    let mut captures = Vec::with_capacity(n);
    for result in answer.results {
        if result.outcome != AuthorizeOutcome::Authorized as i32 {
            bail!("authorize: outcome {} {}", result.outcome, result.message);
        }
        if result.captured != one_phase {
            bail!("authorize: captured {} for {one_phase}", result.captured);
        }
        captures.push(CaptureItem {
            transaction_id: result.transaction_id,
            amount: PRICE,
            upstream_micros: 0,
            http_status: 200,
        });
    }
    if one_phase {
        return Ok(());
    }
    let captured = client
        .capture(CaptureRequest { items: captures })
        .await?
        .into_inner();
    if captured.results.len() != n {
        bail!(
            "capture answered {} results for {n} items",
            captured.results.len()
        );
    }
    match captured
        .results
        .iter()
        .find(|r| r.outcome != ResolveOutcome::Captured as i32)
    {
        None => Ok(()),
        Some(other) => bail!("capture: {other:?}"),
    }
}

/// The pgbench script: the ext_authz peer's statement (`x402-bench-extauthz`'s
/// `DEBIT_SQL`, by account instead of key) with a random (or the hot) payer.
pub fn pgbench_script(payers: usize, hot: bool) -> String {
    let pick = if hot {
        "\\set p 0\n".to_string()
    } else {
        format!("\\set p random(0, {})\n", payers.saturating_sub(1))
    };
    format!(
        "{pick}WITH nonce AS (INSERT INTO bench_peer_nonces (account_id, nonce) VALUES ('bench-payer-' || :p, md5(random()::text || clock_timestamp()::text)) RETURNING account_id), \
         locked AS (SELECT b.account_id FROM balances b, nonce WHERE b.asset = 'USD' AND b.account_id IN (nonce.account_id, '{m}') ORDER BY b.account_id FOR UPDATE OF b) \
         UPDATE balances b SET debits_posted = b.debits_posted + CASE WHEN b.account_id = '{m}' THEN 0 ELSE {PRICE} END, \
         credits_posted = b.credits_posted + CASE WHEN b.account_id = '{m}' THEN {PRICE} ELSE 0 END \
         FROM locked WHERE b.asset = 'USD' AND b.account_id = locked.account_id;\n",
        m = x402_e2e::stack::MERCHANT,
    )
}

/// Where a Postgres tool (`pgbench`, `pg_test_fsync`) is: next to the cluster's
/// binaries (or to what their links point at), else on PATH.
pub fn pg_tool(pg_bin: &Path, name: &str) -> Option<std::path::PathBuf> {
    let linked = std::fs::canonicalize(pg_bin.join("initdb"))
        .ok()
        .and_then(|initdb| initdb.parent().map(|d| d.join(name)));
    if let Some(next) = std::iter::once(pg_bin.join(name))
        .chain(linked)
        .find(|p| p.is_file())
    {
        return Some(next);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// What one WAL flush costs on the disk under `dir`: `pg_test_fsync`'s microseconds per
/// `fdatasync` of one 8 kB write (Linux's default `wal_sync_method`), in one second.
/// The durable runs' figures depend on it.
pub fn wal_flush_us(pg_bin: &Path, dir: &Path) -> Option<u64> {
    let bin = pg_tool(pg_bin, "pg_test_fsync")?;
    let file = dir.join("pg_test_fsync.out");
    let out = std::process::Command::new("timeout")
        .args(["30", &bin.to_string_lossy(), "-s", "1", "-f"])
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()
        .ok();
    let _ = std::fs::remove_file(&file);
    parse_fdatasync_us(&String::from_utf8_lossy(&out?.stdout))
}

/// The first `fdatasync ... N usecs/op` line of `pg_test_fsync`'s output.
fn parse_fdatasync_us(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("fdatasync"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "usecs/op")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// Runs pgbench for `duration` (plus its own connection setup) and returns the rate,
/// the average latency and the failed transactions it reports.
pub fn run_pgbench(
    bin: &Path,
    script: &Path,
    port: u16,
    database: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<(f64, f64, u64)> {
    let secs = duration.as_secs().max(1);
    let out = Command::new(bin)
        .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(port.to_string())
        .args([
            "-c",
            &concurrency.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-M",
            "prepared",
            "-f",
        ])
        .arg(script)
        .arg(database)
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "pgbench failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = field("tps").context("pgbench printed no tps")?;
    let latency_ms = field("latency average").unwrap_or(0.0);
    let failed = text
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((tps, latency_ms * 1000.0, failed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn pgbench_scripts_lock_in_key_order_and_pick_the_right_payers() {
        let spread = pgbench_script(10_000, false);
        assert!(spread.starts_with("\\set p random(0, 9999)\n"));
        let hot = pgbench_script(10_000, true);
        assert!(hot.starts_with("\\set p 0\n"));
        for script in [spread, hot] {
            assert!(script.contains("ORDER BY b.account_id FOR UPDATE OF b"));
            assert_eq!(
                script.lines().count(),
                2,
                "pgbench reads one statement per line"
            );
        }
    }

    #[test]
    fn the_wal_flush_figure_is_fdatasync_of_one_write() {
        let out = "Compare file sync methods using one 8kB write:\n\
            (in wal_sync_method preference order, except fdatasync is Linux's default)\n\
            \x20       open_datasync                      5414.267 ops/sec     185 usecs/op\n\
            \x20       fdatasync                          5459.295 ops/sec     183 usecs/op\n\
            \x20       fsync                              6505.522 ops/sec     154 usecs/op\n\
            Compare file sync methods using two 8kB writes:\n\
            \x20       fdatasync                          4736.247 ops/sec     211 usecs/op\n";
        assert_eq!(parse_fdatasync_us(out), Some(183));
        assert_eq!(parse_fdatasync_us("fdatasync n/a\n"), None);
        assert_eq!(parse_fdatasync_us(""), None);
    }
}
