//! Builds the tonic server stub of the ext_authz peer from a minimal subset of Envoy's
//! `envoy.service.auth.v3` API (`proto/`). Protobuf ignores fields a reader does not
//! declare, so the subset decodes Envoy's full `CheckRequest`.

use std::error::Error;

const PROTO: &str = "envoy/service/auth/v3/external_auth.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto/{PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
