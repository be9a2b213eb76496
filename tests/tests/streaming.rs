//! Streams billed as they pass: real Envoy with the filter, real settlement on real
//! PostgreSQL, the real upstream. A chunked body and a server-sent-events stream are
//! cut exactly where their hold is spent (the SSE one with a final event saying
//! why), the upstream sees its reader go away, and settlement captures exactly the
//! hold; WebSockets billed per message or per second are closed with a 1008 close
//! frame seen by a real WebSocket client, and capture what they used; a long
//! request billed per second is captured every second while it runs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::header::HeaderMap;
use reqwest::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use x402_client::{PayerKey, StreamingResponse};
use x402_e2e::stack::{unix_now, Stack, ASSET, MERCHANT, NETWORK};

const FUNDS: u64 = 10_000_000;

fn streaming_config() -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "network": NETWORK,
        "asset": ASSET,
        "asset_decimals": 6,
        "pay_to": MERCHANT,
        "routes": [
            // 5 KB at 0.001 per KB: a hold of 5000 atomic units.
            { "name": "chunks", "match": { "path_prefix": "/metered/chunks" },
              "pricing": { "per_kb": { "unit_price": "0.001", "max_units": 5 } } },
            // 5 events at 0.0001 per token: a hold of 500.
            { "name": "tokens", "match": { "path_prefix": "/metered/sse-tokens" },
              "pricing": { "per_token": { "unit_price": "0.0001", "max_units": 5, "tokens_from": "sse_events" } } },
            // 3 client messages at 0.001: a hold of 3000.
            { "name": "echo", "match": { "path_prefix": "/ws/echo" },
              "pricing": { "per_message": { "unit_price": "0.001", "max_units": 3, "count": "client" } } },
            // 3 seconds at 0.001 per second: a hold of 3000.
            { "name": "timed", "match": { "path_prefix": "/ws/timed" },
              "pricing": { "per_second": { "unit_price": "0.001", "max_units": 3 } } },
            // 60 seconds at 0.001 per second (a hold of 60000), captured every second.
            { "name": "long", "match": { "path_prefix": "/metered/drip" },
              "pricing": { "per_second": { "unit_price": "0.001", "max_units": 60 } },
              "capture_every_seconds": 1 }
        ]
    })
    .to_string()
}

/// Reads a streamed body to its end; `true` when it ended by a reset, not cleanly.
async fn read_all(response: &mut StreamingResponse) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), response.chunk()).await {
            Ok(Ok(Some(bytes))) => body.extend_from_slice(&bytes),
            Ok(Ok(None)) => return (body, false),
            Ok(Err(_)) => return (body, true),
            Err(_) => panic!("the stream neither ended nor was cut within 30 s"),
        }
    }
}

async fn stream(stack: &Stack, key: &PayerKey, path: &str) -> StreamingResponse {
    let response = stack
        .client(key)
        .unwrap()
        .request_streaming(
            Method::GET,
            stack.parsed_url(path).unwrap(),
            HeaderMap::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status.as_u16(), 200, "{path}");
    response
}

async fn assert_captured(stack: &Stack, transaction: &str, held: u64, captured: u64) {
    let payment = stack.settlement.payment(transaction).await.unwrap();
    assert_eq!(payment.held, held, "{transaction}");
    assert_eq!(payment.captured, captured, "{transaction}");
    assert_eq!(payment.status, "captured", "{transaction}");
}

