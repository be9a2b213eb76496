//! The ext_authz peer of the benchmark: what a seller would otherwise run behind Envoy's
//! native `ext_authz` gRPC filter. Per request it decodes the `PAYMENT-SIGNATURE`
//! header, checks it against the route's price and the request (the same rules as the
//! 402x filter), verifies the ed25519 signature and debits the payer and credits the
//! merchant in the same Postgres ledger, in one SQL statement that also records the
//! nonce. No holds, no batching: as lean as the job allows.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use x402_proto::signing::{resource_string, verify_hex};
use x402_proto::wire::{check_payment, decode_header, PaymentPayload, HEADER_PAYMENT_SIGNATURE};

mod pb {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    tonic::include_proto!("envoy.service.auth.v3");
}

use pb::authorization_server::{Authorization, AuthorizationServer};
use pb::{CheckRequest, CheckResponse, RpcStatus};

/// The single statement of the peer: record the nonce (unique per payer account) and
/// move `amount` from the payer to the merchant. The payer's CHECK refuses overdrafts.
/// The two balance rows are locked in key order first: updated in whatever order the
/// plan reaches them, two requests of one payer deadlock (and wait a second for
/// Postgres to notice).
pub const DEBIT_SQL: &str = "WITH payer AS (SELECT account_id FROM payer_keys WHERE public_key = $1 AND revoked_at IS NULL), \
     nonce AS (INSERT INTO bench_peer_nonces (account_id, nonce) SELECT account_id, $2 FROM payer RETURNING account_id), \
     locked AS (SELECT b.account_id FROM balances b, nonce WHERE b.asset = $5 AND b.account_id IN (nonce.account_id, $4) \
       ORDER BY b.account_id FOR UPDATE OF b) \
     UPDATE balances b SET \
       debits_posted = b.debits_posted + CASE WHEN b.account_id = $4 THEN 0 ELSE $3 END, \
       credits_posted = b.credits_posted + CASE WHEN b.account_id = $4 THEN $3 ELSE 0 END \
     FROM locked WHERE b.asset = $5 AND b.account_id = locked.account_id";

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 16)]
    pool: u32,
    /// Price in atomic units.
    #[arg(long)]
    price: u64,
    #[arg(long)]
    pay_to: String,
    #[arg(long)]
    asset: String,
    #[arg(long)]
    network: String,
}

struct Peer {
    pool: PgPool,
    price: u64,
    pay_to: String,
    asset: String,
    network: String,
}

fn answer(code: i32, message: &str) -> Response<CheckResponse> {
    Response::new(CheckResponse {
        status: Some(RpcStatus {
            code,
            message: message.to_owned(),
        }),
    })
}

const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const UNAVAILABLE: i32 = 14;

impl Peer {
    async fn check_payment(&self, request: CheckRequest) -> Response<CheckResponse> {
        let Some(http) = request
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
        else {
            return answer(PERMISSION_DENIED, "no http request");
        };
        let Some(header) = http.headers.get(HEADER_PAYMENT_SIGNATURE) else {
            return answer(PERMISSION_DENIED, "payment required");
        };
        // serde's typed reader: natively faster than the filter's by-hand reader, whose
        // reason is module size (the peer is kept as lean as it can be).
        let Ok(checked) = decode_header::<PaymentPayload>(header).and_then(check_payment) else {
            return answer(PERMISSION_DENIED, "malformed payment");
        };
        let accepted = &checked.payload.accepted;
        let auth = &checked.payload.payload;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if accepted.pay_to != self.pay_to
            || accepted.asset != self.asset
            || accepted.network != self.network
            || checked.amount < self.price
            || checked.valid_before <= now
            || auth.resource != resource_string(&http.method, &http.host, &http.path)
        {
            return answer(PERMISSION_DENIED, "payment does not match the request");
        }
        if verify_hex(&auth.payer, &auth.signature, &checked.signed_fields()).is_err() {
            return answer(PERMISSION_DENIED, "invalid signature");
        }
        let Ok(price) = i64::try_from(self.price) else {
            return answer(PERMISSION_DENIED, "price out of range");
        };
        let debited = sqlx::query(DEBIT_SQL)
            .bind(&auth.payer)
            .bind(&auth.nonce)
            .bind(price)
            .bind(&self.pay_to)
            .bind(&self.asset)
            .execute(&self.pool)
            .await;
        match debited {
            Ok(done) if done.rows_affected() == 2 => answer(OK, ""),
            Ok(_) => answer(PERMISSION_DENIED, "unknown payer"),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                answer(PERMISSION_DENIED, "nonce reused")
            }
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23514") => {
                answer(PERMISSION_DENIED, "insufficient funds")
            }
            Err(_) => answer(UNAVAILABLE, "ledger unavailable"),
        }
    }
}

#[tonic::async_trait]
impl Authorization for Peer {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(self.check_payment(request.into_inner()).await)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(args.pool)
        .connect(&args.database_url)
        .await
        .context("connecting to Postgres")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let peer = Peer {
        pool,
        price: args.price,
        pay_to: args.pay_to,
        asset: args.asset,
        network: args.network,
    };
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(peer))
        .serve_with_incoming(x402_settlement::server::without_nagle(listener))
        .await
        .context("serving ext_authz")?;
    Ok(())
}
