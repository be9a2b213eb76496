//! The error every fallible call of this crate returns.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot read key file {}: {source}", path.display())]
    KeyRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot write key file {}: {source}", path.display())]
    KeyWrite {
        path: PathBuf,
        source: std::io::Error,
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

    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),

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

    #[error("none of the offered payment options is acceptable (offered: {offered})")]
    NoAcceptableRequirement { offered: String },

    #[error("cannot sign the payment: {0}")]
    Sign(#[from] x402_proto::signing::ControlCharacter),
}
