//! The local dev stack behind `make run`: PostgreSQL (a private cluster unless
//! `DATABASE_URL` is set), the settlement service, the demo upstream and Envoy with the
//! 402x filter on port 10000 (`X402_PORT`), configured by `envoy/demo-filter.json`.
//! Seeds the merchant and a demo payer with 10 USD whose key is `.run/payer.key`, prints
//! what to try, and runs until Ctrl-C or SIGTERM, then stops everything it started.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use x402_client::PayerKey;
use x402_e2e::envoy::{Envoy, EnvoyOptions};
use x402_e2e::paths;
use x402_e2e::pg::TestPostgres;
use x402_e2e::settlement::Settlement;
use x402_e2e::upstream::Upstream;
use x402_proto::amount::format_decimal;
use x402_proto::settlement::v1::AccountKind;

const DEMO_PAYER: &str = "payer-demo";
/// 10 USD in atomic units (6 decimals).
const DEMO_FUNDS: u64 = 10_000_000;

fn port_from_env(var: &str, default: u16) -> Result<u16> {
    match std::env::var(var) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{var} must be a port number, got {value:?}")),
        Err(_) => Ok(default),
    }
}

/// `path` relative to the current directory when it is inside it (shorter commands to copy).
fn display_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

struct DemoConfig {
    json: String,
    pay_to: String,
    asset: String,
    decimals: u8,
}

fn read_demo_config() -> Result<DemoConfig> {
    let path = paths::workspace_root()
        .join("envoy")
        .join("demo-filter.json");
    let json =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let pay_to = value["pay_to"]
        .as_str()
        .context("demo-filter.json has no pay_to")?
        .to_string();
    let asset = value["asset"].as_str().unwrap_or("USD").to_string();
    let decimals = value["asset_decimals"].as_u64().unwrap_or(6);
    let decimals = u8::try_from(decimals).context("asset_decimals is out of range")?;
    Ok(DemoConfig {
        json,
        pay_to,
        asset,
        decimals,
    })
}

/// The demo payer's key: reused from `.run/payer.key` when present, else created there.
fn demo_key(run_dir: &Path) -> Result<(PayerKey, PathBuf)> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join("payer.key");
    if path.exists() {
        let key = PayerKey::load(&path).with_context(|| format!("loading {}", path.display()))?;
        return Ok((key, path));
    }
    let key = PayerKey::generate();
    key.save(&path)
        .with_context(|| format!("saving {}", path.display()))?;
    Ok((key, path))
}

async fn seed(settlement: &Settlement, config: &DemoConfig, key: &PayerKey) -> Result<i64> {
    settlement
        .create_account(&config.pay_to, AccountKind::Merchant)
        .await?;
    settlement
        .create_account(DEMO_PAYER, AccountKind::Payer)
        .await?;
    let pubkey = key.public_key_hex();
    if let Err(e) = settlement.add_key(DEMO_PAYER, &pubkey).await {
        // With a reused DATABASE_URL the key may be registered already; anything else is fatal.
        let registered = e
            .downcast_ref::<tonic::Status>()
            .is_some_and(|status| status.code() == tonic::Code::AlreadyExists);
        if !registered {
            return Err(e);
        }
    }
    let available = settlement
        .balance(DEMO_PAYER, &config.asset)
        .await?
        .available;
    let target = i64::try_from(DEMO_FUNDS)?;
    if available < target {
        let top_up = u64::try_from(target - available)?;
        settlement
            .deposit(DEMO_PAYER, &config.asset, top_up)
            .await?;
    }
    Ok(settlement
        .balance(DEMO_PAYER, &config.asset)
        .await?
        .available)
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let listen_port = port_from_env("X402_PORT", 10000)?;
    let admin_port = port_from_env("X402_ADMIN_PORT", 0)?;
    let config = read_demo_config()?;
    if std::net::TcpListener::bind(("127.0.0.1", listen_port)).is_err() {
        bail!("port {listen_port} is taken: stop what uses it or set X402_PORT");
    }

    // Declared in start order; dropped in reverse, so Envoy goes first.
    let mut postgres = None;
    let database_url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            eprintln!("using DATABASE_URL");
            url
        }
        _ => {
            eprintln!("starting a private PostgreSQL ...");
            let pg = TestPostgres::start()?;
            let url = pg.create_database("x402_dev")?;
            postgres = Some(pg);
            url
        }
    };
    eprintln!("starting settlement ...");
    let mut settlement = Settlement::start(&database_url).await?;
    let upstream = Upstream::start()?;
    let run_dir = paths::workspace_root().join(".run");
    let (key, key_path) = demo_key(&run_dir)?;
    let available = seed(&settlement, &config, &key).await?;
    eprintln!("starting Envoy with the 402x filter (compiling the wasm module takes a moment) ...");
    let mut options = EnvoyOptions::new(upstream.port(), settlement.port(), &config.json);
    options.listen_port = listen_port;
    options.admin_port = admin_port;
    let envoy = Envoy::start(options).await?;

    let x402 = paths::target_dir().join("debug").join("x402");
    let key_shown = display_path(&key_path);
    let base = format!("http://127.0.0.1:{listen_port}");
    println!();
    println!("402x is running:");
    println!(
        "  Envoy + filter   {base}  (admin http://127.0.0.1:{})",
        envoy.admin_port()
    );
    println!("  settlement gRPC  {}", settlement.url());
    println!("  demo upstream    http://127.0.0.1:{}", upstream.port());
    println!("  database         {database_url}");
    println!("  Envoy log        {}", envoy.log_path().display());
    println!("  settlement log   {}", settlement.log_path().display());
    println!(
        "  demo payer       {DEMO_PAYER} with {} {} (key {key_shown}, public {})",
        format_decimal(u64::try_from(available).unwrap_or(0), config.decimals),
        config.asset,
        key.public_key_hex()
    );
    println!();
    println!("An unpaid request is answered 402 with a challenge:");
    println!("  curl -i {base}/paid/quote");
    println!("Pay for it:");
    println!(
        "  {} pay --key {key_shown} {base}/paid/quote",
        display_path(&x402)
    );
    println!("Operator view:");
    println!(
        "  {} balance --account {DEMO_PAYER} --asset {} --server {}",
        display_path(&paths::target_dir().join("debug").join("x402-settlement")),
        config.asset,
        settlement.url()
    );
    println!();
    println!("Ctrl-C stops everything.");

    shutdown_signal().await;
    eprintln!("stopping ...");
    envoy.shutdown(Duration::from_secs(5));
    settlement.shutdown(Duration::from_secs(10));
    drop(upstream);
    if let Some(mut pg) = postgres {
        if let Err(e) = pg.stop() {
            eprintln!("PostgreSQL did not stop cleanly ({e:#}); killing it");
        }
    }
    Ok(())
}
