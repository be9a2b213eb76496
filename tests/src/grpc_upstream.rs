//! The gRPC upstream behind Envoy: a small real tonic server of the `quotes.v1.Quotes`
//! service (`tests/proto/quotes/v1/quotes.proto`), over HTTP/2 cleartext.
//!
//! - `GetQuote`: one quote; symbol `FAIL` answers INTERNAL and `MISSING` NOT_FOUND,
//!   as trailers-only responses (the status in the response headers);
//! - `StreamQuotes`: `count` quotes, then for symbol `FAIL` INTERNAL in the trailers.
//!
//! It counts the calls it served, so a test can assert that an unpaid call never got
//! this far, and reports whether a payment header reached it (the filter strips them).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use x402_proto::wire::{HEADER_PAYMENT_SIGNATURE, HEADER_PAYMENT_SIGNATURE_ALIAS};

/// The generated `quotes.v1` types, client and server.
pub mod proto {
    tonic::include_proto!("quotes.v1");
}

use proto::quotes_server::{Quotes, QuotesServer};
use proto::{Quote, QuoteRequest};

/// The symbol that makes the upstream fail with INTERNAL.
pub const FAIL: &str = "FAIL";
/// The symbol that makes `GetQuote` answer NOT_FOUND.
pub const MISSING: &str = "MISSING";
/// Most quotes one `StreamQuotes` call sends.
const MAX_STREAM: u32 = 100;

#[derive(Debug, Default)]
struct Service {
    calls: Arc<AtomicUsize>,
}

fn quote(symbol: &str, saw_payment_header: bool) -> Quote {
    Quote {
        symbol: symbol.to_owned(),
        price_cents: 12_345,
        saw_payment_header,
    }
}

fn saw_payment_header<T>(request: &Request<T>) -> bool {
    let m = request.metadata();
    m.get(HEADER_PAYMENT_SIGNATURE).is_some() || m.get(HEADER_PAYMENT_SIGNATURE_ALIAS).is_some()
}

type QuoteStream = Pin<Box<dyn Stream<Item = Result<Quote, Status>> + Send>>;

#[tonic::async_trait]
impl Quotes for Service {
    async fn get_quote(&self, request: Request<QuoteRequest>) -> Result<Response<Quote>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let saw = saw_payment_header(&request);
        let symbol = request.into_inner().symbol;
        match symbol.as_str() {
            FAIL => Err(Status::internal("the quote engine failed")),
            MISSING => Err(Status::not_found("no such symbol")),
            _ => Ok(Response::new(quote(&symbol, saw))),
        }
    }

    type StreamQuotesStream = QuoteStream;

    async fn stream_quotes(
        &self,
        request: Request<QuoteRequest>,
    ) -> Result<Response<QuoteStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let saw = saw_payment_header(&request);
        let QuoteRequest { symbol, count } = request.into_inner();
        let mut items: Vec<Result<Quote, Status>> = (0..count.min(MAX_STREAM))
            .map(|_| Ok(quote(&symbol, saw)))
            .collect();
        if symbol == FAIL {
            items.push(Err(Status::internal("the quote feed broke off")));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// The running server; stopped on drop.
pub struct GrpcUpstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcUpstream {
    /// Starts on a free port of 127.0.0.1.
    pub fn start() -> Result<GrpcUpstream> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the gRPC upstream")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("x402-grpc-upstream")
            .build()
            .context("building the gRPC upstream runtime")?;
        let calls = Arc::new(AtomicUsize::new(0));
        let service = Service {
            calls: calls.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = {
            let _guard = runtime.enter();
            tokio_stream::wrappers::TcpListenerStream::new(tokio::net::TcpListener::from_std(
                listener,
            )?)
        };
        let thread = std::thread::Builder::new()
            .name("x402-grpc-upstream".into())
            .spawn(move || {
                let served = tonic::transport::Server::builder()
                    .add_service(QuotesServer::new(service))
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = rx.await;
                    });
                if let Err(e) = runtime.block_on(served) {
                    eprintln!("gRPC upstream stopped: {e}");
                }
            })?;
        Ok(GrpcUpstream {
            addr,
            calls,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Calls served so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
