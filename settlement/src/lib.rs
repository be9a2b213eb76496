//! 402x settlement: the ledger behind paid requests.
//!
//! - [`verify`]: checks of an authorize item that need no database (syntax,
//!   ed25519 signature, request hash).
//! - [`ledger`]: money movements, one Postgres transaction each: holds,
//!   captures, voids, expiry, deposits.
//! - [`limits`]: global rate limits, a fixed-window counter per route and
//!   identity that authorize takes in the hold's transaction.
//! - [`accounts`]: accounts, payer keys, balances and payment reports.
//! - [`grpc`]: the `DataPlane` and `Operator` services over the ledger.
//! - [`server`]: [`server::run`] serves them (plus health and reflection) on a
//!   bound listener and runs the hold sweeper.
//! - [`operator`]: operator features beyond the ledger core: idempotent calls,
//!   account listing/metadata/closing, key rotation, assets, adjustments, refunds,
//!   webhook endpoints.
//! - [`events`]: what a money movement writes besides balances (fee, refund cap,
//!   analytics event, webhook outbox, NOTIFY) and the listener behind `Watch`.
//! - [`analytics`]: incremental per-minute aggregates and their queries.
//! - [`webhooks`]: signed delivery from the outbox with retries.
//! - [`auth`]: bearer tokens of the two APIs; [`tls`]: (mutual) TLS of the gRPC
//!   listener; [`metrics`] and [`http`]: Prometheus
//!   metrics and the dashboard.
//! - [`db`]: pool and migrations; [`error`]: how failures reach callers.
//! - [`check`]: the ledger invariant checker (`x402-settlement check`).

pub mod accounts;
pub mod analytics;
pub mod auth;
pub mod check;
pub mod db;
pub mod error;
pub mod events;
pub mod group;
pub mod grpc;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod signatures;
pub mod tls;
pub mod verify;
pub mod webhooks;

pub use error::LedgerError;
pub use ledger::Ledger;
