//! The paying HTTP client: send, and on 402 sign one offer within budget and retry once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use x402_proto::wire::{
    encode_header, ErrorBody, PaymentPayload, PaymentRequired, SettleResponse,
    HEADER_PAYMENT_SIGNATURE, HEADER_PAYMENT_SIGNATURE_ALIAS,
};

use crate::error::ClientError;
use crate::key::PayerKey;
use crate::payment::{
    choose_requirement, parse_challenge, parse_receipt, random_nonce_hex, resource_for_request,
    sign_payment,
};

/// What the client is willing to pay, checked before anything is signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budget {
    /// Most atomic units one request may cost (`None`: no limit).
    pub max_per_request: Option<u64>,
    /// Networks the payer has funds on; empty accepts any.
    pub networks: Vec<String>,
    /// Asset codes the payer holds; empty accepts any.
    pub assets: Vec<String>,
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

    pub fn with_networks<S: Into<String>>(mut self, networks: impl IntoIterator<Item = S>) -> Self {
        self.networks = networks.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_assets<S: Into<String>>(mut self, assets: impl IntoIterator<Item = S>) -> Self {
        self.assets = assets.into_iter().map(Into::into).collect();
        self
    }

    pub fn accepts_network(&self, network: &str) -> bool {
        self.networks.is_empty() || self.networks.iter().any(|n| n == network)
    }

    pub fn accepts_asset(&self, asset: &str) -> bool {
        self.assets.is_empty() || self.assets.iter().any(|a| a == asset)
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
    /// Atomic units the receipt reports as paid (held, for `upto`), when it reports success.
    pub paid: Option<u64>,
    /// The proof that was sent on the retry, if the first answer was a 402.
    pub payment: Option<PaymentPayload>,
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

/// Sends requests and pays for them with `key`, within `policy`.
#[derive(Debug, Clone)]
pub struct Client {
    /// Follows no redirects: a proof binds one exact resource, and a redirected 402
    /// would have to be signed for a URL the caller never asked for.
    pub http: reqwest::Client,
    pub key: PayerKey,
    pub policy: Budget,
}

impl Client {
    /// A client with its own HTTP connection pool, no redirects, no proxies and a
    /// 60 second overall timeout per request.
    pub fn new(key: PayerKey, policy: Budget) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self::with_http(http, key, policy))
    }

    pub fn with_http(http: reqwest::Client, key: PayerKey, policy: Budget) -> Self {
        Self { http, key, policy }
    }

    /// Sends `method url` with `headers` and `body`. A 402 answer is paid once: the first
    /// offer with a supported scheme within budget is signed for this request (valid for
    /// the offer's `maxTimeoutSeconds`) and the request is sent again with the proof. Any
    /// other answer, including a second 402, is returned as it is.
    pub async fn request(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<PaidResponse, ClientError> {
        let first = self
            .send_once(&method, &url, &headers, body.as_deref())
            .await?;
        if first.status != StatusCode::PAYMENT_REQUIRED {
            return Ok(first);
        }
        let challenge = parse_challenge(first.status, &first.headers, &first.body)?;
        let (requirement, _amount) = choose_requirement(&challenge.accepts, &self.policy)?;
        let resource = resource_for_request(method.as_str(), &url, &headers)?;
        let valid_before = unix_now().saturating_add(requirement.max_timeout_seconds);
        let payment = sign_payment(
            &self.key,
            requirement,
            &resource,
            &random_nonce_hex(),
            valid_before,
        )?;

        let mut paid_headers = headers;
        paid_headers.remove(HEADER_PAYMENT_SIGNATURE_ALIAS);
        let proof = HeaderValue::from_str(&encode_header(&payment)).map_err(|_| {
            ClientError::InvalidHeader("payment proof is not a valid header value".into())
        })?;
        paid_headers.insert(HEADER_PAYMENT_SIGNATURE, proof);
        let mut second = self
            .send_once(&method, &url, &paid_headers, body.as_deref())
            .await?;
        second.payment = Some(payment);
        Ok(second)
    }

    async fn send_once(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<PaidResponse, ClientError> {
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers.clone());
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        let receipt = parse_receipt(&headers);
        let paid = receipt
            .as_ref()
            .filter(|r| r.success)
            .and_then(|r| x402_proto::amount::parse_atomic(&r.amount).ok());
        Ok(PaidResponse {
            status,
            headers,
            body,
            receipt,
            paid,
            payment: None,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
