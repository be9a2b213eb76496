//! The HTTP upstream behind Envoy: a small real hyper server.
//!
//! - `/status/NNN` answers with status NNN (and a JSON body), so tests can make the
//!   upstream fail;
//! - `/flaky/N/...` answers 503 to the first N requests of one exact target, then 200
//!   like the echo, so a client's retry after an upstream failure can be tested;
//! - `/metered/...` answers what metered prices read (see [`metered`]): usage headers,
//!   OpenAI-style usage JSON, SSE streams ending with a usage event, large bodies sent
//!   in many chunks, JSON arrays of items, slow answers, long streams that note when
//!   the reader went away;
//! - `/ws/...` accepts a WebSocket upgrade and echoes every message, noting the close
//!   code it received;
//! - everything else (`/paid/...`, `/free/...`, `/named/...`) answers 200 with a JSON
//!   echo of the request: method, path, query, body size and whether any payment header
//!   reached it (the filter must strip them); `delay_ms=N` in the query (at most 10 s)
//!   holds the answer that long.
//!
//! It records every request it served, so a test can assert that an unpaid request to
//! a priced route never got this far.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use x402_proto::wire::{HEADER_PAYMENT_SIGNATURE, HEADER_PAYMENT_SIGNATURE_ALIAS};

/// What the upstream has served, shared with the test.
#[derive(Debug, Default)]
pub struct Served {
    /// `METHOD path?query` of each request, in arrival order.
    requests: Mutex<Vec<String>>,
    /// The same for every request whose headers arrived, served or not (a request
    /// reset before its body was complete is in here only).
    arrived: Mutex<Vec<String>>,
    /// Streams whose reader went away before the upstream finished: `path?query`
    /// and how many chunks had been handed over.
    cancelled: Mutex<Vec<(String, usize)>>,
    /// Close frames the WebSocket echo received: code and reason.
    ws_closes: Mutex<Vec<(u16, String)>>,
}

impl Served {
    fn record(&self, line: String) {
        if let Ok(mut requests) = self.requests.lock() {
            requests.push(line);
        }
    }

    /// `METHOD path?query` of every request whose headers reached the upstream.
    pub fn arrived(&self) -> Vec<String> {
        self.arrived.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many served requests had a path starting with `prefix`.
    pub fn count_path_prefix(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|line| {
                line.split_once(' ')
                    .is_some_and(|(_, target)| target.starts_with(prefix))
            })
            .count()
    }

    pub fn total(&self) -> usize {
        self.requests().len()
    }

