//! An in-process settlement server on 127.0.0.1:0 over a fresh database of the
//! test binary's shared PostgreSQL cluster, with gRPC clients and payer helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use x402_proto::settlement::v1::data_plane_client::DataPlaneClient;
use x402_proto::settlement::v1::operator_client::OperatorClient;
use x402_proto::settlement::v1::*;
use x402_proto::signing::{public_key_hex, sign_hex, SignedFields, SigningKey};
use x402_settlement::server::{self, ServerConfig};

pub const ASSET: &str = "USD";
pub const MERCHANT: &str = "merchant-demo";

pub struct Harness {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub data: DataPlaneClient<Channel>,
    pub op: OperatorClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

pub async fn start() -> Harness {
    start_with(ServerConfig::default()).await
}

pub async fn start_with(config: ServerConfig) -> Harness {
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    start_on(&url, config).await
}

pub async fn start_on(url: &str, config: ServerConfig) -> Harness {
    let pool = x402_settlement::db::connect(url, 20).await.unwrap();
    x402_settlement::db::migrate(&pool).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server_pool = pool.clone();
    let task = tokio::spawn(async move {
        server::run(listener, server_pool, config, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Harness {
        addr,
        pool,
        data: DataPlaneClient::new(channel.clone()),
        op: OperatorClient::new(channel),
        stop: Some(stop),
        task,
    }
}

pub struct Payer {
    pub account: String,
    pub key: SigningKey,
    pub public_key: String,
}

/// A key derived from a name, so tests need no randomness.
pub fn key_for(name: &str) -> SigningKey {
    let seed: [u8; 32] =
        Sha256::digest(format!("402x test key {name} {}", std::process::id())).into();
    SigningKey::from_bytes(&seed)
}

impl Harness {
    pub async fn merchant(&self, id: &str) {
        self.merchant_with_fee(id, 0).await;
    }

    /// A merchant account whose captures pay the platform `fee_bps` basis points.
    pub async fn merchant_with_fee(&self, id: &str, fee_bps: u32) {
        self.op
            .clone()
            .create_account(CreateAccountRequest {
                account_id: id.into(),
                kind: AccountKind::Merchant as i32,
                fee_bps,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// A payer account with one registered key and `funds` deposited.
    pub async fn payer(&self, id: &str, funds: u64) -> Payer {
        let mut op = self.op.clone();
        op.create_account(CreateAccountRequest {
            account_id: id.into(),
            kind: AccountKind::Payer as i32,
            ..Default::default()
        })
        .await
        .unwrap();
        let key = key_for(id);
        let public_key = public_key_hex(&key);
        op.add_key(AddKeyRequest {
            account_id: id.into(),
            public_key: public_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        if funds > 0 {
            op.deposit(DepositRequest {
                account_id: id.into(),
                asset: ASSET.into(),
                amount: funds,
                idempotency_key: String::new(),
            })
            .await
            .unwrap();
        }
        Payer {
            account: id.into(),
            key,
            public_key,
        }
    }

    pub async fn balance(&self, account: &str) -> Balance {
        self.op
            .clone()
            .get_balance(GetBalanceRequest {
                account_id: account.into(),
                asset: ASSET.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn authorize(&self, item: AuthorizeItem) -> AuthorizeResult {
        let mut r = self
            .data
            .clone()
            .authorize(AuthorizeRequest { items: vec![item] })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results.len(), 1);
        r.results.remove(0)
    }

    pub async fn capture(&self, tx: &str, amount: u64) -> ResolveResult {
        let item = CaptureItem {
            transaction_id: tx.into(),
            amount,
            upstream_micros: 1200,
            http_status: 200,
        };
        let mut r = self
            .data
            .clone()
            .capture(CaptureRequest { items: vec![item] })
            .await
            .unwrap()
            .into_inner();
        r.results.remove(0)
    }

    /// A partial capture naming the running total `total` (`CapturePartial`).
    pub async fn partial(&self, tx: &str, total: u64) -> ResolveResult {
        let item = CaptureItem {
            transaction_id: tx.into(),
            amount: total,
            upstream_micros: 0,
            http_status: 0,
        };
        let mut r = self
            .data
            .clone()
            .capture_partial(CaptureRequest { items: vec![item] })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results.len(), 1);
        r.results.remove(0)
    }

    pub async fn void(&self, tx: &str) -> ResolveResult {
        let item = VoidItem {
            transaction_id: tx.into(),
            reason: "upstream_5xx".into(),
        };
        let mut r = self
            .data
            .clone()
            .void(VoidRequest { items: vec![item] })
            .await
            .unwrap()
            .into_inner();
        r.results.remove(0)
    }

    pub async fn payment(&self, tx: &str) -> Payment {
        self.op
            .clone()
            .get_payment(GetPaymentRequest {
                transaction_id: tx.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What a proof says, before signing.
#[derive(Clone)]
pub struct Terms {
    pub scheme: String,
    pub amount: u64,
    pub pay_to: String,
    pub nonce: String,
    pub valid_before: u64,
    pub resource: String,
}

pub fn terms(amount: u64, nonce_seed: &str) -> Terms {
    Terms {
        scheme: "exact".into(),
        amount,
        pay_to: MERCHANT.into(),
        nonce: hex::encode(&Sha256::digest(nonce_seed.as_bytes())[..16]),
        valid_before: unix_now() + 60,
        resource: "GET 127.0.0.1:10000/paid/quote?sym=ABC".into(),
    }
}

pub fn signed_proof(payer: &Payer, t: &Terms) -> PaymentProof {
    let amount = t.amount.to_string();
    let valid_before = t.valid_before.to_string();
    let fields = SignedFields {
        scheme: &t.scheme,
        network: "402x:local",
        asset: ASSET,
        amount: &amount,
        pay_to: &t.pay_to,
        resource: &t.resource,
        nonce: &t.nonce,
        valid_before: &valid_before,
    };
    PaymentProof {
        scheme: t.scheme.clone(),
        network: "402x:local".into(),
        asset: ASSET.into(),
        signature: sign_hex(&payer.key, &fields).unwrap(),
        amount: amount.clone(),
        pay_to: t.pay_to.clone(),
        resource: t.resource.clone(),
        nonce: t.nonce.clone(),
        valid_before: valid_before.clone(),
        payer: payer.public_key.clone(),
    }
}

pub fn item(request_id: &str, proof: PaymentProof, hold_amount: u64) -> AuthorizeItem {
    AuthorizeItem {
        request_id: request_id.into(),
        proof: Some(proof),
        hold_amount,
        route: "quote".into(),
        hold_ttl_seconds: 300,
        volume_tiers: Vec::new(),
        global_limit: None,
        capture: false,
    }
}

/// A signed authorize item for `amount` with a nonce derived from `request_id`.
pub fn paid(payer: &Payer, request_id: &str, amount: u64) -> AuthorizeItem {
    item(
        request_id,
        signed_proof(
            payer,
            &terms(amount, &format!("{}-{request_id}", payer.account)),
        ),
        amount,
    )
}

pub fn outcome(r: &AuthorizeResult) -> AuthorizeOutcome {
    AuthorizeOutcome::try_from(r.outcome).unwrap()
}

pub fn resolved(r: &ResolveResult) -> ResolveOutcome {
    ResolveOutcome::try_from(r.outcome).unwrap()
}

impl Harness {
    /// The ledger checker finds nothing wrong.
    pub async fn assert_clean(&self) {
        let report = x402_settlement::check::check_ledger(
            &self.pool,
            x402_settlement::check::CheckOptions::default(),
        )
        .await
        .unwrap();
        assert!(report.is_clean(), "{}", report.to_text());
    }

    pub async fn balance_of(&self, account: &str) -> Balance {
        self.balance(account).await
    }

    /// `Watch`'s stream of `merchant`'s payment events.
    pub async fn watch_merchant(&self, merchant: &str) -> tonic::Streaming<PaymentEvent> {
        self.op
            .clone()
            .watch(WatchRequest {
                merchant: merchant.into(),
                payer_account: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Per-minute analytics once `ready` says they are (polled for up to 20 s).
    pub async fn wait_for_analytics(
        &self,
        ready: impl Fn(&AnalyticsResponse) -> bool,
    ) -> AnalyticsResponse {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let a = self
                .op
                .clone()
                .get_analytics(AnalyticsRequest {
                    bucket: AnalyticsBucket::Minute as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if ready(&a) {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "analytics never became ready: {a:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
