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
use x402_client::{Budget, Client, PaidResponse, PayerKey};

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
    /// Send a request; on 402 sign the first acceptable offer and retry once.
    Pay(PayArgs),
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
        Command::Pay(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(pay(args))
        }
    }
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
    };
    let client = Client::new(key, budget)?;
    let response = client.request(method, url, headers, body).await?;

    if args.json {
        print_json(&response)?;
    } else {
        std::io::stdout()
            .write_all(&response.body)
            .context("cannot write the body")?;
        std::io::stdout().flush().context("cannot write the body")?;
        if let Some(line) = receipt_line(&response) {
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
        "asset": response.payment.as_ref().map(|p| p.accepted.asset.clone()),
        "error": response.error_code(),
    });
    let mut out = serde_json::to_string(&document).context("cannot encode the JSON output")?;
    out.push('\n');
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("cannot write the JSON output")
}