    /// Streams that stopped because the reader went away, with the chunks sent.
    pub fn cancelled(&self) -> Vec<(String, usize)> {
        self.cancelled.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Close frames (code, reason) the WebSocket echo received.
    pub fn ws_closes(&self) -> Vec<(u16, String)> {
        self.ws_closes.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn answer(
    request: Request<Incoming>,
    served: Arc<Served>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let target = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    if let Ok(mut arrived) = served.arrived.lock() {
        arrived.push(format!("{method} {target}"));
    }
    let payment_header_seen = request.headers().contains_key(HEADER_PAYMENT_SIGNATURE)
        || request
            .headers()
            .contains_key(HEADER_PAYMENT_SIGNATURE_ALIAS);
    let Ok(body) = request.into_body().collect().await else {
        // Reset before its body was complete: arrived, not served.
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "incomplete body" }),
        ));
    };
    let body_bytes = body.to_bytes().len();
    served.record(format!("{method} {target}"));
    let delay_ms = query_number(&query, "delay_ms").min(10_000);
    if delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
    }
    if let Some(rest) = path.strip_prefix("/flaky/") {
        // `/flaky/N/...`: 503 for the first N requests of this exact target, then 200.
        let failures: usize = rest
            .split('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let seen = served
            .requests()
            .iter()
            .filter(|r| **r == format!("{method} {target}"))
            .count();
        if seen <= failures {
            return Ok(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "error": "flaky", "attempt": seen }),
            ));
        }
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok());
        return Ok(match status {
            Some(status) => {
                json_response(status, &serde_json::json!({ "status": status.as_u16() }))
            }
            None => json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": "bad status code" }),
            ),
        });
    }
    let mut echo = serde_json::json!({
        "ok": true,
        "method": method,
        "path": path,
        "query": query,
        "body_bytes": body_bytes,
        "payment_header_seen": payment_header_seen,
    });
    if path.starts_with("/paid/quote") {
        // Something worth paying for in the demo; prices as decimal strings, never floats.
        let symbol = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("sym="))
            .filter(|s| {
                !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .unwrap_or("ABC");
        echo["quote"] = serde_json::json!({ "symbol": symbol, "bid": "101.25", "ask": "101.27", "currency": "USD" });
    }
    Ok(json_response(StatusCode::OK, &echo))
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, served: Arc<Served>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            // Out of file descriptors or a connection reset before accept: keep serving.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let served = served.clone();
                async move {
                    if request.uri().path().starts_with("/metered/") {
                        return Ok::<_, Infallible>(metered(request, &served).await);
                    }
                    if request.uri().path().starts_with("/ws/") {
                        return Ok(websocket_echo(request, served));
                    }
                    let Ok(response) = answer(request, served).await;
                    Ok(response.map(UpstreamBody::Full))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// The upstream running on its own thread and tokio runtime, so it outlives any one
/// test's runtime and is independent of the test's scheduling. Stopped on drop.
pub struct Upstream {
    addr: SocketAddr,
    served: Arc<Served>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Starts on a free port of 127.0.0.1.
    pub fn start() -> Result<Upstream> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the upstream")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("x402-upstream")
            .build()
            .context("building the upstream runtime")?;
        let served = Arc::new(Served::default());
        let (tx, rx) = oneshot::channel::<()>();
        let for_server = served.clone();
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let thread = std::thread::Builder::new()
            .name("x402-upstream".into())
            .spawn(move || {
                runtime.block_on(serve(listener, for_server, async move {
                    let _ = rx.await;
                }));
            })?;
        Ok(Upstream {
            addr,
            served,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn served(&self) -> &Served {
        &self.served
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A response body that is either complete or streamed chunk by chunk, so tests see
/// responses that reach Envoy in several pieces.
pub enum UpstreamBody {
    Full(Full<Bytes>),
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            UpstreamBody::Full(full) => std::pin::Pin::new(full).poll_frame(cx),
            UpstreamBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|bytes| Ok(hyper::body::Frame::data(bytes)))),
        }
    }
}

fn query_number(query: &str, name: &str) -> u64 {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn streamed(content_type: &'static str, chunks: Vec<Bytes>, gap_ms: u64) -> Response<UpstreamBody> {
    streamed_noting(content_type, chunks, gap_ms, None)
}

/// Streams `chunks`; when the reader goes away first, notes it in `cancelled`.
fn streamed_noting(
    content_type: &'static str,
    chunks: Vec<Bytes>,
    gap_ms: u64,
    cancelled: Option<(Arc<Served>, String)>,
) -> Response<UpstreamBody> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for (sent, chunk) in chunks.into_iter().enumerate() {
            if gap_ms > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(gap_ms)).await;
            }
            if tx.send(chunk).await.is_err() {
                if let Some((served, target)) = cancelled {
                    if let Ok(mut c) = served.cancelled.lock() {
                        c.push((target, sent));
                    }
                }
                return;
            }
        }
    });
    let mut response = Response::new(UpstreamBody::Stream(rx));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// The metered endpoints; `n` in the query is the usage each reports:
