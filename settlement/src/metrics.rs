//! Prometheus metrics of this process, rendered in the text exposition format by
//! [`Metrics::render`] (served at `/metrics` by [`crate::http`]).
//!
//! Counters of calls and resolutions are per process (sum them over replicas).
//! `x402_events_total` and `x402_event_amount_total` count ledger-wide events as this
//! replica saw them on the event channel, so take one replica's value, not the sum.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use x402_proto::settlement::v1::PaymentEvent;

/// Upper bounds (seconds) of the latency histograms.
const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: LATENCY_BOUNDS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let micros = self.sum_micros.load(Ordering::Relaxed);
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braced} {}.{:06}",
            micros / 1_000_000,
            micros % 1_000_000
        );
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }
}

/// (type, route, asset) of a ledger-wide event.
type EventKey = (String, String, String);

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    /// gRPC calls by method and status code.
    calls: Mutex<BTreeMap<(String, String), u64>>,
    /// gRPC handler latency by method.
    call_latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    /// Authorize items by outcome.
    authorizations: Mutex<BTreeMap<String, u64>>,
    captures: AtomicU64,
    captured_units: AtomicU64,
    fee_units: AtomicU64,
    voids: AtomicU64,
    expiries: AtomicU64,
    refunds: AtomicU64,
    refunded_units: AtomicU64,
    /// TLS files read again and served, and read again but refused.
    tls_reloads: AtomicU64,
    tls_reloads_refused: AtomicU64,
    /// When the certificate served expires (unix seconds; 0: no TLS, or not known).
    tls_expiry: AtomicI64,
    /// Upstream time reported with captures.
    pub upstream_latency: Histogram,
    /// Ledger-wide events seen on the channel: (type, route, asset) -> (count, amount).
    events: Mutex<BTreeMap<EventKey, (u64, u64)>>,
    webhook_deliveries: Mutex<BTreeMap<String, u64>>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    calls: Mutex::new(BTreeMap::new()),
    call_latency: Mutex::new(BTreeMap::new()),
    authorizations: Mutex::new(BTreeMap::new()),
    captures: AtomicU64::new(0),
    captured_units: AtomicU64::new(0),
    fee_units: AtomicU64::new(0),
    voids: AtomicU64::new(0),
    expiries: AtomicU64::new(0),
    refunds: AtomicU64::new(0),
    refunded_units: AtomicU64::new(0),
    tls_reloads: AtomicU64::new(0),
    tls_reloads_refused: AtomicU64::new(0),
    tls_expiry: AtomicI64::new(0),
    upstream_latency: Histogram::new(),
    events: Mutex::new(BTreeMap::new()),
    webhook_deliveries: Mutex::new(BTreeMap::new()),
});

/// Live gauges read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub pool_size: u32,
    pub pool_idle: usize,
    pub outbox_pending: i64,
    pub outbox_oldest_seconds: f64,
    pub analytics_pending: i64,
}

impl Metrics {
    pub fn call(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        if let Ok(mut calls) = self.calls.lock() {
            *calls
                .entry((method.to_owned(), format!("{code:?}")))
                .or_default() += 1;
        }
        let histogram = self.call_latency.lock().ok().map(|mut h| {
            h.entry(method.to_owned())
                .or_insert_with(|| std::sync::Arc::new(Histogram::new()))
                .clone()
        });
        if let Some(h) = histogram {
            h.observe(elapsed);
        }
    }

    pub fn authorization(&self, outcome: &str) {
        if let Ok(mut a) = self.authorizations.lock() {
            *a.entry(outcome.to_owned()).or_default() += 1;
        }
    }

