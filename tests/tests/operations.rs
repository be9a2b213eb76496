//! Operating a paid API end to end, with both settlement credentials on: a paid
//! request through Envoy (the filter sends its `settlement_token`) shows up in the
//! Watch stream (authorized and captured), in analytics (a metered request's capture
//! with its upstream time) and as a signed webhook delivered to the merchant; once the
//! operator closes the merchant, a paid request is answered 503 `merchant_closed` and
//! nothing is charged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use x402_e2e::stack::{default_filter_config, Stack, MERCHANT, PAID_PRICE};
use x402_proto::settlement::v1::{
    AnalyticsBucket, AnalyticsRequest, CloseAccountRequest, GetBalancesRequest,
    ListWebhookDeliveriesRequest, PaymentEvent, SetWebhookRequest, WatchRequest,
};

const OPERATOR_TOKEN: &str = "e2e-operator-token";
const DATAPLANE_TOKEN: &str = "e2e-dataplane-token";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-0123";

type Received = Arc<Mutex<Vec<(HashMap<String, String>, String)>>>;

/// A merchant's webhook endpoint on 127.0.0.1 that records every POST.
async fn webhook_receiver() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            store
                                .lock()
                                .unwrap()
                                .push((headers, String::from_utf8_lossy(&body).into_owned()));
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/x402-events"), received)
}

/// The default routes and one billed per second of upstream time.
fn filter_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config()).unwrap();
    let timed = serde_json::json!({"name": "timed", "match": {"path_prefix": "/timed"},
        "pricing": {"per_second": {"unit_price": "0.001", "max_units": 5}}});
    config["routes"].as_array_mut().unwrap().insert(0, timed);
    config.to_string()
}

