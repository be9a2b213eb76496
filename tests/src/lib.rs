//! End-to-end harness of 402x: every part is the real thing, started as a process (or,
//! for the HTTP upstream, a real server in-process) on 127.0.0.1, killed on drop.
//!
//! - [`pg`]: a private PostgreSQL cluster from the system binaries.
//! - [`process`]: child processes that die with their owner, free ports, log tails.
//! - [`pki`]: a private CA and certificates for the TLS tests.
//! - [`settlement`]: the `x402-settlement` binary, its Operator gRPC API and CLI.
//! - [`upstream`]: the HTTP upstream behind Envoy (echo, chosen status, request counts).
//! - [`grpc_upstream`]: the gRPC upstream behind Envoy (a tonic quote service).
//! - [`envoy`]: the Envoy config template rendered and Envoy started with the wasm filter.
//! - [`stack`]: all of the above wired together, plus payer helpers, for one test.
//! - [`stall`]: a TCP proxy that holds a service's requests or answers on demand.
//!
//! Binaries: `x402-dev` (the `make run` stack) and `x402-demo-upstream`.

pub mod envoy;
pub mod grpc_upstream;
pub mod paths;
pub mod pg;
pub mod pki;
pub mod process;
pub mod settlement;
pub mod stack;
pub mod stall;
pub mod upstream;
