//! The client library, the `x402` CLI, discovery and the generated OpenAPI document
//! against a real deployment: Envoy with the filter, settlement on PostgreSQL and the
//! test upstream. Balances are read from settlement, never inferred from the client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use x402_client::{Budget, Client, ClientError, RetryPolicy};
use x402_e2e::paths::{client_bin, workspace_root};
use x402_e2e::stack::{default_filter_config, Stack, MERCHANT, PAID_PRICE};
use x402_filter::config::Config;

/// The default routes plus a priced `/flaky` route and discovery at `/.well-known/x402`.
fn client_filter_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config()).unwrap();
    config["discovery_path"] = serde_json::json!("/.well-known/x402");
    config["routes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "name": "flaky", "match": { "path_prefix": "/flaky" }, "price": "0.01" }));
    config.to_string()
}

fn run_cli(args: &[&str]) -> serde_json::Value {
    let output = Command::new(client_bin().unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "x402 {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "x402 {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_line_call_pays_and_the_cli_shows_balance_and_history() {
    let stack = Stack::start_default().await.unwrap();
    let (account, key) = stack.new_payer(100_000).await.unwrap();

    let client = Client::new(key, Budget::max_per_request(PAID_PRICE)).unwrap();
    let response = client.get(&stack.url("/paid/quote?sym=XYZ")).await.unwrap();

    assert_eq!(response.status, 200, "{}", stack.logs());
    assert_eq!(response.paid, Some(PAID_PRICE));
    assert_eq!(response.attempts, 1);
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["quote"]["symbol"], "XYZ");
    stack
        .wait_for_settled_balance(&account, 100_000 - PAID_PRICE as i64)
        .await
        .unwrap();

    let settlement = stack.settlement.url();
    let balance = run_cli(&[
        "balance",
        "--settlement",
        &settlement,
        "--account",
        &account,
        "--json",
    ]);
    assert_eq!(balance["available"], 100_000 - PAID_PRICE);
    assert_eq!(balance["debitsPosted"], PAID_PRICE);
    let history = run_cli(&[
        "history",
        "--settlement",
        &settlement,
        "--account",
        &account,
        "--json",
    ]);
    let payments = history.as_array().unwrap();
    assert_eq!(payments.len(), 1, "{history}");
    assert_eq!(payments[0]["status"], "captured");
    assert_eq!(payments[0]["captured"], PAID_PRICE);
    assert_eq!(payments[0]["merchant"], MERCHANT);
    assert_eq!(
        payments[0]["transaction"],
        response.receipt.unwrap().transaction.as_str()
    );
    assert_eq!(
        payments[0]["nonce"],
        response.payment.unwrap().payload.nonce.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusal_pays_nothing() {
    let stack = Stack::start_default().await.unwrap();
    let (account, key) = stack.new_payer(100_000).await.unwrap();

    let stingy = Client::new(key.clone(), Budget::max_per_request(PAID_PRICE - 1)).unwrap();
    match stingy.get(&stack.url("/paid/quote")).await.unwrap_err() {
        ClientError::OverBudget { amount, max, .. } => {
            assert_eq!((amount, max), (PAID_PRICE, PAID_PRICE - 1))
        }
        other => panic!("{other}"),
    }
    let elsewhere = Client::new(
        key.clone(),
        Budget::unlimited().with_pay_to(["another-merchant"]),
    )
    .unwrap();
    assert!(matches!(
        elsewhere.get(&stack.url("/paid/quote")).await.unwrap_err(),
        ClientError::PayToNotAllowed { .. }
    ));

    // A total of 1.5 prices: the first request is paid, the second refused unpaid.
    let capped = Client::new(
        key,
        Budget::unlimited().with_max_total(PAID_PRICE * 3 / 2, None),
    )
    .unwrap();
    assert_eq!(
        capped.get(&stack.url("/paid/quote")).await.unwrap().paid,
        Some(PAID_PRICE)
    );
    assert!(matches!(
        capped.get(&stack.url("/paid/quote")).await.unwrap_err(),
        ClientError::OverTotalBudget { .. }
    ));

    stack
        .wait_for_settled_balance(&account, 100_000 - PAID_PRICE as i64)
        .await
        .unwrap();
    assert_eq!(stack.upstream.served().count_path_prefix("/paid"), 1);
    assert_eq!(
        stack.settlement.payments_of(&account).await.unwrap().len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_paying_is_retried_with_a_new_proof_and_paid_once() {
    let stack = Stack::start(&client_filter_config()).await.unwrap();
    let (account, key) = stack.new_payer(100_000).await.unwrap();
    let client = Client::new(key, Budget::unlimited())
        .unwrap()
        .with_retry(RetryPolicy {
            max_paid_attempts: 3,
            backoff: std::time::Duration::from_millis(50),
        });

    // The upstream fails the first two paid attempts, then answers.
    let response = client.get(&stack.url("/flaky/2/report")).await.unwrap();
    assert_eq!(response.status, 200, "{}", stack.logs());
    assert_eq!(response.attempts, 3);
    assert_eq!(response.paid, Some(PAID_PRICE));

    stack
        .wait_for_settled_balance(&account, 100_000 - PAID_PRICE as i64)
        .await
        .unwrap();
    // Each attempt's exact price was captured as it was authorized; the two that
    // failed were refunded in full.
    let mut kept: Vec<u64> = stack
        .settlement
        .payments_of(&account)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.captured - p.refunded)
        .collect();
    kept.sort_unstable();
    assert_eq!(kept, [0, 0, PAID_PRICE]);
    assert_eq!(
        stack.upstream.served().count_path_prefix("/flaky/2/report"),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_exactly_what_the_config_prices() {
    let config_json = client_filter_config();
    let stack = Stack::start(&config_json).await.unwrap();

    let answer = stack.send_unpaid("GET", "/.well-known/x402").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let listing = answer.json().unwrap();

    let config = Config::from_json(config_json.as_bytes()).unwrap();
    let expected = x402_filter::discovery::document(&config, "http", &stack.envoy.authority());
    assert_eq!(listing, serde_json::to_value(&expected).unwrap());

    let items = listing["items"].as_array().unwrap();
    let names: Vec<&str> = items
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["quote", "status", "named", "flaky"]);
    // What discovery advertises for a path route is what a request there is asked to pay.
    for (item, path) in [(&items[0], "/paid"), (&items[3], "/flaky/0/x")] {
        let challenge = stack
            .send_unpaid("GET", path)
            .await
            .unwrap()
            .challenge()
            .unwrap();
        assert_eq!(
            item["accepts"],
            serde_json::to_value(&challenge.accepts).unwrap(),
            "{path}"
        );
    }
    assert_eq!(items[0]["accepts"][0]["amount"], PAID_PRICE.to_string());
    // Only the two challenges reached nothing upstream; discovery itself never does.
    assert_eq!(stack.upstream.served().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_openapi_document_validates_and_states_the_enforced_prices() {
    let config_json = client_filter_config();
    let stack = Stack::start(&config_json).await.unwrap();
    let dir =
        std::env::temp_dir().join(format!("x402-openapi-{}", x402_client::random_nonce_hex()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("filter.json");
    std::fs::write(&config_file, &config_json).unwrap();
    let upstream_file = dir.join("upstream.json");
    std::fs::write(
        &upstream_file,
        serde_json::json!({
            "openapi": "3.1.0",
            "info": { "title": "Demo upstream", "version": "1" },
            "paths": {
                "/paid/quote": { "get": { "operationId": "quote", "responses": { "200": { "description": "A quote" } } } },
                "/free/weather": { "get": { "operationId": "weather", "responses": { "200": { "description": "Weather" } } } }
            }
        })
        .to_string(),
    )
    .unwrap();

    let server = stack.url("");
    for merge in [false, true] {
        let mut args = vec![
            "openapi".to_owned(),
            "--filter-config".to_owned(),
            config_file.display().to_string(),
            "--server".to_owned(),
            server.clone(),
        ];
        if merge {
            args.extend(["--merge".to_owned(), upstream_file.display().to_string()]);
        }
        let output = Command::new(client_bin().unwrap())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let file = dir.join(format!("openapi-{merge}.json"));
        std::fs::write(&file, &output.stdout).unwrap();

        // openapi-spec-validator (PyPI, installed into .venv by `make setup`) checks the
        // document against the official OpenAPI 3.1 JSON schema and adds the checks a
        // schema cannot express (unique operationIds, path parameters, $ref targets),
        // without compiling a JSON-schema engine into the workspace.
        let validator = workspace_root().join(".venv/bin/openapi-spec-validator");
        let checked = Command::new(&validator)
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!("{} cannot run ({e}): run `make setup`", validator.display())
            });
        assert!(
            checked.status.success(),
            "merge={merge}: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );

        let doc: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let path = if merge { "/paid/quote" } else { "/paid" };
        let op = &doc["paths"][path]["get"];
        let challenge = stack
            .send_unpaid("GET", path)
            .await
            .unwrap()
            .challenge()
            .unwrap();
        assert_eq!(op["x-402"]["amount"], challenge.accepts[0].amount.as_str());
        assert_eq!(
            op["x-402"]["accepts"],
            serde_json::to_value(&challenge.accepts).unwrap()
        );
        assert!(op["responses"]["402"]["headers"]["PAYMENT-REQUIRED"].is_object());
        if merge {
            assert_eq!(doc["info"]["title"], "Demo upstream");
            let free = &doc["paths"]["/free/weather"]["get"];
            assert!(free.get("x-402").is_none() && free["responses"].get("402").is_none());
            let weather = stack.send_unpaid("GET", "/free/weather").await.unwrap();
            assert_eq!(weather.status, 200);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the proxy of [`answer_losing_proxy`] loses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lose {
    /// Every answer to a request with a proof, after Envoy sent it in full.
    PaidAnswers,
    /// The first request with a proof, before it reaches Envoy.
    FirstPaidRequest,
}

/// A TCP proxy in front of Envoy that passes unpaid requests through and loses paid
/// requests or their answers as `lose` says, closing the client's connection without a
/// byte of answer. Counts the requests with a proof it saw.
async fn answer_losing_proxy(
    envoy: String,
    lose: Lose,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paid_seen = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = paid_seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let envoy = envoy.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let paid = String::from_utf8_lossy(&request)
                    .to_ascii_lowercase()
                    .contains("\r\npayment-signature:");
                let seen = if paid {
                    counter.fetch_add(1, Ordering::SeqCst) + 1
                } else {
                    0
                };
                if lose == Lose::FirstPaidRequest && seen == 1 {
                    return;
                }
                let mut upstream = tokio::net::TcpStream::connect(&envoy).await.unwrap();
                upstream.write_all(&request).await.unwrap();
                if !paid || lose == Lose::FirstPaidRequest {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
                // Read Envoy's whole answer (headers and content-length body), then drop both.
                let mut answer = Vec::new();
                loop {
                    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if answer.len() >= end + 4 + length {
                            break;
                        }
                    }
                    match upstream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
                drop(upstream);
                drop(client);
            });
        }
    });
    (format!("http://{addr}"), paid_seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_looked_up_in_settlement_and_never_paid_twice() {
    use std::sync::atomic::Ordering;
    let stack = Stack::start_default().await.unwrap();
    let (account, key) = stack.new_payer(100_000).await.unwrap();
    let (proxy, paid_seen) = answer_losing_proxy(stack.envoy.authority(), Lose::PaidAnswers).await;
    // One connection per request, so each request meets the proxy afresh.
    let http = || {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };

    // Without an operator endpoint the client cannot know, so it stops.
    let blind = Client::with_http(http(), key.clone(), Budget::unlimited());
    let err = blind.get(&format!("{proxy}/paid/quote")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::PaymentOutcomeUnknown { .. }),
        "{err}"
    );
    assert_eq!(paid_seen.load(Ordering::SeqCst), 1);

    // With one, it asks settlement about the proof's nonce and finds it charged.
    let informed = Client::with_http(http(), key, Budget::unlimited()).with_operator(
        x402_client::OperatorEndpoint::new(stack.settlement.url(), account.clone()),
    );
    let err = informed
        .get(&format!("{proxy}/paid/quote"))
        .await
        .unwrap_err();
    let ClientError::PaidResponseLost { transaction, .. } = err else {
        panic!("{err}");
    };
    assert_eq!(paid_seen.load(Ordering::SeqCst), 2, "a proof was resent");

    // Two proofs reached Envoy, each charged once; nothing was paid a second time.
    stack
        .wait_for_settled_balance(&account, 100_000 - 2 * PAID_PRICE as i64)
        .await
        .unwrap();
    let payments = stack.settlement.payments_of(&account).await.unwrap();
    assert_eq!(payments.len(), 2);
    assert!(payments.iter().any(|p| p.transaction_id == transaction));
    assert!(
        payments.iter().all(|p| p.status == "captured"),
        "{payments:?}"
    );
    assert_eq!(stack.upstream.served().count_path_prefix("/paid"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_settlement_never_saw_is_resent_unchanged_and_paid_once() {
    use std::sync::atomic::Ordering;
    let stack = Stack::start_default().await.unwrap();
    let (account, key) = stack.new_payer(100_000).await.unwrap();
    let (proxy, paid_seen) =
        answer_losing_proxy(stack.envoy.authority(), Lose::FirstPaidRequest).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let client = Client::with_http(http, key, Budget::unlimited()).with_operator(
        x402_client::OperatorEndpoint::new(stack.settlement.url(), account.clone()),
    );

    let response = client.get(&format!("{proxy}/paid/quote")).await.unwrap();

    assert_eq!(response.status, 200, "{}", stack.logs());
    assert_eq!(response.paid, Some(PAID_PRICE));
    assert_eq!(
        response.attempts, 1,
        "the lost proof was sent again, not replaced"
    );
    assert_eq!(paid_seen.load(Ordering::SeqCst), 2);
    stack
        .wait_for_settled_balance(&account, 100_000 - PAID_PRICE as i64)
        .await
        .unwrap();
    let payments = stack.settlement.payments_of(&account).await.unwrap();
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].nonce, response.payment.unwrap().payload.nonce);
}
