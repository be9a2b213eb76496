//! One complete 402x deployment for one test: a fresh database in the test binary's
//! shared PostgreSQL cluster, the settlement service, the HTTP upstream and Envoy with
//! the filter in front of it. The merchant `merchant-demo` exists; payers are made with
//! [`Stack::new_payer`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use x402_client::wire::{
    encode_header, ErrorBody, PaymentPayload, PaymentRequired, PaymentRequirements,
};
use x402_client::{
    parse_challenge, resource_for, sign_payment, Budget, Client, PaidResponse, PayerKey,
    RetryPolicy,
};
use x402_proto::settlement::v1::AccountKind;

use crate::envoy::{Envoy, EnvoyOptions};
use crate::pg::TestPostgres;
use crate::pki::TestPki;
use crate::settlement::Settlement;
use crate::stall::StallProxy;
use crate::upstream::Upstream;

/// The merchant every stack is seeded with (`pay_to` of [`default_filter_config`]).
pub const MERCHANT: &str = "merchant-demo";
pub const ASSET: &str = "USD";
pub const NETWORK: &str = "402x:local";
/// Price of `/paid` and `/status` in [`default_filter_config`]: 0.01 USD.
pub const PAID_PRICE: u64 = 10_000;
/// Price of the `named` Envoy route in [`default_filter_config`]: 0.02 USD.
pub const NAMED_PRICE: u64 = 20_000;
/// `max_timeout_seconds` of [`default_filter_config`].
pub const MAX_TIMEOUT_SECONDS: u64 = 60;

/// The filter configuration most tests use: `/paid` and `/status` cost 0.01 USD (so a
/// paid request can make the upstream fail), the `named` Envoy route costs 0.02 USD,
/// everything else (`/free`) is not priced.
pub fn default_filter_config() -> String {
    serde_json::json!({
        "settlement_cluster": "settlement",
        "settlement_timeout_ms": 2000,
        "network": NETWORK,
        "asset": ASSET,
        "asset_decimals": 6,
        "pay_to": MERCHANT,
        "max_timeout_seconds": MAX_TIMEOUT_SECONDS,
        "hold_ttl_seconds": 300,
        "clock_skew_seconds": 30,
        "capture_below_status": 500,
        "verify_signatures_in_filter": false,
        "routes": [
            { "name": "quote", "match": { "path_prefix": "/paid" }, "price": "0.01", "description": "A paid quote" },
            { "name": "status", "match": { "path_prefix": "/status" }, "price": "0.01" },
            { "name": "named", "match": { "route_name": "named" }, "price": "0.02" }
        ]
    })
    .to_string()
}

/// The cluster shared by every stack of this test binary, stopped at process exit.
static POSTGRES: OnceLock<Mutex<Option<TestPostgres>>> = OnceLock::new();

extern "C" fn stop_shared_postgres() {
    if let Some(cell) = POSTGRES.get() {
        let taken = match cell.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(taken);
    }
}

/// A fresh, empty database in the shared cluster (started on first use).
pub fn fresh_database() -> Result<String> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let cell = POSTGRES.get_or_init(|| Mutex::new(None));
    let mut guard = cell
        .lock()
        .map_err(|_| anyhow!("the shared PostgreSQL lock is poisoned"))?;
    if guard.is_none() {
        *guard = Some(TestPostgres::start().context("starting the tests' PostgreSQL")?);
        // Statics are never dropped: stop the cluster when the test binary exits.
        // SAFETY: registers a plain `extern "C" fn` with no captured state.
        unsafe {
            libc::atexit(stop_shared_postgres);
        }
    }
    let pg = guard.as_ref().context("PostgreSQL is not running")?;
    let name = format!(
        "x402_e2e_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    pg.create_database(&name)
}

/// Current unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct Stack {
    // Field order is drop order: Envoy first, then the services behind it.
    pub envoy: Envoy,
    pub settlement: Settlement,
    pub upstream: Upstream,
    /// Plain HTTP client for unpaid or hand-made requests (no proxy, no redirects).
    pub http: reqwest::Client,
    payer_seq: AtomicU32,
}

impl Stack {
    /// Starts everything with `filter_config` as the plugin JSON.
    pub async fn start(filter_config: &str) -> Result<Stack> {
        Stack::start_with(filter_config, |_| {}).await
    }

    /// [`Stack::start`] with the Envoy options adjusted by `adjust` (e.g. `concurrency`).
    pub async fn start_with(
        filter_config: &str,
        adjust: impl FnOnce(&mut EnvoyOptions),
    ) -> Result<Stack> {
        let settlement = Settlement::start(&fresh_database()?).await?;
        Stack::around(settlement, filter_config, adjust).await
    }

