//! The 402x protocol, shared by the Envoy filter, the settlement service and clients.
//!
//! - [`settlement`]: prost types (and, with the `tonic` feature, gRPC stubs) of the
//!   settlement API in `x402/settlement/v1/*.proto`.
//! - [`wire`]: the HTTP wire types (challenge, payment payload, receipt) and their
//!   base64/JSON encoding, with the stateless checks every party applies.
//! - [`signing`]: the canonical bytes a payer signs (documented in `PROTOCOL.md`).
//! - [`json`]: JSON parsing that refuses a key written twice.
//! - [`amount`]: exact parsing and formatting of money in atomic units.
//! - [`vectors`]: the published test vectors every implementation checks.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod amount;
mod b64;
pub mod json;
pub mod signing;
pub mod vectors;
pub mod wire;

/// Generated from `x402/settlement/v1/*.proto`.
pub mod settlement {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/x402.settlement.v1.rs"));
    }
}

/// Encoded `FileDescriptorSet` of the settlement API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/x402_descriptor.bin"));

/// The x402 protocol version this crate speaks.
pub const X402_VERSION: u32 = 2;
