//! Operator subcommands beyond the basics: every Operator RPC, printed as a table
//! (or one JSON document with `--json`).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use x402_proto::settlement::v1::operator_client::OperatorClient;
use x402_proto::settlement::v1::*;

/// The operator client with the bearer token attached.
pub type Client = OperatorClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("the token is not a valid header"))?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}

#[derive(Subcommand)]
pub enum OpsCommand {
    /// List accounts (optionally of one kind).
    Accounts {
        #[arg(long, value_parser = ["payer", "merchant", "system"])]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Replace an account's metadata: --set key=value (repeatable).
    AccountMetadata {
        #[arg(long)]
        account: String,
        #[arg(long = "set", value_parser = parse_pair)]
        set: Vec<(String, String)>,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Close an account (revokes its keys; refused while it has open holds).
    AccountClose {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Keys of a payer account.
    Keys {
        #[arg(long)]
        account: String,
    },
    /// Add a new key and revoke the old one atomically.
    KeyRotate {
        #[arg(long)]
        account: String,
        #[arg(long)]
        old_public_key: String,
        #[arg(long)]
        new_public_key: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Credit (positive) or debit (negative) an account with a reason.
    Adjust {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "USD")]
        asset: String,
        #[arg(long, allow_hyphen_values = true)]
        amount: i64,
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Balances of an account in every asset.
    Balances {
        #[arg(long)]
        account: String,
    },
    /// Register an asset.
    AssetCreate {
        #[arg(long)]
        code: String,
        #[arg(long)]
        decimals: u32,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Registered assets.
    Assets,
    /// Refund a captured payment (amount 0 = everything not refunded yet).
    Refund {
        #[arg(long)]
        transaction: String,
        #[arg(long, default_value_t = 0)]
        amount: u64,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Payments with filters (route, status, time range) and pagination.
    PaymentsFind {
        #[arg(long, default_value = "")]
        payer: String,
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value = "")]
        route: String,
        #[arg(long, default_value = "")]
        status: String,
        #[arg(long, default_value_t = 0)]
        from_unix: i64,
        #[arg(long, default_value_t = 0)]
        to_unix: i64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Requests, revenue, errors, refunds and latency over a range.
    Analytics {
        /// Minutes back from now (ignored when --from-unix is set).
        #[arg(long, default_value_t = 60)]
        minutes: i64,
        #[arg(long, default_value_t = 0)]
        from_unix: i64,
        #[arg(long, default_value_t = 0)]
        to_unix: i64,
        #[arg(long, default_value = "minute", value_parser = ["minute", "hour", "day"])]
        bucket: String,
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value = "")]
        asset: String,
    },
    /// Stream payment events until interrupted (or --count events).
    Watch {
        #[arg(long, default_value = "")]
        merchant: String,
        #[arg(long, default_value = "")]
        payer: String,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Set a merchant's webhook endpoint.
    WebhookSet {
        #[arg(long)]
        merchant: String,
        #[arg(long)]
        url: String,
        /// HMAC key (16+ characters); prefer the X402_WEBHOOK_SECRET environment variable.
        #[arg(long, env = "X402_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Webhook events of a merchant and their delivery status.
    WebhookDeliveries {
        #[arg(long)]
        merchant: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected key=value".to_owned())
}

/// Left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn emit(json_out: bool, value: Value, text: String) {
    if json_out {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", e.code(), e.message())
}

fn kind_name(k: i32) -> &'static str {
    match AccountKind::try_from(k) {
        Ok(AccountKind::Payer) => "payer",
        Ok(AccountKind::Merchant) => "merchant",
        Ok(AccountKind::System) => "system",
        _ => "unspecified",
    }
}

fn account_json(a: &Account) -> Value {
    json!({"account_id": a.account_id, "kind": kind_name(a.kind), "created_at_unix": a.created_at_unix,
           "metadata": a.metadata, "closed": a.closed, "fee_bps": a.fee_bps})
}

fn balance_json(b: &Balance) -> Value {
    json!({"account_id": b.account_id, "asset": b.asset, "available": b.available, "held": b.held,
           "posted": b.posted, "decimals": b.decimals, "debits_pending": b.debits_pending,
           "debits_posted": b.debits_posted, "credits_pending": b.credits_pending,
           "credits_posted": b.credits_posted})
}

fn payment_json(p: &Payment) -> Value {
    json!({"transaction_id": p.transaction_id, "status": p.status, "payer_account": p.payer_account,
           "merchant_account": p.merchant_account, "asset": p.asset, "route": p.route,
           "resource": p.resource, "held": p.held, "captured": p.captured, "voided": p.voided,
           "refunded": p.refunded, "fee": p.fee, "http_status": p.http_status,
           "upstream_micros": p.upstream_micros, "created_at_unix": p.created_at_unix})
}

fn event_json(e: &PaymentEvent) -> Value {
    json!({"type": e.r#type, "transaction_id": e.transaction_id, "payer_account": e.payer_account,
           "merchant_account": e.merchant_account, "asset": e.asset, "route": e.route,
           "amount": e.amount, "at_unix_ms": e.at_unix_ms})
}

fn point_json(p: &AnalyticsPoint) -> Value {
    json!({"start_unix": p.start_unix, "requests": p.requests, "paid": p.paid, "refused": p.refused,
           "captures": p.captures, "revenue": p.revenue, "fees": p.fees, "voids": p.voids,
           "expiries": p.expiries, "upstream_errors": p.upstream_errors, "refunds": p.refunds,
           "refunded": p.refunded, "latency_p50_micros": p.latency_p50_micros,
           "latency_p95_micros": p.latency_p95_micros, "latency_p99_micros": p.latency_p99_micros,
           "error_rate": p.error_rate, "refund_rate": p.refund_rate})
}

pub async fn run(client: &mut Client, json_out: bool, command: OpsCommand) -> Result<()> {
    match command {
        OpsCommand::Accounts {
            kind,
            limit,
            page_token,
        } => {
            let kind = match kind.as_deref() {
                Some("payer") => AccountKind::Payer,
                Some("merchant") => AccountKind::Merchant,
                Some("system") => AccountKind::System,
                _ => AccountKind::Unspecified,
            };
            let r = client
                .list_accounts(ListAccountsRequest {
                    kind: kind as i32,
                    page_size: limit,
                    page_token,
                })
                .await
                .map_err(status)?
                .into_inner();
            let rows: Vec<Vec<String>> = r
                .accounts
                .iter()
                .map(|a| {
                    vec![
                        a.account_id.clone(),
                        kind_name(a.kind).into(),
                        if a.closed { "closed" } else { "open" }.into(),
                        a.fee_bps.to_string(),
                        serde_json::to_string(&a.metadata).unwrap_or_default(),
                    ]
                })
                .collect();
            emit(
                json_out,
                json!({"accounts": r.accounts.iter().map(account_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token}),
                format!(
                    "{}{}",
                    table(&["ACCOUNT", "KIND", "STATE", "FEE_BPS", "METADATA"], &rows),
                    if r.next_page_token.is_empty() {
                        String::new()
                    } else {
                        format!("\nnext page: --page-token {}", r.next_page_token)
                    }
                ),
            );
        }
        OpsCommand::AccountMetadata {
            account,
            set,
            idempotency_key,
        } => {
            let a = client
                .set_account_metadata(SetAccountMetadataRequest {
                    account_id: account,
                    metadata: set.into_iter().collect::<HashMap<_, _>>(),
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(
                json_out,
                account_json(&a),
                format!(
                    "account {} metadata {}",
                    a.account_id,
                    serde_json::to_string(&a.metadata).unwrap_or_default()
                ),
            );
        }
        OpsCommand::AccountClose {
            account,
            idempotency_key,
        } => {
            let a = client
                .close_account(CloseAccountRequest {
                    account_id: account,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(
                json_out,
                account_json(&a),
                format!("account {} closed", a.account_id),
            );
        }
        OpsCommand::Keys { account } => {
            let keys = client
                .list_keys(ListKeysRequest {
                    account_id: account,
                })
                .await
                .map_err(status)?
                .into_inner()
                .keys;
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.public_key.clone(),
                        if k.revoked { "revoked" } else { "active" }.into(),
                    ]
                })
                .collect();
            emit(
                json_out,
                json!({"keys": keys.iter().map(|k| json!({"account_id": k.account_id, "public_key": k.public_key, "revoked": k.revoked})).collect::<Vec<_>>()}),
                table(&["PUBLIC KEY", "STATE"], &rows),
            );
        }
        OpsCommand::KeyRotate {
            account,
            old_public_key,
            new_public_key,
            idempotency_key,
        } => {
            let r = client
                .rotate_key(RotateKeyRequest {
                    account_id: account,
                    old_public_key,
                    new_public_key,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            let added = r.added.unwrap_or_default();
            let revoked = r.revoked.unwrap_or_default();
            emit(
                json_out,
                json!({"added": added.public_key, "revoked": revoked.public_key, "account_id": added.account_id}),
                format!(
                    "key {} added, {} revoked",
                    added.public_key, revoked.public_key
                ),
            );
        }
        OpsCommand::Adjust {
            account,
            asset,
            amount,
            reason,
            idempotency_key,
        } => {
            let r = client
                .adjust(AdjustRequest {
                    account_id: account,
                    asset,
                    amount,
                    reason,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            let b = r.balance.unwrap_or_default();
            emit(
                json_out,
                json!({"transaction_id": r.transaction_id, "balance": balance_json(&b)}),
                format!(
                    "adjustment {}: {} {} available {}",
                    r.transaction_id, b.account_id, b.asset, b.available
                ),
            );
        }
        OpsCommand::Balances { account } => {
            let balances = client
                .get_balances(GetBalancesRequest {
                    account_id: account,
                })
                .await
                .map_err(status)?
                .into_inner()
                .balances;
            let rows: Vec<Vec<String>> = balances
                .iter()
                .map(|b| {
                    vec![
                        b.asset.clone(),
                        b.available.to_string(),
                        b.held.to_string(),
                        b.posted.to_string(),
                        b.decimals.to_string(),
                    ]
                })
                .collect();
            emit(
                json_out,
                json!({"balances": balances.iter().map(balance_json).collect::<Vec<_>>()}),
                table(&["ASSET", "AVAILABLE", "HELD", "POSTED", "DECIMALS"], &rows),
            );
        }
        OpsCommand::AssetCreate {
            code,
            decimals,
            idempotency_key,
        } => {
            let a = client
                .create_asset(CreateAssetRequest {
                    code,
                    decimals,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(
                json_out,
                json!({"code": a.code, "decimals": a.decimals}),
                format!("asset {} ({} decimals)", a.code, a.decimals),
            );
        }
        OpsCommand::Assets => {
            let assets = client
                .list_assets(ListAssetsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .assets;
            let rows: Vec<Vec<String>> = assets
                .iter()
                .map(|a| vec![a.code.clone(), a.decimals.to_string()])
                .collect();
            emit(
                json_out,
                json!({"assets": assets.iter().map(|a| json!({"code": a.code, "decimals": a.decimals})).collect::<Vec<_>>()}),
                table(&["ASSET", "DECIMALS"], &rows),
            );
        }
        OpsCommand::Refund {
            transaction,
            amount,
            reason,
            idempotency_key,
        } => {
            let r = client
                .refund(RefundRequest {
                    transaction_id: transaction,
                    amount,
                    reason,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            let p = r.payment.unwrap_or_default();
            emit(
                json_out,
                json!({"refund_id": r.refund_id, "amount": r.amount, "payment": payment_json(&p)}),
                format!(
                    "refund {} of {} {}; payment {} refunded {} of {}",
                    r.refund_id, r.amount, p.asset, p.transaction_id, p.refunded, p.captured
                ),
            );
        }
        OpsCommand::PaymentsFind {
            payer,
            merchant,
            route,
            status: state,
            from_unix,
            to_unix,
            limit,
            page_token,
        } => {
            let r = client
                .list_payments(ListPaymentsRequest {
                    payer_account: payer,
                    merchant_account: merchant,
                    page_size: limit,
                    page_token,
                    route,
                    status: state,
                    from_unix,
                    to_unix,
                })
                .await
                .map_err(status)?
                .into_inner();
            let rows: Vec<Vec<String>> = r
                .payments
                .iter()
                .map(|p| {
                    vec![
                        p.transaction_id.clone(),
                        p.status.clone(),
                        p.payer_account.clone(),
                        p.route.clone(),
                        p.asset.clone(),
                        p.held.to_string(),
                        p.captured.to_string(),
                        p.refunded.to_string(),
                        p.fee.to_string(),
                    ]
                })
                .collect();
            emit(
                json_out,
                json!({"payments": r.payments.iter().map(payment_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token}),
                format!(
                    "{}{}",
                    table(
                        &[
                            "TRANSACTION",
                            "STATUS",
                            "PAYER",
                            "ROUTE",
                            "ASSET",
                            "HELD",
                            "CAPTURED",
                            "REFUNDED",
                            "FEE"
                        ],
                        &rows
                    ),
                    if r.next_page_token.is_empty() {
                        String::new()
                    } else {
                        format!("\nnext page: --page-token {}", r.next_page_token)
                    }
                ),
            );
        }
        OpsCommand::Analytics {
            minutes,
            from_unix,
            to_unix,
            bucket,
            merchant,
            asset,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
                .unwrap_or(0);
            let to = if to_unix > 0 { to_unix } else { now + 1 };
            let from = if from_unix > 0 {
                from_unix
            } else {
                to - minutes.max(1) * 60
            };
            let bucket = match bucket.as_str() {
                "hour" => AnalyticsBucket::Hour,
                "day" => AnalyticsBucket::Day,
                _ => AnalyticsBucket::Minute,
            };
            let a = client
                .get_analytics(AnalyticsRequest {
                    from_unix: from,
                    to_unix: to,
                    bucket: bucket as i32,
                    merchant,
                    asset,
                    top_payers: 10,
                })
                .await
                .map_err(status)?
                .into_inner();
            let t = a.totals.unwrap_or_default();
            let routes: Vec<Vec<String>> = a
                .routes
                .iter()
                .map(|r| {
                    vec![
                        r.route.clone(),
                        r.asset.clone(),
                        r.requests.to_string(),
                        r.paid.to_string(),
                        r.revenue.to_string(),
                        r.fees.to_string(),
                        r.net_revenue.to_string(),
                        r.latency_p50_micros.to_string(),
                        r.latency_p95_micros.to_string(),
                    ]
                })
                .collect();
            let payers: Vec<Vec<String>> = a
                .top_payers
                .iter()
                .map(|p| {
                    vec![
                        p.payer_account.clone(),
                        p.asset.clone(),
                        p.payments.to_string(),
                        p.spent.to_string(),
                    ]
                })
                .collect();
            let text = format!(
                "requests {}  paid {}  refused {}  revenue {}  fees {}  refunded {}  error rate {:.2}%  refund rate {:.2}%  p50/p95/p99 {}/{}/{} µs\n\n{}\n\n{}",
                t.requests, t.paid, t.refused, t.revenue, t.fees, t.refunded, t.error_rate * 100.0, t.refund_rate * 100.0,
                t.latency_p50_micros, t.latency_p95_micros, t.latency_p99_micros,
                table(&["ROUTE", "ASSET", "REQUESTS", "PAID", "REVENUE", "FEES", "NET", "P50_US", "P95_US"], &routes),
                table(&["TOP PAYER", "ASSET", "PAYMENTS", "SPENT"], &payers),
            );
            emit(
                json_out,
                json!({
                    "from_unix": a.from_unix, "to_unix": a.to_unix, "totals": point_json(&t),
                    "points": a.points.iter().map(point_json).collect::<Vec<_>>(),
                    "routes": a.routes.iter().map(|r| json!({"route": r.route, "asset": r.asset, "requests": r.requests, "paid": r.paid, "revenue": r.revenue, "fees": r.fees, "net_revenue": r.net_revenue, "refunded": r.refunded, "latency_p50_micros": r.latency_p50_micros, "latency_p95_micros": r.latency_p95_micros})).collect::<Vec<_>>(),
                    "top_payers": a.top_payers.iter().map(|p| json!({"payer_account": p.payer_account, "asset": p.asset, "payments": p.payments, "spent": p.spent})).collect::<Vec<_>>(),
                }),
                text,
            );
        }
        OpsCommand::Watch {
            merchant,
            payer,
            count,
        } => {
            let mut stream = client
                .watch(WatchRequest {
                    merchant,
                    payer_account: payer,
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let Some(e) = stream.message().await.map_err(status)? else {
                    break;
                };
                seen += 1;
                emit(
                    json_out,
                    event_json(&e),
                    format!(
                        "{} {} {} {} -> {} {} {} {}",
                        e.at_unix_ms,
                        e.r#type,
                        e.transaction_id,
                        e.payer_account,
                        e.merchant_account,
                        e.route,
                        e.amount,
                        e.asset
                    ),
                );
            }
        }
        OpsCommand::WebhookSet {
            merchant,
            url,
            secret,
            idempotency_key,
        } => {
            let w = client
                .set_webhook(SetWebhookRequest {
                    merchant,
                    url,
                    secret,
                    idempotency_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(
                json_out,
                json!({"merchant": w.merchant, "url": w.url}),
                format!("webhook of {} -> {}", w.merchant, w.url),
            );
        }
        OpsCommand::WebhookDeliveries { merchant, limit } => {
            if limit == 0 {
                bail!("--limit must be at least 1");
            }
            let d = client
                .list_webhook_deliveries(ListWebhookDeliveriesRequest {
                    merchant,
                    page_size: limit,
                })
                .await
                .map_err(status)?
                .into_inner()
                .deliveries;
            let rows: Vec<Vec<String>> = d
                .iter()
                .map(|d| {
                    vec![
                        d.event_id.clone(),
                        d.event_type.clone(),
                        if d.delivered { "delivered" } else { "pending" }.into(),
                        d.attempts.to_string(),
                        d.last_status.to_string(),
                        d.last_error.clone(),
                    ]
                })
                .collect();
            emit(
                json_out,
                json!({"deliveries": d.iter().map(|d| json!({"event_id": d.event_id, "event_type": d.event_type, "delivered": d.delivered, "attempts": d.attempts, "last_status": d.last_status, "last_error": d.last_error, "created_at_unix": d.created_at_unix, "next_attempt_unix": d.next_attempt_unix, "payload": serde_json::from_str::<Value>(&d.payload).unwrap_or(Value::Null)})).collect::<Vec<_>>()}),
                table(
                    &[
                        "EVENT",
                        "TYPE",
                        "STATE",
                        "ATTEMPTS",
                        "LAST_STATUS",
                        "LAST_ERROR",
                    ],
                    &rows,
                ),
            );
        }
    }
    Ok(())
}
