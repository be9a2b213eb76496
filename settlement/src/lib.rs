//! 402x settlement: the ledger behind paid requests.
//!
//! - [`verify`]: checks of an authorize item that need no database (syntax,
//!   ed25519 signature, request hash).
//! - [`ledger`]: money movements, one Postgres transaction each: holds,
//!   captures, voids, expiry, deposits.
//! - [`accounts`]: accounts, payer keys, balances and payment reports.
//! - [`grpc`]: the `DataPlane` and `Operator` services over the ledger.
//! - [`server`]: [`server::run`] serves them (plus health and reflection) on a
//!   bound listener and runs the hold sweeper.
//! - [`db`]: pool and migrations; [`error`]: how failures reach callers.
//! - [`check`]: the ledger invariant checker (`x402-settlement check`).

pub mod accounts;
pub mod check;
pub mod db;
pub mod error;
pub mod grpc;
pub mod ledger;
pub mod server;
pub mod verify;

pub use error::LedgerError;
pub use ledger::Ledger;
