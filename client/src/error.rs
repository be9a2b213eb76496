//! The error every fallible call of this crate returns.
//!
//! Each message is complete on its own (it includes the underlying cause), so the
//! variants report no separate `source()`: printing the chain would repeat it.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot read key file {}: {cause}", path.display())]
    KeyRead {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("cannot write key file {}: {cause}", path.display())]
    KeyWrite {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("key file {} already exists; refusing to overwrite a payer key", path.display())]
    KeyExists { path: PathBuf },

    /// A secret readable by other users is as good as leaked, so it is never used.
    #[error(
        "key file {} is accessible by group or others (mode {mode:03o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    /// Never echoes the offending text: it may be most of a secret.
    #[error("payer key must be 32 bytes as 64 hex characters")]
    InvalidKey,

    #[error("no payer key: pass --key FILE or set X402_PAYER_KEY to a hex seed")]
    MissingKey,

    #[error("invalid URL: {0}")]
    InvalidUrl(String),

    #[error("invalid header: {0}")]
    InvalidHeader(String),

    #[error("HTTP request failed: {}", chain(.0))]
    Http(reqwest::Error),

    #[error("402 answer carries no readable payment challenge: {0}")]
    BadChallenge(String),

    #[error("the server asks for x402Version {0}; this client speaks version 2")]
    UnsupportedVersion(u32),

    /// The cheapest acceptable offer costs more than the budget allows; nothing was paid.
    #[error("price {amount} {asset} exceeds the budget of {max} per request; nothing was paid")]
    OverBudget {
        amount: u64,
        asset: String,
        max: u64,
    },

    /// Paying this price would take the client past its total (or per-window) budget.
    #[error("price {amount} {asset} would bring spending to {would_spend}, over the total budget of {max}{}; nothing was paid", window.map(|w| format!(" per {} s", w.as_secs())).unwrap_or_default())]
    OverTotalBudget {
        amount: u64,
        asset: String,
        would_spend: u64,
        max: u64,
        window: Option<std::time::Duration>,
    },

    /// Every payable offer pays an account outside the allow-list; nothing was paid.
    #[error("the server asks to pay {pay_to}, which is not in the allowed payTo accounts; nothing was paid")]
    PayToNotAllowed { pay_to: String },

    /// The server is outside the allow-list of hosts; nothing was paid.
    #[error("host {host} is not in the allowed hosts; nothing was paid")]
    HostNotAllowed { host: String },

    /// A proof was sent but no answer came back, and no operator endpoint is configured
    /// to ask settlement whether it was accepted: the client does not pay again.
    #[error("the paid request failed after the proof was sent ({cause}); it may have been charged (nonce {nonce}); configure an operator endpoint to let the client find out")]
    PaymentOutcomeUnknown { nonce: String, cause: String },

    /// Settlement holds or captured the payment of a proof whose answer was lost; the
    /// client does not pay again.
    #[error("the answer was lost but settlement shows the payment as {status} (transaction {transaction}); not paying again")]
    PaidResponseLost { transaction: String, status: String },

    /// Every proof sent was released unanswered; nothing was paid.
    #[error("no answer after {attempts} payment attempt(s), each released by settlement; nothing was paid")]
    RetriesExhausted { attempts: u32 },

    #[error("settlement operator API: {0}")]
    Operator(String),

    #[error("none of the offered payment options is acceptable (offered: {offered})")]
    NoAcceptableRequirement { offered: String },

    #[error("cannot sign the payment: {0}")]
    Sign(x402_proto::signing::ControlCharacter),
}

impl From<reqwest::Error> for ClientError {
    fn from(error: reqwest::Error) -> Self {
        ClientError::Http(error)
    }
}

impl From<x402_proto::signing::ControlCharacter> for ClientError {
    fn from(error: x402_proto::signing::ControlCharacter) -> Self {
        ClientError::Sign(error)
    }
}

/// `error: cause: cause...`, skipping a cause whose text its parent already shows.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}
