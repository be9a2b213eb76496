//! 402x Envoy filter: answers unpaid requests to priced routes with HTTP 402 and an
//! x402 v2 challenge, checks payment proofs, and holds, captures or voids the money
//! through the settlement service over gRPC.
//!
//! - [`config`]: the plugin JSON, parsed once and compiled into a validated form.
//! - [`request`]: one pure state machine per request, `step(state, event) -> (state, effects)`.
//! - [`discovery`]: the optional listing of priced routes (`GET /.well-known/x402`).
//! - [`dispatcher`]: every settlement callout, batched per RPC, on behalf of the root context.
//! - [`journal`]: a copy in Envoy's shared data of the captures a VM still owes, taken
//!   over by another VM when it crashes.
//! - [`policy`]: per-route traffic policy (allow-list, rate limit, free tier, failure mode).
//! - [`ratelimit`]: token buckets and free-tier counters in shared data, updated with CAS.
//! - [`pricing`]: pricing models per route (flat, time of day, expression, GraphQL,
//!   metered per token/second/KB/item), request validation and metering.
//! - [`decimal`], [`expr`], [`graphql`]: exact decimals, price expressions, GraphQL root fields.
//! - [`stream`], [`websocket`]: metering while a response streams (SSE, chunked,
//!   WebSocket) and ending it when the hold is spent.
//! - [`grpc`]: gRPC methods as routes, `grpc-status` deciding capture or void, and
//!   payment answers as gRPC statuses.
//! - [`plugin`]: the glue that feeds host callbacks to the state machine and applies effects.
//! - [`host`]: the host as a trait, with a recording test double.
//! - [`metrics`]: the counters exported to Envoy.
//! - `abi` (wasm only): the proxy-wasm ABI exports and imports; the only `unsafe` code.

pub mod config;
pub mod decimal;
pub mod discovery;
pub mod dispatcher;
pub mod expr;
pub mod fields;
pub mod graphql;
pub mod grpc;
pub mod host;
pub mod journal;
pub mod metrics;
pub mod plugin;
pub mod policy;
pub mod pricing;
pub mod ratelimit;
pub mod request;
pub mod stream;
pub mod websocket;

#[cfg(target_arch = "wasm32")]
mod abi;
