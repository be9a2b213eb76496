//! Total budgets, allow-lists, the retry rule and streaming, against an in-process
//! resource server on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use support::{challenge_reply, check_proof, paywall, requirement, Reply, TestServer};
use x402_client::wire::encode_header;
use x402_client::{Budget, Client, ClientError, PayerKey, RetryPolicy};

fn client(budget: Budget) -> Client {
    Client::new(PayerKey::generate(), budget)
        .unwrap()
        .with_retry(RetryPolicy {
            max_paid_attempts: 3,
            backoff: Duration::from_millis(1),
        })
}

fn paid_attempts(server: &TestServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.header("payment-signature").is_some())
        .count()
}

#[tokio::test]
async fn the_total_budget_stops_paying_and_is_shared_by_clones() {
    let server = paywall("4000");
    let client = client(Budget::unlimited().with_max_total(10_000, None));
    let clone = client.clone();
    assert_eq!(
        client.get(&server.url("/a")).await.unwrap().paid,
        Some(4000)
    );
    assert_eq!(clone.get(&server.url("/b")).await.unwrap().paid, Some(4000));
    assert_eq!(client.spent(), 8000);
    match client.get(&server.url("/c")).await.unwrap_err() {
        ClientError::OverTotalBudget {
            amount,
            would_spend,
            max,
            ..
        } => assert_eq!((amount, would_spend, max), (4000, 12_000, 10_000)),
        other => panic!("{other}"),
    }
    // Two paid requests, then only the unpaid probe of the third.
    assert_eq!(paid_attempts(&server), 2);
    assert_eq!(server.requests().len(), 5);
    assert_eq!(client.spent(), 8000);
}

#[tokio::test]
async fn a_window_budget_frees_up_as_time_passes() {
    let server = paywall("6000");
    let client =
        client(Budget::unlimited().with_max_total(10_000, Some(Duration::from_millis(300))));
    assert!(client.get(&server.url("/a")).await.unwrap().paid.is_some());
    assert!(matches!(
        client.get(&server.url("/a")).await.unwrap_err(),
        ClientError::OverTotalBudget { .. }
    ));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(client.spent(), 0);
    assert!(client.get(&server.url("/a")).await.unwrap().paid.is_some());
    assert_eq!(paid_attempts(&server), 2);
}

#[tokio::test]
async fn allow_lists_refuse_other_merchants_and_hosts_unpaid() {
    let server = paywall("1");
    let err = client(Budget::unlimited().with_pay_to(["someone-else"]))
        .get(&server.url("/a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::PayToNotAllowed { pay_to } if pay_to == "merchant-demo"),
        "{err}"
    );
    let err = client(Budget::unlimited().with_hosts(["api.example.com"]))
        .get(&server.url("/a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::HostNotAllowed { host } if host == "127.0.0.1"),
        "{err}"
    );
    assert_eq!(paid_attempts(&server), 0);
    let ok = client(
        Budget::unlimited()
            .with_pay_to(["merchant-demo"])
            .with_hosts(["127.0.0.1"]),
    )
    .get(&server.url("/a"))
    .await
    .unwrap();
    assert_eq!(ok.paid, Some(1));
}

/// Fails the first `failures` paid attempts with 502, like an upstream error behind the
/// gateway (which voids the hold), then serves.
fn flaky(failures: usize) -> TestServer {
    let seen = Arc::new(AtomicUsize::new(0));
    TestServer::start(move |req| {
        let price = requirement("700");
        if req.header("payment-signature").is_none() {
            return challenge_reply(req, "payment_required", vec![price]);
        }
        let receipt = check_proof(req, &price).unwrap();
        let status = if seen.fetch_add(1, Ordering::SeqCst) < failures {
            502
        } else {
            200
        };
        Reply::new(status, "answer").header("payment-response", &encode_header(&receipt))
    })
}

#[tokio::test]
async fn a_5xx_after_paying_is_retried_with_a_new_proof() {
    let server = flaky(2);
    let client = client(Budget::unlimited().with_max_total(700, None));
    let response = client.get(&server.url("/llm")).await.unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.attempts, 3);
    assert_eq!(response.paid, Some(700));
    let nonces: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.header("payment-signature"))
        .map(|h| {
            x402_client::wire::decode_payment(h)
                .unwrap()
                .payload
                .payload
                .nonce
        })
        .collect();
    assert_eq!(nonces.len(), 3);
    assert!(nonces[0] != nonces[1] && nonces[1] != nonces[2] && nonces[0] != nonces[2]);
    // The voided attempts did not count against the total budget.
    assert_eq!(client.spent(), 700);
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_nothing_counts_as_spent() {
    let server = flaky(10);
    let client = client(Budget::unlimited());
    let response = client.get(&server.url("/llm")).await.unwrap();
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!((response.attempts, response.paid), (3, None));
    assert_eq!(paid_attempts(&server), 3);
    assert_eq!(client.spent(), 0);
}

#[tokio::test]
async fn a_lost_answer_without_an_operator_endpoint_is_never_paid_again() {
    let server = TestServer::start(|req| {
        if req.header("payment-signature").is_none() {
            challenge_reply(req, "payment_required", vec![requirement("300")])
        } else {
            Reply::new(0, "")
        }
    });
    let client = client(Budget::unlimited().with_max_total(1000, None));
    let err = client.get(&server.url("/a")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::PaymentOutcomeUnknown { .. }),
        "{err}"
    );
    assert_eq!(paid_attempts(&server), 1);
    // It may have been charged, so it stays counted.
    assert_eq!(client.spent(), 300);
}

