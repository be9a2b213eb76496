//! The gRPC services: `DataPlane` for the Envoy filter, `Operator` for people and
//! scripts. Handlers only translate; the rules live in `verify`, `ledger` and
//! `accounts`.

use std::future::Future;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status};
use x402_proto::settlement::v1::data_plane_server::DataPlane;
use x402_proto::settlement::v1::operator_server::Operator;
use x402_proto::settlement::v1::{
    Account, AccountKind, AddKeyRequest, AdjustRequest, AdjustResponse, AnalyticsRequest,
    AnalyticsResponse, Asset, AuthorizeOutcome, AuthorizeRequest, AuthorizeResponse,
    AuthorizeResult, Balance, CaptureRequest, CaptureResponse, CloseAccountRequest,
    CreateAccountRequest, CreateAssetRequest, DepositRequest, DepositResponse, GetAccountRequest,
    GetBalanceRequest, GetBalancesRequest, GetBalancesResponse, GetPaymentRequest,
    ListAccountsRequest, ListAccountsResponse, ListAssetsRequest, ListAssetsResponse,
    ListKeysRequest, ListKeysResponse, ListPaymentsRequest, ListPaymentsResponse,
    ListWebhookDeliveriesRequest, ListWebhookDeliveriesResponse, PayerKey, Payment, PaymentEvent,
    RefundRequest, RefundResponse, RevokeKeyRequest, RotateKeyRequest, RotateKeyResponse,
    SetAccountMetadataRequest, SetWebhookRequest, VoidRequest, VoidResponse, WatchRequest, Webhook,
};

use crate::accounts;
use crate::error::LedgerError;
use crate::events::Authorization;
use crate::group::{parse_grpc_timeout, Committers};
use crate::ledger::{Ledger, Resolution};
use crate::operator;
use crate::verify::{check_authorizes, MAX_ID_LEN};

/// Most items in one data-plane call.
pub const MAX_BATCH: usize = 1000;

/// When the caller stops waiting, from its `grpc-timeout` header.
fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let timeout = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    Instant::now().checked_add(parse_grpc_timeout(timeout)?)
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
    /// Group commit of the items of concurrent calls.
    committers: Committers,
    /// Partial captures, one transaction per item (they are a few per long request).
    ledger: Ledger,
    /// Where authorize outcomes go for analytics and `Watch` (none: not recorded).
    recorder: Option<mpsc::Sender<Authorization>>,
}

impl DataPlaneService {
    /// Starts `committers` group-commit tasks for authorizations and as many for
    /// resolutions; needs a Tokio runtime.
    pub fn new(ledger: Ledger, committers: usize) -> Self {
        let per_kind = committers.max(1);
        DataPlaneService {
            committers: Committers::start(ledger.clone(), per_kind),
            ledger,
            recorder: None,
        }
    }

    /// Sends authorize outcomes to `recorder` (see [`crate::events::run_recorder`]).
    pub fn with_recorder(mut self, recorder: mpsc::Sender<Authorization>) -> Self {
        self.recorder = Some(recorder);
        self
    }
}

#[tonic::async_trait]
impl DataPlane for DataPlaneService {
    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        timed_status("Authorize", self.authorize_items(request)).await
    }

    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn capture(
        &self,
        request: Request<CaptureRequest>,
    ) -> Result<Response<CaptureResponse>, Status> {
        timed_status("Capture", self.capture_items(request)).await
    }

    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn capture_partial(
        &self,
        request: Request<CaptureRequest>,
    ) -> Result<Response<CaptureResponse>, Status> {
        timed_status("CapturePartial", self.capture_partial_items(request)).await
    }

    #[tracing::instrument(skip(self, request), fields(items = request.get_ref().items.len()))]
    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<VoidResponse>, Status> {
        timed_status("Void", self.void_items(request)).await
    }
}

