//! Generates the test gRPC upstream's service (`proto/quotes/v1/quotes.proto`) with
//! `protox` (pure Rust, no `protoc`).

use std::error::Error;

const PROTO: &str = "proto/quotes/v1/quotes.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
