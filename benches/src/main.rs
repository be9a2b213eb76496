//! `make bench`: the 402x paid path next to bare Envoy, a `direct_response`, and the
//! way a seller would otherwise do it (Envoy's native ext_authz calling a native
//! service), plus settlement alone next to pgbench. One process tree on loopback,
//! every Envoy at `--concurrency 1`, scenarios interleaved round by round, medians
//! reported, every loop bounded. `BENCH_QUICK=1` runs short rounds.
//!
//! Modules: `load` (HTTP load generator), `settle` (gRPC load client and pgbench),
//! `payers` (seeding and proofs), `envoys` (the comparison Envoy configs), `procfs`
//! (CPU and memory per process), `report` (table, JSON, Markdown).

mod envoys;
mod load;
mod payers;
mod pg_statements;
mod procfs;
mod report;
mod settle;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use x402_client::wire::{encode_header, PaymentRequirements, HEADER_PAYMENT_SIGNATURE};
use x402_client::{parse_challenge, sign_payment};
use x402_e2e::envoy::{Envoy, EnvoyOptions};
use x402_e2e::paths;
use x402_e2e::pg::{pg_bin_dir, TestPostgres};
use x402_e2e::process::{free_port, ChildGuard, ScratchDir};
use x402_e2e::settlement::Settlement;
use x402_e2e::stack::{default_filter_config, unix_now, ASSET, MERCHANT, NETWORK};
use x402_proto::settlement::v1::AccountKind;

use crate::envoys::BenchEnvoy;
use crate::load::{HttpLoad, MakeRequest, Measured};
use crate::payers::{requirements, Payers, PRICE};
use crate::procfs::Tracked;
use crate::report::{Report, RoundResult, Scenario};

/// Path of the bare proxy, 402, paid flat and ext_authz scenarios (priced at [`PRICE`] in the
/// filter config).
const PATH: &str = "/paid/bench";
/// A path no route of the filter prices: the filter passes it to the upstream.
const UNPRICED_PATH: &str = "/free/bench";
/// Path of the metered scenario: priced per token from the upstream's `x-usage-tokens`
/// header (the demo upstream reports `n` tokens), so each request holds the maximum
/// (1,000 tokens) and captures 250 tokens' worth.
const METERED_PATH: &str = "/metered/tokens/header?n=250";

/// The filter config of the benchmark: the tests' default routes plus a route priced
/// per output token (`upto`), read from a response header. `BENCH_ONE_PHASE=0` turns
/// `one_phase_exact` off, so the flat price is held and captured after the response.
fn bench_filter_config() -> Result<String> {
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config())?;
    config["one_phase_exact"] = std::env::var("BENCH_ONE_PHASE")
        .map_or(true, |v| v != "0")
        .into();
    config["routes"]
        .as_array_mut()
        .context("default filter config has no routes")?
        .push(serde_json::json!({
            "name": "bench-metered",
            "match": { "path_prefix": "/metered/tokens" },
            "pricing": { "per_token": {
                "unit_price": "0.00002",
                "max_units": 1000,
                "tokens_from": { "header": "x-usage-tokens" }
            } }
        }));
    Ok(config.to_string())
}

struct Settings {
    quick: bool,
    rounds: usize,
    warmup: Duration,
    duration: Duration,
    connections: usize,
    settle_concurrency: usize,
    /// Items per Authorize and per Capture call of the settlement load client.
    settle_batch: usize,
    payers: usize,
    settlement_args: Vec<String>,
    peer_pool: u32,
    /// `BENCH_ONLY`: scenario keys to run (comma-separated); empty = all.
    only: Vec<String>,
    /// `BENCH_PG_STATEMENTS=1`: Postgres preloads `pg_stat_statements` and the run writes
    /// the costliest statements to `target/bench/statements.md`.
    pg_statements: bool,
    /// `BENCH_PG_SETTINGS`: Postgres settings (`name=value`, space-separated) over the
    /// test cluster's (which does not wait for the disk). Default [`DURABLE`]: a ledger
    /// commits to disk, as Postgres does unless told otherwise.
    pg_settings: Vec<String>,
    /// `BENCH_HISTORY`: past payments in the ledger before the first scenario.
    history: u64,
}