impl DataPlaneService {
    async fn authorize_items(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<AuthorizeResponse, Status> {
        let deadline = deadline_of(&request);
        let items = request.into_inner().items;
        check_batch(items.len())?;
        // Every signature is checked before any row is touched.
        let mut results = Vec::with_capacity(items.len());
        let mut checked = Vec::with_capacity(items.len());
        for item in check_authorizes(&items) {
            match item {
                Ok(c) => {
                    checked.push(c);
                    results.push(None);
                }
                Err(refused) => results.push(Some(refused)),
            }
        }
        let placed = self.committers.authorize.submit(checked, deadline).await?;
        // A call none of whose items could be decided fails as a whole. Once one was,
        // each item gets its own answer: a caller that saw the call fail would take
        // payments already made (captured at once, some of them) for payments never made.
        let all_failed = placed.iter().all(Result::is_err);
        let mut placed = placed.into_iter();
        if all_failed {
            if let Some(Err(status)) = placed.next() {
                return Err(status);
            }
        }
        let results: Vec<_> = results
            .into_iter()
            .zip(&items)
            .map(|(refused, item)| {
                refused.unwrap_or_else(|| match placed.next() {
                    Some(Ok(result)) => result,
                    Some(Err(status)) => undecided(&item.request_id, &status),
                    None => undecided(
                        &item.request_id,
                        &Status::internal("settlement lost an item of a batch"),
                    ),
                })
            })
            .collect();
        if let Some(recorder) = &self.recorder {
            record_authorizations(recorder, &items, &results);
        }
        Ok(AuthorizeResponse { results })
    }

    async fn capture_items(
        &self,
        request: Request<CaptureRequest>,
    ) -> Result<CaptureResponse, Status> {
        let deadline = deadline_of(&request);
        let items = request.into_inner().items;
        check_batch(items.len())?;
        let items = items
            .into_iter()
            .map(|item| {
                crate::metrics::METRICS
                    .upstream_latency
                    .observe(std::time::Duration::from_micros(item.upstream_micros));
                let resolution = Resolution::Capture {
                    amount: item.amount,
                    http_status: item.http_status,
                    upstream_micros: item.upstream_micros,
                };
                (item.transaction_id, resolution)
            })
            .collect();
        // Any failed item fails the call: the filter sends it again whole, and a hold
        // already resolved is answered ALREADY_RESOLVED.
        let results = whole(self.committers.resolve.submit(items, deadline).await?)?;
        Ok(CaptureResponse { results })
    }

    async fn capture_partial_items(
        &self,
        request: Request<CaptureRequest>,
    ) -> Result<CaptureResponse, Status> {
        let items = request.into_inner().items;
        check_batch(items.len())?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(
                self.ledger
                    .capture_partial(&item.transaction_id, item.amount)
                    .await
                    .map_err(Status::from)?,
            );
        }
        Ok(CaptureResponse { results })
    }

    async fn void_items(&self, request: Request<VoidRequest>) -> Result<VoidResponse, Status> {
        let deadline = deadline_of(&request);
        let items = request.into_inner().items;
        check_batch(items.len())?;
        let items = items
            .into_iter()
            .map(|item| {
                let reason: String = item.reason.chars().take(MAX_ID_LEN).collect();
                (item.transaction_id, Resolution::Void { reason })
            })
            .collect();
        let results = whole(self.committers.resolve.submit(items, deadline).await?)?;
        Ok(VoidResponse { results })
    }
}

/// Results of a call that fails whole if any item failed (the first failure).
fn whole<R>(results: Vec<Result<R, Status>>) -> Result<Vec<R>, Status> {
    results.into_iter().collect()
}

/// The answer for an item settlement could not decide while it decided others of the
/// same call: nothing was held for it.
fn undecided(request_id: &str, status: &Status) -> AuthorizeResult {
    tracing::warn!(request_id, code = ?status.code(), error = %status.message(), "an authorization failed while others of its call were placed");
    AuthorizeResult {
        request_id: request_id.to_owned(),
        outcome: AuthorizeOutcome::Unavailable as i32,
        message: format!(
            "settlement could not decide this payment ({}); nothing is held, it may be sent again",
            status.code().description()
        ),
        ..Default::default()
    }
}

