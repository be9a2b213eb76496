//! Traffic policy per route: who passes without paying (allow-list), how often anyone
//! may call (rate limit), how many calls are free (free tier), and what happens when
//! settlement cannot answer (failure mode).
//!
//! The counters live in proxy-wasm shared data ([`crate::ratelimit`]), so every
//! worker VM of one Envoy shares them. [`evaluate`] reads the host once, before the
//! request state machine runs, and hands it a [`Verdict`]; [`before_payment`] turns
//! that verdict into the request's next state without touching the host.
//!
//! Order of the checks on a priced route: allow-list (an allowed identity is neither
//! limited nor charged), then the rate limit, then the free tier, then payment.
//!
//! A route's `global_limit` is not counted here but by settlement, in Postgres, so it
//! holds across every Envoy: it rides on the Authorize call a paid request makes
//! anyway (no extra round trip) and settlement answers RATE_LIMITED before it holds
//! anything. Requests that never reach settlement (challenges, rejected proofs) never
//! reach the upstream either, so they are not counted; `rate_limit` bounds them per Envoy.

use x402_proto::wire::{self, ErrorBody};

use crate::config::ConfigError;
use crate::fields::Obj;
use crate::host::Host;
use crate::metrics::Metric;
use crate::ratelimit::{self, FreeTierAnswer, LimitAnswer};
use crate::request::{Effect, RequestInfo, State};

/// Response header with the free requests left in the current window.
pub const HEADER_FREE_REMAINING: &str = "x-402-free-remaining";
/// Longest window a rate limit or free tier may use (30 days).
pub const MAX_WINDOW_SECONDS: u64 = 30 * 86_400;
/// Most entries of one allow-list kind.
pub const MAX_ALLOW_ENTRIES: usize = 64;

/// `routes[i].rate_limit` as written.
#[derive(Debug, Clone)]
pub struct RawRateLimit {
    pub max_requests: u32,
    /// 60 when unset.
    pub window_seconds: u64,
    /// The `message` of the 429 JSON body.
    pub message: Option<String>,
}

impl RawRateLimit {
    pub const FIELDS: &'static [&'static str] = &["max_requests", "window_seconds", "message"];

    pub fn read(o: &Obj<'_>) -> Result<RawRateLimit, ConfigError> {
        Ok(RawRateLimit {
            max_requests: o.uint("max_requests")?,
            window_seconds: o.uint_or("window_seconds", DEFAULT_WINDOW_SECONDS)?,
            message: o.opt_string("message")?,
        })
    }
}

/// `routes[i].free_tier` as written.
#[derive(Debug, Clone)]
pub struct RawFreeTier {
    pub requests: u32,
    /// A day when unset.
    pub window_seconds: u64,
    /// `client` (default: by client address) or `payer` (by the payer key of a proof
    /// whose signature the filter verifies).
    pub per: Option<String>,
}

impl RawFreeTier {
    pub const FIELDS: &'static [&'static str] = &["requests", "window_seconds", "per"];

    pub fn read(o: &Obj<'_>) -> Result<RawFreeTier, ConfigError> {
        Ok(RawFreeTier {
            requests: o.uint("requests")?,
            window_seconds: o.uint_or("window_seconds", DEFAULT_FREE_WINDOW_SECONDS)?,
            per: o.opt_string("per")?,
        })
    }
}

/// `routes[i].global_limit` as written.
#[derive(Debug, Clone)]
pub struct RawGlobalLimit {
    pub max_requests: u32,
    /// 60 when unset.
    pub window_seconds: u64,
    /// `payer` (default: the payer account settlement verified) or `client` (the
    /// client address).
    pub key: Option<String>,
    /// The `message` of the 429 JSON body.
    pub message: Option<String>,
}

