//! Generates the settlement API types from `x402/settlement/v1/*.proto` with `protox`
//! (pure Rust, no `protoc`). prost messages are always built; tonic stubs only with the
//! `tonic` feature, so the wasm filter's tree stays free of tonic and tokio.

use std::{env, error::Error, path::PathBuf};

const PROTOS: &[&str] = &[
    "x402/settlement/v1/dataplane.proto",
    "x402/settlement/v1/operator.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    // The descriptor set serves gRPC reflection in settlement.
    std::fs::write(
        out.join("x402_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    if env::var_os("CARGO_FEATURE_TONIC").is_some() {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    } else {
        prost_build::Config::new().compile_fds(fds)?;
    }
    Ok(())
}
