//! Settlement's operator API as a payer uses it: balance, payment history, and finding
//! the payment a proof made when its HTTP answer was lost.
//!
//! The token, when set, is sent as `authorization: Bearer <token>` gRPC metadata and never
//! appears in `Debug` output or error messages.

use std::fmt;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use x402_proto::settlement::v1::operator_client::OperatorClient;
use x402_proto::settlement::v1::{
    Balance, GetBalanceRequest, GetPaymentRequest, ListPaymentsRequest, Payment,
};

use crate::error::ClientError;

/// Largest history page asked for; settlement caps pages at 500.
const PAGE_SIZE: u32 = 100;
/// Pages searched for a nonce: payments are listed newest first, so a proof made a
/// moment ago is on the first page unless the account pays hundreds of times a second.
const NONCE_SEARCH_PAGES: usize = 5;

/// Where the payer's account lives in settlement, and how to ask about it.
#[derive(Clone)]
pub struct OperatorEndpoint {
    /// gRPC URL of settlement, e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Operator bearer token, when settlement requires one.
    pub token: Option<String>,
    /// The payer account the client's key is registered to.
    pub account: String,
}

impl fmt::Debug for OperatorEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorEndpoint")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("account", &self.account)
            .finish()
    }
}

/// What settlement says became of one proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofOutcome {
    /// Held or captured: the proof was accepted and the money is (being) taken.
    Charged(Payment),
    /// Voided, expired or refunded in full (how a payment captured at authorize is
    /// released when the upstream fails): nothing was taken.
    Released(Payment),
    /// No payment with this nonce (yet).
    NotFound,
}

impl ProofOutcome {
    /// What a payment's state says about its proof.
    pub fn of(p: Payment) -> ProofOutcome {
        let refunded_in_full = p.captured > 0 && p.refunded >= p.captured;
        match p.status.as_str() {
            "voided" | "expired" => ProofOutcome::Released(p),
            "captured" if refunded_in_full => ProofOutcome::Released(p),
            _ => ProofOutcome::Charged(p),
        }
    }
}

impl OperatorEndpoint {
    pub fn new(url: impl Into<String>, account: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            account: account.into(),
        }
    }

    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    async fn connect(&self) -> Result<OperatorClient<Channel>, ClientError> {
        let channel = Endpoint::from_shared(self.url.clone())
            .map_err(|e| ClientError::Operator(format!("invalid settlement URL: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|e| {
                ClientError::Operator(format!("cannot connect to {}: {}", self.url, chain(&e)))
            })?;
        Ok(OperatorClient::new(channel))
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, ClientError> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                ClientError::Operator("the operator token is not a valid header value".into())
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// The account's balance in `asset`.
    pub async fn balance(&self, asset: &str) -> Result<Balance, ClientError> {
        let request = self.request(GetBalanceRequest {
            account_id: self.account.clone(),
            asset: asset.to_owned(),
        })?;
        let answer = self.connect().await?.get_balance(request).await;
        answer
            .map(tonic::Response::into_inner)
            .map_err(status_error)
    }

    /// Up to `limit` payments of the account, newest first.
    pub async fn history(&self, limit: usize) -> Result<Vec<Payment>, ClientError> {
        let mut client = self.connect().await?;
        let mut payments = Vec::new();
        let mut page_token = String::new();
        while payments.len() < limit {
            let page_size =
                PAGE_SIZE.min(u32::try_from(limit - payments.len()).unwrap_or(PAGE_SIZE));
            let request = self.request(ListPaymentsRequest {
                payer_account: self.account.clone(),
                page_size,
                page_token: page_token.clone(),
                ..Default::default()
            })?;
            let page = client
                .list_payments(request)
                .await
                .map_err(status_error)?
                .into_inner();
            payments.extend(page.payments);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        payments.truncate(limit);
        Ok(payments)
    }

    /// One payment by its transaction id (the receipt's `transaction`).
    pub async fn payment(&self, transaction_id: &str) -> Result<Payment, ClientError> {
        let request = self.request(GetPaymentRequest {
            transaction_id: transaction_id.to_owned(),
        })?;
        let answer = self.connect().await?.get_payment(request).await;
        answer
            .map(tonic::Response::into_inner)
            .map_err(status_error)
    }

    /// What became of the proof with this nonce, from the account's recent payments.
    pub async fn outcome_of_nonce(&self, nonce: &str) -> Result<ProofOutcome, ClientError> {
        let mut client = self.connect().await?;
        let mut page_token = String::new();
        for _ in 0..NONCE_SEARCH_PAGES {
            let request = self.request(ListPaymentsRequest {
                payer_account: self.account.clone(),
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
                ..Default::default()
            })?;
            let page = client
                .list_payments(request)
                .await
                .map_err(status_error)?
                .into_inner();
            if let Some(p) = page.payments.into_iter().find(|p| p.nonce == nonce) {
                return Ok(ProofOutcome::of(p));
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Ok(ProofOutcome::NotFound)
    }
}

fn status_error(status: tonic::Status) -> ClientError {
    ClientError::Operator(format!(
        "settlement answered {:?}: {}",
        status.code(),
        status.message()
    ))
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(status: &str, captured: u64, refunded: u64) -> Payment {
        Payment {
            status: status.into(),
            captured,
            refunded,
            ..Payment::default()
        }
    }

    #[test]
    fn a_payment_refunded_in_full_released_its_proof() {
        let released = |p| matches!(ProofOutcome::of(p), ProofOutcome::Released(_));
        assert!(released(payment("voided", 0, 0)));
        assert!(released(payment("expired", 0, 0)));
        // Captured at authorize, then refunded because the upstream failed.
        assert!(released(payment("captured", 10_000, 10_000)));
        // Taken, in part or in full.
        assert!(!released(payment("captured", 10_000, 0)));
        assert!(!released(payment("captured", 10_000, 4_000)));
        assert!(!released(payment("held", 0, 0)));
    }
}