    /// [`Stack::start_with`] with Envoy reaching settlement through a [`StallProxy`],
    /// which the caller keeps (and drops after the stack).
    pub async fn start_stallable(
        filter_config: &str,
        adjust: impl FnOnce(&mut EnvoyOptions),
    ) -> Result<(Stack, StallProxy)> {
        let settlement = Settlement::start(&fresh_database()?).await?;
        let proxy = StallProxy::start(settlement.port()).await?;
        let port = proxy.port;
        let stack = Stack::around(settlement, filter_config, |o| {
            adjust(o);
            o.settlement_port = port;
        })
        .await?;
        Ok((stack, proxy))
    }

    /// [`Stack::start`] with settlement requiring `operator_token` (sent by the
    /// harness) and `dataplane_token` (sent by the filter as `settlement_token`).
    pub async fn start_secured(
        filter_config: &str,
        operator_token: &str,
        dataplane_token: &str,
    ) -> Result<Stack> {
        let mut config: serde_json::Value = serde_json::from_str(filter_config)?;
        config["settlement_token"] = dataplane_token.into();
        let settlement =
            Settlement::start_secured(&fresh_database()?, operator_token, dataplane_token).await?;
        Stack::around(settlement, &config.to_string(), |_| {}).await
    }

    /// [`Stack::start`] with settlement over mutual TLS: it serves `pki`'s server
    /// certificate and requires client certificates; Envoy and the harness present
    /// `pki.client`.
    pub async fn start_tls(filter_config: &str, pki: &TestPki) -> Result<Stack> {
        let settlement = Settlement::start_tls(&fresh_database()?, pki, &[]).await?;
        Stack::around(settlement, filter_config, |o| {
            o.settlement_tls = Some((pki.ca.clone(), pki.client.clone()));
        })
        .await
    }