impl RawGlobalLimit {
    pub const FIELDS: &'static [&'static str] =
        &["max_requests", "window_seconds", "key", "message"];

    pub fn read(o: &Obj<'_>) -> Result<RawGlobalLimit, ConfigError> {
        Ok(RawGlobalLimit {
            max_requests: o.uint("max_requests")?,
            window_seconds: o.uint_or("window_seconds", DEFAULT_WINDOW_SECONDS)?,
            key: o.opt_string("key")?,
            message: o.opt_string("message")?,
        })
    }
}

/// `routes[i].allow` as written: any one match lets the request through unpaid.
#[derive(Debug, Clone, Default)]
pub struct RawAllow {
    pub headers: Vec<RawHeaderMatch>,
    /// Peer identities as Envoy sees them (`source.principal`), e.g. Istio's
    /// `spiffe://cluster.local/ns/billing/sa/reporter`.
    pub source_principals: Vec<String>,
    pub metadata: Vec<RawMetadataMatch>,
}

impl RawAllow {
    pub const FIELDS: &'static [&'static str] = &["headers", "source_principals", "metadata"];

    pub fn read(o: &Obj<'_>) -> Result<RawAllow, ConfigError> {
        let headers = o
            .list("headers", false)?
            .into_iter()
            .map(|(field, v)| {
                let h = Obj::new(field, v, &["name", "values"])?;
                Ok(RawHeaderMatch {
                    name: h.string("name")?,
                    values: h.strings("values", true)?,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let metadata = o
            .list("metadata", false)?
            .into_iter()
            .map(|(field, v)| {
                let m = Obj::new(field, v, &["filter", "path", "values"])?;
                Ok(RawMetadataMatch {
                    filter: m.string("filter")?,
                    path: m.strings("path", true)?,
                    values: m.strings("values", true)?,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(RawAllow {
            headers,
            source_principals: o.strings("source_principals", false)?,
            metadata,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RawHeaderMatch {
    pub name: String,
    pub values: Vec<String>,
}

/// A string in dynamic metadata, e.g. a JWT claim that `jwt_authn` (or Istio's
/// `RequestAuthentication`) stored with `payload_in_metadata`.
#[derive(Debug, Clone)]
pub struct RawMetadataMatch {
    /// Metadata namespace, e.g. `envoy.filters.http.jwt_authn`.
    pub filter: String,
    /// Keys below the namespace, e.g. `["jwt_payload", "sub"]`.
    pub path: Vec<String>,
    pub values: Vec<String>,
}

const DEFAULT_WINDOW_SECONDS: u64 = 60;
const DEFAULT_FREE_WINDOW_SECONDS: u64 = 86_400;

/// What a route does when settlement gives no usable answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// 503 JSON; nothing reaches the upstream.
    #[default]
    Closed,
    /// The request goes upstream unpaid and is logged and counted for review.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub max_requests: u32,
    pub window_seconds: u64,
    pub message: String,
}

/// What a global limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalLimitKey {
    Payer,
    Client,
}

/// A limit settlement enforces across all Envoys: `max_requests` paid requests per
/// fixed window of `window_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimit {
    pub max_requests: u32,
    pub window_seconds: u32,
    pub key: GlobalLimitKey,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeTierKey {
    Client,
    Payer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeTier {
    pub requests: u32,
    pub window_seconds: u64,
    pub per: FreeTierKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataMatch {
    pub filter: String,
    pub path: Vec<String>,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// (lower-case header name, accepted values).
    pub headers: Vec<(String, Vec<String>)>,
    pub source_principals: Vec<String>,
    pub metadata: Vec<MetadataMatch>,
}

impl AllowList {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.source_principals.is_empty() && self.metadata.is_empty()
    }
}

/// The compiled policy of one route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    pub rate_limit: Option<RateLimit>,
    pub free_tier: Option<FreeTier>,
    pub global_limit: Option<GlobalLimit>,
    pub allow: AllowList,
    pub failure_mode: FailureMode,
    /// Settlement call timeout for this route; the global one when unset.
    pub timeout_ms: Option<u32>,
}

/// The policy fields of `routes[index]` as written.
#[derive(Debug, Clone, Default)]
pub struct RawRoutePolicy {
    pub rate_limit: Option<RawRateLimit>,
    pub free_tier: Option<RawFreeTier>,
    pub global_limit: Option<RawGlobalLimit>,
    pub allow: Option<RawAllow>,
    pub failure_mode: Option<String>,
    pub timeout_ms: Option<u32>,
}

fn invalid(field: String, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn check_window(field: String, seconds: u64) -> Result<(), ConfigError> {
    if seconds == 0 || seconds > MAX_WINDOW_SECONDS {
        return Err(invalid(
            field,
            format!("must be between 1 and {MAX_WINDOW_SECONDS} seconds"),
        ));
    }
    Ok(())
}

fn check_message(field: String, message: Option<String>) -> Result<String, ConfigError> {
    let message = message.unwrap_or_else(|| "too many requests; retry later".to_owned());
    if message.len() > 1024 || message.contains(char::is_control) {
        return Err(invalid(
            field,
            "must be at most 1024 characters without control characters",
        ));
    }
    Ok(message)
}

fn check_values(field: String, values: &[String]) -> Result<(), ConfigError> {
    if values.is_empty() || values.len() > MAX_ALLOW_ENTRIES {
        return Err(invalid(
            field,
            format!("must list between 1 and {MAX_ALLOW_ENTRIES} values"),
        ));
    }
    if values
        .iter()
        .any(|v| v.is_empty() || v.len() > wire::MAX_SHORT_FIELD || v.contains(char::is_control))
    {
        return Err(invalid(
            field,
            "values must be non-empty, short and free of control characters",
        ));
    }
    Ok(())
}

/// Validates the policy fields of `routes[index]`.
pub fn compile(index: usize, raw: RawRoutePolicy) -> Result<RoutePolicy, ConfigError> {
    let at = |name: &str| format!("routes[{index}].{name}");
    let rate_limit = match raw.rate_limit {
        None => None,
        Some(r) => {
            if r.max_requests == 0 {
                return Err(invalid(
                    at("rate_limit.max_requests"),
                    "must be positive (remove the route or its price to block it)",
                ));
            }
            check_window(at("rate_limit.window_seconds"), r.window_seconds)?;
            let message = check_message(at("rate_limit.message"), r.message)?;
            Some(RateLimit {
                max_requests: r.max_requests,
                window_seconds: r.window_seconds,
                message,
            })
        }
    };
    let free_tier = match raw.free_tier {
        None => None,
        Some(f) => {
            if f.requests == 0 {
                return Err(invalid(
                    at("free_tier.requests"),
                    "must be positive (leave free_tier out for no free requests)",
                ));
            }
            check_window(at("free_tier.window_seconds"), f.window_seconds)?;
            let per = match f.per.as_deref() {
                None | Some("client") => FreeTierKey::Client,
                Some("payer") => FreeTierKey::Payer,
                Some(other) => {
                    return Err(invalid(
                        at("free_tier.per"),
                        format!("{other:?} is neither \"client\" nor \"payer\""),
                    ))
                }
            };
            Some(FreeTier {
                requests: f.requests,
                window_seconds: f.window_seconds,
                per,
            })
        }
    };
    let global_limit = match raw.global_limit {
        None => None,
        Some(g) => {
            if g.max_requests == 0 {
                return Err(invalid(
                    at("global_limit.max_requests"),
                    "must be positive (remove the route or its price to block it)",
                ));
            }
            check_window(at("global_limit.window_seconds"), g.window_seconds)?;
            let key = match g.key.as_deref() {
                None | Some("payer") => GlobalLimitKey::Payer,
                Some("client") => GlobalLimitKey::Client,
                Some(other) => {
                    return Err(invalid(
                        at("global_limit.key"),
                        format!("{other:?} is neither \"payer\" nor \"client\""),
                    ))
                }
            };
            if free_tier.is_some() {
                // Free requests pass without a call to settlement, which counts the
                // global limit.
                return Err(invalid(
                    at("global_limit"),
                    "cannot be combined with free_tier: free requests are not counted by settlement",
                ));
            }
            Some(GlobalLimit {
                max_requests: g.max_requests,
                window_seconds: u32::try_from(g.window_seconds).unwrap_or(u32::MAX),
                key,
                message: check_message(at("global_limit.message"), g.message)?,
            })
        }
    };
    let allow = match raw.allow {
        None => AllowList::default(),
        Some(a) => compile_allow(index, a)?,
    };
    let failure_mode = match raw.failure_mode.as_deref() {
        None | Some("closed") => FailureMode::Closed,
        Some("open") => FailureMode::Open,
        Some(other) => {
            return Err(invalid(
                at("failure_mode"),
                format!("{other:?} is neither \"closed\" nor \"open\""),
            ))
        }
    };
    if let Some(ms) = raw.timeout_ms {
        if ms == 0 || ms > 60_000 {
            return Err(invalid(at("timeout_ms"), "must be between 1 and 60000"));
        }
    }
    Ok(RoutePolicy {
        rate_limit,
        free_tier,
        global_limit,
        allow,
        failure_mode,
        timeout_ms: raw.timeout_ms,
    })
}

fn compile_allow(index: usize, raw: RawAllow) -> Result<AllowList, ConfigError> {
    let at = |name: String| format!("routes[{index}].allow.{name}");
    if raw.headers.len() > MAX_ALLOW_ENTRIES
        || raw.source_principals.len() > MAX_ALLOW_ENTRIES
        || raw.metadata.len() > MAX_ALLOW_ENTRIES
    {
        return Err(invalid(
            format!("routes[{index}].allow"),
            format!("at most {MAX_ALLOW_ENTRIES} entries of each kind"),
        ));
    }
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (i, h) in raw.headers.into_iter().enumerate() {
        let ok = !h.name.is_empty()
            && h.name.len() <= 128
            && !h.name.starts_with(':')
            && h.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(invalid(
                at(format!("headers[{i}].name")),
                "must be a header name such as x-api-key (pseudo-headers are not allowed)",
            ));
        }
        let name = h.name.to_ascii_lowercase();
        if name == wire::HEADER_PAYMENT_SIGNATURE || name == wire::HEADER_PAYMENT_SIGNATURE_ALIAS {
            return Err(invalid(
                at(format!("headers[{i}].name")),
                "must not be a payment header",
            ));
        }
        check_values(at(format!("headers[{i}].values")), &h.values)?;
        headers.push((name, h.values));
    }
    if !raw.source_principals.is_empty() {
        check_values(at("source_principals".into()), &raw.source_principals)?;
    }
    let mut metadata = Vec::with_capacity(raw.metadata.len());
    for (i, m) in raw.metadata.into_iter().enumerate() {
        if m.filter.is_empty() || m.filter.contains(char::is_control) {
            return Err(invalid(
                at(format!("metadata[{i}].filter")),
                "must be a metadata namespace such as envoy.filters.http.jwt_authn",
            ));
        }
        if m.path.is_empty()
            || m.path.len() > 8
            || m.path
                .iter()
                .any(|k| k.is_empty() || k.contains(char::is_control))
        {
            return Err(invalid(
                at(format!("metadata[{i}].path")),
                "must list 1 to 8 non-empty keys",
            ));
        }
        check_values(at(format!("metadata[{i}].values")), &m.values)?;
        metadata.push(MetadataMatch {
            filter: m.filter,
            path: m.path,
            values: m.values,
        });
    }
    Ok(AllowList {
        headers,
        source_principals: raw.source_principals,
        metadata,
    })
}

/// What the policy decided before payment is looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Verdict {
    /// No policy applies: the normal price applies.
    #[default]
    Charge,
    /// The free tier is used up: the normal price applies, and 402s say none is left.
    ChargeFreeExhausted,
    /// An allow-listed identity: no limit, no charge.
    Allowed,
    /// Over the rate limit: 429, nothing held.
    Limited { retry_after_seconds: u64 },
    /// Within the free tier: passes unpaid; `remaining` free requests are left.
    Free { remaining: u64 },
}

/// What the policy looks at, read from the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The client address without its port.
    pub client_address: String,
    /// `source.principal` (mTLS peer identity), when any.
    pub source_principal: Option<String>,
}

/// The client address of `source.address` without the port (`[v6]:port` or `v4:port`).
pub fn strip_port(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => address,
    }
}

fn property_string(host: &dyn Host, path: &[&str]) -> Option<String> {
    host.property(path)
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
}

fn allowed(host: &dyn Host, allow: &AllowList) -> bool {
    if allow.is_empty() {
        return false;
    }
    let header_match = allow.headers.iter().any(|(name, values)| {
        host.request_header(name)
            .is_some_and(|v| values.contains(&v))
    });
    if header_match {
        return true;
    }
    if !allow.source_principals.is_empty() {
        if let Some(principal) = property_string(host, &["source", "principal"]) {
            if allow.source_principals.contains(&principal) {
                return true;
            }
        }
    }
    allow.metadata.iter().any(|m| {
        let mut path: Vec<&str> = vec!["metadata", "filter_metadata", m.filter.as_str()];
        path.extend(m.path.iter().map(String::as_str));
        property_string(host, &path).is_some_and(|v| m.values.contains(&v))
    })
}

/// The payer key of a proof whose signature checks out, for per-payer free tiers.
fn verified_payer(
    config: &crate::config::Config,
    route: &crate::config::Route,
    info: &RequestInfo,
) -> Option<String> {
    let payment = wire::decode_payment(info.payment.as_deref()?).ok()?;
    crate::request::check_payment(config, route, info, &payment).ok()?;
    let p = &payment.payload.payload;
    x402_proto::signing::verify_hex(&p.payer, &p.signature, &payment.signed_fields()).ok()?;
    Some(p.payer.clone())
}

/// [`evaluate`] for the route `info` matches; unpriced requests have no policy.
pub fn evaluate_request(
    host: &mut dyn Host,
    config: &crate::config::Config,
    info: &RequestInfo,
) -> Verdict {
    let key = crate::config::RouteKey {
        route_name: info.route_name.as_deref(),
        method: &info.method,
        path: &info.path,
    };
    match config.route_for(&key) {
        Some(route) => evaluate(host, config, route, info),
        None => Verdict::Charge,
    }
}

/// Decides the policy of a priced request, reading and updating the shared counters.
pub fn evaluate(
    host: &mut dyn Host,
    config: &crate::config::Config,
    route: &crate::config::Route,
    info: &RequestInfo,
) -> Verdict {
    let policy = &route.policy;
    if policy.rate_limit.is_none() && policy.free_tier.is_none() && policy.allow.is_empty() {
        return Verdict::Charge;
    }
    if allowed(host, &policy.allow) {
        return Verdict::Allowed;
    }
    let client = property_string(host, &["source", "address"])
        .map(|a| strip_port(&a).to_owned())
        .unwrap_or_default();
    let now_nanos = host.now_nanos();
    // Counting by payer needs a genuine signature: otherwise anyone could spend a
    // victim's rate limit or free requests by sending junk proofs with its public key.
    let per_payer = policy.rate_limit.is_some()
        || policy
            .free_tier
            .as_ref()
            .is_some_and(|f| f.per == FreeTierKey::Payer);
    let payer = if per_payer {
        verified_payer(config, route, info)
    } else {
        None
    };
    if let Some(limit) = &policy.rate_limit {
        let identity = match &payer {
            Some(payer) => format!("payer:{payer}"),
            None => format!("client:{client}"),
        };
        let key = format!("x402.rl.{}.{identity}", route.name);
        if let LimitAnswer::Denied {
            retry_after_seconds,
        } = ratelimit::take_token(host, &key, limit, now_nanos)
        {
            return Verdict::Limited {
                retry_after_seconds,
            };
        }
    }
    if let Some(free) = &policy.free_tier {
        let identity = match free.per {
            FreeTierKey::Client => Some(format!("client:{client}")),
            FreeTierKey::Payer => payer.as_ref().map(|p| format!("payer:{p}")),
        };
        if let Some(identity) = identity {
            let key = format!("x402.ft.{}.{identity}", route.name);
            return match ratelimit::take_free(host, &key, free, now_nanos / 1_000_000_000) {
                FreeTierAnswer::Free { remaining } => Verdict::Free { remaining },
                FreeTierAnswer::Exhausted => Verdict::ChargeFreeExhausted,
            };
        }
    }
    Verdict::Charge
}

/// The outcome of a verdict that settles the request before payment, if any.
pub fn before_payment(
    route: &crate::config::Route,
    verdict: &Verdict,
) -> Option<(State, Vec<Effect>)> {
    match verdict {
        Verdict::Charge | Verdict::ChargeFreeExhausted => None,
        Verdict::Allowed => Some((
            State::Passthrough,
            vec![Effect::Count(Metric::Allowed, 1), Effect::Continue],
        )),
        Verdict::Free { remaining } => Some((
            State::Free {
                remaining: *remaining,
            },
            vec![
                Effect::RemoveRequestHeader(wire::HEADER_PAYMENT_SIGNATURE),
                Effect::RemoveRequestHeader(wire::HEADER_PAYMENT_SIGNATURE_ALIAS),
                Effect::Count(Metric::Free, 1),
                Effect::Continue,
            ],
        )),
        Verdict::Limited {
            retry_after_seconds,
        } => {
            let message = route
                .policy
                .rate_limit
                .as_ref()
                .map(|l| l.message.as_str())
                .unwrap_or_default();
            Some((State::Replied, rate_limited(message, *retry_after_seconds)))
        }
    }
}

/// The 429 of a rate limit: `Retry-After` and `{"error": "rate_limited", message}`.
pub fn rate_limited(message: &str, retry_after_seconds: u64) -> Vec<Effect> {
    let body = ErrorBody {
        error: "rate_limited".to_owned(),
        message: message.to_owned(),
    };
    vec![
        Effect::Reply {
            status: 429,
            headers: vec![
                ("content-type".to_owned(), "application/json".to_owned()),
                ("cache-control".to_owned(), "no-store".to_owned()),
                (
                    "retry-after".to_owned(),
                    retry_after_seconds.max(1).to_string(),
                ),
            ],
            body: serde_json::to_vec(&body).unwrap_or_default(),
        },
        Effect::Count(Metric::RateLimited, 1),
    ]
}

/// The client address a route's global limit counts by, when it counts by client.
pub fn global_limit_client(
    host: &dyn Host,
    config: &crate::config::Config,
    info: &RequestInfo,
) -> Option<String> {
    let key = crate::config::RouteKey {
        route_name: info.route_name.as_deref(),
        method: &info.method,
        path: &info.path,
    };
    let limit = config.route_for(&key)?.policy.global_limit.as_ref()?;
    if limit.key != GlobalLimitKey::Client {
        return None;
    }
    Some(
        property_string(host, &["source", "address"])
            .map(|a| strip_port(&a).to_owned())
            .unwrap_or_default(),
    )
}

/// Free requests left that a challenge states: none once the free tier is used up.
pub fn free_remaining(verdict: &Verdict) -> Option<u64> {
    match verdict {
        Verdict::ChargeFreeExhausted => Some(0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn ports_are_stripped_from_v4_and_v6_addresses() {
        assert_eq!(strip_port("10.0.0.7:5123"), "10.0.0.7");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("10.0.0.7"), "10.0.0.7");
    }

    #[test]
    fn unknown_modes_name_their_field() {
        let raw = RawRoutePolicy {
            failure_mode: Some("sometimes".into()),
            ..RawRoutePolicy::default()
        };
        let err = compile(2, raw).unwrap_err().to_string();
        assert!(err.contains("routes[2].failure_mode"), "{err}");
    }
}
