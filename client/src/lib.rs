//! A client that pays for HTTP requests protected by 402x.
//!
//! A request to a priced route is answered `402 Payment Required` with an x402 v2
//! challenge; this crate signs an ed25519 payment proof for one of the offered
//! requirements and retries once with the `PAYMENT-SIGNATURE` header.
//!
//! - [`key`]: the payer's ed25519 key ([`PayerKey`]): generate, load, save, from env.
//! - [`payment`]: building proofs ([`sign_payment`], [`random_nonce_hex`],
//!   [`resource_for`]) and reading challenges and receipts ([`parse_challenge`],
//!   [`parse_receipt`]).
//! - [`client`]: [`Client`], which sends a request, pays within a [`Budget`] when
//!   asked to, and returns a [`PaidResponse`].
//! - [`operator`]: settlement's operator API for the payer: balance, history, and the
//!   fate of a proof whose answer was lost.
//! - [`openapi`]: an OpenAPI 3.1 document of the priced routes, from the filter config.
//! - [`error`]: the [`ClientError`] every fallible call returns.
//!
//! ```no_run
//! # async fn demo() -> Result<(), x402_client::ClientError> {
//! use x402_client::{Budget, Client, PayerKey};
//!
//! let key = PayerKey::load("payer.key")?;
//! let client = Client::new(key, Budget::max_per_request(50_000))?;
//! let url = reqwest::Url::parse("http://127.0.0.1:10000/paid/quote?sym=ABC")
//!     .map_err(|e| x402_client::ClientError::InvalidUrl(e.to_string()))?;
//! let response = client
//!     .request(reqwest::Method::GET, url, reqwest::header::HeaderMap::new(), None)
//!     .await?;
//! if let Some(receipt) = &response.receipt {
//!     println!("paid {} in transaction {}", receipt.amount, receipt.transaction);
//! }
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod error;
pub mod key;
pub mod openapi;
pub mod operator;
pub mod payment;

pub use client::{Budget, Client, PaidResponse, RetryPolicy, StreamingResponse};
pub use error::ClientError;
pub use key::{PayerKey, ENV_PAYER_KEY};
pub use operator::{OperatorEndpoint, ProofOutcome};
pub use payment::{
    authority_for, choose_requirement, parse_challenge, parse_receipt, random_nonce_hex,
    resource_for, resource_for_request, sign_payment,
};

/// Re-exported so callers can name the wire and HTTP types without extra dependencies.
pub use reqwest;
pub use x402_proto::wire;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Keeps the README's library example compiling.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