    /// The merchant account, the upstream and Envoy around a running settlement.
    async fn around(
        settlement: Settlement,
        filter_config: &str,
        adjust: impl FnOnce(&mut EnvoyOptions),
    ) -> Result<Stack> {
        settlement
            .create_account(MERCHANT, AccountKind::Merchant)
            .await?;
        let upstream = Upstream::start()?;
        let mut options = EnvoyOptions::new(upstream.port(), settlement.port(), filter_config);
        adjust(&mut options);
        let envoy = Envoy::start(options).await?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Stack {
            envoy,
            settlement,
            upstream,
            http,
            payer_seq: AtomicU32::new(0),
        })
    }

    /// [`Stack::start`] with [`default_filter_config`].
    pub async fn start_default() -> Result<Stack> {
        Stack::start(&default_filter_config()).await
    }

    /// `http://127.0.0.1:PORT{path}` through Envoy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.envoy.authority())
    }

    pub fn parsed_url(&self, path: &str) -> Result<Url> {
        Url::parse(&self.url(path)).with_context(|| format!("bad path {path}"))
    }

    /// A new payer account with a fresh registered key and `funds` atomic USD.
    pub async fn new_payer(&self, funds: u64) -> Result<(String, PayerKey)> {
        let account = format!("payer-{}", self.payer_seq.fetch_add(1, Ordering::Relaxed));
        self.settlement
            .create_account(&account, AccountKind::Payer)
            .await?;
        let key = PayerKey::generate();
        self.settlement
            .add_key(&account, &key.public_key_hex())
            .await?;
        if funds > 0 {
            self.settlement.deposit(&account, ASSET, funds).await?;
        }
        Ok((account, key))
    }

    /// Available USD of `account` in atomic units.
    pub async fn balance(&self, account: &str) -> Result<i64> {
        Ok(self.settlement.balance(account, ASSET).await?.available)
    }

    /// Polls (bounded) until `account`'s available balance is `expected` and nothing is
    /// pending; captures and voids land after the client has its response.
    pub async fn wait_for_settled_balance(&self, account: &str, expected: i64) -> Result<()> {
        let start = Instant::now();
        loop {
            let balance = self.settlement.balance(account, ASSET).await?;
            if balance.available == expected
                && balance.debits_pending == 0
                && balance.credits_pending == 0
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("balance of {account} did not settle at {expected}: {balance:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A paying client for `key` with no budget limit that sends at most one proof per
    /// request, so a test sees each upstream answer as it is (the library's default
    /// retries a 5xx with a new proof).
    pub fn client(&self, key: &PayerKey) -> Result<Client> {
        Ok(
            Client::with_http(self.http.clone(), key.clone(), Budget::unlimited()).with_retry(
                RetryPolicy {
                    max_paid_attempts: 1,
                    ..RetryPolicy::default()
                },
            ),
        )
    }

    /// GET `path` through Envoy, paying on a 402.
    pub async fn pay_get(&self, key: &PayerKey, path: &str) -> Result<PaidResponse> {
        Ok(self
            .client(key)?
            .request(Method::GET, self.parsed_url(path)?, HeaderMap::new(), None)
            .await?)
    }

    /// Pays for `path`, whose upstream answers slowly (e.g. `delay_ms=2000`), and stops
    /// settlement once the request has reached the upstream: the payment is placed, and
    /// what is due at the end of the response cannot be sent, so the filter is left
    /// owing it: the capture of a held payment, or the void (refund) of one captured at
    /// authorize whose upstream failed. Returns the client's answer.
    pub async fn pay_then_stop_settlement(
        &mut self,
        key: &PayerKey,
        path: &str,
        limit: Duration,
    ) -> Result<PaidResponse> {
        let prefix = path.split('?').next().unwrap_or(path);
        let before = self.upstream.served().count_path_prefix(prefix);
        let client = self.client(key)?;
        let url = self.parsed_url(path)?;
        let paying = tokio::spawn(async move {
            client
                .request(Method::GET, url, HeaderMap::new(), None)
                .await
        });
        let started = Instant::now();
        while self.upstream.served().count_path_prefix(prefix) == before {
            if started.elapsed() > limit {
                paying.abort();
                bail!(
                    "the paid request did not reach the upstream within {limit:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.settlement.stop();
        let Ok(answer) = tokio::time::timeout(limit, paying).await else {
            bail!("the paid request hung\n{}", self.logs());
        };
        Ok(answer??)
    }

    /// The requirements the default config offers for `price`.
    pub fn requirements(&self, price: u64) -> PaymentRequirements {
        let mut extra = serde_json::Map::new();
        extra.insert("decimals".into(), 6.into());
        extra.insert("name".into(), ASSET.into());
        PaymentRequirements {
            scheme: "exact".into(),
            network: NETWORK.into(),
            amount: price.to_string(),
            asset: ASSET.into(),
            pay_to: MERCHANT.into(),
            max_timeout_seconds: MAX_TIMEOUT_SECONDS,
            extra,
        }
    }

    /// A valid proof for `method path` at `price`, signed by `key`, valid for 30 s.
    pub fn signed_proof(
        &self,
        key: &PayerKey,
        method: &str,
        path: &str,
        price: u64,
    ) -> Result<PaymentPayload> {
        let resource = resource_for(method, &self.parsed_url(path)?)?;
        Ok(sign_payment(
            key,
            &self.requirements(price),
            &resource,
            &x402_client::random_nonce_hex(),
            unix_now() + 30,
        )?)
    }

    /// Sends `method path` through Envoy with no payment.
    pub async fn send_unpaid(&self, method: &str, path: &str) -> Result<Answer> {
        let method = Method::from_bytes(method.as_bytes())?;
        Answer::read(self.http.request(method, self.url(path)).send().await?).await
    }

    /// Sends `method path` through Envoy with `payment` as the `PAYMENT-SIGNATURE` header.
    pub async fn send_with_payment(
        &self,
        method: &str,
        path: &str,
        payment: &PaymentPayload,
    ) -> Result<Answer> {
        self.send_with_header(method, path, &encode_header(payment))
            .await
    }

    /// Sends `method path` with a raw `PAYMENT-SIGNATURE` header value.
    pub async fn send_with_header(&self, method: &str, path: &str, header: &str) -> Result<Answer> {
        let method = Method::from_bytes(method.as_bytes())?;
        let response = self
            .http
            .request(method, self.url(path))
            .header(x402_client::wire::HEADER_PAYMENT_SIGNATURE, header)
            .send()
            .await?;
        Answer::read(response).await
    }

    /// Sends `parts` over one new HTTP/1.1 connection exactly as written, `pause` apart
    /// (a request's head, then its body), and returns the answer's status and text.
    /// Nothing is normalized on the way, as a client library would.
    pub async fn send_raw(&self, parts: &[&str], pause: Duration) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.envoy.authority()).await?;
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            conn.write_all(part.as_bytes()).await?;
        }
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_string(&mut answer))
            .await
            .context("no answer within 30 s")??;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, answer))
    }

    /// The last lines of the Envoy and settlement logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- envoy ---\n{}\n--- settlement ---\n{}",
            self.envoy.log_tail(40),
            self.settlement.log_tail(40)
        )
    }
}

/// A complete HTTP answer, read into memory.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Result<Answer> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// The 402 challenge, parsed as a client would.
    pub fn challenge(&self) -> Option<PaymentRequired> {
        let status = reqwest::StatusCode::from_u16(self.status).ok()?;
        parse_challenge(status, &self.headers, &self.body).ok()
    }

    /// The `error` of a 402 challenge or of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        if let Some(challenge) = self.challenge() {
            return challenge.error;
        }
        serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|e| e.error)
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