/// Postgres's own defaults for durability, which the test cluster turns off: a commit
/// returns once its WAL is on disk.
const DURABLE: &str = "fsync=on synchronous_commit=on full_page_writes=on";

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var("BENCH_QUICK")
            .map(|v| v == "1")
            .unwrap_or(false);
        let num = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let rounds = num("BENCH_ROUNDS", if quick { 3 } else { 5 }).clamp(1, 20) as usize;
        let secs = num("BENCH_SECONDS", if quick { 2 } else { 6 }).clamp(1, 60);
        Settings {
            quick,
            rounds,
            warmup: Duration::from_millis(if quick { 500 } else { 1000 }),
            duration: Duration::from_secs(secs),
            connections: num("BENCH_CONNECTIONS", 16).clamp(1, 512) as usize,
            settle_concurrency: num("BENCH_SETTLE_CONCURRENCY", 16).clamp(1, 512) as usize,
            settle_batch: num("BENCH_SETTLE_BATCH", 8).clamp(1, 1000) as usize,
            payers: num("BENCH_PAYERS", 10_000).clamp(1, 1_000_000) as usize,
            settlement_args: std::env::var("BENCH_SETTLEMENT_ARGS")
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            peer_pool: num("BENCH_PEER_POOL", 16).clamp(1, 190) as u32,
            only: std::env::var("BENCH_ONLY")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            pg_statements: std::env::var("BENCH_PG_STATEMENTS").is_ok_and(|v| v == "1"),
            pg_settings: std::env::var("BENCH_PG_SETTINGS")
                .unwrap_or_else(|_| DURABLE.to_owned())
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            history: num("BENCH_HISTORY", if quick { 0 } else { 1_000_000 }).min(100_000_000),
        }
    }
}

/// Binaries built next to this one (`cargo build --release` builds them all).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("no parent dir")?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace's binaries in this profile first",
            path.display()
        );
    }
    Ok(path)
}

fn get(port: u16) -> MakeRequest {
    get_of(port, PATH)
}

/// A GET of `path` without a proof.
fn get_of(port: u16, path: &'static str) -> MakeRequest {
    Arc::new(move || {
        Ok(Request::get(path)
            .header("host", format!("127.0.0.1:{port}"))
            .body(Empty::<Bytes>::new())?)
    })
}

/// A GET of [`PATH`] with a fresh proof signed by a random payer (signed here, on the fly).
fn paid_get(port: u16, payers: Arc<Payers>) -> MakeRequest {
    paid_get_of(port, PATH, requirements(), payers)
}

/// A GET of `path` with a fresh proof for `requirements` signed by a random payer.
fn paid_get_of(
    port: u16,
    path: &'static str,
    requirements: PaymentRequirements,
    payers: Arc<Payers>,
) -> MakeRequest {
    let resource = format!("GET 127.0.0.1:{port}{path}");
    Arc::new(move || {
        let proof = sign_payment(
            payers.pick(),
            &requirements,
            &resource,
            &x402_client::random_nonce_hex(),
            unix_now() + 50,
        )?;
        Ok(Request::get(path)
            .header("host", format!("127.0.0.1:{port}"))
            .header(HEADER_PAYMENT_SIGNATURE, encode_header(&proof))
            .body(Empty::<Bytes>::new())?)
    })
}

