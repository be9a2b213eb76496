//! The dashboard and metrics endpoint against a seeded ledger: the JSON API and
//! `/metrics` need the operator token, and the page rendered by headless Chromium
//! (Debian's `chromium`; `make setup` installs it) shows the ledger's numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sqlx::Row;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use x402_proto::settlement::v1::data_plane_client::DataPlaneClient;
use x402_proto::settlement::v1::operator_client::OperatorClient;
use x402_proto::settlement::v1::*;
use x402_settlement::auth::BearerToken;
use x402_settlement::server::{self, ServerConfig};

const TOKEN: &str = "dashboard-operator-token";

fn chromium() -> String {
    for candidate in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate.into();
        }
    }
    panic!("headless Chromium is required for the dashboard test: run `make setup` (apt-get install chromium)");
}

/// The text of the element with `id` in `dom`.
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\">");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"))
        + marker.len();
    let end = dom[start..].find('<').unwrap() + start;
    dom[start..end].to_string()
}

#[tokio::test]
async fn the_dashboard_shows_the_ledger_numbers() {
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let pool = x402_settlement::db::connect(&url, 10).await.unwrap();
    x402_settlement::db::migrate(&pool).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, http_addr) = (listener.local_addr().unwrap(), http.local_addr().unwrap());
    let config = ServerConfig {
        operator_token: BearerToken::new(Some(TOKEN.into())),
        ..ServerConfig::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server_pool = pool.clone();
    let task = tokio::spawn(async move {
        server::run_with_http(listener, Some(http), server_pool, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        Ok(req)
    };
    let mut op = OperatorClient::with_interceptor(channel.clone(), auth);
    let mut data = DataPlaneClient::new(channel);
    op.create_account(CreateAccountRequest {
        account_id: MERCHANT.into(),
        kind: AccountKind::Merchant as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    // Seed: three payers, 2/3/4 paid requests at different prices, one capture failing upstream.
    for (n, name) in ["ada", "bo", "cy"].iter().enumerate() {
        op.create_account(CreateAccountRequest {
            account_id: (*name).into(),
            kind: AccountKind::Payer as i32,
            ..Default::default()
        })
        .await
        .unwrap();
        let key = key_for(name);
        let payer = Payer {
            account: (*name).into(),
            public_key: x402_proto::signing::public_key_hex(&key),
            key,
        };
        op.add_key(AddKeyRequest {
            account_id: (*name).into(),
            public_key: payer.public_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        op.deposit(DepositRequest {
            account_id: (*name).into(),
            asset: ASSET.into(),
            amount: 1_000_000,
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
        for i in 0..(n + 2) {
            let price = 1_000 * (n as u64 + 1);
            let r = data
                .authorize(AuthorizeRequest {
                    items: vec![paid(&payer, &format!("{name}-{i}"), price)],
                })
                .await
                .unwrap()
                .into_inner()
                .results
                .remove(0);
            assert_eq!(outcome(&r), AuthorizeOutcome::Authorized, "{}", r.message);
            data.capture(CaptureRequest {
                items: vec![CaptureItem {
                    transaction_id: r.transaction_id,
                    amount: price,
                    upstream_micros: 2_000,
                    http_status: if i == 0 && n == 0 { 503 } else { 200 },
                }],
            })
            .await
            .unwrap();
        }
    }
    // What the ledger says.
    let ledger = sqlx::query(
        "SELECT (SELECT count(*) FROM transfers WHERE kind = 'hold') AS holds, \
           (SELECT coalesce(sum(amount), 0)::bigint FROM transfers WHERE kind = 'capture') AS revenue",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let holds: i64 = ledger.get("holds");
    let revenue: i64 = ledger.get("revenue");
    assert_eq!((holds, revenue), (9, 2 * 1_000 + 3 * 2_000 + 4 * 3_000));

    let http_client = reqwest::Client::new();
    let base = format!("http://{http_addr}");
    let unauth = http_client
        .get(format!("{base}/api/analytics"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let unauth = http_client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    // Wait until the recorder has written every authorize outcome.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a: serde_json::Value = http_client
            .get(format!("{base}/api/analytics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if a["totals"]["requests"] == holds && a["totals"]["revenue"] == revenue {
            assert_eq!(a["top_payers"][0]["payer_account"], "cy");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "analytics never matched the ledger: {a}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http_client
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("x402_captures_total 9"), "{metrics}");
    assert!(metrics.contains("x402_authorizations_total{outcome=\"authorized\"} 9"));
    // Data-plane calls are timed and counted like operator calls.
    assert!(metrics.contains("x402_grpc_calls_total{method=\"Authorize\",code=\"Ok\"}"));
    assert!(metrics.contains("x402_grpc_call_seconds_count{method=\"Capture\"}"));
    assert!(metrics.contains("x402_upstream_seconds_count 9"));
    assert!(metrics.contains("x402_db_pool_connections"));

    // The page, rendered by a real browser with the token in the fragment.
    let profile = std::env::temp_dir().join(format!("x402-dashboard-{}", std::process::id()));
    let browser = chromium();
    let page = format!("{base}/dashboard#token={TOKEN}");
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let dom = tokio::task::spawn_blocking(move || {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                &profile_arg,
                "--virtual-time-budget=8000",
                "--dump-dom",
                &page,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    // The browser profile is scratch: leave nothing behind in the temp dir.
    let _ = std::fs::remove_dir_all(&profile);
    let html = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        html.contains("data-loaded=\"true\""),
        "the page did not load analytics; stderr:\n{}\npage:\n{html}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert_eq!(text_of(&html, "total-requests"), holds.to_string());
    assert_eq!(text_of(&html, "total-paid"), holds.to_string());
    assert_eq!(text_of(&html, "total-revenue"), revenue.to_string());
    // One 5xx capture out of nine paid requests.
    assert_eq!(text_of(&html, "error-rate"), "11.1%");
    assert!(html.contains(">cy<"), "top payers missing");
    assert!(html.contains(">quote<"), "routes missing");

    let _ = stop.send(());
    task.await.unwrap();
}
