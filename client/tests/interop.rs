//! Our 402 challenge, payment proof and receipt, decoded by an independent implementation
//! of the x402 v2 transport: the published `@x402/core` package for Node (pinned in
//! `tests/interop/package-lock.json`), run when `node` is installed. The challenge is
//! the filter's own (`x402_filter::request::challenge`), the proof the client's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use x402_client::wire::{encode_header, ErrorCode, SettleResponse};
use x402_client::{random_nonce_hex, sign_payment, PayerKey};
use x402_filter::config::Config;
use x402_filter::request::{challenge, ChallengeInput};

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

fn node_available() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the pinned package once (`npm ci`), then runs `check.mjs` on `input`.
fn decode_with_x402_core(input: &Value) -> Value {
    let dir = interop_dir();
    // One install even when the tests run in parallel.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if !dir.join("node_modules/@x402/core/package.json").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("node is installed but npm is not");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
    drop(guard);
    let file = std::env::temp_dir().join(format!("x402-interop-{}.json", random_nonce_hex()));
    std::fs::write(&file, serde_json::to_vec(input).unwrap()).unwrap();
    let output = Command::new("node")
        .arg(dir.join("check.mjs"))
        .arg(&file)
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "check.mjs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The filter's challenge for `network`, a proof for it and a receipt, as header values,
/// plus the JSON our side encoded.
fn exchange(network: Option<&str>) -> (Value, Value) {
    let mut raw = json!({
        "settlement_cluster": "settlement", "pay_to": "merchant-demo",
        "routes": [{"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01", "description": "A quote"}]
    });
    if let Some(network) = network {
        raw["network"] = network.into();
    }
    let config = Config::from_json(raw.to_string().as_bytes()).unwrap();
    let network = config.network.clone();
    let input = ChallengeInput {
        scheme: "http".into(),
        authority: "127.0.0.1:10000".into(),
        path: "/paid/quote?sym=ABC".into(),
        free_remaining: None,
    };
    let ours = challenge(
        &config,
        &config.routes[0],
        &input,
        ErrorCode::PaymentRequired,
    );
    let key = PayerKey::generate();
    let payment = sign_payment(
        &key,
        &ours.accepts[0],
        "GET 127.0.0.1:10000/paid/quote?sym=ABC",
        &random_nonce_hex(),
        1_900_000_000,
    )
    .unwrap();
    let receipt = SettleResponse {
        success: true,
        transaction: "6c0e0d2a".into(),
        network,
        payer: key.public_key_hex(),
        amount: "10000".into(),
        error_reason: None,
    };
    let headers = json!({
        "challengeHeader": encode_header(&ours),
        "challengeBody": serde_json::to_string(&ours).unwrap(),
        "paymentHeader": encode_header(&payment),
        "receiptHeader": encode_header(&receipt),
    });
    let encoded = json!({
        "challenge": serde_json::to_value(&ours).unwrap(),
        "payment": serde_json::to_value(&payment).unwrap(),
        "receipt": serde_json::to_value(&receipt).unwrap(),
    });
    (headers, encoded)
}

#[test]
fn x402_core_decodes_and_accepts_our_challenge_proof_and_receipt() {
    if !node_available() {
        println!("skipped: `node` is not installed, so @x402/core cannot run");
        return;
    }
    // The filter's default network id is CAIP-2 (`namespace:reference`), as x402 v2 asks.
    let (headers, ours) = exchange(None);
    let decoded = decode_with_x402_core(&headers);
    // Field for field, what the independent decoder read is what we encoded.
    assert_eq!(decoded["challenge"], ours["challenge"]);
    assert_eq!(decoded["payment"], ours["payment"]);
    assert_eq!(decoded["receipt"], ours["receipt"]);
    assert_eq!(decoded["challengeIssues"], json!([]), "{decoded}");
    assert_eq!(decoded["bodyIssues"], json!([]), "{decoded}");
    assert_eq!(decoded["paymentIssues"], json!([]), "{decoded}");
    assert_eq!(decoded["challenge"]["x402Version"], 2);
    assert_eq!(decoded["challenge"]["accepts"][0]["amount"], "10000");
    assert_eq!(decoded["challenge"]["accepts"][0]["payTo"], "merchant-demo");
    assert_eq!(
        decoded["payment"]["accepted"],
        decoded["challenge"]["accepts"][0]
    );
}

#[test]
fn a_network_id_without_a_namespace_is_the_only_thing_x402_core_objects_to() {
    if !node_available() {
        println!("skipped: `node` is not installed, so @x402/core cannot run");
        return;
    }
    // An operator-chosen id without a namespace is not CAIP-2; everything else still passes.
    let (headers, ours) = exchange(Some("402x-local"));
    let decoded = decode_with_x402_core(&headers);
    assert_eq!(decoded["challenge"], ours["challenge"]);
    assert_eq!(decoded["payment"], ours["payment"]);
    let paths = |key: &str| -> Vec<String> {
        decoded[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["path"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(paths("challengeIssues"), vec!["accepts.0.network"]);
    assert_eq!(paths("paymentIssues"), vec!["accepted.network"]);
}
