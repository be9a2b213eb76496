//! The gRPC services: `DataPlane` for the Envoy filter, `Operator` for people and
//! scripts. Handlers only translate; the rules live in `verify`, `ledger` and
//! `accounts`.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use x402_proto::settlement::v1::data_plane_server::DataPlane;
use x402_proto::settlement::v1::operator_server::Operator;
use x402_proto::settlement::v1::{
    Account, AccountKind, AddKeyRequest, AuthorizeRequest, AuthorizeResponse, Balance,
    CaptureRequest, CaptureResponse, CreateAccountRequest, DepositRequest, DepositResponse,
    GetAccountRequest, GetBalanceRequest, GetPaymentRequest, ListPaymentsRequest,
    ListPaymentsResponse, PayerKey, Payment, RevokeKeyRequest, VoidRequest, VoidResponse,
};

use crate::accounts;
use crate::ledger::{Ledger, Resolution};
use crate::verify::{check_authorize, MAX_ID_LEN};

/// Most items in one data-plane call.
pub const MAX_BATCH: usize = 1000;

/// Items of one call that run at the same time: enough to overlap round trips to
/// Postgres, few enough that one large batch cannot take the whole pool.
pub const PER_CALL_CONCURRENCY: usize = 8;

/// Runs `op` on every item, at most [`PER_CALL_CONCURRENCY`] at a time, and returns
/// the results in item order. Any failure fails the whole call; items that did
/// commit are safe to send again (request ids and resolutions are idempotent).
async fn each_item<I, T, F, Fut>(items: Vec<I>, op: F) -> Result<Vec<T>, Status>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: Future<Output = Result<T, Status>> + Send + 'static,
{
    if items.len() == 1 {
        let mut out = Vec::with_capacity(1);
        for item in items {
            out.push(op(item).await?);
        }
        return Ok(out);
    }
    let limit = Arc::new(Semaphore::new(PER_CALL_CONCURRENCY));
    let handles: Vec<_> = items
        .into_iter()
        .map(|item| {
            let limit = limit.clone();
            let fut = op(item);
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut failure = None;
    for handle in handles {
        match handle.await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(status)) => {
                failure.get_or_insert(status);
            }
            Err(e) => {
                tracing::error!(error = %e, "batch item task failed");
                failure.get_or_insert(Status::internal("settlement failed to process an item"));
            }
        }
    }
    match failure {
        Some(status) => Err(status),
        None => Ok(out),
    }
}

fn check_batch(len: usize) -> Result<(), Status> {
    if len > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH} items per call"
        )));
    }
    Ok(())
}

/// The data-plane service over one ledger.
#[derive(Debug, Clone)]
pub struct DataPlaneService {
    ledger: Ledger,
}

impl DataPlaneService {
    pub fn new(ledger: Ledger) -> Self {
        DataPlaneService { ledger }
    }
}

#[tonic::async_trait]
impl DataPlane for DataPlaneService {
    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let items = request.into_inner().items;
        check_batch(items.len())?;
        // Every signature is checked before any row is touched.
        let checked: Vec<_> = items.iter().map(check_authorize).collect();
        let results = each_item(checked, |item| {
            let ledger = self.ledger.clone();
            async move {
                match item {
                    Ok(item) => Ok(ledger.authorize_hold(&item).await?),
                    Err(refused) => Ok(refused),
                }
            }
        })
        .await?;
        Ok(Response::new(AuthorizeResponse { results }))
    }

    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn capture(
        &self,
        request: Request<CaptureRequest>,
    ) -> Result<Response<CaptureResponse>, Status> {
        let items = request.into_inner().items;
        check_batch(items.len())?;
        let results = each_item(items, |item| {
            let ledger = self.ledger.clone();
            async move {
                let resolution = Resolution::Capture {
                    amount: item.amount,
                    http_status: item.http_status,
                    upstream_micros: item.upstream_micros,
                };
                Ok(ledger.resolve(&item.transaction_id, &resolution).await?)
            }
        })
        .await?;
        Ok(Response::new(CaptureResponse { results }))
    }

    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<VoidResponse>, Status> {
        let items = request.into_inner().items;
        check_batch(items.len())?;
        let results = each_item(items, |item| {
            let ledger = self.ledger.clone();
            async move {
                let reason: String = item.reason.chars().take(MAX_ID_LEN).collect();
                let resolution = Resolution::Void { reason };
                Ok(ledger.resolve(&item.transaction_id, &resolution).await?)
            }
        })
        .await?;
        Ok(Response::new(VoidResponse { results }))
    }
}

/// The operator service over one ledger.
#[derive(Debug, Clone)]
pub struct OperatorService {
    ledger: Ledger,
}

impl OperatorService {
    pub fn new(ledger: Ledger) -> Self {
        OperatorService { ledger }
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn create_account(
        &self,
        request: Request<CreateAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let r = request.into_inner();
        let kind = AccountKind::try_from(r.kind).unwrap_or(AccountKind::Unspecified);
        Ok(Response::new(
            accounts::create_account(self.ledger.pool(), &r.account_id, kind).await?,
        ))
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            accounts::get_account(self.ledger.pool(), &r.account_id).await?,
        ))
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn add_key(&self, request: Request<AddKeyRequest>) -> Result<Response<PayerKey>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            accounts::add_key(self.ledger.pool(), &r.account_id, &r.public_key).await?,
        ))
    }

    #[tracing::instrument(skip(self, request), fields(key = %request.get_ref().public_key))]
    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<PayerKey>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            accounts::revoke_key(self.ledger.pool(), &r.public_key).await?,
        ))
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id, amount = request.get_ref().amount))]
    async fn deposit(
        &self,
        request: Request<DepositRequest>,
    ) -> Result<Response<DepositResponse>, Status> {
        let r = request.into_inner();
        let transaction_id = self
            .ledger
            .deposit(&r.account_id, &r.asset, r.amount, &r.idempotency_key)
            .await?;
        let balance = accounts::balance(self.ledger.pool(), &r.account_id, &r.asset).await?;
        Ok(Response::new(DepositResponse {
            transaction_id,
            balance: Some(balance),
        }))
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn get_balance(
        &self,
        request: Request<GetBalanceRequest>,
    ) -> Result<Response<Balance>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            accounts::balance(self.ledger.pool(), &r.account_id, &r.asset).await?,
        ))
    }

    #[tracing::instrument(skip(self, request), fields(transaction = %request.get_ref().transaction_id))]
    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            accounts::get_payment(self.ledger.pool(), &r.transaction_id).await?,
        ))
    }

    #[tracing::instrument(skip(self, request))]
    async fn list_payments(
        &self,
        request: Request<ListPaymentsRequest>,
    ) -> Result<Response<ListPaymentsResponse>, Status> {
        let r = request.into_inner();
        let (payments, next_page_token) = accounts::list_payments(
            self.ledger.pool(),
            &r.payer_account,
            &r.merchant_account,
            r.page_size,
            &r.page_token,
        )
        .await?;
        Ok(Response::new(ListPaymentsResponse {
            payments,
            next_page_token,
        }))
    }
}