///
/// - `/metered/tokens/header?n=N`: JSON, with `x-usage-tokens: N`;
/// - `/metered/tokens/json?n=N`: OpenAI-style `{"usage": {"completion_tokens": N, ..}}`;
/// - `/metered/sse?n=N`: an SSE stream of a few deltas, then a `usage` event with N
///   completion tokens and `[DONE]`, each event its own chunk;
/// - `/metered/openai/json?n=N` and `/metered/openai/sse?n=N`: the two above, as an
///   OpenAI-style API answers without and with `"stream": true`;
/// - `/metered/bytes?n=N`: N bytes of body in 16 KiB chunks;
/// - `/metered/items?n=N`: `{"objects": [N items]}`;
/// - `/metered/slow?ms=M`: answers after M milliseconds;
/// - `/metered/chunks?n=N&size=S`: N chunks of S bytes, 20 ms apart;
/// - `/metered/sse-tokens?n=N`: N one-token SSE events, 20 ms apart, then `[DONE]`;
/// - `/metered/drip?n=N&ms=M`: N lines of `tick`, M milliseconds apart (a long request).
///
/// The last two note in [`Served::cancelled`] when the reader goes away early.
pub async fn metered(request: Request<Incoming>, served: &Arc<Served>) -> Response<UpstreamBody> {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    served.record(format!("{} {path}?{query}", request.method()));
    let _ = request.into_body().collect().await;
    let n = query_number(&query, "n");
    let full = |r: Response<Full<Bytes>>| r.map(UpstreamBody::Full);
    match path.as_str() {
        "/metered/tokens/header" => {
            let mut response = full(json_response(
                StatusCode::OK,
                &serde_json::json!({ "text": "hello" }),
            ));
            if let Ok(value) = hyper::header::HeaderValue::from_str(&n.to_string()) {
                response.headers_mut().insert("x-usage-tokens", value);
            }
            response
        }
        "/metered/tokens/json" | "/metered/openai/json" => full(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "choices": [{"message": {"content": "hello"}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": n + 11}
            }),
        )),
        "/metered/sse" | "/metered/openai/sse" => {
            let mut events: Vec<Bytes> = ["Hel", "lo", "!"]
                .iter()
                .map(|delta| {
                    Bytes::from(format!(
                        "data: {}\n\n",
                        serde_json::json!({"choices": [{"delta": {"content": delta}}]})
                    ))
                })
                .collect();
            events.push(Bytes::from(format!(
                "data: {}\n\n",
                serde_json::json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n}})
            )));
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            streamed("text/event-stream", events, 20)
        }
        "/metered/bytes" => {
            let total = usize::try_from(n).unwrap_or(0);
            let chunks = (0..total)
                .step_by(16 * 1024)
                .map(|start| Bytes::from(vec![b'x'; (total - start).min(16 * 1024)]))
                .collect();
            streamed("application/octet-stream", chunks, 1)
        }
        "/metered/items" => full(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "objects": (0..n).map(|i| serde_json::json!({"id": i, "label": "cat"})).collect::<Vec<_>>()
            }),
        )),
        "/metered/chunks" => {
            let size = usize::try_from(query_number(&query, "size")).unwrap_or(0);
            let chunks = (0..n).map(|_| Bytes::from(vec![b'c'; size])).collect();
            let note = Some((served.clone(), format!("{path}?{query}")));
            streamed_noting("application/octet-stream", chunks, 20, note)
        }
        "/metered/sse-tokens" => {
            let mut events: Vec<Bytes> = (0..n)
                .map(|i| {
                    Bytes::from(format!(
                        "data: {}\n\n",
                        serde_json::json!({"choices": [{"delta": {"content": format!("t{i} ")}}]})
                    ))
                })
                .collect();
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            let note = Some((served.clone(), format!("{path}?{query}")));
            streamed_noting("text/event-stream", events, 20, note)
        }
        "/metered/drip" => {
            let lines = (0..n).map(|_| Bytes::from_static(b"tick\n")).collect();
            let note = Some((served.clone(), format!("{path}?{query}")));
            streamed_noting("text/plain", lines, query_number(&query, "ms"), note)
        }
        "/metered/slow" => {
            tokio::time::sleep(std::time::Duration::from_millis(query_number(&query, "ms"))).await;
            full(json_response(
                StatusCode::OK,
                &serde_json::json!({ "ok": true }),
            ))
        }
        _ => full(json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": "no such metered endpoint" }),
        )),
    }
}

/// Accepts a WebSocket upgrade and echoes text and binary messages until the
/// connection closes; close frames received are noted.
fn websocket_echo(request: Request<Incoming>, served: Arc<Served>) -> Response<UpstreamBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};

    served.record(format!("{} {}", request.method(), request.uri().path()));
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "not a WebSocket upgrade" }),
        )
        .map(UpstreamBody::Full);
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(request).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(frame) = &message {
                let noted = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                if let Ok(mut c) = served.ws_closes.lock() {
                    c.push(noted);
                }
                // tungstenite answers the close on the next flush.
                let _ = ws.flush().await;
                continue;
            }
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(UpstreamBody::Full(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(value) = hyper::header::HeaderValue::from_str(&accept) {
        headers.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn echoes_answers_chosen_statuses_and_counts_what_it_served() {
        let upstream = Upstream::start().unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let base = format!("http://127.0.0.1:{}", upstream.port());

        let echo = http
            .post(format!("{base}/paid/quote?sym=ABC"))
            .header(HEADER_PAYMENT_SIGNATURE, "x")
            .body("12345")
            .send()
            .await
            .unwrap();
        assert_eq!(echo.status().as_u16(), 200);
        let json: serde_json::Value = echo.json().await.unwrap();
        assert_eq!(json["method"], "POST");
        assert_eq!(json["path"], "/paid/quote");
        assert_eq!(json["query"], "sym=ABC");
        assert_eq!(json["body_bytes"], 5);
        assert_eq!(json["payment_header_seen"], true);
        assert_eq!(json["quote"]["symbol"], "ABC");

        assert_eq!(
            http.get(format!("{base}/status/503"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            503
        );
        assert_eq!(
            http.get(format!("{base}/status/abc"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            400
        );

        assert_eq!(upstream.served().total(), 3);
        assert_eq!(upstream.served().count_path_prefix("/status/"), 2);
        assert_eq!(upstream.served().count_path_prefix("/paid"), 1);
        assert_eq!(upstream.served().requests()[0], "POST /paid/quote?sym=ABC");
    }
}
