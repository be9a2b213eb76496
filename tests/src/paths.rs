//! Where the harness finds the workspace, the built binaries and the wasm filter.
//! Each location can be overridden by an environment variable; the defaults are what
//! `make test` builds.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// The workspace root (the directory holding `Cargo.toml`, `envoy/`, `target/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the workspace),
/// else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

fn from_env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

fn existing(path: PathBuf, what: &str, var: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{what} not found at {} (set {var} to override): run `make test` (or `make run`), which installs and builds everything needed",
            path.display()
        )
    }
}

/// The settlement binary: `X402_SETTLEMENT_BIN`, default `<target>/debug/x402-settlement`.
pub fn settlement_bin() -> Result<PathBuf> {
    existing(
        from_env_or(
            "X402_SETTLEMENT_BIN",
            target_dir().join("debug").join("x402-settlement"),
        ),
        "settlement binary",
        "X402_SETTLEMENT_BIN",
    )
}

/// The paying client CLI: `X402_CLIENT_BIN`, default `<target>/debug/x402`.
pub fn client_bin() -> Result<PathBuf> {
    existing(
        from_env_or("X402_CLIENT_BIN", target_dir().join("debug").join("x402")),
        "client binary",
        "X402_CLIENT_BIN",
    )
}

/// The Envoy binary: `X402_ENVOY`, default `<workspace>/.venv/bin/envoy`.
pub fn envoy_bin() -> Result<PathBuf> {
    existing(
        from_env_or(
            "X402_ENVOY",
            workspace_root().join(".venv").join("bin").join("envoy"),
        ),
        "Envoy",
        "X402_ENVOY",
    )
}

/// The filter module: `X402_FILTER_WASM`, default
/// `<target>/wasm32-wasip1/wasm/x402_filter.wasm`.
pub fn filter_wasm() -> Result<PathBuf> {
    existing(
        from_env_or(
            "X402_FILTER_WASM",
            target_dir()
                .join("wasm32-wasip1")
                .join("wasm")
                .join("x402_filter.wasm"),
        ),
        "filter wasm module",
        "X402_FILTER_WASM",
    )
}

/// The Envoy config template.
pub fn envoy_template() -> Result<PathBuf> {
    existing(
        workspace_root().join("envoy").join("envoy.template.yaml"),
        "Envoy config template",
        "the workspace layout",
    )
}
