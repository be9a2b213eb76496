//! Operator rules against a real PostgreSQL: refunds capped by the capture, the
//! platform fee split, currencies kept apart, idempotent replays, key rotation,
//! closing accounts, bearer tokens, Watch, analytics and webhook delivery with
//! retries across a receiver outage and a settlement restart, over TLS to a
//! receiver with a private CA, and once per event from two replicas.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use x402_proto::settlement::v1::*;
use x402_settlement::server::ServerConfig;

/// A merchant with `fee_bps`, a funded payer, and one captured payment of `amount`.
async fn captured_payment(h: &Harness, fee_bps: u32, amount: u64) -> (Payer, String) {
    h.merchant_with_fee(MERCHANT, fee_bps).await;
    let p = h.payer("pat", 1_000_000).await;
    let r = h.authorize(paid(&p, "pay-1", amount)).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::Authorized, "{}", r.message);
    let c = h.capture(&r.transaction_id, amount).await;
    assert_eq!(resolved(&c), ResolveOutcome::Captured);
    (p, r.transaction_id)
}

fn refund(tx: &str, amount: u64, key: &str) -> RefundRequest {
    RefundRequest {
        transaction_id: tx.into(),
        amount,
        reason: "customer complaint".into(),
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn the_platform_fee_is_split_at_capture_and_reported() {
    let h = start().await;
    // 2.5 % of 10 001 = 250.025 -> 250 (rounded down, never more than the rate).
    let (_, tx) = captured_payment(&h, 250, 10_001).await;
    let merchant = h.balance(MERCHANT).await;
    assert_eq!(
        (merchant.credits_posted, merchant.debits_posted),
        (10_001, 250)
    );
    assert_eq!(merchant.posted, 9_751);
    let platform = h.balance_of("system:platform").await;
    assert_eq!((platform.credits_posted, platform.posted), (250, 250));
    let payer = h.balance("pat").await;
    assert_eq!((payer.available, payer.held), (1_000_000 - 10_001, 0));
    let p = h.payment(&tx).await;
    assert_eq!(
        (p.captured, p.fee, p.http_status, p.upstream_micros),
        (10_001, 250, 200, 1200)
    );

    let a = h
        .wait_for_analytics(|a| a.totals.as_ref().is_some_and(|t| t.captures == 1))
        .await;
    let route = &a.routes[0];
    assert_eq!(
        (route.revenue, route.fees, route.net_revenue),
        (10_001, 250, 9_751)
    );
}

#[tokio::test]
async fn refunds_never_exceed_the_capture_and_return_credit() {
    let h = start().await;
    let (_, tx) = captured_payment(&h, 1_000, 10_000).await; // 10 % fee = 1 000
    let mut op = h.op.clone();

    let first = op
        .refund(refund(&tx, 3_000, "r1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.amount, 3_000);
    let p = first.payment.unwrap();
    assert_eq!(
        (p.status.as_str(), p.captured, p.refunded),
        ("captured", 10_000, 3_000)
    );
    // The same key and request replays; another request under it is refused.
    let again = op
        .refund(refund(&tx, 3_000, "r1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.refund_id.as_str(), again.amount),
        (first.refund_id.as_str(), 3_000)
    );
    let conflict = op.refund(refund(&tx, 10, "r1")).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    // More than what is left is refused and moves nothing.
    let too_much = op.refund(refund(&tx, 7_001, "")).await.unwrap_err();
    assert_eq!(
        too_much.code(),
        Code::FailedPrecondition,
        "{}",
        too_much.message()
    );
    assert_eq!(h.balance("pat").await.available, 1_000_000 - 10_000 + 3_000);

    // 0 refunds the rest; afterwards nothing is left to refund.
    let rest = op.refund(refund(&tx, 0, "")).await.unwrap().into_inner();
    assert_eq!(rest.amount, 7_000);
    assert_eq!(
        op.refund(refund(&tx, 1, "")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(h.balance("pat").await.available, 1_000_000);
    // Merchant and platform each gave back exactly what they got.
    assert_eq!(h.balance(MERCHANT).await.posted, 0);
    assert_eq!(h.balance_of("system:platform").await.posted, 0);

    // The database refuses a refund counter above the capture whatever the code does.
    let raw = sqlx::query("UPDATE payment_refunds SET refunded = captured + 1 WHERE hold_id = $1")
        .bind(&tx)
        .execute(&h.pool)
        .await
        .unwrap_err();
    assert!(
        raw.to_string().contains("payment_refunds_within_captured"),
        "{raw}"
    );

    let listed = op
        .list_payments(ListPaymentsRequest {
            status: "refunded".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.payments.len(), 1);
    assert_eq!(listed.payments[0].refunded, 10_000);

    // A held (not captured) payment cannot be refunded.
    let p = h.payer("quinn", 10_000).await;
    let held = h.authorize(paid(&p, "held-1", 500)).await;
    assert_eq!(
        op.refund(refund(&held.transaction_id, 0, ""))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn concurrent_refunds_never_exceed_the_capture() {
    let h = start().await;
    let (_, tx) = captured_payment(&h, 0, 10_000).await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut op = h.op.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            op.refund(refund(&tx, 1_000, "")).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message()),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(h.payment(&tx).await.refunded, 10_000);
    assert_eq!(h.balance("pat").await.available, 1_000_000);
}

#[tokio::test]
async fn assets_keep_balances_apart() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("eve", 0).await;
    let mut op = h.op.clone();
    let deposit = |asset: &str, amount| DepositRequest {
        account_id: "eve".into(),
        asset: asset.into(),
        amount,
        idempotency_key: String::new(),
    };
    // Unregistered assets are refused; registering twice with other decimals too.
    assert_eq!(
        op.deposit(deposit("EUR", 100)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let eur = CreateAssetRequest {
        code: "EUR".into(),
        decimals: 2,
        ..Default::default()
    };
    op.create_asset(eur.clone()).await.unwrap();
    op.create_asset(eur).await.unwrap();
    let clash = CreateAssetRequest {
        code: "EUR".into(),
        decimals: 6,
        ..Default::default()
    };
    assert_eq!(
        op.create_asset(clash).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let assets = op
        .list_assets(ListAssetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .assets;
    assert!(assets.iter().any(|a| a.code == "EUR" && a.decimals == 2));

    op.deposit(deposit("EUR", 1_000_000)).await.unwrap();
    // Plenty of EUR, no USD: a USD payment is refused and no EUR moves.
    let r = h.authorize(paid(&p, "usd-1", 100)).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::InsufficientFunds);
    let balances = op
        .get_balances(GetBalancesRequest {
            account_id: "eve".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .balances;
    let by_asset: HashMap<_, _> = balances.iter().map(|b| (b.asset.as_str(), b)).collect();
    assert_eq!(by_asset["EUR"].available, 1_000_000);
    assert_eq!(by_asset["EUR"].decimals, 2);
    assert!(by_asset.get("USD").is_none_or(|b| b.available == 0));

    op.deposit(deposit("USD", 500)).await.unwrap();
    let r = h.authorize(paid(&p, "usd-2", 100)).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::Authorized);
    let usd = h.balance("eve").await;
    assert_eq!((usd.available, usd.held, usd.decimals), (400, 100, 6));
    let eur = op
        .get_balance(GetBalanceRequest {
            account_id: "eve".into(),
            asset: "EUR".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((eur.available, eur.held), (1_000_000, 0));
}

#[tokio::test]
async fn adjustments_need_a_reason_replay_by_key_and_never_overdraw() {
    let h = start().await;
    h.payer("ann", 1_000).await;
    let mut op = h.op.clone();
    let adjust = |amount: i64, reason: &str, key: &str| AdjustRequest {
        account_id: "ann".into(),
        asset: ASSET.into(),
        amount,
        reason: reason.into(),
        idempotency_key: key.into(),
    };
    assert_eq!(
        op.adjust(adjust(5, "", "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let credit = op
        .adjust(adjust(500, "goodwill", "adj-1"))
        .await
        .unwrap()
        .into_inner();
    let replay = op
        .adjust(adjust(500, "goodwill", "adj-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(credit.transaction_id, replay.transaction_id);
    assert_eq!(h.balance("ann").await.available, 1_500);
    assert_eq!(
        op.adjust(adjust(501, "goodwill", "adj-1"))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    // A deposit key is not reusable for an adjustment either.
    op.deposit(DepositRequest {
        account_id: "ann".into(),
        asset: ASSET.into(),
        amount: 1,
        idempotency_key: "shared-key".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        op.adjust(adjust(1, "x", "shared-key"))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let overdraw = op
        .adjust(adjust(-1_502, "chargeback", ""))
        .await
        .unwrap_err();
    assert_eq!(overdraw.code(), Code::FailedPrecondition);
    let debit = op
        .adjust(adjust(-1_501, "chargeback", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(debit.balance.unwrap().available, 0);
    let system = h.balance_of("system:adjust").await;
    assert_eq!(system.posted, 1_001);
}

#[tokio::test]
async fn operator_mutations_are_idempotent_by_key() {
    let h = start().await;
    let mut op = h.op.clone();
    let create = |kind: AccountKind, meta: &str| CreateAccountRequest {
        account_id: "acme".into(),
        kind: kind as i32,
        metadata: HashMap::from([("plan".to_string(), meta.to_string())]),
        fee_bps: 0,
        idempotency_key: "create-acme".into(),
    };
    let a = op
        .create_account(create(AccountKind::Merchant, "gold"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.metadata["plan"], "gold");
    let b = op
        .create_account(create(AccountKind::Merchant, "gold"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a, b);
    let conflict = op
        .create_account(create(AccountKind::Merchant, "silver"))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    let set = |v: &str, key: &str| SetAccountMetadataRequest {
        account_id: "acme".into(),
        metadata: HashMap::from([("plan".to_string(), v.to_string())]),
        idempotency_key: key.into(),
    };
    op.set_account_metadata(set("platinum", "meta-1"))
        .await
        .unwrap();
    // A replay does not overwrite what happened since.
    op.set_account_metadata(set("bronze", "")).await.unwrap();
    let replay = op
        .set_account_metadata(set("platinum", "meta-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.metadata["plan"], "platinum");
    let now = op
        .get_account(GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.metadata["plan"], "bronze");

    h.payer("zoe", 0).await;
    let listed = op
        .list_accounts(ListAccountsRequest {
            kind: AccountKind::Payer as i32,
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .accounts
            .iter()
            .map(|a| a.account_id.as_str())
            .collect::<Vec<_>>(),
        ["zoe"]
    );
}

#[tokio::test]
async fn rotated_and_closed_accounts_stop_paying() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("rita", 100_000).await;
    let mut op = h.op.clone();
    let new_key = key_for("rita-2");
    let new_public = x402_proto::signing::public_key_hex(&new_key);
    let rotated = op
        .rotate_key(RotateKeyRequest {
            account_id: "rita".into(),
            old_public_key: p.public_key.clone(),
            new_public_key: new_public.clone(),
            idempotency_key: "rot-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.revoked.unwrap().revoked);
    let keys = op
        .list_keys(ListKeysRequest {
            account_id: "rita".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 2);
    assert_eq!(keys.iter().filter(|k| !k.revoked).count(), 1);

    let old = h.authorize(paid(&p, "old-key", 100)).await;
    assert_eq!(outcome(&old), AuthorizeOutcome::KeyRevoked);
    let p2 = Payer {
        account: "rita".into(),
        key: new_key,
        public_key: new_public,
    };
    let fresh = h.authorize(paid(&p2, "new-key", 100)).await;
    assert_eq!(outcome(&fresh), AuthorizeOutcome::Authorized);

    // Closing waits for unresolved holds; then the account can no longer pay or be credited.
    let close = || CloseAccountRequest {
        account_id: "rita".into(),
        idempotency_key: String::new(),
    };
    assert_eq!(
        op.close_account(close()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    h.capture(&fresh.transaction_id, 100).await;
    let closed = op.close_account(close()).await.unwrap().into_inner();
    assert!(closed.closed);
    let after = h.authorize(paid(&p2, "after-close", 100)).await;
    assert_eq!(outcome(&after), AuthorizeOutcome::KeyRevoked);
    let deposit = op
        .deposit(DepositRequest {
            account_id: "rita".into(),
            asset: ASSET.into(),
            amount: 5,
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(deposit.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_closed_merchant_takes_no_new_payments() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("mona", 100_000).await;
    let before = h.authorize(paid(&p, "before-close", 1_000)).await;
    assert_eq!(outcome(&before), AuthorizeOutcome::Authorized);
    h.capture(&before.transaction_id, 1_000).await;
    let mut op = h.op.clone();
    let closed = op
        .close_account(CloseAccountRequest {
            account_id: MERCHANT.into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(closed.closed);

    let after = h.authorize(paid(&p, "after-close", 1_000)).await;
    assert_eq!(outcome(&after), AuthorizeOutcome::MerchantClosed);
    assert!(after.transaction_id.is_empty());
    assert!(after.message.contains("closed"), "{}", after.message);
    // Concurrent calls (committed in groups) are refused the same way.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut data = h.data.clone();
            let item = paid(&p, &format!("after-close-{i}"), 1_000);
            tokio::spawn(async move {
                data.authorize(AuthorizeRequest { items: vec![item] })
                    .await
                    .unwrap()
                    .into_inner()
                    .results
                    .remove(0)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(outcome(&t.await.unwrap()), AuthorizeOutcome::MerchantClosed);
    }
    // Nothing was held: the payer keeps everything but the one capture.
    let balances = op
        .get_balances(GetBalancesRequest {
            account_id: "mona".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .balances;
    let usd = balances.iter().find(|b| b.asset == ASSET).unwrap();
    assert_eq!((usd.available, usd.debits_pending), (99_000, 0));
}

#[tokio::test]
async fn tokens_guard_both_apis_when_set() {
    let config = ServerConfig {
        operator_token: x402_settlement::auth::BearerToken::new(Some("op-secret-token".into())),
        dataplane_token: x402_settlement::auth::BearerToken::new(Some("dp-secret-token".into())),
        ..ServerConfig::default()
    };
    let h = start_with(config).await;
    let mut op = h.op.clone();
    let denied = op
        .get_account(GetAccountRequest {
            account_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let denied = h
        .data
        .clone()
        .capture(CaptureRequest { items: vec![] })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = |token: &'static str| {
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(req)
        }
    };
    let mut op = operator_client::OperatorClient::with_interceptor(
        channel.clone(),
        bearer("op-secret-token"),
    );
    let missing = op
        .get_account(GetAccountRequest {
            account_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // The data-plane token does not open the operator API.
    let mut wrong = operator_client::OperatorClient::with_interceptor(
        channel.clone(),
        bearer("dp-secret-token"),
    );
    assert_eq!(
        wrong
            .list_assets(ListAssetsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut data =
        data_plane_client::DataPlaneClient::with_interceptor(channel, bearer("dp-secret-token"));
    data.capture(CaptureRequest { items: vec![] })
        .await
        .unwrap();
}

#[tokio::test]
async fn watch_streams_events_and_analytics_count_them() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("wes", 1_000_000).await;
    let mut stream = h.watch_merchant(MERCHANT).await;
    // The listener subscribes asynchronously: keep paying until the stream sees events.
    let mut seen: Vec<PaymentEvent> = Vec::new();
    let mut paid_txs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    // Until one payment shows both its authorization and its capture (authorizations
    // are announced in batches, so they may arrive after the capture).
    let both = |seen: &[PaymentEvent]| {
        seen.iter().any(|a| {
            a.r#type == "authorized"
                && seen
                    .iter()
                    .any(|c| c.r#type == "captured" && c.transaction_id == a.transaction_id)
        })
    };
    while !both(&seen) {
        assert!(
            Instant::now() < deadline,
            "no events on the stream: {seen:?}"
        );
        let r = h.authorize(paid(&p, &format!("w-{i}"), 1_000)).await;
        let mut c = CaptureItem {
            transaction_id: r.transaction_id.clone(),
            amount: 900,
            upstream_micros: 3_000 + i * 1000,
            http_status: 200,
        };
        if i == 0 {
            c.http_status = 502;
        }
        h.data
            .clone()
            .capture(CaptureRequest { items: vec![c] })
            .await
            .unwrap();
        paid_txs.push(r.transaction_id);
        i += 1;
        while let Ok(Ok(Some(e))) =
            tokio::time::timeout(Duration::from_millis(300), stream.message()).await
        {
            seen.push(e);
        }
    }
    let captured = seen.iter().find(|e| e.r#type == "captured").unwrap();
    assert!(paid_txs.contains(&captured.transaction_id));
    assert_eq!(
        (captured.amount, captured.payer_account.as_str()),
        (900, "wes")
    );
    assert_eq!(captured.route, "quote");
    let authorized: Vec<_> = seen.iter().filter(|e| e.r#type == "authorized").collect();
    for a in &authorized {
        assert!(paid_txs.contains(&a.transaction_id), "{a:?}");
        assert_eq!(
            (
                a.amount,
                a.payer_account.as_str(),
                a.merchant_account.as_str()
            ),
            (1_000, "wes", MERCHANT),
            "an authorization announces the amount held"
        );
        assert_eq!(a.route, "quote");
        assert!(a.at_unix_ms > 0);
    }

    // One refused call (more than the payer has); analytics must account for every call.
    let refused = h.authorize(paid(&p, "w-too-much", 10_000_000)).await;
    assert_eq!(outcome(&refused), AuthorizeOutcome::InsufficientFunds);
    let n = paid_txs.len() as u64;
    let a = h
        .wait_for_analytics(|a| {
            a.totals
                .as_ref()
                .is_some_and(|t| t.captures == n && t.requests == n + 1)
        })
        .await;
    let t = a.totals.unwrap();
    assert_eq!((t.paid, t.refused), (n, 1));
    assert_eq!(t.revenue, 900 * n);
    assert_eq!(t.upstream_errors, 1);
    assert!(t.latency_p50_micros >= 3_000, "{t:?}");
    assert_eq!(a.top_payers[0].payer_account, "wes");
    assert_eq!(a.top_payers[0].spent, 900 * n);
    assert_eq!(a.routes[0].route, "quote");
}

/// Headers and body of one accepted POST.
type Delivery = (HashMap<String, String>, String);

/// A webhook receiver that answers 503 while `down`, and records what it accepted.
struct Receiver {
    addr: SocketAddr,
    down: Arc<Mutex<bool>>,
    received: Arc<Mutex<Vec<Delivery>>>,
    attempts: Arc<Mutex<u32>>,
}

async fn receiver() -> Receiver {
    receiver_with(None).await
}

/// A connection the receiver serves: plain TCP or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A receiver over TLS (`tls`) or plain HTTP.
async fn receiver_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let down = Arc::new(Mutex::new(false));
    let received = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(0u32));
    let (d, r, n) = (down.clone(), received.clone(), attempts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (d, r, n) = (d.clone(), r.clone(), n.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let io: Box<dyn Io> = match tls {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(s) => Box::new(s),
                        // A client that does not trust the certificate hangs up.
                        Err(_) => return,
                    },
                    None => Box::new(stream),
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (d, r, n) = (d.clone(), r.clone(), n.clone());
                        async move {
                            *n.lock().unwrap() += 1;
                            let headers: HashMap<String, String> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = if *d.lock().unwrap() {
                                503
                            } else {
                                r.lock()
                                    .unwrap()
                                    .push((headers, String::from_utf8_lossy(&body).into_owned()));
                                200
                            };
                            let mut resp = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            ));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    Receiver {
        addr,
        down,
        received,
        attempts,
    }
}

fn fast_webhooks() -> ServerConfig {
    ServerConfig {
        webhooks: x402_settlement::webhooks::WebhookConfig {
            poll_interval: Duration::from_millis(50),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            ..Default::default()
        },
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn webhooks_are_signed_retried_through_an_outage_and_survive_a_restart() {
    const SECRET: &str = "whsec-0123456789abcdef";
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let rx = receiver().await;
    *rx.down.lock().unwrap() = true;
    let h = start_on(&url, fast_webhooks()).await;
    h.merchant(MERCHANT).await;
    h.op.clone()
        .set_webhook(SetWebhookRequest {
            merchant: MERCHANT.into(),
            url: format!("http://{}/hooks", rx.addr),
            secret: SECRET.into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let p = h.payer("hank", 100_000).await;
    let r = h.authorize(paid(&p, "hook-1", 5_000)).await;
    h.capture(&r.transaction_id, 5_000).await;

    // The receiver is down: attempts pile up, each recorded with its status.
    let deadline = Instant::now() + Duration::from_secs(20);
    while *rx.attempts.lock().unwrap() < 2 {
        assert!(Instant::now() < deadline, "no retries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = |h: &Harness| {
        let mut op = h.op.clone();
        async move {
            op.list_webhook_deliveries(ListWebhookDeliveriesRequest {
                merchant: MERCHANT.into(),
                page_size: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .deliveries
        }
    };
    let d = deliveries(&h).await;
    assert_eq!(d.len(), 1);
    assert!(
        !d[0].delivered && d[0].attempts >= 1 && d[0].last_status == 503,
        "{d:?}"
    );

    // Settlement stops with the event undelivered; a new process delivers it.
    drop(h);
    tokio::time::sleep(Duration::from_millis(200)).await;
    *rx.down.lock().unwrap() = false;
    // The lease of an interrupted attempt may have to run out first (timeout + 5 s).
    let h = start_on(&url, fast_webhooks()).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while rx.received.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (headers, body) = rx.received.lock().unwrap()[0].clone();
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "payment.captured");
    assert_eq!(event["data"]["transaction_id"], r.transaction_id.as_str());
    assert_eq!(event["data"]["amount"], 5_000);
    assert_eq!(headers["x-402x-event-id"], event["id"].as_str().unwrap());
    let ts: i64 = headers["x-402x-timestamp"].parse().unwrap();
    assert_eq!(
        headers["x-402x-signature"],
        x402_settlement::webhooks::signature(SECRET, ts, &body)
    );
    assert_ne!(
        headers["x-402x-signature"],
        x402_settlement::webhooks::signature("another-secret-0000", ts, &body)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = deliveries(&h).await;
        if d[0].delivered {
            assert_eq!(d[0].last_status, 200);
            assert!(d[0].attempts >= 2);
            break;
        }
        assert!(Instant::now() < deadline, "delivery not recorded: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Refunds are announced too.
    h.op.clone()
        .refund(refund(&r.transaction_id, 1_000, ""))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.received.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "refund event never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = rx.received.lock().unwrap()[1].clone();
    assert!(body.contains("payment.refunded"), "{body}");
}

/// Two settlement processes on one database, as replicas behind one Service: both
/// poll the webhook outbox and both sweep expired holds, and still every event reaches
/// the merchant once and every hold expires once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_deliver_each_webhook_once_and_expire_each_hold_once() {
    const PAYMENTS: u64 = 30;
    const EXPIRING: u64 = 20;
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let rx = receiver().await;
    let config = || ServerConfig {
        hold_sweep_interval: Duration::from_millis(20),
        ..fast_webhooks()
    };
    let replicas = [
        start_on(&url, config()).await,
        start_on(&url, config()).await,
    ];
    let a = &replicas[0];
    a.merchant(MERCHANT).await;
    a.op.clone()
        .set_webhook(SetWebhookRequest {
            merchant: MERCHANT.into(),
            url: format!("http://{}/hooks", rx.addr),
            secret: "whsec-replicas-0123456789".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let p = a.payer("rita", 1_000_000).await;
    // Captured payments and holds left to expire, through either replica.
    for i in 0..PAYMENTS {
        let h = &replicas[(i % 2) as usize];
        let r = h.authorize(paid(&p, &format!("paid-{i}"), 1_000)).await;
        assert_eq!(outcome(&r), AuthorizeOutcome::Authorized);
        h.capture(&r.transaction_id, 1_000).await;
    }
    for i in 0..EXPIRING {
        let mut item = paid(&p, &format!("lapse-{i}"), 700);
        item.hold_ttl_seconds = 1;
        let r = replicas[(i % 2) as usize].authorize(item).await;
        assert_eq!(outcome(&r), AuthorizeOutcome::Authorized);
    }

    // Every hold expires (both sweepers at it every 20 ms), each once.
    let count = |sql: &'static str| {
        let pool = a.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count("SELECT count(*) FROM open_holds").await > 0 {
        assert!(Instant::now() < deadline, "holds left unexpired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expiries = count("SELECT count(*) FROM transfers WHERE kind = 'expire'").await;
    assert_eq!(expiries, EXPIRING as i64);
    let balance = a.balance_of("rita").await;
    assert_eq!(balance.debits_pending, 0);
    assert_eq!(balance.debits_posted, PAYMENTS * 1_000);

    // Every event in the outbox delivered, none twice, also after both pollers have
    // had many more turns.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count("SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL").await > 0 {
        assert!(Instant::now() < deadline, "events left undelivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = count("SELECT count(*) FROM webhook_outbox").await;
    assert!(events >= PAYMENTS as i64, "{events} events");
    let ids: Vec<String> = rx
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(headers, _)| headers["x-402x-event-id"].clone())
        .collect();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "an event was delivered twice");
    assert_eq!(ids.len() as i64, events);
    a.assert_clean().await;
}

// The CLI runs as a blocking child process: the server needs threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_every_new_operator_call_with_the_token() {
    let h = start_with(ServerConfig {
        operator_token: x402_settlement::auth::BearerToken::new(Some("cli-token-0001".into())),
        ..ServerConfig::default()
    })
    .await;
    let server = format!("http://{}", h.addr);
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_x402-settlement"));
        cmd.arg("--server")
            .arg(&server)
            .args(args)
            .env_remove("X402_OPERATOR_TOKEN");
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        cmd.output().unwrap()
    };
    let denied = cli(None, &["assets"]);
    assert!(!denied.status.success());
    let why = String::from_utf8_lossy(&denied.stderr);
    assert!(why.contains("missing or wrong bearer token"), "{why}");
    let json = |args: &[&str]| -> serde_json::Value {
        let out = cli(Some("cli-token-0001"), args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    json(&["--json", "asset-create", "--code", "JPY", "--decimals", "0"]);
    let assets = json(&["--json", "assets"]);
    assert!(assets["assets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["code"] == "JPY"));
    json(&[
        "--json",
        "account",
        "create",
        "--id",
        "cli-payer",
        "--kind",
        "payer",
    ]);
    let adjusted = json(&[
        "--json",
        "adjust",
        "--account",
        "cli-payer",
        "--asset",
        "JPY",
        "--amount",
        "700",
        "--reason",
        "welcome",
    ]);
    assert_eq!(adjusted["balance"]["available"], 700);
    let balances = json(&["--json", "balances", "--account", "cli-payer"]);
    assert_eq!(balances["balances"][0]["asset"], "JPY");
    assert_eq!(balances["balances"][0]["decimals"], 0);
    let accounts = json(&["--json", "accounts", "--kind", "payer"]);
    assert_eq!(accounts["accounts"][0]["account_id"], "cli-payer");
    let analytics = json(&["--json", "analytics", "--minutes", "5"]);
    assert!(analytics["totals"]["requests"].is_u64());
    // Tables for people.
    let table = cli(
        Some("cli-token-0001"),
        &["balances", "--account", "cli-payer"],
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("ASSET"), "{text}");
    assert!(text.contains("JPY"), "{text}");
}

/// A CA and a certificate it signed for 127.0.0.1: the CA's PEM and a TLS acceptor.
fn private_ca() -> (String, tokio_rustls::TlsAcceptor) {
    use tokio_rustls::rustls;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "402x test receivers CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn webhooks_reach_https_receivers_that_the_extra_ca_vouches_for() {
    const SECRET: &str = "whsec-tls-0123456789";
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let (ca_pem, acceptor) = private_ca();
    let rx = receiver_with(Some(acceptor)).await;
    // Without the CA, the receiver's certificate is refused and the event waits.
    let h = start_on(&url, fast_webhooks()).await;
    h.merchant(MERCHANT).await;
    h.op.clone()
        .set_webhook(SetWebhookRequest {
            merchant: MERCHANT.into(),
            url: format!("https://{}/hooks", rx.addr),
            secret: SECRET.into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let p = h.payer("tess", 100_000).await;
    let r = h.authorize(paid(&p, "tls-1", 4_000)).await;
    h.capture(&r.transaction_id, 4_000).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let d =
            h.op.clone()
                .list_webhook_deliveries(ListWebhookDeliveriesRequest {
                    merchant: MERCHANT.into(),
                    page_size: 10,
                })
                .await
                .unwrap()
                .into_inner()
                .deliveries;
        if d.first()
            .is_some_and(|d| d.attempts >= 1 && !d.last_error.is_empty())
        {
            break d[0].clone();
        }
        assert!(Instant::now() < deadline, "no failed attempt: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!failed.delivered);
    assert!(
        failed.last_error.to_lowercase().contains("certificate"),
        "the error says the certificate is not trusted: {}",
        failed.last_error
    );
    assert!(rx.received.lock().unwrap().is_empty());
    drop(h);

    // Trusting the private CA, a new process delivers it over TLS, signed.
    let config = ServerConfig {
        webhooks: x402_settlement::webhooks::WebhookConfig {
            extra_ca_pem: ca_pem.into_bytes(),
            ..fast_webhooks().webhooks
        },
        ..fast_webhooks()
    };
    let _h = start_on(&url, config).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while rx.received.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never delivered over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (headers, body) = rx.received.lock().unwrap()[0].clone();
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "payment.captured");
    assert_eq!(event["data"]["transaction_id"], r.transaction_id.as_str());
    let ts: i64 = headers["x-402x-timestamp"].parse().unwrap();
    assert_eq!(
        headers["x-402x-signature"],
        x402_settlement::webhooks::signature(SECRET, ts, &body)
    );
}

/// Refunds of one unit each of a payment whose fee is half of it: each refund's share
/// of the fee is the share of all refunds so far less what earlier ones returned, so
/// the shares add up to the fee and none is more than its refund (rounded down one by
/// one, the last refund would owe the whole fee on one unit and always fail).
#[tokio::test]
async fn small_refunds_return_the_fee_exactly_and_the_last_one_succeeds() {
    let h = start().await;
    let (_, tx) = captured_payment(&h, 5_000, 10).await;
    assert_eq!(h.payment(&tx).await.fee, 5);
    let mut op = h.op.clone();
    for i in 0..10 {
        let r = op
            .refund(refund(&tx, 1, &format!("unit-{i}")))
            .await
            .unwrap_or_else(|e| panic!("refund {i}: {e}"))
            .into_inner();
        assert_eq!(r.amount, 1, "refund {i}");
    }
    let p = h.payment(&tx).await;
    assert_eq!((p.captured, p.refunded, p.fee), (10, 10, 5));
    let fee_refunded: i64 =
        sqlx::query_scalar("SELECT fee_refunded FROM payment_refunds WHERE hold_id = $1")
            .bind(&tx)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(fee_refunded, 5);
    let merchant = h.balance(MERCHANT).await;
    assert_eq!(
        (
            merchant.credits_posted,
            merchant.debits_posted,
            merchant.posted
        ),
        (10, 10, 0)
    );
    let platform = h.balance_of("system:platform").await;
    assert_eq!((platform.credits_posted, platform.posted), (5, 0));
    assert_eq!(h.balance("pat").await.available, 1_000_000);
    assert_eq!(
        op.refund(refund(&tx, 1, "")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    h.assert_clean().await;
}
