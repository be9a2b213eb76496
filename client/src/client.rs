//! The paying HTTP client: send, and on 402 sign one offer within budget and retry.
//!
//! # The retry rule
//!
//! A proof pays for one request at most once (settlement refuses a reused nonce), so:
//!
//! - **5xx after paying**: the gateway voids the hold (or refunds an exact price it
//!   captured at authorize) when the upstream fails (and a 503
//!   from the gateway itself means nothing was held). The client signs a **new** proof
//!   (new nonce) and tries again, up to [`RetryPolicy::max_paid_attempts`] proofs in all.
//! - **Network error after sending a proof** (no answer): the proof may have been
//!   accepted. Without an operator endpoint the client stops with
//!   [`ClientError::PaymentOutcomeUnknown`] and never resends. With one
//!   ([`Client::with_operator`]) it first asks settlement about the proof's nonce: held
//!   or captured => [`ClientError::PaidResponseLost`] (not paid again); voided, expired
//!   or refunded in full => a new proof; not found => the **same** proof is resent once,
//!   which settlement can accept at most once, so no outcome of the first attempt can
//!   make it pay twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{HeaderMap, HeaderValue, HOST};
use reqwest::{Method, StatusCode, Url};
use x402_proto::wire::{
    encode_header, ErrorBody, PaymentPayload, PaymentRequired, PaymentRequirements, SettleResponse,
    HEADER_PAYMENT_SIGNATURE, HEADER_PAYMENT_SIGNATURE_ALIAS,
};

use crate::error::ClientError;
use crate::key::PayerKey;
use crate::operator::{OperatorEndpoint, ProofOutcome};
use crate::payment::{
    choose_requirement, parse_challenge, parse_receipt, random_nonce_hex, resource_for_request,
    sign_payment,
};

/// What the client is willing to pay, checked before anything is signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budget {
    /// Most atomic units one request may cost (`None`: no limit).
    pub max_per_request: Option<u64>,
    /// Most atomic units all requests of this client (and its clones) may cost together,
    /// over its lifetime or, with `window`, over any sliding window of that length.
    pub max_total: Option<u64>,
    /// The sliding window `max_total` applies to (`None`: the client's lifetime).
    pub window: Option<Duration>,
    /// Networks the payer has funds on; empty accepts any.
    pub networks: Vec<String>,
    /// Asset codes the payer holds; empty accepts any.
    pub assets: Vec<String>,
    /// Merchant accounts (`payTo`) the client agrees to pay; empty accepts any.
    pub pay_to: Vec<String>,
    /// Hosts (without port, lower case) the client agrees to pay; empty accepts any.
    pub hosts: Vec<String>,
}

impl Budget {
    pub fn unlimited() -> Self {
        Self::default()
    }

    pub fn max_per_request(max: u64) -> Self {
        Self {
            max_per_request: Some(max),
            ..Self::default()
        }
    }

    /// Caps the total spent, over the client's lifetime or per `window`.
    pub fn with_max_total(mut self, max: u64, window: Option<Duration>) -> Self {
        self.max_total = Some(max);
        self.window = window;
        self
    }

