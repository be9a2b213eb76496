//! Pays for a per-token, LLM-style endpoint and streams its server-sent events.
//!
//! ```sh
//! X402_PAYER_KEY=$(cat .run/payer.key) cargo run -p x402-client --example llm_per_token -- \
//!     http://127.0.0.1:10000/v1/chat/completions [SETTLEMENT_URL ACCOUNT]
//! ```
//!
//! A metered route answers 402 with scheme `upto`: `amount` is the most the request may
//! cost (e.g. the token limit times the unit price). The client signs that maximum, so
//! the budget is checked against it; the gateway holds it and captures only what the
//! response's token usage says, releasing the rest. The events are printed as they
//! arrive. With a settlement URL and the payer account, the captured amount is looked up
//! once the stream has ended.

use std::io::Write;

use x402_client::reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use x402_client::reqwest::{Method, Url};
use x402_client::{Budget, Client, OperatorEndpoint, PayerKey};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:10000/v1/chat/completions".to_owned());
    let operator = match (args.next(), args.next()) {
        (Some(settlement), Some(account)) => Some(OperatorEndpoint::new(settlement, account)),
        _ => None,
    };
    // At most 0.50 USD per completion and 5 USD per hour, to this merchant only.
    let budget = Budget::max_per_request(500_000)
        .with_max_total(5_000_000, Some(std::time::Duration::from_secs(3600)))
        .with_pay_to(["merchant-demo"]);
    let mut client = Client::new(PayerKey::from_env()?, budget)?;
    if let Some(operator) = &operator {
        client = client.with_operator(operator.clone());
    }

    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    let body = serde_json::json!({
        "model": "demo",
        "stream": true,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Say hello in three languages."}]
    });
    let mut response = client
        .request_streaming(
            Method::POST,
            Url::parse(&url)?,
            headers,
            Some(serde_json::to_vec(&body)?),
        )
        .await?;

    let mut out = std::io::stdout();
    while let Some(chunk) = response.chunk().await? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    let Some(receipt) = response.receipt.filter(|r| r.success) else {
        eprintln!("not paid: {}", response.status);
        return Ok(());
    };
    eprintln!(
        "held at most {} atomic units, transaction {}",
        receipt.amount, receipt.transaction
    );
    if let Some(operator) = operator {
        let payment = operator.payment(&receipt.transaction).await?;
        eprintln!(
            "captured {} ({}), released the rest",
            payment.captured, payment.status
        );
    }
    Ok(())
}