/// Waits (bounded) until the upstream notes that the reader of `path` went away.
async fn wait_cancelled(stack: &Stack, path: &str) -> usize {
    for _ in 0..200 {
        if let Some((_, sent)) = stack
            .upstream
            .served()
            .cancelled()
            .into_iter()
            .find(|(p, _)| p == path)
        {
            return sent;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream kept streaming {path} after the cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_cut_exactly_at_the_hold_and_capture_the_hold() {
    let stack = Stack::start(&streaming_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let mut balance = FUNDS;

    // A chunked body of 100 × 1000 bytes, paid for 5 KB: exactly 5000 bytes arrive.
    let path = "/metered/chunks?n=100&size=1000";
    let mut response = stream(&stack, &key, path).await;
    let receipt = response.receipt.clone().expect("a receipt");
    assert_eq!(receipt.amount, "5000", "the receipt carries the hold");
    let (body, _) = read_all(&mut response).await;
    assert_eq!(body.len(), 5000, "exactly the paid bytes");
    assert!(body.iter().all(|b| *b == b'c'));
    let sent = wait_cancelled(&stack, path).await;
    assert!(sent < 100, "the upstream stopped after {sent} chunks");
    balance -= 5000;
    stack
        .wait_for_settled_balance(&account, i64::try_from(balance).unwrap())
        .await
        .unwrap();
    assert_captured(&stack, &receipt.transaction, 5000, 5000).await;

    // An SSE stream of 30 one-token events, paid for 5: five events, then the final
    // event saying why the stream ends.
    let path = "/metered/sse-tokens?n=30";
    let mut response = stream(&stack, &key, path).await;
    let receipt = response.receipt.clone().expect("a receipt");
    assert_eq!(receipt.amount, "500");
    let (body, _) = read_all(&mut response).await;
    let text = String::from_utf8(body).unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert_eq!(
        events.len(),
        6,
        "five paid events and the final one: {text}"
    );
    for (i, event) in events[..5].iter().enumerate() {
        assert!(event.contains(&format!("\"t{i} \"")), "{event}");
    }
    let last = events[5];
    assert!(
        last.starts_with("event: x402-budget-exhausted\ndata: "),
        "{last}"
    );
    let data: serde_json::Value =
        serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(data["error"], "budget_exhausted");
    assert_eq!(data["transaction"], receipt.transaction.as_str());
    assert_eq!(data["amount"], "500");
    wait_cancelled(&stack, path).await;
    balance -= 500;
    stack
        .wait_for_settled_balance(&account, i64::try_from(balance).unwrap())
        .await
        .unwrap();
    assert_captured(&stack, &receipt.transaction, 500, 500).await;

    // Within its budget a stream passes untouched and pays what it used.
    let path = "/metered/sse-tokens?n=3";
    let mut response = stream(&stack, &key, path).await;
    let receipt = response.receipt.clone().expect("a receipt");
    let (body, reset) = read_all(&mut response).await;
    let text = String::from_utf8(body).unwrap();
    assert!(!reset, "a stream within budget ends cleanly");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("x402-budget-exhausted"));
    balance -= 300;
    stack
        .wait_for_settled_balance(&account, i64::try_from(balance).unwrap())
        .await
        .unwrap();
    assert_captured(&stack, &receipt.transaction, 500, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_billed_per_second_is_captured_while_it_runs() {
    let stack = Stack::start(&streaming_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();

    // Six lines a second apart: at least six seconds of upstream time.
    let path = "/metered/drip?n=6&ms=1000";
    let mut response = stream(&stack, &key, path).await;
    let receipt = response.receipt.clone().expect("a receipt");
    assert_eq!(receipt.amount, "60000", "the receipt carries the hold");

    // While the response is still streaming, settlement already holds a partial
    // capture of the time used so far, and the hold is still open.
    let mut body = Vec::new();
    let mut seen_partial = None;
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(30), response.chunk())
            .await
            .expect("the stream went silent for 30 s")
            .expect("the stream was cut");
        let Some(bytes) = chunk else { break };
        body.extend_from_slice(&bytes);
        if seen_partial.is_none() {
            let payment = stack
                .settlement
                .payment(&receipt.transaction)
                .await
                .unwrap();
            if payment.captured > 0 {
                assert_eq!(
                    payment.status, "held",
                    "partial captures keep the hold open"
                );
                seen_partial = Some(payment.captured);
            }
        }
    }
    assert_eq!(body, b"tick\n".repeat(6), "the whole response arrives");
    let partial = seen_partial.expect("a capture landed before the response ended");
    assert!(
        partial >= 1_000,
        "at least a second was captured, not {partial}"
    );

    // The final capture is the cost of the whole request: at least the six seconds
    // the upstream took, no less than the partial captures, within the hold; the
    // payer pays it once, not the partials on top.
    let mut payment = stack
        .settlement
        .payment(&receipt.transaction)
        .await
        .unwrap();
    for _ in 0..200 {
        if payment.status != "held" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        payment = stack
            .settlement
            .payment(&receipt.transaction)
            .await
            .unwrap();
    }
    assert_eq!(payment.status, "captured");
    let captured = payment.captured;
    assert!(
        captured >= 6_000,
        "six seconds cost at least 6000, captured {captured}"
    );
    assert!(
        captured >= partial && captured < 60_000,
        "{captured} vs {partial}"
    );
    assert_eq!(payment.held, 60_000);
    stack
        .wait_for_settled_balance(&account, i64::try_from(FUNDS - captured).unwrap())
        .await
        .unwrap();

    // In the ledger: partial capture rows before the final one, which accounts for
    // them; every invariant holds.
    let pool = sqlx::PgPool::connect(stack.settlement.database_url())
        .await
        .unwrap();
    let (parts, parts_total): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(amount), 0)::bigint FROM transfers \
         WHERE pending_id = $1 AND kind = 'partial_capture'",
    )
    .bind(&receipt.transaction)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(parts >= 1, "no partial capture rows");
    let (total, before): (i64, Option<i64>) = sqlx::query_as(
        "SELECT amount, captured_before FROM transfers WHERE pending_id = $1 AND kind = 'capture'",
    )
    .bind(&receipt.transaction)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(u64::try_from(total).unwrap(), captured);
    assert_eq!(
        before,
        Some(parts_total),
        "the final capture posts only the rest"
    );
    let report = x402_settlement::check::check_ledger(
        &pool,
        x402_settlement::check::CheckOptions::default(),
    )
    .await
    .unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `path` through Envoy, paying `offer`; returns it and the receipt.
async fn connect_paid(
    stack: &Stack,
    key: &PayerKey,
    path: &str,
    offer: &x402_client::wire::PaymentRequirements,
) -> (Socket, x402_client::wire::SettleResponse) {
    let url = stack.parsed_url(path).unwrap();
    let resource = x402_client::resource_for("GET", &url).unwrap();
    let proof = x402_client::sign_payment(
        key,
        offer,
        &resource,
        &x402_client::random_nonce_hex(),
        unix_now() + 30,
    )
    .unwrap();
    let ws_url = stack.url(path).replacen("http://", "ws://", 1);
    let mut request = ws_url.into_client_request().unwrap();
    request.headers_mut().insert(
        x402_client::wire::HEADER_PAYMENT_SIGNATURE,
        x402_client::wire::encode_header(&proof).parse().unwrap(),
    );
    let (ws, upgrade) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the upgrade within 30 s")
    .unwrap();
    assert_eq!(upgrade.status().as_u16(), 101);
    let receipt = x402_client::parse_receipt(upgrade.headers()).expect("a receipt");
    (ws, receipt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_billed_per_message_and_closed_when_the_hold_is_spent() {
    let stack = Stack::start(&streaming_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();

    // The route answers an unpaid upgrade with a challenge for the maximum.
    let unpaid = stack.send_unpaid("GET", "/ws/echo").await.unwrap();
    assert_eq!(unpaid.status, 402);
    let challenge = unpaid.challenge().expect("a challenge");
    let offer = &challenge.accepts[0];
    assert_eq!(offer.scheme, "upto");
    assert_eq!(offer.amount, "3000");
    assert_eq!(offer.extra["unit"], "message");

    let (mut ws, receipt) = connect_paid(&stack, &key, "/ws/echo", offer).await;
    assert_eq!(receipt.amount, "3000");

    // Three paid messages, each echoed.
    for i in 0..3 {
        let text = format!("message {i}");
        ws.send(Message::Text(text.clone())).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an echo within 30 s")
            .expect("the connection is open")
            .unwrap();
        assert_eq!(echo, Message::Text(text));
    }
    // The fourth is over the hold: the client gets a close frame, not an echo.
    ws.send(Message::Text("message 3".into())).await.unwrap();
    let close = match tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("an answer within 30 s")
    {
        Some(Ok(Message::Close(frame))) => frame,
        Some(Ok(other)) => panic!("expected the close frame, got {other:?}"),
        Some(Err(e)) => panic!("the connection failed before the close frame: {e}"),
        None => panic!("the connection ended without a close frame"),
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Policy, "1008");
    assert_eq!(close.reason, "payment exhausted");
    // The upstream was told too, and never saw the unpaid message.
    assert!(stack
        .upstream
        .served()
        .ws_closes()
        .contains(&(1008, "payment exhausted".to_owned())));

    stack
        .wait_for_settled_balance(&account, i64::try_from(FUNDS - 3000).unwrap())
        .await
        .unwrap();
    assert_captured(&stack, &receipt.transaction, 3000, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_billed_per_second_is_closed_when_its_time_is_spent() {
    let stack = Stack::start(&streaming_config()).await.unwrap();
    let (account, key) = stack.new_payer(FUNDS).await.unwrap();
    let challenge = stack
        .send_unpaid("GET", "/ws/timed")
        .await
        .unwrap()
        .challenge()
        .expect("a challenge");
    let offer = &challenge.accepts[0];
    assert_eq!(offer.amount, "3000");
    assert_eq!(offer.extra["unit"], "second");
    let (mut ws, receipt) = connect_paid(&stack, &key, "/ws/timed", offer).await;

    // Talk until the 3 paid seconds are over: the answer is then the close frame.
    let mut echoed = 0;
    let mut close = None;
    for i in 0..200 {
        ws.send(Message::Text(format!("tick {i}"))).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer within 30 s")
        {
            Some(Ok(Message::Text(text))) => {
                assert_eq!(text, format!("tick {i}"));
                echoed += 1;
            }
            Some(Ok(Message::Close(frame))) => {
                close = frame;
                break;
            }
            other => panic!("expected an echo or the close frame, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(echoed > 0, "messages within the paid time are echoed");
    let close = close.expect("a close frame once the time is spent");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason, "payment exhausted");

    stack
        .wait_for_settled_balance(&account, i64::try_from(FUNDS - 3000).unwrap())
        .await
        .unwrap();
    assert_captured(&stack, &receipt.transaction, 3000, 3000).await;
}