    pub fn with_networks<S: Into<String>>(mut self, networks: impl IntoIterator<Item = S>) -> Self {
        self.networks = networks.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_assets<S: Into<String>>(mut self, assets: impl IntoIterator<Item = S>) -> Self {
        self.assets = assets.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_pay_to<S: Into<String>>(mut self, accounts: impl IntoIterator<Item = S>) -> Self {
        self.pay_to = accounts.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_hosts<S: Into<String>>(mut self, hosts: impl IntoIterator<Item = S>) -> Self {
        self.hosts = hosts
            .into_iter()
            .map(|h| h.into().to_ascii_lowercase())
            .collect();
        self
    }

    pub fn accepts_network(&self, network: &str) -> bool {
        self.networks.is_empty() || self.networks.iter().any(|n| n == network)
    }

    pub fn accepts_asset(&self, asset: &str) -> bool {
        self.assets.is_empty() || self.assets.iter().any(|a| a == asset)
    }

    pub fn accepts_pay_to(&self, pay_to: &str) -> bool {
        self.pay_to.is_empty() || self.pay_to.iter().any(|p| p == pay_to)
    }

    pub fn accepts_host(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// How often a paid request is tried when the upstream fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Proofs sent for one request in all (each with a new nonce); at least 1.
    pub max_paid_attempts: u32,
    /// Pause before the n-th retry is n times this.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_paid_attempts: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Money reserved against the total budget: once a proof is signed its amount counts as
/// spent until the answer shows nothing was charged.
#[derive(Debug, Default)]
struct Spending {
    next_id: u64,
    entries: VecDeque<(u64, Instant, u64)>,
}

impl Spending {
    fn total(&mut self, window: Option<Duration>, now: Instant) -> u64 {
        if let Some(window) = window {
            self.entries
                .retain(|(_, at, _)| now.saturating_duration_since(*at) < window);
        }
        self.entries
            .iter()
            .fold(0u64, |sum, (_, _, amount)| sum.saturating_add(*amount))
    }
}

/// The final answer to a request, after paying when it was asked for.
#[derive(Debug, Clone)]
pub struct PaidResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The `PAYMENT-RESPONSE` receipt, present when the payment was accepted.
    pub receipt: Option<SettleResponse>,
    /// Atomic units charged (held, for `upto`), when the receipt reports success and the
    /// answer is not a 5xx (whose hold the gateway voids).
    pub paid: Option<u64>,
    /// The proof that was sent last, if the first answer was a 402.
    pub payment: Option<PaymentPayload>,
    /// Proofs sent for this request (0 when it was free).
    pub attempts: u32,
}

impl PaidResponse {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// The machine-readable reason of a refusal: the `error` of a 402 challenge or of a
    /// JSON error body (`malformed_payment`, `settlement_unavailable`, ...).
    pub fn error_code(&self) -> Option<String> {
        if self.status.is_success() {
            return None;
        }
        if let Ok(challenge) = parse_challenge(self.status, &self.headers, &self.body) {
            return challenge.error;
        }
        serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|e| e.error)
    }

    /// The challenge, when the final answer is still a 402.
    pub fn challenge(&self) -> Option<PaymentRequired> {
        parse_challenge(self.status, &self.headers, &self.body).ok()
    }
}

/// The final answer with its body not yet read: for server-sent events and other
/// long responses, which pass through as they arrive.
#[derive(Debug)]
pub struct StreamingResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub receipt: Option<SettleResponse>,
    pub paid: Option<u64>,
    pub payment: Option<PaymentPayload>,
    pub attempts: u32,
    body: reqwest::Response,
}

impl StreamingResponse {
    /// The next chunk of the body as it arrives; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        Ok(self.body.chunk().await?)
    }

    /// The body as a stream of chunks.
    pub fn bytes_stream(self) -> impl Stream<Item = Result<Bytes, reqwest::Error>> {
        self.body.bytes_stream()
    }

    /// Reads the whole body.
    pub async fn into_buffered(self) -> Result<PaidResponse, ClientError> {
        let body = self.body.bytes().await?.to_vec();
        Ok(PaidResponse {
            status: self.status,
            headers: self.headers,
            body,
            receipt: self.receipt,
            paid: self.paid,
            payment: self.payment,
            attempts: self.attempts,
        })
    }

    fn unpaid(response: reqwest::Response) -> Self {
        let headers = response.headers().clone();
        Self {
            status: response.status(),
            receipt: parse_receipt(&headers),
            headers,
            paid: None,
            payment: None,
            attempts: 0,
            body: response,
        }
    }
}

/// Sends requests and pays for them with `key`, within `policy`. Clones share the
/// spending counted against [`Budget::max_total`].
#[derive(Debug, Clone)]
pub struct Client {
    /// Follows no redirects: a proof binds one exact resource, and a redirected 402
    /// would have to be signed for a URL the caller never asked for.
    pub http: reqwest::Client,
    pub key: PayerKey,
    pub policy: Budget,
    pub retry: RetryPolicy,
    /// Where to ask what became of a proof whose answer was lost.
    pub operator: Option<OperatorEndpoint>,
    spending: Arc<Mutex<Spending>>,
}

/// A paid attempt's raw result.
enum Attempt {
    Answer(reqwest::Response),
    Retry,
}

impl Client {
    /// A client with its own HTTP connection pool, no redirects, no proxies and a
    /// 60 second timeout to connect and read each chunk.
    pub fn new(key: PayerKey, policy: Budget) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self::with_http(http, key, policy))
    }

    pub fn with_http(http: reqwest::Client, key: PayerKey, policy: Budget) -> Self {
        Self {
            http,
            key,
            policy,
            retry: RetryPolicy::default(),
            operator: None,
            spending: Arc::default(),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn with_operator(mut self, operator: OperatorEndpoint) -> Self {
        self.operator = Some(operator);
        self
    }

    /// Atomic units counted against [`Budget::max_total`] now (within the window).
    pub fn spent(&self) -> u64 {
        match self.spending.lock() {
            Ok(mut s) => s.total(self.policy.window, Instant::now()),
            Err(poisoned) => poisoned
                .into_inner()
                .total(self.policy.window, Instant::now()),
        }
    }

    /// `GET url`, paid if asked, within budget: the one-line call.
    pub async fn get(&self, url: &str) -> Result<PaidResponse, ClientError> {
        let url = Url::parse(url).map_err(|e| ClientError::InvalidUrl(format!("{url}: {e}")))?;
        self.request(Method::GET, url, HeaderMap::new(), None).await
    }

    /// Sends `method url` with `headers` and `body`. A 402 answer is paid: the first
    /// offer with a supported scheme within budget is signed for this request (valid for
    /// the offer's `maxTimeoutSeconds`) and the request is sent again with the proof,
    /// retried after a 5xx as the module documentation describes. Any other answer,
    /// including a second 402, is returned as it is.
    pub async fn request(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<PaidResponse, ClientError> {
        self.request_streaming(method, url, headers, body)
            .await?
            .into_buffered()
            .await
    }

    /// Like [`Client::request`], but the final answer's body is not read: it streams.
    pub async fn request_streaming(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<StreamingResponse, ClientError> {
        let first = self
            .send_once(&method, &url, &headers, body.as_deref())
            .await?;
        if first.status() != StatusCode::PAYMENT_REQUIRED {
            return Ok(StreamingResponse::unpaid(first));
        }
        let status = first.status();
        let first_headers = first.headers().clone();
        let first_body = first.bytes().await?;
        let challenge = parse_challenge(status, &first_headers, &first_body)?;
        let host = host_of(&url, &headers)?;
        if !self.policy.accepts_host(&host) {
            return Err(ClientError::HostNotAllowed { host });
        }
        let (requirement, amount) = choose_requirement(&challenge.accepts, &self.policy)?;
        let requirement = requirement.clone();
        let reservation = self.reserve(amount, &requirement.asset)?;
        let resource = resource_for_request(method.as_str(), &url, &headers)?;

        let mut attempts = 0u32;
        let max_attempts = self.retry.max_paid_attempts.max(1);
        loop {
            attempts += 1;
            let payment = self.sign(&requirement, &resource)?;
            let attempt = self
                .send_paid(&method, &url, &headers, body.as_deref(), &payment)
                .await;
            let attempt = match attempt {
                Ok(a) => a,
                Err(e) => {
                    // Money may be held: the reservation stays unless settlement said otherwise.
                    return Err(e);
                }
            };
            let response = match attempt {
                Attempt::Retry if attempts < max_attempts => {
                    self.pause(attempts).await;
                    continue;
                }
                Attempt::Retry => {
                    self.release(reservation);
                    return Err(ClientError::RetriesExhausted { attempts });
                }
                Attempt::Answer(r) => r,
            };
            if response.status().is_server_error() && attempts < max_attempts {
                // The gateway voids the hold of a failed upstream call; pay afresh.
                drop(response);
                self.pause(attempts).await;
                continue;
            }
            let headers = response.headers().clone();
            let receipt = parse_receipt(&headers);
            let paid = receipt
                .as_ref()
                .filter(|r| r.success && !response.status().is_server_error())
                .and_then(|r| x402_proto::amount::parse_atomic(&r.amount).ok());
            match paid {
                Some(held) => self.settle_reservation(reservation, held),
                None => self.release(reservation),
            }
            return Ok(StreamingResponse {
                status: response.status(),
                headers,
                receipt,
                paid,
                payment: Some(payment),
                attempts,
                body: response,
            });
        }
    }

    fn sign(
        &self,
        requirement: &PaymentRequirements,
        resource: &str,
    ) -> Result<PaymentPayload, ClientError> {
        let valid_before = unix_now().saturating_add(requirement.max_timeout_seconds);
        sign_payment(
            &self.key,
            requirement,
            resource,
            &random_nonce_hex(),
            valid_before,
        )
    }

    async fn pause(&self, attempts: u32) {
        tokio::time::sleep(self.retry.backoff.saturating_mul(attempts)).await;
    }

    /// Sends one proof. A transport error is resolved by the retry rule of this module.
    async fn send_paid(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        payment: &PaymentPayload,
    ) -> Result<Attempt, ClientError> {
        let mut paid_headers = headers.clone();
        paid_headers.remove(HEADER_PAYMENT_SIGNATURE_ALIAS);
        let proof = HeaderValue::from_str(&encode_header(payment)).map_err(|_| {
            ClientError::InvalidHeader("payment proof is not a valid header value".into())
        })?;
        paid_headers.insert(HEADER_PAYMENT_SIGNATURE, proof);
        let error = match self.send_once(method, url, &paid_headers, body).await {
            Ok(response) => return Ok(Attempt::Answer(response)),
            Err(error) => error,
        };
        let nonce = payment.payload.nonce.clone();
        let Some(operator) = &self.operator else {
            return Err(ClientError::PaymentOutcomeUnknown {
                nonce,
                cause: error.to_string(),
            });
        };
        match operator.outcome_of_nonce(&nonce).await? {
            ProofOutcome::Charged(p) => Err(ClientError::PaidResponseLost {
                transaction: p.transaction_id,
                status: p.status,
            }),
            ProofOutcome::Released(_) => Ok(Attempt::Retry),
            ProofOutcome::NotFound => {
                // The same nonce can be accepted at most once: resending cannot pay twice.
                match self.send_once(method, url, &paid_headers, body).await {
                    Ok(response) => Ok(Attempt::Answer(response)),
                    Err(again) => Err(ClientError::PaymentOutcomeUnknown {
                        nonce,
                        cause: again.to_string(),
                    }),
                }
            }
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers.clone());
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        Ok(request.send().await?)
    }

    fn reserve(&self, amount: u64, asset: &str) -> Result<u64, ClientError> {
        let mut spending = match self.spending.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let spent = spending.total(self.policy.window, Instant::now());
        let would_spend = spent.saturating_add(amount);
        if let Some(max) = self.policy.max_total {
            if would_spend > max {
                return Err(ClientError::OverTotalBudget {
                    amount,
                    asset: asset.to_owned(),
                    would_spend,
                    max,
                    window: self.policy.window,
                });
            }
        }
        let id = spending.next_id;
        spending.next_id += 1;
        spending.entries.push_back((id, Instant::now(), amount));
        Ok(id)
    }

    fn release(&self, id: u64) {
        let mut spending = match self.spending.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        spending.entries.retain(|(i, _, _)| *i != id);
    }

    /// Counts what the receipt says was held (never more than was reserved).
    fn settle_reservation(&self, id: u64, held: u64) {
        let mut spending = match self.spending.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = spending.entries.iter_mut().find(|(i, _, _)| *i == id) {
            entry.2 = entry.2.min(held);
        }
    }
}

/// The host the request goes to: an explicit `Host` header wins, as on the wire.
fn host_of(url: &Url, headers: &HeaderMap) -> Result<String, ClientError> {
    if let Some(value) = headers.get(HOST) {
        let text = value
            .to_str()
            .map_err(|_| ClientError::InvalidHeader("Host header is not visible ASCII".into()))?;
        let text = text.trim();
        let host = match text.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or_default(),
            None => text.split(':').next().unwrap_or_default(),
        };
        return Ok(host.to_ascii_lowercase());
    }
    url.host_str()
        .map(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        })
        .ok_or_else(|| ClientError::InvalidUrl(format!("{url} has no host")))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_window_forgets_old_spending() {
        let mut s = Spending::default();
        let start = Instant::now();
        s.entries.push_back((0, start, 10));
        s.entries.push_back((1, start + Duration::from_secs(5), 7));
        assert_eq!(s.total(None, start + Duration::from_secs(100)), 17);
        assert_eq!(
            s.total(
                Some(Duration::from_secs(10)),
                start + Duration::from_secs(12)
            ),
            7
        );
        assert_eq!(
            s.total(
                Some(Duration::from_secs(10)),
                start + Duration::from_secs(15)
            ),
            0
        );
    }

    #[test]
    fn hosts_compare_without_port_and_case() {
        let url = Url::parse("http://API.example.com:8080/x").unwrap();
        assert_eq!(host_of(&url, &HeaderMap::new()).unwrap(), "api.example.com");
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("Other.example:443"));
        assert_eq!(host_of(&url, &headers).unwrap(), "other.example");
        let v6 = Url::parse("http://[::1]:9/x").unwrap();
        assert_eq!(host_of(&v6, &HeaderMap::new()).unwrap(), "::1");
        let b = Budget::unlimited().with_hosts(["API.example.com"]);
        assert!(b.accepts_host("api.example.com"));
        assert!(!b.accepts_host("evil.example"));
        assert!(Budget::unlimited().accepts_host("anything"));
    }
}