async fn wait_port(port: u16) -> Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("nothing listens on {port} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let settings = Settings::from_env();
    let started = Instant::now();
    // Release binaries from this profile unless told otherwise; quiet logs.
    if std::env::var_os("X402_SETTLEMENT_BIN").is_none() {
        std::env::set_var("X402_SETTLEMENT_BIN", sibling("x402-settlement")?);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    eprintln!(
        "x402-bench: {} rounds x {:?} (+{:?} warm-up) per scenario{}",
        settings.rounds,
        settings.duration,
        settings.warmup,
        if settings.quick { " (quick)" } else { "" }
    );

    // --- the stack -----------------------------------------------------------------
    let mut pg_settings: Vec<&str> = Vec::new();
    if settings.pg_statements {
        pg_settings.extend([
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track=all",
            "pg_stat_statements.track_planning=on",
        ]);
    }
    // Later settings win: these override the test cluster's (fsync off and so on).
    pg_settings.extend(settings.pg_settings.iter().map(String::as_str));
    let pg = TestPostgres::start_with_settings(&pg_settings).context("starting PostgreSQL")?;
    let database = "x402_bench";
    let database_url = pg.create_database(database)?;
    if settings.pg_statements {
        pg_statements::install(&database_url).await?;
    }
    let settlement_args: Vec<&str> = settings
        .settlement_args
        .iter()
        .map(String::as_str)
        .collect();
    let settlement = Settlement::start_with(&database_url, None, &settlement_args).await?;
    settlement
        .create_account(MERCHANT, AccountKind::Merchant)
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    let payers = Arc::new(Payers::seed(&pool, settings.payers).await?);
    if settings.history > 0 {
        let t = Instant::now();
        payers.history(&pool, settings.history).await?;
        eprintln!(
            "x402-bench: {} past payments written in {:.1} s",
            settings.history,
            t.elapsed().as_secs_f64()
        );
    }
    pool.close().await;

    let scratch = ScratchDir::new("bench")?;
    let upstream_port = free_port()?;
    let mut upstream_cmd = Command::new(sibling("x402-demo-upstream")?);
    upstream_cmd
        .arg("--listen")
        .arg(format!("127.0.0.1:{upstream_port}"));
    let upstream = ChildGuard::spawn(
        "upstream",
        upstream_cmd,
        &scratch.path().join("upstream.log"),
    )?;
    wait_port(upstream_port).await?;

    let peer_port = free_port()?;
    let mut peer_cmd = Command::new(sibling("x402-bench-extauthz")?);
    peer_cmd
        .args([
            "--listen",
            &format!("127.0.0.1:{peer_port}"),
            "--database-url",
            &database_url,
        ])
        .args([
            "--pool",
            &settings.peer_pool.to_string(),
            "--price",
            &PRICE.to_string(),
        ])
        .args(["--pay-to", MERCHANT, "--asset", ASSET, "--network", NETWORK]);
    let peer = ChildGuard::spawn("extauthz-peer", peer_cmd, &scratch.path().join("peer.log"))?;
    wait_port(peer_port).await?;

    let mut options = EnvoyOptions::new(upstream_port, settlement.port(), &bench_filter_config()?);
    options.log_level = "warning".into();
    let x402 = Envoy::start(options).await?;
    let x402_port = x402.listen_port();
    let x402_pid = procfs::find_by_cmdline(&[&x402.config_path().display().to_string()])
        .context("finding the filter Envoy's pid")?;

    // Our 402, byte for byte, for the direct_response listener.
    let http = reqwest::Client::builder().no_proxy().build()?;
    let challenge = http
        .get(format!("http://127.0.0.1:{x402_port}{PATH}"))
        .send()
        .await?;
    if challenge.status().as_u16() != 402 {
        bail!(
            "the filter answered {} to an unpaid request",
            challenge.status()
        );
    }
    let challenge_headers: Vec<(String, String)> = challenge
        .headers()
        .iter()
        .filter(|(n, _)| matches!(n.as_str(), "payment-required" | "content-type"))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let challenge_body = challenge.text().await?;
    // The metered route's offer (`upto`, the maximum), as a client would read it.
    let metered = http
        .get(format!("http://127.0.0.1:{x402_port}{METERED_PATH}"))
        .send()
        .await?;
    let (status, headers) = (metered.status(), metered.headers().clone());
    let metered_offer = parse_challenge(status, &headers, &metered.bytes().await?)
        .context("the metered route's challenge")?
        .accepts
        .into_iter()
        .next()
        .context("the metered route's challenge offers nothing")?;
    if metered_offer.scheme != "upto" {
        bail!(
            "the metered route offers {:?}, not upto",
            metered_offer.scheme
        );
    }

    let plain = BenchEnvoy::start("envoy-plain", 2, |admin, ports| {
        envoys::plain_config(
            admin,
            ports[0],
            ports[1],
            upstream_port,
            402,
            &challenge_body,
            &challenge_headers,
        )
    })
    .await?;
    let (bare_port, direct_port) = (plain.ports[0], plain.ports[1]);
    let authz = BenchEnvoy::start("envoy-extauthz", 1, |admin, ports| {
        envoys::extauthz_config(admin, ports[0], upstream_port, peer_port)
    })
    .await?;
    let authz_port = authz.ports[0];

    let pg_pid = procfs::postmaster_pid(&pg.root().join("data")).context("postmaster pid")?;
    let settlement_pid = procfs::find_by_cmdline(&[
        "x402-settlement",
        &format!("127.0.0.1:{}", settlement.port()),
    ])
    .context("finding settlement's pid")?;
    let tracked = vec![
        Tracked {
            name: "envoy",
            root: plain.child.id(),
            include_children: false,
        },
        Tracked {
            name: "envoy+x402",
            root: x402_pid,
            include_children: false,
        },
        Tracked {
            name: "envoy+ext_authz",
            root: authz.child.id(),
            include_children: false,
        },
        Tracked {
            name: "upstream",
            root: upstream.id(),
            include_children: false,
        },
        Tracked {
            name: "settlement",
            root: settlement_pid,
            include_children: false,
        },
        Tracked {
            name: "ext_authz peer",
            root: peer.id(),
            include_children: false,
        },
        Tracked {
            name: "postgres",
            root: pg_pid,
            include_children: true,
        },
        Tracked {
            name: "load client",
            root: std::process::id(),
            include_children: false,
        },
    ];
    let pg_bin = pg_bin_dir()?;
    let pgbench = settle::pg_tool(&pg_bin, "pgbench");
    let mut scripts = BTreeMap::new();
    for hot in [false, true] {
        let path = scratch
            .path()
            .join(if hot { "hot.sql" } else { "spread.sql" });
        std::fs::write(&path, settle::pgbench_script(settings.payers, hot))?;
        scripts.insert(hot, path);
    }
    let channels = vec![
        settle::channel(settlement.port()).await?,
        settle::channel(settlement.port()).await?,
    ];

    let http_load = |port: u16, expect: u16, make: MakeRequest, rate: Option<f64>| HttpLoad {
        port,
        connections: settings.connections,
        warmup: settings.warmup,
        duration: settings.duration,
        rate,
        expect_status: expect,
        make,
    };
    let mut report = Report::new(
        settings.quick,
        settings.rounds,
        settings.duration,
        settings.connections,
        settings.settle_concurrency,
        settings.payers,
    );
    report.settlement_args = settings.settlement_args.join(" ");
    report.pg_settings = settings.pg_settings.join(" ");
    // ~15 s of flushes: off the runtime's workers.
    let (tools, pg_root) = (pg_bin.clone(), pg.root().to_owned());
    report.wal_flush_us =
        tokio::task::spawn_blocking(move || settle::wal_flush_us(&tools, &pg_root))
            .await
            .unwrap_or_default();
    report.settle_batch = settings.settle_batch;
    report.only = settings.only.clone();
    report.history = settings.history;
    let tck = procfs::ticks_per_second();
    let settle_stats_before = envoy_stats(&http, x402.admin_port()).await;

    // --- interleaved rounds ----------------------------------------------------------
    if settings.pg_statements {
        pg_statements::reset(&database_url).await?;
    }
    for round in 0..settings.rounds {
        for scenario in Scenario::ALL {
            if !settings.only.is_empty() && !settings.only.iter().any(|k| k == scenario.key()) {
                continue;
            }
            let before = procfs::sample(&tracked);
            let measured: Option<Measured> = match scenario {
                Scenario::BareProxy => {
                    Some(load::run(http_load(bare_port, 200, get(bare_port), None)).await?)
                }
                Scenario::DirectResponse => {
                    Some(load::run(http_load(direct_port, 402, get(direct_port), None)).await?)
                }
                Scenario::Reject402 => {
                    Some(load::run(http_load(x402_port, 402, get(x402_port), None)).await?)
                }
                Scenario::Unpriced => Some(
                    load::run(http_load(
                        x402_port,
                        200,
                        get_of(x402_port, UNPRICED_PATH),
                        None,
                    ))
                    .await?,
                ),
                Scenario::PaidFlat => Some(
                    load::run(http_load(
                        x402_port,
                        200,
                        paid_get(x402_port, payers.clone()),
                        None,
                    ))
                    .await?,
                ),
                Scenario::PaidMetered => Some(
                    load::run(http_load(
                        x402_port,
                        200,
                        paid_get_of(
                            x402_port,
                            METERED_PATH,
                            metered_offer.clone(),
                            payers.clone(),
                        ),
                        None,
                    ))
                    .await?,
                ),
                Scenario::ExtAuthz => Some(
                    load::run(http_load(
                        authz_port,
                        200,
                        paid_get(authz_port, payers.clone()),
                        None,
                    ))
                    .await?,
                ),
                Scenario::SettleSpread | Scenario::SettleHot | Scenario::SettleOnePhase => Some(
                    settle::run_pairs(
                        &channels,
                        &payers,
                        scenario == Scenario::SettleHot,
                        scenario == Scenario::SettleOnePhase,
                        settings.settle_concurrency,
                        settings.settle_batch,
                        settings.warmup,
                        settings.duration,
                    )
                    .await?,
                ),
                Scenario::PgbenchSpread | Scenario::PgbenchHot => match &pgbench {
                    Some(bin) => {
                        let hot = scenario == Scenario::PgbenchHot;
                        let (tps, avg_us, failed) = settle::run_pgbench(
                            bin,
                            &scripts[&hot],
                            pg.port(),
                            database,
                            settings.settle_concurrency,
                            settings.duration,
                        )?;
                        let n = (tps * settings.duration.as_secs_f64()) as u64;
                        Some(Measured {
                            ok: n,
                            ok_all: n,
                            errors: failed,
                            seconds: settings.duration.as_secs_f64(),
                            latencies_us: vec![avg_us as u32],
                            first_error: None,
                        })
                    }
                    None => None,
                },
            };
            let after = procfs::sample(&tracked);
            if let Some(m) = measured {
                let cpu: Vec<(String, f64)> = tracked
                    .iter()
                    .zip(before.iter().zip(after.iter()))
                    .filter(|(t, _)| scenario.uses(t.name))
                    .map(|(t, (b, a))| {
                        let us = (a.saturating_sub(*b)) as f64 * 1e6 / tck as f64;
                        (
                            t.name.to_owned(),
                            if m.ok_all > 0 {
                                us / m.ok_all as f64
                            } else {
                                0.0
                            },
                        )
                    })
                    .collect();
                eprintln!(
                    "round {} {:<28} {:>9.0}/s p50 {:>7.0} us p99 {:>7.0} us errors {}{}",
                    round + 1,
                    scenario.label(),
                    m.rate(),
                    m.percentile_us(50.0),
                    m.percentile_us(99.0),
                    m.errors,
                    m.first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                report.push(scenario, RoundResult::of(&m, cpu));
            }
        }
    }
    let settle_stats_after = envoy_stats(&http, x402.admin_port()).await;

    // --- added latency at half the paid path's capacity -----------------------------
    let paid_rate = report.median_rate(Scenario::PaidFlat).unwrap_or(0.0);
    if paid_rate > 10.0 && report.median_rate(Scenario::BareProxy).is_some() {
        let rate = paid_rate * 0.5;
        report.half_load_rate = rate;
        for _ in 0..settings.rounds {
            let bare = load::run(http_load(bare_port, 200, get(bare_port), Some(rate))).await?;
            let paid = load::run(http_load(
                x402_port,
                200,
                paid_get(x402_port, payers.clone()),
                Some(rate),
            ))
            .await?;
            report.half_load.push((
                bare.percentile_us(50.0),
                bare.percentile_us(99.0),
                paid.percentile_us(50.0),
                paid.percentile_us(99.0),
            ));
        }
    }

    // --- sizes, memory, batching ----------------------------------------------------
    report.wasm_bytes = std::fs::metadata(paths::filter_wasm()?)
        .map(|m| m.len())
        .unwrap_or(0);
    report.envoy_rss_kib = procfs::rss_kib(plain.child.id());
    report.envoy_x402_rss_kib = procfs::rss_kib(x402_pid);
    let delta = |name: &str| {
        settle_stats_after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(settle_stats_before.get(name).copied().unwrap_or(0))
    };
    report.settlement_calls = delta("cluster.settlement.upstream_rq_total");
    report.paid_requests = delta("wasmcustom.x402_requests_paid");
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    report.table_scans = table_scans(&database_url).await.unwrap_or_default();
    if settings.pg_statements {
        let path = paths::workspace_root()
            .join("target")
            .join("bench")
            .join("statements.md");
        pg_statements::write(&database_url, &path).await?;
        eprintln!("wrote {}", path.display());
    }

    let out_dir = paths::workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let markdown = report.markdown();
    println!("{markdown}");
    std::fs::write(out_dir.join("results.md"), &markdown)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    eprintln!(
        "wrote {} and results.json",
        out_dir.join("results.md").display()
    );
    drop((authz, plain, x402, peer, upstream, settlement));
    drop(pg);
    Ok(())
}

/// Sequential scans per ledger table over the whole run: a table read whole on the hot
/// path shows up here first.
async fn table_scans(database_url: &str) -> Result<Vec<(String, i64, i64, i64)>> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), coalesce(idx_scan, 0) \
         FROM pg_stat_user_tables ORDER BY seq_tup_read DESC",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows)
}

/// Counters of an Envoy's admin `/stats` (those that are plain integers).
async fn envoy_stats(http: &reqwest::Client, admin_port: u16) -> BTreeMap<String, u64> {
    let Ok(response) = http
        .get(format!("http://127.0.0.1:{admin_port}/stats"))
        .send()
        .await
    else {
        return BTreeMap::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