#[tokio::test]
async fn a_paid_request_reaches_watch_analytics_and_the_merchant_webhook() {
    let stack = Stack::start_secured(&filter_config(), OPERATOR_TOKEN, DATAPLANE_TOKEN)
        .await
        .unwrap();
    let (url, received) = webhook_receiver().await;
    let mut op = stack.settlement.operator().await.unwrap();
    op.set_webhook(SetWebhookRequest {
        merchant: MERCHANT.into(),
        url,
        secret: WEBHOOK_SECRET.into(),
        idempotency_key: "hook-setup".into(),
    })
    .await
    .unwrap();
    let mut events = op
        .watch(WatchRequest {
            merchant: MERCHANT.into(),
            payer_account: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    // Without the operator token the API refuses.
    let anonymous = tonic::transport::Channel::from_shared(stack.settlement.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = x402_proto::settlement::v1::operator_client::OperatorClient::new(anonymous)
        .list_assets(x402_proto::settlement::v1::ListAssetsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let (payer, key) = stack.new_payer(1_000_000).await.unwrap();
    // The Watch subscription may start a moment after the call returns: pay until the
    // stream shows this payer's capture.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut paid = Vec::new();
    let mut authorized: Vec<PaymentEvent> = Vec::new();
    let captured = loop {
        assert!(
            Instant::now() < deadline,
            "no captured event for {payer}; logs:\n{}",
            stack.logs()
        );
        let answer = stack.pay_get(&key, "/paid/quote").await.unwrap();
        assert_eq!(answer.status, 200, "{}", stack.logs());
        let receipt = answer.receipt.expect("a receipt");
        paid.push(receipt.transaction.clone());
        let mut found = None;
        while let Ok(Ok(Some(e))) =
            tokio::time::timeout(Duration::from_secs(3), events.message()).await
        {
            if e.r#type == "authorized" && e.payer_account == payer {
                authorized.push(e);
            } else if e.r#type == "captured" && e.payer_account == payer {
                found = Some(e);
                break;
            }
        }
        if let Some(e) = found {
            break e;
        }
    };
    assert!(paid.contains(&captured.transaction_id));
    assert_eq!(
        (captured.amount, captured.route.as_str()),
        (PAID_PRICE, "quote")
    );
    let n = paid.len() as u64;
    // Authorizations are announced too (in batches, so perhaps after the capture).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !authorized
        .iter()
        .any(|a| a.transaction_id == captured.transaction_id)
    {
        assert!(
            Instant::now() < deadline,
            "no authorized event: {authorized:?}"
        );
        if let Ok(Ok(Some(e))) =
            tokio::time::timeout(Duration::from_secs(3), events.message()).await
        {
            if e.r#type == "authorized" && e.payer_account == payer {
                authorized.push(e);
            }
        }
    }
    let a = authorized
        .iter()
        .find(|a| a.transaction_id == captured.transaction_id)
        .unwrap();
    assert_eq!((a.amount, a.route.as_str()), (PAID_PRICE, "quote"));

    // Analytics count every paid request. The exact price was captured as it was
    // authorized; a metered request is captured after its response, with the upstream
    // time the filter measured.
    let timed = stack.pay_get(&key, "/timed/x").await.unwrap();
    assert_eq!(timed.status, 200, "{}", stack.logs());
    let timed_tx = timed.receipt.expect("a receipt").transaction;
    let deadline = Instant::now() + Duration::from_secs(30);
    let metered = loop {
        let p = stack.settlement.payment(&timed_tx).await.unwrap();
        if p.status == "captured" {
            break p.captured;
        }
        assert!(Instant::now() < deadline, "metered payment: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metered > 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = op
            .get_analytics(AnalyticsRequest {
                bucket: AnalyticsBucket::Minute as i32,
                merchant: MERCHANT.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let t = a.totals.unwrap_or_default();
        if t.captures == n + 1 {
            assert_eq!((t.paid, t.revenue), (n + 1, n * PAID_PRICE + metered));
            assert!(t.latency_p50_micros > 0);
            assert_eq!(a.top_payers[0].payer_account, payer);
            let quote = a.routes.iter().find(|r| r.route == "quote").unwrap();
            assert_eq!(quote.revenue, n * PAID_PRICE);
            break;
        }
        assert!(Instant::now() < deadline, "analytics: {t:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The merchant receives a signed payment.captured webhook per payment.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (received.lock().unwrap().len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "webhooks: {:?}",
            received.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hooks = received.lock().unwrap().clone();
    let (headers, body) = hooks
        .iter()
        .find(|(_, b)| b.contains(&captured.transaction_id))
        .unwrap()
        .clone();
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "payment.captured");
    assert_eq!(event["data"]["amount"], PAID_PRICE);
    let ts: i64 = headers["x-402x-timestamp"].parse().unwrap();
    assert_eq!(
        headers["x-402x-signature"],
        x402_settlement_signature(ts, &body)
    );
    let deliveries = op
        .list_webhook_deliveries(ListWebhookDeliveriesRequest {
            merchant: MERCHANT.into(),
            page_size: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    let mine = deliveries
        .iter()
        .find(|d| d.event_id == event["id"].as_str().unwrap())
        .unwrap();
    // Delivery is recorded right after the receiver answered.
    assert!(mine.attempts >= 1);
    // The secret never reaches the logs.
    assert!(!stack.logs().contains(WEBHOOK_SECRET));
    assert!(!stack.logs().contains(DATAPLANE_TOKEN));

    // The operator closes the merchant: a paid request is refused, nothing is held.
    let balance = |op: &mut x402_proto::settlement::v1::operator_client::OperatorClient<_>| {
        let request = GetBalancesRequest {
            account_id: payer.clone(),
        };
        let mut op = op.clone();
        async move {
            let b = op
                .get_balances(request)
                .await
                .unwrap()
                .into_inner()
                .balances;
            b.iter().map(|b| (b.available, b.held)).next().unwrap()
        }
    };
    let before = balance(&mut op).await;
    assert_eq!(before.1, 0, "every earlier payment is resolved");
    op.close_account(CloseAccountRequest {
        account_id: MERCHANT.into(),
        idempotency_key: "close-merchant".into(),
    })
    .await
    .unwrap();
    let answer = stack.pay_get(&key, "/paid/quote").await.unwrap();
    assert_eq!(answer.status, 503, "{}", stack.logs());
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["error"], "merchant_closed", "{body}");
    assert!(answer.paid.is_none());
    assert_eq!(balance(&mut op).await, before);
}

/// `t=<ts>,v1=hex(HMAC-SHA256(secret, "<ts>.<body>"))`, computed independently.
fn x402_settlement_signature(ts: i64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("t={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// `--worker-threads` sets how many threads run the service, and it serves with one.
#[tokio::test]
async fn settlement_runs_on_the_worker_threads_it_is_given() {
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let workers = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "settlement-rt")
            .count()
    };
    let settlement =
        x402_e2e::settlement::Settlement::start_with(&url, None, &["--worker-threads", "1"])
            .await
            .unwrap();
    settlement
        .create_account(
            "worker-check",
            x402_proto::settlement::v1::AccountKind::Payer,
        )
        .await
        .unwrap();
    let balance = settlement.deposit("worker-check", "USD", 5).await.unwrap();
    assert_eq!(balance.credits_posted, 5);
    assert_eq!(workers(settlement.pid().unwrap()), 1);
    drop(settlement);
    let settlement =
        x402_e2e::settlement::Settlement::start_with(&url, None, &["--worker-threads", "3"])
            .await
            .unwrap();
    assert_eq!(workers(settlement.pid().unwrap()), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_over_mutual_tls_serves_only_clients_with_a_certificate() {
    use tonic::transport::Endpoint;

    let pki = x402_e2e::pki::TestPki::generate().unwrap();
    let stack = Stack::start_tls(&default_filter_config(), &pki)
        .await
        .unwrap();
    // Envoy's settlement cluster speaks TLS and presents the client certificate.
    let (account, key) = stack.new_payer(1_000_000).await.unwrap();
    let answer = stack.pay_get(&key, "/paid/quote").await.unwrap();
    assert_eq!(answer.status, 200, "{}", stack.logs());
    stack
        .wait_for_settled_balance(&account, 1_000_000 - i64::try_from(PAID_PRICE).unwrap())
        .await
        .unwrap();
    // So does the operator CLI, given the CA and its certificate (`X402_SETTLEMENT_*`).
    let out = stack
        .settlement
        .cli(&["account", "get", "--id", &account, "--json"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&account));

    // Plaintext, and TLS without a client certificate, get nothing.
    let port = stack.settlement.port();
    probe(tls_endpoint(&stack.settlement.url(), &pki))
        .await
        .unwrap();
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    assert!(probe(plain).await.is_err(), "a plaintext client was served");
    let anonymous = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(x402_settlement::tls::client_config(Some(&pki.ca), None).unwrap())
        .unwrap();
    assert!(
        probe(anonymous).await.is_err(),
        "a client without a certificate was served"
    );
}

/// One Operator call on a new connection to `endpoint`: `Ok` when settlement
/// answered it (NOT_FOUND for the account asked for, which does not exist), the
/// connection's or call's failure otherwise.
async fn probe(endpoint: tonic::transport::Endpoint) -> anyhow::Result<()> {
    use x402_proto::settlement::v1::operator_client::OperatorClient;
    use x402_proto::settlement::v1::GetAccountRequest;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let answer = OperatorClient::new(channel)
        .get_account(GetAccountRequest {
            account_id: "nobody".into(),
        })
        .await;
    match answer {
        Err(status) if status.code() != tonic::Code::NotFound => Err(status.into()),
        _ => Ok(()),
    }
}

/// A client of settlement at `url` trusting the CA and presenting the client
/// certificate `pki`'s files hold now.
fn tls_endpoint(url: &str, pki: &x402_e2e::pki::TestPki) -> tonic::transport::Endpoint {
    let tls = x402_settlement::tls::client_config(
        Some(&pki.ca),
        Some((&pki.client.cert, &pki.client.key)),
    )
    .unwrap();
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_serves_renewed_certificates_without_a_restart() {
    use x402_e2e::pki::TestPki;
    use x402_e2e::settlement::Settlement;

    let pki = TestPki::generate().unwrap();
    let http = format!("127.0.0.1:{}", x402_e2e::pg::free_port().unwrap());
    let settlement = Settlement::start_tls(
        &x402_e2e::stack::fresh_database().unwrap(),
        &pki,
        &["--tls-reload-seconds", "1", "--http-listen", &http],
    )
    .await
    .unwrap();
    // The reload counters and the served certificate's expiry, as Prometheus scrapes
    // them.
    let reloads = || {
        let url = format!("http://{http}/metrics");
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<i64>().ok())
                    .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            };
            (
                value("x402_tls_reloads_total"),
                value("x402_tls_reloads_refused_total"),
                value("x402_tls_certificate_expiry_timestamp_seconds"),
            )
        }
    };
    let first_expiry = pki.expires_unix();
    assert_eq!(reloads().await, (0, 0, first_expiry));
    let first_ca = tls_endpoint(&settlement.url(), &pki);
    probe(first_ca.clone()).await.unwrap();
    let mut open = settlement.operator().await.unwrap();
    answers_on_its_connection(&mut open).await;
    let wait_for_log = |text: &str| {
        let text = text.to_owned();
        let settlement = &settlement;
        async move {
            let start = Instant::now();
            while !settlement.log_tail(400).contains(&text) {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no `{text}` in the log:\n{}",
                    settlement.log_tail(40)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // A key that is not the certificate's: refused, the certificate served stays.
    let good_key = std::fs::read(&pki.server.key).unwrap();
    let stranger = TestPki::generate().unwrap();
    let partial = pki.server.key.with_extension("partial");
    std::fs::copy(&stranger.server.key, &partial).unwrap();
    std::fs::rename(&partial, &pki.server.key).unwrap();
    wait_for_log("not the key of the certificate").await;
    probe(first_ca.clone()).await.unwrap();
    assert_eq!(reloads().await, (0, 1, first_expiry));
    std::fs::write(&pki.server.key, good_key).unwrap();

    // A new CA, server and client certificates: new connections get them, clients of
    // the replaced CA are refused, and a connection already open keeps working. (The
    // files change one after the other, so a look between two of them may serve a mix
    // for a moment.)
    pki.rotate().unwrap();
    let rotated = Instant::now();
    loop {
        let new_ca = probe(tls_endpoint(&settlement.url(), &pki)).await;
        let old_ca = probe(first_ca.clone()).await;
        if new_ca.is_ok() && old_ca.is_err() {
            break;
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(30),
            "the new certificates are not served alone: new CA {new_ca:?}, replaced CA {old_ca:?}\n{}",
            settlement.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_log("new connections get the new certificate").await;
    let (served, refused, expiry) = reloads().await;
    assert!(
        served >= 1 && refused >= 1,
        "{served} served, {refused} refused"
    );
    assert_ne!(pki.expires_unix(), first_expiry);
    assert_eq!(
        expiry,
        pki.expires_unix(),
        "the renewed certificate's notAfter"
    );
    answers_on_its_connection(&mut open).await;
}

/// `client` gets settlement's answer (NOT_FOUND for an account that does not exist)
/// on the connection it has.
async fn answers_on_its_connection(client: &mut x402_e2e::settlement::OperatorApi) {
    let status = client
        .get_account(x402_proto::settlement::v1::GetAccountRequest {
            account_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}
