//! Counters the filter exports through `proxy_define_metric`. Envoy shows them with
//! a `wasmcustom.` prefix, e.g. `wasmcustom.x402_requests_paid`.

use crate::host::Host;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Requests on routes without a price.
    Unpriced,
    /// 402 answers to requests that carried no proof.
    Challenged,
    /// Requests that were authorized and sent upstream.
    Paid,
    /// Requests refused for a bad or insufficient proof (400 / 402 with an error).
    Rejected,
    /// 503 answers because settlement gave no usable answer.
    Unavailable,
    /// Atomic units captured.
    RevenueAtomic,
    Captures,
    Voids,
    /// gRPC calls to settlement that failed (transport, timeout, bad response).
    CalloutFailures,
    /// Captures (final or partial) given up after their retries; voids are resent until
    /// settlement answers.
    ResolutionsDropped,
    /// Captures, voids and unanswered payments taken over from a filter VM that stopped
    /// (crashed) or a configuration that was replaced before sending them.
    CapturesRecovered,
    /// 429 answers: over a route's rate limit.
    RateLimited,
    /// Requests passed unpaid within a free tier.
    Free,
    /// Requests passed unpaid for an allow-listed identity.
    Allowed,
    /// Requests let through unpaid because settlement failed on a `failure_mode: open` route.
    FailedOpen,
    /// Atomic units a metered response used beyond its hold (never charged).
    MeteredOverage,
    /// Metered responses that did not report their usage (hold released).
    Unmetered,
}

impl Metric {
    pub const ALL: [Metric; 17] = [
        Metric::Unpriced,
        Metric::Challenged,
        Metric::Paid,
        Metric::Rejected,
        Metric::Unavailable,
        Metric::RevenueAtomic,
        Metric::Captures,
        Metric::Voids,
        Metric::CalloutFailures,
        Metric::ResolutionsDropped,
        Metric::CapturesRecovered,
        Metric::RateLimited,
        Metric::Free,
        Metric::Allowed,
        Metric::FailedOpen,
        Metric::MeteredOverage,
        Metric::Unmetered,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Metric::Unpriced => "x402_requests_unpriced",
            Metric::Challenged => "x402_requests_challenged",
            Metric::Paid => "x402_requests_paid",
            Metric::Rejected => "x402_requests_rejected",
            Metric::Unavailable => "x402_requests_unavailable",
            Metric::RevenueAtomic => "x402_revenue_atomic",
            Metric::Captures => "x402_captures",
            Metric::Voids => "x402_voids",
            Metric::CalloutFailures => "x402_callout_failures",
            Metric::ResolutionsDropped => "x402_resolutions_dropped",
            Metric::CapturesRecovered => "x402_captures_recovered",
            Metric::RateLimited => "x402_requests_rate_limited",
            Metric::Free => "x402_requests_free",
            Metric::Allowed => "x402_requests_allowed",
            Metric::FailedOpen => "x402_requests_failed_open",
            Metric::MeteredOverage => "x402_metered_overage_atomic",
            Metric::Unmetered => "x402_requests_unmetered",
        }
    }
}

/// Host ids of the counters, defined once per plugin.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    ids: Vec<Option<u32>>,
}

impl Metrics {
    pub fn define(host: &mut dyn Host) -> Metrics {
        Metrics {
            ids: Metric::ALL
                .iter()
                .map(|m| host.define_counter(m.name()))
                .collect(),
        }
    }

    pub fn add(&self, host: &mut dyn Host, metric: Metric, by: u64) {
        let index = Metric::ALL.iter().position(|m| *m == metric);
        if let Some(Some(id)) = index.and_then(|i| self.ids.get(i)) {
            host.increment_counter(*id, by);
        }
    }
}
