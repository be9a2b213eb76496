//! `x402`: make a key, show it, and pay for HTTP requests like `curl` would send them.
//!
//! Exit codes: 0 when the final answer is 2xx; 1 when it is not, or when the request
//! could not be made or paid (the reason is printed on stderr); 2 for usage errors.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use x402_client::{Budget, Client, OperatorEndpoint, PaidResponse, PayerKey, RetryPolicy};

#[derive(Debug, Parser)]
#[command(
    name = "x402",
    version,
    about = "Pay for HTTP requests answered with 402 Payment Required"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new payer key file (hex seed, mode 0600) and print its public key.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (hex) of a key file, or of X402_PAYER_KEY.
    Pubkey {
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Send a request; on 402 sign the first acceptable offer and retry with the proof.
    Pay(Box<PayArgs>),
    /// The payer account's balance, from settlement's operator API.
    Balance {
        #[command(flatten)]
        settlement: SettlementArgs,
        /// Asset code.
        #[arg(long, default_value = "USD")]
        asset: String,
        /// Print the balance as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The payer account's payments, newest first, from settlement's operator API.
    History {
        #[command(flatten)]
        settlement: SettlementArgs,
        /// Most payments to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Write an OpenAPI 3.1 document of the priced routes of a filter configuration.
    Openapi {
        /// The filter's plugin JSON (the `configuration` Envoy passes to the filter).
        #[arg(long)]
        filter_config: PathBuf,
        /// The upstream's OpenAPI document (JSON) to merge the prices into.
        #[arg(long)]
        merge: Option<PathBuf>,
        /// Gateway URL for `servers`, e.g. http://127.0.0.1:10000.
        #[arg(long)]
        server: Option<String>,
    },
}

/// Where settlement's operator API is, and which account to ask about.
#[derive(Debug, clap::Args)]
struct SettlementArgs {
    /// gRPC URL of settlement, e.g. http://127.0.0.1:50051.
    #[arg(long = "settlement", env = "X402_SETTLEMENT_URL")]
    url: String,
    /// Operator bearer token (never printed).
    #[arg(long, env = "X402_OPERATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The payer account id.
    #[arg(long, env = "X402_ACCOUNT")]
    account: String,
}

#[derive(Debug, clap::Args)]
struct PayArgs {
    /// Payer key file; without it the hex seed in X402_PAYER_KEY is used.
    #[arg(long)]
    key: Option<PathBuf>,
    /// HTTP method (default GET, or POST when -d is given).
    #[arg(short = 'X', long = "request")]
    method: Option<String>,
    /// Extra header, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body; `@FILE` reads it from a file, `@-` from stdin.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// Most atomic units this request may cost; a higher price is refused unpaid.
    #[arg(long, value_name = "ATOMIC")]
    max: Option<String>,
    /// Only pay on this network (repeatable; default any).
    #[arg(long = "network")]
    networks: Vec<String>,
    /// Only pay in this asset (repeatable; default any).
    #[arg(long = "asset")]
    assets: Vec<String>,
    /// Only pay this merchant account (repeatable; default any).
    #[arg(long = "pay-to")]
    pay_to: Vec<String>,
    /// Only pay this host (repeatable; default any).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Proofs to send in all when the upstream answers 5xx after paying (each voided).
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Write the body as it arrives (server-sent events, long downloads).
    #[arg(long, conflicts_with = "json")]
    stream: bool,
    /// Settlement's gRPC URL: lets the client find out whether a proof whose answer was
    /// lost was charged, instead of giving up (needs --account).
    #[arg(long = "settlement", env = "X402_SETTLEMENT_URL", requires = "account")]
    settlement: Option<String>,
    #[arg(long, env = "X402_OPERATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The payer account id, for --settlement.
    #[arg(long, env = "X402_ACCOUNT")]
    account: Option<String>,
    /// Print {status, body, receipt, paid, error} as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// The URL to request, e.g. http://127.0.0.1:10000/paid/quote.
    url: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("x402: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen { out } => {
            let key = PayerKey::generate();
            key.save(&out)?;
            println!("{}", key.public_key_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey { key } => {
            println!("{}", load_key(key.as_ref())?.public_key_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pay(args) => runtime()?.block_on(pay(*args)),
        Command::Balance {
            settlement,
            asset,
            json,
        } => runtime()?.block_on(balance(settlement, asset, json)),
        Command::History {
            settlement,
            limit,
            json,
        } => runtime()?.block_on(history(settlement, limit, json)),
        Command::Openapi {
            filter_config,
            merge,
            server,
        } => {
            let config = std::fs::read(&filter_config)
                .with_context(|| format!("cannot read {}", filter_config.display()))?;
            let upstream = merge
                .map(|path| {
                    let text = std::fs::read(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    serde_json::from_slice::<serde_json::Value>(&text)
                        .with_context(|| format!("{} is not JSON", path.display()))
                })
                .transpose()?;
            let doc = x402_client::openapi::generate(&config, upstream, server.as_deref())?;
            let mut out = serde_json::to_string_pretty(&doc)?;
            out.push('\n');
            std::io::stdout()
                .write_all(out.as_bytes())
                .context("cannot write the document")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn operator(args: SettlementArgs) -> OperatorEndpoint {
    OperatorEndpoint::new(args.url, args.account).with_token(args.token)
}

async fn balance(args: SettlementArgs, asset: String, json: bool) -> anyhow::Result<ExitCode> {
    let b = operator(args).balance(&asset).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "account": b.account_id,
                "asset": b.asset,
                "available": b.available,
                "debitsPending": b.debits_pending,
                "debitsPosted": b.debits_posted,
                "creditsPending": b.credits_pending,
                "creditsPosted": b.credits_posted,
            })
        );
    } else {
        println!(
            "{}: {} {} available ({} held, {} spent, {} deposited)",
            b.account_id, b.available, b.asset, b.debits_pending, b.debits_posted, b.credits_posted
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(args: SettlementArgs, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let payments = operator(args).history(limit).await?;
    if json {
        let list: Vec<serde_json::Value> = payments
            .iter()
            .map(|p| {
                serde_json::json!({
                    "transaction": p.transaction_id,
                    "merchant": p.merchant_account,
                    "asset": p.asset,
                    "route": p.route,
                    "resource": p.resource,
                    "held": p.held,
                    "captured": p.captured,
                    "voided": p.voided,
                    "status": p.status,
                    "createdAt": p.created_at_unix,
                    "nonce": p.nonce,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else if payments.is_empty() {
        println!("no payments");
    } else {
        for p in &payments {
            println!(
                "{}  {:<8}  held {:>10}  captured {:>10} {}  {}  {}",
                p.created_at_unix,
                p.status,
                p.held,
                p.captured,
                p.asset,
                p.resource,
                p.transaction_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load_key(path: Option<&PathBuf>) -> anyhow::Result<PayerKey> {
    Ok(match path {
        Some(path) => PayerKey::load(path)?,
        None => PayerKey::from_env()?,
    })
}

fn parse_headers(raw: &[String]) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for line in raw {
        let Some((name, value)) = line.split_once(':') else {
            bail!("header {line:?} is not `Name: value`");
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("invalid header name in {line:?}"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("invalid header value in {line:?}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn read_data(data: &str) -> anyhow::Result<Vec<u8>> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                .context("cannot read the body from stdin")?;
            Ok(body)
        }
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read the body from {path}"))
        }
        None => Ok(data.as_bytes().to_vec()),
    }
}

async fn pay(args: PayArgs) -> anyhow::Result<ExitCode> {
    let key = load_key(args.key.as_ref())?;
    let url = Url::parse(&args.url).with_context(|| format!("invalid URL {:?}", args.url))?;
    let body = args.data.as_deref().map(read_data).transpose()?;
    let method = match &args.method {
        Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .with_context(|| format!("invalid method {m:?}"))?,
        None if body.is_some() => Method::POST,
        None => Method::GET,
    };
    let headers = parse_headers(&args.headers)?;
    let max_per_request = args
        .max
        .as_deref()
        .map(|m| {
            x402_proto::amount::parse_atomic(m)
                .with_context(|| format!("--max {m:?} is not an amount in atomic units"))
        })
        .transpose()?;
    let budget = Budget {
        max_per_request,
        networks: args.networks,
        assets: args.assets,
        pay_to: args.pay_to,
        ..Budget::default()
    }
    .with_hosts(args.hosts);
    let mut client = Client::new(key, budget)?.with_retry(RetryPolicy {
        max_paid_attempts: args.attempts.max(1),
        ..RetryPolicy::default()
    });
    if let (Some(url), Some(account)) = (args.settlement, args.account) {
        client = client.with_operator(OperatorEndpoint::new(url, account).with_token(args.token));
    }
    if args.stream {
        let mut response = client
            .request_streaming(method.clone(), url.clone(), headers.clone(), body.clone())
            .await?;
        if response.status.is_success() {
            let mut out = std::io::stdout();
            while let Some(chunk) = response.chunk().await? {
                out.write_all(&chunk).context("cannot write the body")?;
                out.flush().context("cannot write the body")?;
            }
            if let Some(receipt) = response.receipt.as_ref().filter(|r| r.success) {
                let asset = response
                    .payment
                    .as_ref()
                    .map(|p| format!(" {}", p.accepted.asset))
                    .unwrap_or_default();
                eprintln!(
                    "paid {}{asset}, transaction {}",
                    receipt.amount, receipt.transaction
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        let response = response.into_buffered().await?;
        return finish(&response, false);
    }
    let response = client.request(method, url, headers, body).await?;
    finish(&response, args.json)
}

/// Prints the answer and turns it into the exit status.
fn finish(response: &PaidResponse, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(response)?;
    } else {
        std::io::stdout()
            .write_all(&response.body)
            .context("cannot write the body")?;
        std::io::stdout().flush().context("cannot write the body")?;
        if let Some(line) = receipt_line(response) {
            eprintln!("{line}");
        }
    }
    if response.is_success() {
        return Ok(ExitCode::SUCCESS);
    }
    let reason = response
        .error_code()
        .unwrap_or_else(|| "no reason given".to_owned());
    let message = serde_json::from_slice::<x402_proto::wire::ErrorBody>(&response.body)
        .map(|e| format!(" ({})", e.message))
        .unwrap_or_default();
    eprintln!(
        "x402: server answered {}: {reason}{message}",
        response.status
    );
    Ok(ExitCode::FAILURE)
}

/// `paid 10000 USD, transaction tx-...` when a payment was accepted.
fn receipt_line(response: &PaidResponse) -> Option<String> {
    let receipt = response.receipt.as_ref().filter(|r| r.success)?;
    let amount = match &response.payment {
        Some(p) => format!("{} {}", receipt.amount, p.accepted.asset),
        None => receipt.amount.clone(),
    };
    Some(format!(
        "paid {amount}, transaction {}",
        receipt.transaction
    ))
}

fn print_json(response: &PaidResponse) -> anyhow::Result<()> {
    let document = serde_json::json!({
        "status": response.status.as_u16(),
        "body": String::from_utf8_lossy(&response.body),
        "receipt": response.receipt,
        "paid": response.paid,
        "attempts": response.attempts,
        "asset": response.payment.as_ref().map(|p| p.accepted.asset.clone()),
        "error": response.error_code(),
    });
    let mut out = serde_json::to_string(&document).context("cannot encode the JSON output")?;
    out.push('\n');
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("cannot write the JSON output")
}
