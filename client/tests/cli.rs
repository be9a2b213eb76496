//! The `x402` binary: keygen, pubkey and pay against an in-process resource server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::{challenge_reply, error_reply, paywall, requirement, TestServer};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "x402-cli-{tag}-{}-{}",
            std::process::id(),
            x402_client::random_nonce_hex()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn x402(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_x402"));
    cmd.args(args).env_remove("X402_PAYER_KEY");
    cmd
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn keygen(dir: &Dir) -> (PathBuf, String) {
    let path = dir.path("payer.key");
    let (ok, out, err) = run(&mut x402(&["keygen", "--out", path.to_str().unwrap()]));
    assert!(ok, "{err}");
    (path, out.trim().to_owned())
}

#[test]
fn keygen_writes_a_private_key_file_and_pubkey_reads_it() {
    let dir = Dir::new("keygen");
    let (path, public) = keygen(&dir);
    assert_eq!(public.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let (ok, out, err) = run(&mut x402(&["pubkey", "--key", path.to_str().unwrap()]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), public);

    let seed = std::fs::read_to_string(&path).unwrap();
    let (ok, out, err) = run(x402(&["pubkey"]).env("X402_PAYER_KEY", seed.trim()));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), public);

    let (ok, _, err) = run(&mut x402(&["keygen", "--out", path.to_str().unwrap()]));
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), seed);
}

#[cfg(unix)]
#[test]
fn a_readable_key_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new("perm");
    let (path, _) = keygen(&dir);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out, err) = run(&mut x402(&["pubkey", "--key", path.to_str().unwrap()]));
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn no_key_is_a_clear_error() {
    let (ok, _, err) = run(&mut x402(&["pubkey"]));
    assert!(!ok);
    assert!(err.contains("X402_PAYER_KEY"), "{err}");
}

#[test]
fn pay_prints_the_body_and_a_receipt_line() {
    let server = paywall("10000");
    let dir = Dir::new("pay");
    let (path, _) = keygen(&dir);
    let url = server.url("/paid/quote?sym=ABC");
    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "--max",
        "10000",
        &url,
    ]));
    assert!(ok, "{err}");
    assert_eq!(out, "paid content for GET /paid/quote?sym=ABC");
    assert_eq!(err.trim(), "paid 10000 USD, transaction tx-test-1");
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn pay_sends_method_headers_and_data() {
    let server = paywall("1");
    let dir = Dir::new("post");
    let (path, _) = keygen(&dir);
    let url = server.url("/x");
    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "-X",
        "put",
        "-H",
        "content-type: application/json",
        "-H",
        "x-a: b",
        "-d",
        r#"{"n":2}"#,
        &url,
    ]));
    assert!(ok, "{err}");
    assert_eq!(out, "paid content for PUT /x");
    for r in server.requests() {
        assert_eq!(
            (r.method.as_str(), r.body.as_slice()),
            ("PUT", br#"{"n":2}"#.as_slice())
        );
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    // -d without -X is a POST.
    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "-d",
        "q",
        &url,
    ]));
    assert!(ok, "{err}");
    assert_eq!(out, "paid content for POST /x");
}

#[test]
fn pay_json_reports_status_body_and_receipt() {
    let server = paywall("10000");
    let key = x402_client::PayerKey::generate();
    let dir = Dir::new("json");
    let seed_path = dir.path("k");
    key.save(&seed_path).unwrap();
    let seed = std::fs::read_to_string(&seed_path).unwrap();
    let (ok, out, err) =
        run(x402(&["pay", "--json", &server.url("/paid")]).env("X402_PAYER_KEY", seed.trim()));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"], "paid content for GET /paid");
    assert_eq!(v["paid"], 10000);
    assert_eq!(v["receipt"]["transaction"], "tx-test-1");
    assert_eq!(v["receipt"]["payer"], key.public_key_hex());
    assert_eq!(v["error"], serde_json::Value::Null);
}

