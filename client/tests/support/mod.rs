//! A tiny HTTP/1.1 server on 127.0.0.1:0 that plays a 402x resource server: it answers
//! unpaid requests with a challenge and checks the proof on the retry. It stands in for
//! the gateway only in this crate's own tests; the end-to-end suite uses real Envoy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x402_proto::signing::{resource_string, verify_hex};
use x402_proto::wire::{
    decode_payment, encode_header, ErrorBody, PaymentRequired, PaymentRequirements, ResourceInfo,
    SettleResponse,
};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    /// Lower-cased names; a repeated header keeps its last value.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

pub struct TestServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let requests = requests.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Errors of one connection (a client that went away) end only it.
                    let _ = serve_connection(stream, &*handler, &requests);
                }
            })
        };
        Self {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_connection(
    stream: TcpStream,
    handler: &Handler,
    requests: &Mutex<Vec<Recorded>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(());
    }
    let mut parts = request_line.trim_end().splitn(3, ' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let recorded = Recorded {
        method,
        target,
        headers,
        body,
    };
    requests.lock().unwrap().push(recorded.clone());
    let reply = handler(&recorded);
    if reply.status == 0 {
        // Status 0: the connection drops without an answer, like a network failure.
        return Ok(());
    }

    let mut out = format!(
        "HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut stream = stream;
    stream.write_all(out.as_bytes())?;
    stream.write_all(&reply.body)?;
    stream.flush()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn requirement(amount: &str) -> PaymentRequirements {
    PaymentRequirements {
        scheme: "exact".into(),
        network: "402x:local".into(),
        amount: amount.into(),
        asset: "USD".into(),
        pay_to: "merchant-demo".into(),
        max_timeout_seconds: 60,
        extra: serde_json::json!({"decimals": 6, "name": "USD"})
            .as_object()
            .cloned()
            .unwrap(),
    }
}

pub fn challenge_reply(req: &Recorded, error: &str, accepts: Vec<PaymentRequirements>) -> Reply {
    let challenge = PaymentRequired {
        x402_version: 2,
        error: Some(error.into()),
        resource: ResourceInfo {
            url: format!(
                "http://{}{}",
                req.header("host").unwrap_or_default(),
                req.target
            ),
            description: String::new(),
            mime_type: String::new(),
        },
        accepts,
        price: Some("0.01".into()),
        payment_address: Some("merchant-demo".into()),
        free_remaining: None,
    };
    Reply::new(402, serde_json::to_vec(&challenge).unwrap())
        .header("content-type", "application/json")
        .header("payment-required", &encode_header(&challenge))
}

pub fn error_reply(status: u16, error: &str, message: &str) -> Reply {
    let body = ErrorBody {
        error: error.into(),
        message: message.into(),
    };
    Reply::new(status, serde_json::to_vec(&body).unwrap())
        .header("content-type", "application/json")
}

/// What a gateway checks of a proof, stateless plus the signature; `Err` names the
/// first problem as an x402 error code.
pub fn check_proof(
    req: &Recorded,
    price: &PaymentRequirements,
) -> Result<SettleResponse, &'static str> {
    let header = req.header("payment-signature").ok_or("payment_required")?;
    let checked = decode_payment(header).map_err(|_| "malformed_payment")?;
    let p = &checked.payload;
    if p.accepted != *price {
        return Err("wrong_requirements");
    }
    let host = req.header("host").ok_or("no_host")?;
    if p.payload.resource != resource_string(&req.method, host, &req.target) {
        return Err("wrong_resource");
    }
    let now = now();
    if checked.valid_before <= now {
        return Err("expired");
    }
    if checked.valid_before > now + price.max_timeout_seconds + 5 {
        return Err("validity_too_long");
    }
    verify_hex(
        &p.payload.payer,
        &p.payload.signature,
        &checked.signed_fields(),
    )
    .map_err(|_| "invalid_signature")?;
    Ok(SettleResponse {
        success: true,
        transaction: "tx-test-1".into(),
        network: p.accepted.network.clone(),
        payer: p.payload.payer.clone(),
        amount: p.accepted.amount.clone(),
        error_reason: None,
    })
}

/// A resource server selling every path for `amount` USD atomic units.
pub fn paywall(amount: &'static str) -> TestServer {
    TestServer::start(move |req| {
        let price = requirement(amount);
        if req.header("payment-signature").is_none() {
            return challenge_reply(req, "payment_required", vec![price]);
        }
        match check_proof(req, &price) {
            Ok(receipt) => Reply::new(
                200,
                format!("paid content for {} {}", req.method, req.target),
            )
            .header("payment-response", &encode_header(&receipt)),
            Err(code) => challenge_reply(req, code, vec![price]),
        }
    })
}
