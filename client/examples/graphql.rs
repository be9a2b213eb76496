//! Pays for a GraphQL query. A gateway may price a GraphQL endpoint per root field, so
//! the price depends on the query: the client simply pays what the challenge for this
//! exact body asks, within its budget. The body is sent again unchanged with the proof.
//!
//! ```sh
//! X402_PAYER_KEY=$(cat .run/payer.key) cargo run -p x402-client --example graphql -- \
//!     http://127.0.0.1:10000/graphql
//! ```

use x402_client::reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use x402_client::reqwest::{Method, Url};
use x402_client::{Budget, Client, PayerKey};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:10000/graphql".to_owned());
    let client = Client::new(PayerKey::from_env()?, Budget::max_per_request(100_000))?;

    let query = serde_json::json!({
        "query": "query Quote($sym: String!) { quote(symbol: $sym) { bid ask } }",
        "variables": { "sym": "ABC" }
    });
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let response = client
        .request(
            Method::POST,
            Url::parse(&url)?,
            headers,
            Some(serde_json::to_vec(&query)?),
        )
        .await?;

    println!("{}", String::from_utf8_lossy(&response.body));
    if let Some(paid) = response.paid {
        eprintln!("paid {paid} atomic units for this query");
    }
    Ok(())
}