/// Hands authorize outcomes to analytics and `Watch` without delaying the answer. A
/// payment captured as it was authorized is left out: the write that placed it counted
/// it and announced it, authorization and capture both.
fn record_authorizations(
    recorder: &mpsc::Sender<Authorization>,
    items: &[x402_proto::settlement::v1::AuthorizeItem],
    results: &[x402_proto::settlement::v1::AuthorizeResult],
) {
    let records = items.iter().zip(results).filter_map(|(item, result)| {
        let authorized = result.outcome == AuthorizeOutcome::Authorized as i32;
        let outcome = AuthorizeOutcome::try_from(result.outcome)
            .map(|o| {
                o.as_str_name()
                    .trim_start_matches("AUTHORIZE_OUTCOME_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| "unspecified".into());
        crate::metrics::METRICS.authorization(&outcome);
        // Captured at once: the write that placed it counted it. Undecided: neither
        // paid nor refused.
        if (authorized && result.captured) || result.outcome == AuthorizeOutcome::Unavailable as i32
        {
            return None;
        }
        let proof = item.proof.clone().unwrap_or_default();
        Some(Authorization {
            event: if authorized { "authorized" } else { "refused" },
            transaction_id: result.transaction_id.clone(),
            route: item.route.chars().take(MAX_ID_LEN).collect(),
            merchant: proof.pay_to.chars().take(MAX_ID_LEN).collect(),
            payer: result.payer_account.clone(),
            asset: proof.asset.chars().take(MAX_ID_LEN).collect(),
            amount: i64::try_from(if authorized {
                result.held_amount
            } else {
                item.hold_amount
            })
            .unwrap_or(0),
        })
    });
    for record in records {
        if recorder.try_send(record).is_err() {
            tracing::warn!("analytics recorder is behind; an authorize outcome was not counted");
        }
    }
}

/// The operator service over one ledger.
#[derive(Debug, Clone)]
pub struct OperatorService {
    ledger: Ledger,
    /// Payment events for `Watch` (fed by the event listener).
    events: broadcast::Sender<PaymentEvent>,
    /// Turns true when the server starts shutting down: `Watch` streams end then.
    draining: watch::Receiver<bool>,
}

impl OperatorService {
    pub fn new(ledger: Ledger) -> Self {
        let (events, _) = broadcast::channel(16);
        let (_, draining) = watch::channel(false);
        OperatorService {
            ledger,
            events,
            draining,
        }
    }

    /// Feeds `Watch` from `events`; streams end when `draining` turns true.
    pub fn with_events(
        mut self,
        events: broadcast::Sender<PaymentEvent>,
        draining: watch::Receiver<bool>,
    ) -> Self {
        self.events = events;
        self.draining = draining;
        self
    }

    fn pool(&self) -> &sqlx::PgPool {
        self.ledger.pool()
    }
}

type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<PaymentEvent, Status>> + Send + 'static>,
>;

/// Times a handler and counts its status for the metrics.
async fn timed<T>(
    method: &str,
    fut: impl Future<Output = Result<T, LedgerError>>,
) -> Result<Response<T>, Status> {
    timed_status(method, async { fut.await.map_err(Status::from) }).await
}

/// [`timed`] for handlers that answer with a gRPC status of their own.
async fn timed_status<T>(
    method: &str,
    fut: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let result = fut.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    crate::metrics::METRICS.call(method, code, start.elapsed());
    result.map(Response::new)
}

#[tonic::async_trait]
impl Operator for OperatorService {
    type WatchStream = WatchStream;

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn create_account(
        &self,
        request: Request<CreateAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "CreateAccount",
            operator::idempotent(pool, &r.idempotency_key, "CreateAccount", &hash, || async {
                let kind = AccountKind::try_from(r.kind).unwrap_or(AccountKind::Unspecified);
                if kind == AccountKind::Payer && r.fee_bps > 0 {
                    return Err(LedgerError::InvalidArgument(
                        "fee_bps applies to merchant accounts".into(),
                    ));
                }
                let account = accounts::create_account(pool, &r.account_id, kind).await?;
                if !r.metadata.is_empty() || r.fee_bps > 0 {
                    operator::configure_account(pool, &r.account_id, &r.metadata, r.fee_bps)
                        .await?;
                }
                operator::with_details(pool, account).await
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let r = request.into_inner();
        let pool = self.pool();
        timed("GetAccount", async {
            operator::with_details(pool, accounts::get_account(pool, &r.account_id).await?).await
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn add_key(&self, request: Request<AddKeyRequest>) -> Result<Response<PayerKey>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "AddKey",
            operator::idempotent(pool, &r.idempotency_key, "AddKey", &hash, || {
                accounts::add_key(pool, &r.account_id, &r.public_key)
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(key = %request.get_ref().public_key))]
    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<PayerKey>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "RevokeKey",
            operator::idempotent(pool, &r.idempotency_key, "RevokeKey", &hash, || {
                accounts::revoke_key(pool, &r.public_key)
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id, amount = request.get_ref().amount))]
    async fn deposit(
        &self,
        request: Request<DepositRequest>,
    ) -> Result<Response<DepositResponse>, Status> {
        let r = request.into_inner();
        let pool = self.pool();
        timed("Deposit", async {
            operator::asset_decimals(pool, &r.asset).await?;
            operator::require_open(pool, &r.account_id).await?;
            let transaction_id = self
                .ledger
                .deposit(&r.account_id, &r.asset, r.amount, &r.idempotency_key)
                .await?;
            let balance = accounts::balance(pool, &r.account_id, &r.asset).await?;
            Ok(DepositResponse {
                transaction_id,
                balance: Some(balance),
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn get_balance(
        &self,
        request: Request<GetBalanceRequest>,
    ) -> Result<Response<Balance>, Status> {
        let r = request.into_inner();
        timed(
            "GetBalance",
            accounts::balance(self.pool(), &r.account_id, &r.asset),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(transaction = %request.get_ref().transaction_id))]
    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let r = request.into_inner();
        timed(
            "GetPayment",
            accounts::get_payment(self.pool(), &r.transaction_id),
        )
        .await
    }

    #[tracing::instrument(skip(self, request))]
    async fn list_payments(
        &self,
        request: Request<ListPaymentsRequest>,
    ) -> Result<Response<ListPaymentsResponse>, Status> {
        let r = request.into_inner();
        let filter = accounts::PaymentFilter {
            payer: r.payer_account.clone(),
            merchant: r.merchant_account.clone(),
            route: r.route.clone(),
            status: r.status.clone(),
            from_unix: r.from_unix,
            to_unix: r.to_unix,
        };
        timed("ListPayments", async {
            let (payments, next_page_token) =
                accounts::list_payments_filtered(self.pool(), &filter, r.page_size, &r.page_token)
                    .await?;
            Ok(ListPaymentsResponse {
                payments,
                next_page_token,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request))]
    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        let r = request.into_inner();
        timed("ListAccounts", async {
            let kind = AccountKind::try_from(r.kind).unwrap_or(AccountKind::Unspecified);
            let (accounts, next_page_token) =
                operator::list_accounts(self.pool(), kind, r.page_size, &r.page_token).await?;
            Ok(ListAccountsResponse {
                accounts,
                next_page_token,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn set_account_metadata(
        &self,
        request: Request<SetAccountMetadataRequest>,
    ) -> Result<Response<Account>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "SetAccountMetadata",
            operator::idempotent(
                pool,
                &r.idempotency_key,
                "SetAccountMetadata",
                &hash,
                || operator::set_metadata(pool, &r.account_id, &r.metadata),
            ),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn close_account(
        &self,
        request: Request<CloseAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "CloseAccount",
            operator::idempotent(pool, &r.idempotency_key, "CloseAccount", &hash, || {
                operator::close_account(pool, &r.account_id)
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let r = request.into_inner();
        timed("ListKeys", async {
            Ok(ListKeysResponse {
                keys: operator::list_keys(self.pool(), &r.account_id).await?,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "RotateKey",
            operator::idempotent(pool, &r.idempotency_key, "RotateKey", &hash, || async {
                let (added, revoked) =
                    operator::rotate_key(pool, &r.account_id, &r.old_public_key, &r.new_public_key)
                        .await?;
                Ok(RotateKeyResponse {
                    added: Some(added),
                    revoked: Some(revoked),
                })
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id, amount = request.get_ref().amount))]
    async fn adjust(
        &self,
        request: Request<AdjustRequest>,
    ) -> Result<Response<AdjustResponse>, Status> {
        let r = request.into_inner();
        let pool = self.pool();
        timed("Adjust", async {
            let transaction_id = operator::adjust(
                pool,
                &r.account_id,
                &r.asset,
                r.amount,
                &r.reason,
                &r.idempotency_key,
            )
            .await?;
            Ok(AdjustResponse {
                transaction_id,
                balance: Some(accounts::balance(pool, &r.account_id, &r.asset).await?),
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(account = %request.get_ref().account_id))]
    async fn get_balances(
        &self,
        request: Request<GetBalancesRequest>,
    ) -> Result<Response<GetBalancesResponse>, Status> {
        let r = request.into_inner();
        let pool = self.pool();
        timed("GetBalances", async {
            accounts::get_account(pool, &r.account_id).await?;
            let assets: Vec<String> = sqlx::query_scalar(
                "SELECT asset FROM balances WHERE account_id = $1 ORDER BY asset",
            )
            .bind(&r.account_id)
            .fetch_all(pool)
            .await?;
            let mut balances = Vec::with_capacity(assets.len());
            for asset in assets {
                balances.push(accounts::balance(pool, &r.account_id, &asset).await?);
            }
            Ok(GetBalancesResponse { balances })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(code = %request.get_ref().code))]
    async fn create_asset(
        &self,
        request: Request<CreateAssetRequest>,
    ) -> Result<Response<Asset>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "CreateAsset",
            operator::idempotent(pool, &r.idempotency_key, "CreateAsset", &hash, || {
                operator::create_asset(pool, &r.code, r.decimals)
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, _request))]
    async fn list_assets(
        &self,
        _request: Request<ListAssetsRequest>,
    ) -> Result<Response<ListAssetsResponse>, Status> {
        timed("ListAssets", async {
            Ok(ListAssetsResponse {
                assets: operator::list_assets(self.pool()).await?,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(transaction = %request.get_ref().transaction_id, amount = request.get_ref().amount))]
    async fn refund(
        &self,
        request: Request<RefundRequest>,
    ) -> Result<Response<RefundResponse>, Status> {
        let r = request.into_inner();
        let pool = self.pool();
        timed("Refund", async {
            let (refund_id, amount) = operator::refund(
                pool,
                &r.transaction_id,
                r.amount,
                &r.reason,
                &r.idempotency_key,
            )
            .await?;
            operator::refund_response(pool, &r.transaction_id, refund_id, amount).await
        })
        .await
    }

    #[tracing::instrument(skip(self, request))]
    async fn get_analytics(
        &self,
        request: Request<AnalyticsRequest>,
    ) -> Result<Response<AnalyticsResponse>, Status> {
        let r = request.into_inner();
        timed("GetAnalytics", crate::analytics::query(self.pool(), &r)).await
    }

    #[tracing::instrument(skip(self, request))]
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        let mut events = self.events.subscribe();
        let mut draining = self.draining.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            if *draining.borrow() {
                return;
            }
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = draining.changed() => return,
                    _ = tx.closed() => return,
                };
                match event {
                    Ok(e) => {
                        let wanted = (r.merchant.is_empty() || e.merchant_account == r.merchant)
                            && (r.payer_account.is_empty() || e.payer_account == r.payer_account);
                        if wanted && tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "a Watch stream fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[tracing::instrument(skip(self, request), fields(merchant = %request.get_ref().merchant))]
    async fn set_webhook(
        &self,
        request: Request<SetWebhookRequest>,
    ) -> Result<Response<Webhook>, Status> {
        let r = request.into_inner();
        let hash = operator::request_hash(&r, |r| r.idempotency_key.clear());
        let pool = self.pool();
        timed(
            "SetWebhook",
            operator::idempotent(pool, &r.idempotency_key, "SetWebhook", &hash, || {
                operator::set_webhook(pool, &r.merchant, &r.url, &r.secret)
            }),
        )
        .await
    }

    #[tracing::instrument(skip(self, request), fields(merchant = %request.get_ref().merchant))]
    async fn list_webhook_deliveries(
        &self,
        request: Request<ListWebhookDeliveriesRequest>,
    ) -> Result<Response<ListWebhookDeliveriesResponse>, Status> {
        let r = request.into_inner();
        timed("ListWebhookDeliveries", async {
            Ok(ListWebhookDeliveriesResponse {
                deliveries: operator::list_deliveries(self.pool(), &r.merchant, r.page_size)
                    .await?,
            })
        })
        .await
    }
}