    pub fn resolved(&self, kind: &str, amount: u64, fee: i64) {
        if kind == "capture" {
            self.captures.fetch_add(1, Ordering::Relaxed);
            self.captured_units.fetch_add(amount, Ordering::Relaxed);
            self.fee_units
                .fetch_add(u64::try_from(fee).unwrap_or(0), Ordering::Relaxed);
        } else {
            self.voids.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn expired(&self, n: usize) {
        self.expiries
            .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
    }

    /// Changed TLS files were served (`true`) or refused.
    pub fn tls_reloaded(&self, served: bool) {
        let counter = if served {
            &self.tls_reloads
        } else {
            &self.tls_reloads_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The certificate now served expires at `unix_seconds` (`None`: not known).
    pub fn tls_certificate_expires(&self, unix_seconds: Option<i64>) {
        self.tls_expiry
            .store(unix_seconds.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn refunded(&self, amount: u64) {
        self.refunds.fetch_add(1, Ordering::Relaxed);
        self.refunded_units.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn event(&self, e: &PaymentEvent) {
        if let Ok(mut events) = self.events.lock() {
            let entry = events
                .entry((e.r#type.clone(), e.route.clone(), e.asset.clone()))
                .or_default();
            entry.0 += 1;
            entry.1 = entry.1.saturating_add(e.amount);
        }
    }

    pub fn webhook(&self, result: &str) {
        if let Ok(mut w) = self.webhook_deliveries.lock() {
            *w.entry(result.to_owned()).or_default() += 1;
        }
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        counter(
            &mut out,
            "x402_grpc_calls_total",
            "gRPC calls by method and status code.",
        );
        if let Ok(calls) = self.calls.lock() {
            for ((method, code), n) in calls.iter() {
                let _ = writeln!(
                    out,
                    "x402_grpc_calls_total{{method=\"{}\",code=\"{code}\"}} {n}",
                    esc(method)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP x402_grpc_call_seconds gRPC handler latency.\n# TYPE x402_grpc_call_seconds histogram"
        );
        if let Ok(h) = self.call_latency.lock() {
            for (method, hist) in h.iter() {
                hist.render(
                    &mut out,
                    "x402_grpc_call_seconds",
                    &format!("method=\"{}\"", esc(method)),
                );
            }
        }
        counter(
            &mut out,
            "x402_authorizations_total",
            "Authorize items by outcome.",
        );
        if let Ok(a) = self.authorizations.lock() {
            for (outcome, n) in a.iter() {
                let _ = writeln!(
                    out,
                    "x402_authorizations_total{{outcome=\"{}\"}} {n}",
                    esc(outcome)
                );
            }
        }
        let simple: [(&str, &str, &AtomicU64); 9] = [
            ("x402_captures_total", "Holds captured.", &self.captures),
            (
                "x402_captured_units_total",
                "Atomic units captured (all assets).",
                &self.captured_units,
            ),
            (
                "x402_fee_units_total",
                "Atomic units of platform fees (all assets).",
                &self.fee_units,
            ),
            ("x402_voids_total", "Holds voided.", &self.voids),
            (
                "x402_expiries_total",
                "Holds expired by the sweeper.",
                &self.expiries,
            ),
            ("x402_refunds_total", "Refunds.", &self.refunds),
            (
                "x402_refunded_units_total",
                "Atomic units refunded (all assets).",
                &self.refunded_units,
            ),
            (
                "x402_tls_reloads_total",
                "Changed TLS files served to new connections.",
                &self.tls_reloads,
            ),
            (
                "x402_tls_reloads_refused_total",
                "Changed TLS files refused (the last good ones stay in use).",
                &self.tls_reloads_refused,
            ),
        ];
        for (name, help, v) in simple {
            counter(&mut out, name, help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP x402_upstream_seconds Upstream time reported with captures.\n# TYPE x402_upstream_seconds histogram"
        );
        self.upstream_latency
            .render(&mut out, "x402_upstream_seconds", "");
        counter(
            &mut out,
            "x402_events_total",
            "Ledger-wide payment events by type, route and asset.",
        );
        counter(
            &mut out,
            "x402_event_amount_total",
            "Atomic units of ledger-wide payment events (revenue when type=captured).",
        );
        if let Ok(events) = self.events.lock() {
            for ((kind, route, asset), (n, amount)) in events.iter() {
                let labels = format!(
                    "type=\"{}\",route=\"{}\",asset=\"{}\"",
                    esc(kind),
                    esc(route),
                    esc(asset)
                );
                let _ = writeln!(out, "x402_events_total{{{labels}}} {n}");
                let _ = writeln!(out, "x402_event_amount_total{{{labels}}} {amount}");
            }
        }
        counter(
            &mut out,
            "x402_webhook_deliveries_total",
            "Webhook delivery attempts by result.",
        );
        if let Ok(w) = self.webhook_deliveries.lock() {
            for (result, n) in w.iter() {
                let _ = writeln!(
                    out,
                    "x402_webhook_deliveries_total{{result=\"{}\"}} {n}",
                    esc(result)
                );
            }
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "x402_db_pool_connections",
            "Open Postgres connections.",
            gauges.pool_size.to_string(),
        );
        gauge(
            &mut out,
            "x402_db_pool_idle",
            "Idle Postgres connections.",
            gauges.pool_idle.to_string(),
        );
        gauge(
            &mut out,
            "x402_webhook_outbox_pending",
            "Webhook events not delivered yet.",
            gauges.outbox_pending.to_string(),
        );
        gauge(
            &mut out,
            "x402_webhook_outbox_lag_seconds",
            "Age of the oldest undelivered webhook event.",
            format!("{:.3}", gauges.outbox_oldest_seconds),
        );
        gauge(
            &mut out,
            "x402_analytics_pending",
            "Events not folded into analytics yet.",
            gauges.analytics_pending.to_string(),
        );
        let expiry = self.tls_expiry.load(Ordering::Relaxed);
        if expiry != 0 {
            gauge(
                &mut out,
                "x402_tls_certificate_expiry_timestamp_seconds",
                "When the certificate the gRPC listener serves expires (its notAfter).",
                expiry.to_string(),
            );
        }
        out
    }
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x", "m=\"a\"");
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.001\"} 1"));
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.05\"} 2"));
        assert!(out.contains("x_count{m=\"a\"} 2"));
        assert_eq!(esc("a\"b"), "a\\\"b");
    }
}