#[test]
fn pay_over_budget_sends_no_payment_and_fails() {
    let server = paywall("10000");
    let dir = Dir::new("budget");
    let (path, _) = keygen(&dir);
    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "--max",
        "9999",
        &server.url("/paid"),
    ]));
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("exceeds the budget"), "{err}");
    assert_eq!(server.requests().len(), 1);

    let (ok, _, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "--max",
        "0.5",
        &server.url("/paid"),
    ]));
    assert!(!ok);
    assert!(err.contains("--max"), "{err}");
}

#[test]
fn pay_fails_with_the_servers_reason() {
    let server = TestServer::start(|req| {
        if req.header("payment-signature").is_some() {
            error_reply(503, "settlement_unavailable", "settlement did not answer")
        } else {
            challenge_reply(req, "payment_required", vec![requirement("1")])
        }
    });
    let dir = Dir::new("fail");
    let (path, _) = keygen(&dir);
    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        &server.url("/paid"),
    ]));
    assert!(!ok);
    assert!(out.contains("settlement_unavailable"), "{out}");
    assert!(
        err.contains("503") && err.contains("settlement_unavailable"),
        "{err}"
    );

    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "--json",
        &server.url("/paid"),
    ]));
    assert!(!ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["error"].as_str()),
        (Some(503), Some("settlement_unavailable"))
    );
}

#[test]
fn pay_refused_after_payment_reports_the_challenge_error() {
    let server = TestServer::start(|req| {
        let code = if req.header("payment-signature").is_some() {
            "nonce_reused"
        } else {
            "payment_required"
        };
        challenge_reply(req, code, vec![requirement("1")])
    });
    let dir = Dir::new("refused");
    let (path, _) = keygen(&dir);
    let (ok, _, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        &server.url("/paid"),
    ]));
    assert!(!ok);
    assert!(err.contains("402") && err.contains("nonce_reused"), "{err}");
}

#[test]
fn openapi_documents_the_priced_routes_and_refuses_a_bad_config() {
    let dir = Dir::new("openapi");
    let good = dir.path("good.json");
    std::fs::write(
        &good,
        r#"{"settlement_cluster":"s","pay_to":"m","routes":[{"name":"q","match":{"method":"GET","path_exact":"/q"},"price":"0.5"}]}"#,
    )
    .unwrap();
    let (ok, stdout, stderr) = run(&mut x402(&[
        "openapi",
        "--filter-config",
        good.to_str().unwrap(),
    ]));
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["paths"]["/q"]["get"]["x-402"]["amount"], "500000");

    let bad = dir.path("bad.json");
    std::fs::write(&bad, r#"{"settlement_cluster":"s","pay_to":"m","routes":[{"name":"q","match":{},"price":"0.5"}]}"#).unwrap();
    let (ok, _, stderr) = run(&mut x402(&[
        "openapi",
        "--filter-config",
        bad.to_str().unwrap(),
    ]));
    assert!(!ok);
    assert!(stderr.contains("routes[0].match"), "{stderr}");
}

#[test]
fn balance_without_a_reachable_settlement_fails_without_printing_the_token() {
    let (ok, stdout, stderr) = run(&mut x402(&[
        "balance",
        "--settlement",
        "http://127.0.0.1:9",
        "--account",
        "payer-a",
        "--token",
        "s3cret-token",
    ]));
    assert!(!ok);
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
    assert!(!stderr.contains("s3cret") && !stdout.contains("s3cret"));
}

#[test]
fn pay_stream_writes_the_body_and_the_receipt_line() {
    let server = paywall("10000");
    let dir = Dir::new("stream");
    let (path, _) = keygen(&dir);
    let url = server.url("/events");
    let (ok, out, err) = run(&mut x402(&[
        "pay",
        "--key",
        path.to_str().unwrap(),
        "--stream",
        &url,
    ]));
    assert!(ok, "{err}");
    assert_eq!(out, "paid content for GET /events");
    assert_eq!(err.trim(), "paid 10000 USD, transaction tx-test-1");
}
