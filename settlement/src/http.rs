//! The HTTP side of settlement: Prometheus metrics at `/metrics`, the read-only
//! dashboard at `/dashboard` and the JSON it reads at `/api/analytics`.
//!
//! `/metrics` and `/api/*` require the operator token when one is set (Prometheus
//! sends it with `authorization: credentials`); the dashboard page itself is static
//! and reads the token from the URL fragment (`/dashboard#token=...`), which browsers
//! never send to the server, so it stays out of access logs.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;
use x402_proto::settlement::v1::{AnalyticsBucket, AnalyticsPoint, AnalyticsRequest};

use crate::auth::BearerToken;
use crate::metrics::{Gauges, METRICS};

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");

#[derive(Clone)]
struct State {
    pool: PgPool,
    token: BearerToken,
}

/// Serves until `stop` turns true; open connections finish their current request.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    token: BearerToken,
    mut stop: watch::Receiver<bool>,
) {
    let state = State { pool, token };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics and dashboard listening");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    if let Ok(v) = "no-store".parse() {
        r.headers_mut().insert("cache-control", v);
    }
    r
}

async fn handle(state: State, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let authorized = state.token.accepts(
            req.headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
        );
        let unauthorized = || {
            reply(
                StatusCode::UNAUTHORIZED,
                "application/json",
                json!({"error": "unauthenticated", "message": "missing or wrong bearer token"})
                    .to_string(),
            )
        };
        let r = match path.as_str() {
            "/" | "/dashboard" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                DASHBOARD_HTML.into(),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/metrics" if !authorized => unauthorized(),
            "/metrics" => {
                let gauges = gauges(&state.pool).await;
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    METRICS.render(&gauges),
                )
            }
            "/api/analytics" if !authorized => unauthorized(),
            "/api/analytics" => analytics(&state.pool, &query).await,
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                json!({"error": "not_found"}).to_string(),
            ),
        };
        Ok(r)
    }
}

async fn gauges(pool: &PgPool) -> Gauges {
    let mut g = Gauges {
        pool_size: pool.size(),
        pool_idle: pool.num_idle(),
        ..Gauges::default()
    };
    let outbox: Result<(i64, f64), _> = sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) \
         FROM webhook_outbox WHERE delivered_at IS NULL AND next_attempt_at <> 'infinity'",
    )
    .fetch_one(pool)
    .await;
    if let Ok((n, age)) = outbox {
        g.outbox_pending = n;
        g.outbox_oldest_seconds = age;
    }
    if let Ok(n) = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM analytics_pending")
        .fetch_one(pool)
        .await
    {
        g.analytics_pending = n;
    }
    g
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn point_json(p: &AnalyticsPoint) -> serde_json::Value {
    json!({
        "start_unix": p.start_unix, "requests": p.requests, "paid": p.paid, "refused": p.refused,
        "captures": p.captures, "revenue": p.revenue, "fees": p.fees, "voids": p.voids,
        "expiries": p.expiries, "upstream_errors": p.upstream_errors, "refunds": p.refunds,
        "refunded": p.refunded, "latency_p50_micros": p.latency_p50_micros,
        "latency_p95_micros": p.latency_p95_micros, "latency_p99_micros": p.latency_p99_micros,
        "error_rate": p.error_rate, "refund_rate": p.refund_rate,
    })
}

/// `/api/analytics?minutes=60&bucket=minute|hour|day&merchant=&asset=`
async fn analytics(pool: &PgPool, query: &str) -> Response<Full<Bytes>> {
    let minutes: i64 = param(query, "minutes")
        .and_then(|m| m.parse().ok())
        .unwrap_or(60)
        .clamp(1, 60 * 24 * 31);
    let bucket = match param(query, "bucket") {
        Some("hour") => AnalyticsBucket::Hour,
        Some("day") => AnalyticsBucket::Day,
        _ => AnalyticsBucket::Minute,
    };
    let now = i64::try_from(crate::verify::unix_now()).unwrap_or(0);
    let request = AnalyticsRequest {
        from_unix: now + 1 - minutes * 60,
        to_unix: now + 1,
        bucket: bucket as i32,
        merchant: param(query, "merchant").unwrap_or("").to_owned(),
        asset: param(query, "asset").unwrap_or("").to_owned(),
        top_payers: 10,
    };
    match crate::analytics::query(pool, &request).await {
        Ok(a) => {
            let body = json!({
                "from_unix": a.from_unix,
                "to_unix": a.to_unix,
                "totals": a.totals.as_ref().map(point_json),
                "points": a.points.iter().map(point_json).collect::<Vec<_>>(),
                "routes": a.routes.iter().map(|r| json!({
                    "route": r.route, "asset": r.asset, "requests": r.requests, "paid": r.paid,
                    "revenue": r.revenue, "fees": r.fees, "net_revenue": r.net_revenue,
                    "refunded": r.refunded, "latency_p50_micros": r.latency_p50_micros,
                    "latency_p95_micros": r.latency_p95_micros,
                })).collect::<Vec<_>>(),
                "top_payers": a.top_payers.iter().map(|p| json!({
                    "payer_account": p.payer_account, "asset": p.asset,
                    "payments": p.payments, "spent": p.spent,
                })).collect::<Vec<_>>(),
            });
            reply(StatusCode::OK, "application/json", body.to_string())
        }
        Err(e) => {
            let status = tonic::Status::from(e);
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                json!({"error": "analytics_unavailable", "message": status.message()}).to_string(),
            )
        }
    }
}
