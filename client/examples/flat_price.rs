//! Pays for a flat-price endpoint in one line.
//!
//! ```sh
//! X402_PAYER_KEY=$(cat .run/payer.key) cargo run -p x402-client --example flat_price -- \
//!     'http://127.0.0.1:10000/paid/quote?sym=ABC'
//! ```
//!
//! Prints the body, then what was paid. A price above 0.05 USD (50000 atomic units) is
//! refused before anything is signed.

use x402_client::{Budget, Client, PayerKey};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:10000/paid/quote?sym=ABC".to_owned());
    let client = Client::new(PayerKey::from_env()?, Budget::max_per_request(50_000))?;

    let response = client.get(&url).await?;

    println!("{}", String::from_utf8_lossy(&response.body));
    match (&response.receipt, response.paid) {
        (Some(receipt), Some(paid)) => {
            eprintln!(
                "paid {paid} atomic units, transaction {}",
                receipt.transaction
            )
        }
        _ => eprintln!(
            "{}: {}",
            response.status,
            response.error_code().unwrap_or_else(|| "not paid".into())
        ),
    }
    Ok(())
}