/// Answers the unpaid probe with a challenge and the paid request with a chunked
/// `text/event-stream` whose second event is only written once the test has seen the
/// first (or after 10 s), so a client that buffers the body would see both at once.
fn sse_server(
    first_seen: std::sync::mpsc::Receiver<()>,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let second_sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = second_sent.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut paid = false;
            let mut target = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if target.is_empty() {
                    target = line.split(' ').nth(1).unwrap_or_default().to_owned();
                }
                paid |= line.to_ascii_lowercase().starts_with("payment-signature:");
            }
            if !paid {
                let host = format!("{addr}");
                let req = support::Recorded {
                    method: "GET".into(),
                    target: target.clone(),
                    headers: [("host".to_owned(), host)].into_iter().collect(),
                    body: Vec::new(),
                };
                let reply = challenge_reply(&req, "payment_required", vec![requirement("9")]);
                let mut out = format!(
                    "HTTP/1.1 402 X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    reply.body.len()
                );
                for (n, v) in &reply.headers {
                    out.push_str(&format!("{n}: {v}\r\n"));
                }
                out.push_str("\r\n");
                stream.write_all(out.as_bytes()).unwrap();
                stream.write_all(&reply.body).unwrap();
                continue;
            }
            let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(chunk("data: one\n\n").as_bytes()).unwrap();
            stream.flush().unwrap();
            let _ = first_seen.recv_timeout(Duration::from_secs(10));
            flag.store(true, Ordering::SeqCst);
            stream.write_all(chunk("data: two\n\n").as_bytes()).unwrap();
            stream.write_all(b"0\r\n\r\n").unwrap();
            stream.flush().unwrap();
        }
    });
    (addr, second_sent)
}

#[tokio::test]
async fn a_paid_event_stream_passes_through_as_it_arrives() {
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let (addr, second_sent) = sse_server(seen_rx);
    let client = client(Budget::unlimited());
    let mut response = client
        .request_streaming(
            reqwest::Method::GET,
            reqwest::Url::parse(&format!("http://{addr}/events")).unwrap(),
            reqwest::header::HeaderMap::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.attempts, 1);
    let first = response.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    assert!(
        !second_sent.load(Ordering::SeqCst),
        "the first event arrived only after the whole stream was written"
    );
    seen_tx.send(()).unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: two\n\n");
}
