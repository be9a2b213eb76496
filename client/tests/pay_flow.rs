//! The request/pay/retry flow against an in-process resource server on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use reqwest::header::{HeaderMap, HeaderValue, HOST};
use reqwest::{Method, StatusCode, Url};
use support::{challenge_reply, error_reply, paywall, requirement, Reply, TestServer};
use x402_client::{Budget, Client, ClientError, PayerKey};

fn client(budget: Budget) -> (Client, PayerKey) {
    let key = PayerKey::generate();
    (Client::new(key.clone(), budget).unwrap(), key)
}

fn url(s: &str) -> Url {
    Url::parse(s).unwrap()
}

#[tokio::test]
async fn a_402_is_paid_once_and_the_receipt_returned() {
    let server = paywall("10000");
    let (client, key) = client(Budget::max_per_request(10_000));
    let response = client
        .request(
            Method::GET,
            url(&server.url("/paid/quote?sym=ABC")),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap();

    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.body, b"paid content for GET /paid/quote?sym=ABC");
    let receipt = response.receipt.clone().unwrap();
    assert!(receipt.success);
    assert_eq!(receipt.transaction, "tx-test-1");
    assert_eq!(receipt.payer, key.public_key_hex());
    assert_eq!(response.paid, Some(10_000));
    let payment = response.payment.clone().unwrap();
    assert_eq!(
        payment.payload.resource,
        format!("GET {}/paid/quote?sym=ABC", server.addr)
    );
    assert_eq!(response.error_code(), None);

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].header("payment-signature"), None);
    assert!(requests[1].header("payment-signature").is_some());
}

#[tokio::test]
async fn each_payment_uses_a_fresh_nonce() {
    let server = paywall("10000");
    let (client, _) = client(Budget::unlimited());
    let mut nonces = Vec::new();
    for _ in 0..2 {
        let r = client
            .request(
                Method::GET,
                url(&server.url("/paid")),
                HeaderMap::new(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        nonces.push(r.payment.unwrap().payload.nonce);
    }
    assert_ne!(nonces[0], nonces[1]);
}

#[tokio::test]
async fn a_body_and_method_are_sent_again_with_the_proof() {
    let server = paywall("250");
    let (client, _) = client(Budget::unlimited());
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let response = client
        .request(
            Method::POST,
            url(&server.url("/x")),
            headers,
            Some(br#"{"q":1}"#.to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{:?}",
        response.error_code()
    );
    assert_eq!(response.paid, Some(250));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.method, "POST");
        assert_eq!(r.body, br#"{"q":1}"#);
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
}

#[tokio::test]
async fn an_explicit_host_header_is_what_the_proof_binds() {
    let server = paywall("10000");
    let (client, _) = client(Budget::unlimited());
    let mut headers = HeaderMap::new();
    headers.insert(HOST, HeaderValue::from_static("api.example.com"));
    let response = client
        .request(Method::GET, url(&server.url("/paid")), headers, None)
        .await
        .unwrap();
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{:?}",
        response.error_code()
    );
    assert_eq!(
        response.payment.unwrap().payload.resource,
        "GET api.example.com/paid"
    );
    assert_eq!(server.requests()[1].header("host"), Some("api.example.com"));
}

#[tokio::test]
async fn over_budget_fails_without_paying() {
    let server = paywall("10000");
    let (client, _) = client(Budget::max_per_request(9_999));
    let err = client
        .request(
            Method::GET,
            url(&server.url("/paid")),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap_err();
    match err {
        ClientError::OverBudget { amount, max, .. } => assert_eq!((amount, max), (10_000, 9_999)),
        other => panic!("{other}"),
    }
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("payment-signature"), None);
}

#[tokio::test]
async fn an_unpriced_answer_is_returned_untouched() {
    let server = TestServer::start(|_| Reply::new(200, "free").header("x-up", "1"));
    let (client, _) = client(Budget::max_per_request(0));
    let response = client
        .request(
            Method::GET,
            url(&server.url("/free")),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, b"free");
    assert_eq!(response.headers.get("x-up").unwrap(), "1");
    assert!(response.receipt.is_none() && response.paid.is_none() && response.payment.is_none());
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_refused_payment_is_returned_after_one_retry() {
    let server = TestServer::start(|req| {
        let code = if req.header("payment-signature").is_some() {
            "insufficient_funds"
        } else {
            "payment_required"
        };
        challenge_reply(req, code, vec![requirement("10000")])
    });
    let (client, _) = client(Budget::unlimited());
    let response = client
        .request(
            Method::GET,
            url(&server.url("/paid")),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(response.error_code().as_deref(), Some("insufficient_funds"));
    assert!(response.payment.is_some());
    assert_eq!(response.paid, None);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn error_bodies_give_their_reason() {
    let server = TestServer::start(|req| {
        if req.header("payment-signature").is_some() {
            error_reply(503, "settlement_unavailable", "settlement did not answer")
        } else {
            challenge_reply(req, "payment_required", vec![requirement("1")])
        }
    });
    let (client, _) = client(Budget::unlimited());
    let response = client
        .request(
            Method::GET,
            url(&server.url("/paid")),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.error_code().as_deref(),
        Some("settlement_unavailable")
    );
}

#[tokio::test]
async fn a_402_without_a_challenge_is_an_error() {
    let server = TestServer::start(|_| Reply::new(402, "pay me"));
    let (client, _) = client(Budget::unlimited());
    let err = client
        .request(
            Method::GET,
            url(&server.url("/paid")),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::BadChallenge(_)), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_challenge_in_the_body_only_is_enough() {
    let server = TestServer::start(|req| {
        if req.header("payment-signature").is_some() {
            return Reply::new(200, "ok");
        }
        let mut reply = challenge_reply(req, "payment_required", vec![requirement("5")]);
        reply.headers.retain(|(name, _)| name != "payment-required");
        reply
    });
    let (client, _) = client(Budget::unlimited());
    let response = client
        .request(Method::GET, url(&server.url("/p")), HeaderMap::new(), None)
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.payment.unwrap().accepted.amount, "5");
}
