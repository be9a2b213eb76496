//! The HTTP upstream behind Envoy: a small real hyper server.
//!
//! - `/status/NNN` answers with status NNN (and a JSON body), so tests can make the
//!   upstream fail;
//! - `/flaky/N/...` answers 503 to the first N requests of one exact target, then 200
//!   like the echo, so a client's retry after an upstream failure can be tested;
//! - everything else (`/paid/...`, `/free/...`, `/named/...`) answers 200 with a JSON
//!   echo of the request: method, path, query, body size and whether any payment header
//!   reached it (the filter must strip them).
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
}

impl Served {
    fn record(&self, line: String) {
        if let Ok(mut requests) = self.requests.lock() {
            requests.push(line);
        }
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
    let payment_header_seen = request.headers().contains_key(HEADER_PAYMENT_SIGNATURE)
        || request
            .headers()
            .contains_key(HEADER_PAYMENT_SIGNATURE_ALIAS);
    let body_bytes = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => 0,
    };
    served.record(format!("{method} {target}"));
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
            let service = service_fn(move |request| answer(request, served.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
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
