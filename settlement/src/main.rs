//! `x402-settlement`: runs the settlement service (`serve`, `migrate`) and speaks
//! its operator API (`account`, `key`, `deposit`, `balance`, `payments`).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;
use x402_proto::settlement::v1::operator_client::OperatorClient;
use x402_proto::settlement::v1::{
    Account, AccountKind, AddKeyRequest, Balance, CreateAccountRequest, DepositRequest,
    GetAccountRequest, GetBalanceRequest, GetPaymentRequest, ListPaymentsRequest, PayerKey,
    Payment, RevokeKeyRequest,
};
use x402_settlement::{db, server};

mod ops_cli;

#[derive(Parser)]
#[command(
    name = "x402-settlement",
    version,
    about = "402x settlement service and operator CLI"
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Settlement gRPC endpoint for operator commands.
    #[arg(
        long,
        global = true,
        env = "X402_SETTLEMENT_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Operator token sent as `authorization: Bearer` by operator commands.
    #[arg(
        long,
        global = true,
        env = "X402_OPERATOR_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Operator commands over TLS (an `https://` `--server`): PEM CA certificates to
    /// trust instead of the system's roots.
    #[arg(long, global = true, env = "X402_SETTLEMENT_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM) presented to a settlement that requires one.
    #[arg(
        long,
        global = true,
        env = "X402_SETTLEMENT_CERT_FILE",
        requires = "key_file"
    )]
    cert_file: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--cert-file`.
    #[arg(
        long,
        global = true,
        env = "X402_SETTLEMENT_KEY_FILE",
        requires = "cert_file"
    )]
    key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service (applies migrations first).
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Create or show accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Register or revoke payer keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Credit a payer account (atomic units).
    Deposit {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "USD")]
        asset: String,
        /// Atomic units (e.g. 1000000 = 1 USD with 6 decimals).
        #[arg(long)]
        amount: u64,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Show the balance of an account.
    Balance {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "USD")]
        asset: String,
    },
    /// List or show payments.
    #[command(subcommand)]
    Payments(PaymentsCommand),
    #[command(flatten)]
    Ops(ops_cli::OpsCommand),
    /// Check every ledger invariant in the database; exits 1 on a violation.
    Check {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// How long past its expiry an unresolved hold may stay open.
        #[arg(long, default_value_t = 60)]
        expiry_grace_seconds: u64,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, env = "X402_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Interval of the sweeper that expires unresolved holds.
    #[arg(long, env = "X402_HOLD_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    hold_sweep_interval_ms: u64,
    /// Size of the Postgres connection pool.
    #[arg(long, env = "X402_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
    /// Threads that run the service (default: one per CPU). Fewer than the host's CPUs
    /// when settlement shares them with Postgres or Envoy: each thread that sleeps and
    /// wakes per call costs CPU of its own.
    #[arg(long, env = "X402_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Group-commit tasks for authorizations (and as many for captures and voids);
    /// each commits the items that arrived meanwhile in one transaction.
    #[arg(long, env = "X402_GROUP_COMMITTERS", default_value_t = x402_settlement::server::DEFAULT_GROUP_COMMITTERS)]
    group_committers: usize,
    /// Log as JSON lines.
    #[arg(long, env = "X402_LOG_JSON")]
    log_json: bool,
    /// Bearer token the Operator API requires (unset: open, for development).
    #[arg(long, env = "X402_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: Option<String>,
    /// Bearer token the DataPlane API requires: the filter's `settlement_token`.
    #[arg(long, env = "X402_DATAPLANE_TOKEN", hide_env_values = true)]
    dataplane_token: Option<String>,
    /// Address of the HTTP listener for /metrics and the dashboard (off when unset).
    #[arg(long, env = "X402_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// First webhook retry delay; it doubles per attempt up to an hour.
    #[arg(long, env = "X402_WEBHOOK_RETRY_BASE_MS", default_value_t = 2000)]
    webhook_retry_base_ms: u64,
    /// PEM file of CA certificates trusted for https:// webhook receivers, besides
    /// the system's roots (for receivers with a private CA).
    #[arg(long, env = "X402_WEBHOOK_CA_FILE")]
    webhook_ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain served on the gRPC listener (TLS; plaintext when unset).
    #[arg(long, env = "X402_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "X402_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates: with it, only clients presenting a certificate it signed
    /// connect (mutual TLS). Needs `--tls-cert`.
    #[arg(long, env = "X402_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// How often the TLS files are read again: a renewed certificate (or client CA)
    /// is served to new connections without a restart; files that do not make a
    /// working identity are refused with a warning and the last good ones kept.
    #[arg(long, env = "X402_TLS_RELOAD_SECONDS", default_value_t = 10)]
    tls_reload_seconds: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Payer,
    Merchant,
}

#[derive(Subcommand)]
enum AccountCommand {
    Create {
        #[arg(long)]
        id: String,
        #[arg(long, value_enum)]
        kind: Kind,
    },
    Get {
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    Add {
        #[arg(long)]
        account: String,
        #[arg(long)]
        public_key: String,
    },
    Revoke {
        #[arg(long)]
        public_key: String,
    },
}

#[derive(Subcommand)]
enum PaymentsCommand {
    List {
        #[arg(long, default_value = "")]
        payer: String,
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Get {
        #[arg(long)]
        transaction: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("settlement-rt");
    if let Command::Serve(ServeArgs {
        worker_threads: Some(n),
        ..
    }) = &cli.command
    {
        builder.worker_threads((*n).max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate { database_url } => {
            let pool = db::connect(&database_url, 1)
                .await
                .context("connecting to the database")?;
            db::migrate(&pool).await.context("applying migrations")?;
            print(json, json!({"migrated": true}), "migrations applied".into());
            Ok(())
        }
        Command::Check {
            database_url,
            expiry_grace_seconds,
        } => {
            let pool = db::connect(&database_url, 1)
                .await
                .context("connecting to the database")?;
            let report = x402_settlement::check::check_ledger(
                &pool,
                x402_settlement::check::CheckOptions {
                    expiry_grace: Duration::from_secs(expiry_grace_seconds),
                },
            )
            .await
            .context("checking the ledger")?;
            print(json, report.to_json(), report.to_text());
            if !report.is_clean() {
                bail!("{} ledger invariant violations", report.violations.len());
            }
            Ok(())
        }
        command => {
            // TLS is the server's scheme: certificate flags alone do not turn it on.
            let tls = if cli.server.starts_with("https://") {
                Some(x402_settlement::tls::client_config(
                    cli.ca_file.as_deref(),
                    cli.cert_file.as_deref().zip(cli.key_file.as_deref()),
                )?)
            } else {
                None
            };
            operator(&cli.server, tls, cli.token, json, command).await
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    // Certificate files are read before anything else starts, so a wrong path fails fast.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(x402_settlement::tls::ServerTls::load(
            x402_settlement::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            },
        )?),
        _ => None,
    };
    let pool = db::connect(&args.database_url, args.db_max_connections)
        .await
        .context("connecting to the database")?;
    db::migrate(&pool).await.context("applying migrations")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let http = match &args.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    let config = server::ServerConfig {
        hold_sweep_interval: Duration::from_millis(args.hold_sweep_interval_ms),
        operator_token: x402_settlement::auth::BearerToken::new(args.operator_token.clone()),
        dataplane_token: x402_settlement::auth::BearerToken::new(args.dataplane_token.clone()),
        webhooks: x402_settlement::webhooks::WebhookConfig {
            base_backoff: Duration::from_millis(args.webhook_retry_base_ms),
            extra_ca_pem: match &args.webhook_ca_file {
                Some(path) => x402_settlement::webhooks::load_ca_file(path)?,
                None => Vec::new(),
            },
            ..Default::default()
        },
        group_committers: args.group_committers,
        tls,
        tls_reload_interval: Duration::from_secs(args.tls_reload_seconds.max(1)),
        ..server::ServerConfig::default()
    };
    server::run_with_http(listener, http, pool, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}

fn print(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn kind_str(kind: i32) -> &'static str {
    match AccountKind::try_from(kind) {
        Ok(AccountKind::Payer) => "payer",
        Ok(AccountKind::Merchant) => "merchant",
        Ok(AccountKind::System) => "system",
        _ => "unspecified",
    }
}

fn account_json(a: &Account) -> serde_json::Value {
    json!({"account_id": a.account_id, "kind": kind_str(a.kind), "created_at_unix": a.created_at_unix})
}

fn key_json(k: &PayerKey) -> serde_json::Value {
    json!({"account_id": k.account_id, "public_key": k.public_key, "revoked": k.revoked})
}

fn balance_json(b: &Balance) -> serde_json::Value {
    json!({
        "account_id": b.account_id, "asset": b.asset,
        "debits_pending": b.debits_pending, "debits_posted": b.debits_posted,
        "credits_pending": b.credits_pending, "credits_posted": b.credits_posted,
        "available": b.available,
    })
}

fn balance_text(b: &Balance) -> String {
    format!(
        "{} {}: available {} (credits posted {}, pending {}; debits posted {}, pending {})",
        b.account_id,
        b.asset,
        b.available,
        b.credits_posted,
        b.credits_pending,
        b.debits_posted,
        b.debits_pending
    )
}

fn payment_json(p: &Payment) -> serde_json::Value {
    json!({
        "transaction_id": p.transaction_id, "payer_account": p.payer_account,
        "merchant_account": p.merchant_account, "asset": p.asset, "route": p.route,
        "resource": p.resource, "held": p.held, "captured": p.captured, "voided": p.voided,
        "status": p.status, "created_at_unix": p.created_at_unix, "payer_key": p.payer_key, "nonce": p.nonce,
    })
}

fn payment_text(p: &Payment) -> String {
    format!(
        "{} {} {} -> {} held {} captured {} {} {}",
        p.transaction_id,
        p.status,
        p.payer_account,
        p.merchant_account,
        p.held,
        p.captured,
        p.asset,
        p.resource
    )
}

async fn operator(
    server: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    token: Option<String>,
    json: bool,
    command: Command,
) -> Result<()> {
    let mut endpoint = Channel::from_shared(server.to_owned())
        .map_err(|e| anyhow!("invalid --server {server}: {e}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS for {server}"))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to settlement at {server}"))?;
    let mut client = OperatorClient::with_interceptor(channel, ops_cli::Bearer(token));
    let status = |e: tonic::Status| anyhow!("{}: {}", e.code(), e.message());
    match command {
        Command::Account(AccountCommand::Create { id, kind }) => {
            let kind = match kind {
                Kind::Payer => AccountKind::Payer,
                Kind::Merchant => AccountKind::Merchant,
            };
            let a = client
                .create_account(CreateAccountRequest {
                    account_id: id,
                    kind: kind as i32,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            print(
                json,
                account_json(&a),
                format!("account {} ({})", a.account_id, kind_str(a.kind)),
            );
        }
        Command::Account(AccountCommand::Get { id }) => {
            let a = client
                .get_account(GetAccountRequest { account_id: id })
                .await
                .map_err(status)?
                .into_inner();
            print(
                json,
                account_json(&a),
                format!("account {} ({})", a.account_id, kind_str(a.kind)),
            );
        }
        Command::Key(KeyCommand::Add {
            account,
            public_key,
        }) => {
            let k = client
                .add_key(AddKeyRequest {
                    account_id: account,
                    public_key,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            print(
                json,
                key_json(&k),
                format!("key {} added to {}", k.public_key, k.account_id),
            );
        }
        Command::Key(KeyCommand::Revoke { public_key }) => {
            let k = client
                .revoke_key(RevokeKeyRequest {
                    public_key,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            print(
                json,
                key_json(&k),
                format!("key {} of {} revoked", k.public_key, k.account_id),
            );
        }
        Command::Deposit {
            account,
            asset,
            amount,
            idempotency_key,
        } => {
            let r = client
                .deposit(DepositRequest {
                    account_id: account,
                    asset,
                    amount,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            let b = r.balance.unwrap_or_default();
            print(
                json,
                json!({"transaction_id": r.transaction_id, "balance": balance_json(&b)}),
                format!("deposit {}\n{}", r.transaction_id, balance_text(&b)),
            );
        }
        Command::Balance { account, asset } => {
            let b = client
                .get_balance(GetBalanceRequest {
                    account_id: account,
                    asset,
                })
                .await
                .map_err(status)?
                .into_inner();
            print(json, balance_json(&b), balance_text(&b));
        }
        Command::Payments(PaymentsCommand::List {
            payer,
            merchant,
            limit,
        }) => {
            if limit == 0 {
                bail!("--limit must be at least 1");
            }
            let r = client
                .list_payments(ListPaymentsRequest {
                    payer_account: payer,
                    merchant_account: merchant,
                    page_size: limit,
                    page_token: String::new(),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            let text = r
                .payments
                .iter()
                .map(payment_text)
                .collect::<Vec<_>>()
                .join("\n");
            print(
                json,
                json!({
                    "payments": r.payments.iter().map(payment_json).collect::<Vec<_>>(),
                    "next_page_token": r.next_page_token,
                }),
                if text.is_empty() {
                    "no payments".into()
                } else {
                    text
                },
            );
        }
        Command::Payments(PaymentsCommand::Get { transaction }) => {
            let p = client
                .get_payment(GetPaymentRequest {
                    transaction_id: transaction,
                })
                .await
                .map_err(status)?
                .into_inner();
            print(json, payment_json(&p), payment_text(&p));
        }
        Command::Ops(ops) => ops_cli::run(&mut client, json, ops).await?,
        Command::Serve(_) | Command::Migrate { .. } | Command::Check { .. } => {
            bail!("not an operator command")
        }
    }
    Ok(())
}
