//! The plugin configuration: the JSON an operator writes into Envoy's
//! `configuration` field, read once ([`crate::fields`]) and compiled into [`Config`], a
//! validated form the request path can use without further checks.

use std::borrow::Cow;

use thiserror::Error;
use x402_proto::amount::{self, AmountError, MAX_DECIMALS};

use crate::fields::Obj;

/// Largest route table accepted; matching is a linear scan in table order.
pub const MAX_ROUTES: usize = 256;

/// Default of `capture_window_ms`: under load, captures of requests that finish within
/// this long share one settlement call (and one ledger transaction); a capture is sent at
/// once when no other request is in progress. Captures are off the request's path.
pub const DEFAULT_CAPTURE_WINDOW_MS: u32 = 10;

/// Largest `capture_window_ms`: holds stay open this much longer at most.
pub const MAX_CAPTURE_WINDOW_MS: u32 = 1_000;

/// The plugin JSON as written. Only `settlement_cluster`, `pay_to` and `routes` are
/// required; every other field has the documented default.
#[derive(Debug, Clone)]
pub struct RawConfig {
    pub settlement_cluster: String,
    pub settlement_timeout_ms: u32,
    /// How long a finished request's capture may wait for others to share its call.
    pub capture_window_ms: u32,
    pub network: String,
    pub asset: String,
    pub asset_decimals: u8,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub hold_ttl_seconds: u32,
    pub clock_skew_seconds: u64,
    pub capture_below_status: u16,
    pub one_phase_exact: bool,
    /// Body-priced routes hold the request headers too until the request is paid
    /// (Envoy's `allow_on_headers_stop_iteration` must be on).
    pub hold_request_headers: bool,
    /// gRPC status codes (numbers or names) that void a paid call's hold; every
    /// non-OK code when unset ([`crate::grpc`]).
    pub grpc_void_codes: Option<Vec<crate::grpc::RawCode>>,
    pub verify_signatures_in_filter: bool,
    /// Path answered with the discovery document (e.g. `/.well-known/x402`); off when unset.
    pub discovery_path: Option<String>,
    /// Credential sent to settlement as `authorization: Bearer <token>` gRPC metadata
    /// (settlement's `--dataplane-token`); none when unset.
    pub settlement_token: Option<String>,
    /// Test only: a request carrying this header (lowercase name) makes the VM trap,
    /// so fault tests can prove Envoy's `failure_policy: FAIL_RELOAD` reloads it.
    /// Never set in production; off when unset.
    pub debug_crash_on_header: Option<String>,
    pub routes: Vec<RawRoute>,
}

impl RawConfig {
    /// Reads the parsed plugin JSON; unknown, missing and mistyped fields are refused
    /// by name.
    pub fn read(value: &serde_json::Value) -> Result<RawConfig, ConfigError> {
        let o = Obj::new(
            String::new(),
            value,
            &[
                "settlement_cluster",
                "settlement_timeout_ms",
                "capture_window_ms",
                "network",
                "asset",
                "asset_decimals",
                "pay_to",
                "max_timeout_seconds",
                "hold_ttl_seconds",
                "clock_skew_seconds",
                "capture_below_status",
                "one_phase_exact",
                "hold_request_headers",
                "grpc_void_codes",
                "verify_signatures_in_filter",
                "discovery_path",
                "settlement_token",
                "debug_crash_on_header",
                "routes",
            ],
        )?;
        let grpc_void_codes = match o.opt("grpc_void_codes") {
            None => None,
            Some(_) => Some(
                o.list("grpc_void_codes", true)?
                    .into_iter()
                    .map(|(field, v)| crate::grpc::RawCode::read(field, v))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let routes = o
            .list("routes", true)?
            .into_iter()
            .map(|(field, v)| RawRoute::read(field, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RawConfig {
            settlement_cluster: o.string("settlement_cluster")?,
            settlement_timeout_ms: o.uint_or("settlement_timeout_ms", 2000)?,
            capture_window_ms: o.uint_or("capture_window_ms", DEFAULT_CAPTURE_WINDOW_MS)?,
            network: o.string_or("network", "402x:local")?,
            asset: o.string_or("asset", "USD")?,
            asset_decimals: o.uint_or("asset_decimals", 6)?,
            pay_to: o.string("pay_to")?,
            max_timeout_seconds: o.uint_or("max_timeout_seconds", 60)?,
            hold_ttl_seconds: o.uint_or("hold_ttl_seconds", 300)?,
            clock_skew_seconds: o.uint_or("clock_skew_seconds", 30)?,
            capture_below_status: o.uint_or("capture_below_status", 500)?,
            one_phase_exact: o.flag_or("one_phase_exact", true)?,
            hold_request_headers: o.flag("hold_request_headers")?,
            grpc_void_codes,
            verify_signatures_in_filter: o.flag("verify_signatures_in_filter")?,
            discovery_path: o.opt_string("discovery_path")?,
            settlement_token: o.opt_string("settlement_token")?,
            debug_crash_on_header: o.opt_string("debug_crash_on_header")?,
            routes,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RawRoute {
    pub name: String,
    pub match_: RawMatch,
    /// Decimal price in units of the asset, e.g. `"0.01"`; required unless `pricing`
    /// computes the price ([`crate::pricing`]).
    pub price: Option<String>,
    /// A pricing model other than the flat `price` ([`crate::pricing::RawPricing`]).
    pub pricing: Option<crate::pricing::RawPricing>,
    /// Checks on JSON body fields, answered with 400 before anything is held.
    pub validate: Vec<crate::pricing::RawFieldRule>,
    /// Largest request body buffered for body-dependent prices or validation (413 above).
    pub max_request_body_bytes: Option<u64>,
    /// Largest response body a meter keeps to read usage from.
    pub max_response_body_bytes: Option<u64>,
    pub description: String,
    /// Traffic policy ([`crate::policy`]).
    pub rate_limit: Option<crate::policy::RawRateLimit>,
    pub free_tier: Option<crate::policy::RawFreeTier>,
    pub global_limit: Option<crate::policy::RawGlobalLimit>,
    pub allow: Option<crate::policy::RawAllow>,
    /// `closed` (default) or `open`.
    pub failure_mode: Option<String>,
    pub timeout_ms: Option<u32>,
    /// `per_second` routes: capture what the request has used so far every this
    /// many seconds while it runs, so a crash loses at most one period of billing.
    pub capture_every_seconds: Option<u32>,
}

impl RawRoute {
    fn read(path: String, value: &serde_json::Value) -> Result<RawRoute, ConfigError> {
        let o = Obj::new(
            path,
            value,
            &[
                "name",
                "match",
                "price",
                "pricing",
                "validate",
                "max_request_body_bytes",
                "max_response_body_bytes",
                "description",
                "rate_limit",
                "free_tier",
                "global_limit",
                "allow",
                "failure_mode",
                "timeout_ms",
                "capture_every_seconds",
            ],
        )?;
        let match_ = Obj::new(
            o.field("match"),
            o.req("match")?,
            &[
                "route_name",
                "method",
                "path_prefix",
                "path_exact",
                "grpc_method",
            ],
        )?;
        let pricing = match o.opt("pricing") {
            None => None,
            Some(v) => Some(crate::pricing::RawPricing::read(&o.field("pricing"), v)?),
        };
        let validate = o
            .list("validate", false)?
            .into_iter()
            .map(|(field, v)| crate::pricing::RawFieldRule::read(field, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RawRoute {
            name: o.string("name")?,
            match_: RawMatch {
                route_name: match_.opt_string("route_name")?,
                method: match_.opt_string("method")?,
                path_prefix: match_.opt_string("path_prefix")?,
                path_exact: match_.opt_string("path_exact")?,
                grpc_method: match_.opt_string("grpc_method")?,
            },
            price: o.opt_string("price")?,
            pricing,
            validate,
            max_request_body_bytes: o.opt_uint("max_request_body_bytes")?,
            max_response_body_bytes: o.opt_uint("max_response_body_bytes")?,
            description: o.string_or("description", "")?,
            rate_limit: o
                .opt_obj("rate_limit", crate::policy::RawRateLimit::FIELDS)?
                .map(|o| crate::policy::RawRateLimit::read(&o))
                .transpose()?,
            free_tier: o
                .opt_obj("free_tier", crate::policy::RawFreeTier::FIELDS)?
                .map(|o| crate::policy::RawFreeTier::read(&o))
                .transpose()?,
            global_limit: o
                .opt_obj("global_limit", crate::policy::RawGlobalLimit::FIELDS)?
                .map(|o| crate::policy::RawGlobalLimit::read(&o))
                .transpose()?,
            allow: o
                .opt_obj("allow", crate::policy::RawAllow::FIELDS)?
                .map(|o| crate::policy::RawAllow::read(&o))
                .transpose()?,
            failure_mode: o.opt_string("failure_mode")?,
            timeout_ms: o.opt_uint("timeout_ms")?,
            capture_every_seconds: o.opt_uint("capture_every_seconds")?,
        })
    }
}

/// Longest period between partial captures (a day).
pub const MAX_CAPTURE_EVERY_SECONDS: u32 = 86_400;

#[derive(Debug, Clone, Default)]
pub struct RawMatch {
    /// Envoy route name (`xds.route_name`).
    pub route_name: Option<String>,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub path_exact: Option<String>,
    /// `package.Service/Method` or `package.Service/*` ([`crate::grpc::method_path`]).
    pub grpc_method: Option<String>,
}

/// Why a configuration is refused; every variant names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("invalid plugin configuration JSON: {0}")]
    Json(String),
    #[error("field `{field}` is missing")]
    Missing { field: String },
    #[error("field `{field}` is not a known field (expected one of: {expected})")]
    Unknown { field: String, expected: String },
    #[error("field `{field}` must not be empty")]
    Empty { field: String },
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: String, reason: String },
    #[error("field `routes[{index}].price` ({price:?}) is not a valid price: {reason}")]
    Price {
        index: usize,
        price: String,
        reason: AmountError,
    },
    #[error("field `routes[{index}].name`: duplicate route name {name:?}")]
    DuplicateRoute { index: usize, name: String },
    #[error("field `routes[{index}].match` has no criteria: set route_name, method, path_prefix, path_exact or grpc_method")]
    EmptyMatch { index: usize },
    #[error("field `routes[{index}].match` sets both path_prefix and path_exact")]
    AmbiguousPath { index: usize },
    #[error("field `routes` has more than {MAX_ROUTES} entries")]
    TooManyRoutes,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The data-plane credential; its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SettlementToken(pub String);

impl std::fmt::Debug for SettlementToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SettlementToken(..)")
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Sent as `authorization: Bearer ...` metadata on every settlement call.
    pub settlement_token: Option<SettlementToken>,
    /// Envoy cluster (HTTP/2) of the settlement service.
    pub settlement_cluster: String,
    pub settlement_timeout_ms: u32,
    /// How long a capture may wait for others to share its call (`capture_window_ms`).
    pub capture_window_ms: u32,
    pub network: String,
    pub asset: String,
    pub asset_decimals: u8,
    /// Merchant account every priced route pays.
    pub pay_to: String,
    /// Longest a proof may stay valid from now; also advertised in challenges.
    pub max_timeout_seconds: u64,
    pub hold_ttl_seconds: u32,
    /// Tolerance for client clocks that run ahead of ours.
    pub clock_skew_seconds: u64,
    /// Upstream statuses below this are captured; the rest void the hold.
    pub capture_below_status: u16,
    /// Exact prices are captured by settlement as the hold is placed (one ledger
    /// write per paid request); a failed upstream then gets the payment refunded.
    pub one_phase_exact: bool,
    /// Body-priced routes hold the request headers with the body until the request is
    /// paid, so the upstream sees nothing of an unpaid one. Needs Envoy's
    /// `allow_on_headers_stop_iteration: true` in the filter's plugin config; without
    /// it the first such request per worker finds out after two seconds
    /// ([`crate::plugin`]), and the headers go first from then on.
    pub hold_request_headers: bool,
    /// A paid gRPC call answered with one of these `grpc-status` codes is voided.
    pub grpc_void_codes: crate::grpc::CodeSet,
    pub verify_signatures_in_filter: bool,
    /// Where [`crate::discovery`] answers; `None` turns discovery off.
    pub discovery_path: Option<String>,
    /// Test only: the lowercase header name whose presence traps the VM.
    pub debug_crash_on_header: Option<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    /// Price in atomic units.
    pub price: u64,
    /// The price as the operator wrote it, normalised (e.g. `"0.01"`).
    pub price_decimal: String,
    pub description: String,
    /// How the price is computed or metered; `price` is the flat price, the `upto`
    /// maximum of a metered route, or 0 when the request body decides it.
    pub pricing: crate::pricing::RoutePricing,
    /// Rate limit, free tier, allow-list, failure mode and timeout.
    pub policy: crate::policy::RoutePolicy,
    /// `per_second` routes: seconds between partial captures while a request runs.
    pub capture_every_seconds: Option<u32>,
    /// The route's `payment_required` challenge, built once per configuration.
    pub challenge_template: Option<crate::request::ChallengeTemplate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub route_name: Option<String>,
    /// Upper-case HTTP method.
    pub method: Option<String>,
    pub path: PathMatch,
}

/// What route matching looks at.
#[derive(Debug, Clone, Copy)]
pub struct RouteKey<'a> {
    pub route_name: Option<&'a str>,
    pub method: &'a str,
    /// `:path` as the request sent it, query string included; matched in
    /// [`normalized_path`] form.
    pub path: &'a str,
}

impl Matcher {
    pub fn matches(&self, key: &RouteKey<'_>) -> bool {
        self.matches_normalized(key.route_name, key.method, &normalized_path(key.path))
    }

    /// [`Matcher::matches`] for a path already in [`normalized_path`] form, so a
    /// table scan normalizes once.
    fn matches_normalized(&self, route_name: Option<&str>, method: &str, path: &str) -> bool {
        if let Some(name) = &self.route_name {
            if route_name != Some(name.as_str()) {
                return false;
            }
        }
        self.matches_method_and_path(method, path)
    }

    fn matches_method_and_path(&self, method: &str, path: &str) -> bool {
        if let Some(wanted) = &self.method {
            if !method.eq_ignore_ascii_case(wanted) {
                return false;
            }
        }
        match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
        }
    }
}

impl Config {
    /// Parses and validates the plugin JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::try_from(RawConfig::read(&crate::fields::parse(bytes)?)?)
    }

    /// The first route of the table that matches, in table order.
    pub fn route_for(&self, key: &RouteKey<'_>) -> Option<&Route> {
        let path = normalized_path(key.path);
        self.routes.iter().find(|r| {
            r.matcher
                .matches_normalized(key.route_name, key.method, &path)
        })
    }

    /// Whether the request's path selects another route (or none) when read as some
    /// upstreams read it ([`lenient_path`]) than in normal form: such a request is
    /// refused, since the filter cannot know which of the two it would be served.
    pub fn path_reads_as_another_route(&self, key: &RouteKey<'_>) -> bool {
        let Some(lenient) = lenient_path(key.path) else {
            return false;
        };
        let other = RouteKey {
            path: &lenient,
            ..*key
        };
        let route = |key| self.route_for(key).map(std::ptr::from_ref);
        route(key) != route(&other)
    }

    /// Whether finding the route of a request with this method and path needs Envoy's
    /// route name: a route that matches on the name is reached (no route before it
    /// matches without one) and its other criteria match. Reading the name costs Envoy
    /// ~20 us per request, so it is read only then.
    pub fn needs_route_name(&self, method: &str, path: &str) -> bool {
        let path = normalized_path(path);
        for route in &self.routes {
            if route.matcher.matches_method_and_path(method, &path) {
                return route.matcher.route_name.is_some();
            }
        }
        false
    }

    pub fn route_named(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }
}

fn check_text(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::Empty {
            field: field.to_owned(),
        });
    }
    if value.len() > x402_proto::wire::MAX_SHORT_FIELD {
        return Err(invalid(field, "is too long"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains a control character"));
    }
    Ok(())
}

fn check_path(field: String, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') {
        return Err(invalid(field, "must start with '/'"));
    }
    if value.contains(['?', '#']) {
        return Err(invalid(
            field,
            "matches the path only; it must not contain '?' or '#'",
        ));
    }
    // Requests are matched in normal form, so a path in any other form would never match.
    let normal = normalized_path(value);
    if normal != value {
        return Err(invalid(
            field,
            format!("is not in normal form (requests are matched normalized); write `{normal}`"),
        ));
    }
    Ok(())
}

/// The path of `:path` (query and fragment left out) in RFC 3986 normal form, the form
/// routes are matched in: escapes of unreserved characters (`%70` is `p`) decoded,
/// repeated slashes merged, then `.` and `..` segments removed (`..` at the root stays
/// there). An upstream that normalizes serves `//paid/x`, `/./paid/x`, `/%70aid/x` and
/// `/free/../paid/x` as `/paid/x`, so they are priced as `/paid/x`. Slashes are merged
/// before `..` applies, as Go's `path.Clean`, nginx and Tomcat do: `/free//../paid` is
/// `/paid`. Behind Envoy's `normalize_path` and `merge_slashes` this changes nothing.
/// It runs on every request, so a path without `//`, `/.` or `%` is borrowed.
pub fn normalized_path(path: &str) -> Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let may_change =
        path.contains("//") || path.contains("/.") || path.contains('%') || path.starts_with('.');
    if !may_change {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    Cow::Owned(merge_slashes_and_remove_dot_segments(&decoded))
}

/// The path (query and fragment left out) as an upstream reads it that decodes escaped
/// slashes and backslashes (`%2F`, `%5C`), takes `\` for `/`, and drops `;` path
/// parameters (Java servlet containers do: `/free/..;/paid` is `/paid` there), in
/// [`normalized_path`] form; `None` when the path has none of these (or reads the same).
/// Envoy passes them on (escaped slashes unless `path_with_escaped_slashes_action` says
/// otherwise).
pub fn lenient_path(path: &str) -> Option<String> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if !path.contains(['%', '\\', ';']) {
        return None;
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_parameter = false;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let escaped = (byte == b'%')
            .then(|| bytes.get(i + 1..i + 3).and_then(hex_byte))
            .flatten();
        let (slash, width) = match escaped {
            Some(b'/' | b'\\') => (true, 3),
            _ => (byte == b'/' || byte == b'\\', 1),
        };
        if slash {
            out.push(b'/');
            in_parameter = false;
        } else if byte == b';' {
            in_parameter = true;
        } else if !in_parameter {
            out.push(byte);
        }
        i += width;
    }
    // Only ASCII bytes were replaced or dropped, and only whole parameters: still UTF-8.
    let read = String::from_utf8(out).ok()?;
    let normal = normalized_path(&read).into_owned();
    (normal != normalized_path(path)).then_some(normal)
}

/// Decodes `%XX` escapes of unreserved characters (ALPHA DIGIT `-` `.` `_` `~`) and
/// upper-cases the hex digits of the other escapes, which stay encoded (`%2f` is `%2F`:
/// decoding it would make a new segment). A `%` without two hex digits after it
/// (`%zz`, a `%` at the end) is left as it is.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some((before, after)) = rest.split_once('%') {
        out.push_str(before);
        let escape = after
            .as_bytes()
            .get(..2)
            .and_then(|hex| Some((hex, hex_byte(hex)?)));
        match escape {
            Some((_, byte)) if is_unreserved(byte) => out.push(char::from(byte)),
            Some((hex, _)) => {
                out.push('%');
                out.extend(hex.iter().map(|b| char::from(b.to_ascii_uppercase())));
            }
            None => {
                out.push('%');
                rest = after;
                continue;
            }
        }
        // Two ASCII hex digits: a char boundary follows them.
        rest = after.get(2..).unwrap_or_default();
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The byte two hex digits (either case) spell, as in a `%XX` escape; `None` for
/// anything else (a sign, one digit, three).
pub(crate) fn hex_byte(hex: &[u8]) -> Option<u8> {
    let mut byte = [0u8; 1];
    hex::decode_to_slice(hex, &mut byte).ok()?;
    Some(byte[0])
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 5.2.4 over segments with the empty ones (repeated slashes) dropped. A path
/// that ends in a slash, `.` or `..` keeps a trailing slash (`/a/b/..` is `/a/`).
fn merge_slashes_and_remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut ends_in_slash = false;
    for segment in path.split('/') {
        ends_in_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            name => kept.push(name),
        }
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    for (i, name) in kept.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(name);
    }
    if ends_in_slash && !kept.is_empty() {
        out.push('/');
    }
    out
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        check_text("settlement_cluster", &raw.settlement_cluster)?;
        check_text("network", &raw.network)?;
        check_text("asset", &raw.asset)?;
        check_text("pay_to", &raw.pay_to)?;
        if raw.settlement_timeout_ms == 0 {
            return Err(invalid("settlement_timeout_ms", "must be positive"));
        }
        if raw.capture_window_ms > MAX_CAPTURE_WINDOW_MS {
            return Err(invalid(
                "capture_window_ms",
                format!("must be at most {MAX_CAPTURE_WINDOW_MS}"),
            ));
        }
        if raw.asset_decimals > MAX_DECIMALS {
            return Err(invalid(
                "asset_decimals",
                format!("must be at most {MAX_DECIMALS}"),
            ));
        }
        if raw.max_timeout_seconds == 0 || raw.max_timeout_seconds > 86_400 {
            return Err(invalid(
                "max_timeout_seconds",
                "must be between 1 and 86400",
            ));
        }
        if raw.hold_ttl_seconds == 0 {
            return Err(invalid("hold_ttl_seconds", "must be positive"));
        }
        if raw.clock_skew_seconds > 3_600 {
            return Err(invalid("clock_skew_seconds", "must be at most 3600"));
        }
        if !(100..=600).contains(&raw.capture_below_status) {
            return Err(invalid(
                "capture_below_status",
                "must be an HTTP status between 100 and 600",
            ));
        }
        let grpc_void_codes = match &raw.grpc_void_codes {
            None => crate::grpc::CodeSet::ALL_ERRORS,
            Some(codes) => crate::grpc::CodeSet::compile(codes)
                .map_err(|reason| invalid("grpc_void_codes", reason))?,
        };
        if let Some(path) = &raw.discovery_path {
            check_path("discovery_path".to_owned(), path)?;
        }
        if let Some(name) = &raw.debug_crash_on_header {
            let token = |b: u8| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
            };
            if name.is_empty() || name.len() > 256 || !name.bytes().all(token) {
                return Err(invalid(
                    "debug_crash_on_header",
                    "must be a lowercase HTTP header name (token characters, no ':' pseudo-headers)",
                ));
            }
        }
        if raw.routes.len() > MAX_ROUTES {
            return Err(ConfigError::TooManyRoutes);
        }
        let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
        for (index, r) in raw.routes.into_iter().enumerate() {
            check_text(&format!("routes[{index}].name"), &r.name)?;
            if routes.iter().any(|seen| seen.name == r.name) {
                return Err(ConfigError::DuplicateRoute {
                    index,
                    name: r.name,
                });
            }
            let flat_price = r
                .price
                .as_deref()
                .map(|text| {
                    amount::parse_decimal(text, raw.asset_decimals).map_err(|reason| {
                        ConfigError::Price {
                            index,
                            price: text.to_owned(),
                            reason,
                        }
                    })
                })
                .transpose()?;
            let pricing = crate::pricing::compile(
                r.pricing,
                r.validate,
                r.max_request_body_bytes,
                r.max_response_body_bytes,
                flat_price,
                raw.asset_decimals,
            )
            .map_err(|(field, reason)| invalid(format!("routes[{index}].{field}"), reason))?;
            let price = match pricing.meter() {
                Some(meter) => meter.max_amount,
                None => flat_price.unwrap_or(0),
            };
            if let Some(every) = r.capture_every_seconds {
                let field = format!("routes[{index}].capture_every_seconds");
                if !(1..=MAX_CAPTURE_EVERY_SECONDS).contains(&every) {
                    return Err(invalid(
                        field,
                        format!("must be 1-{MAX_CAPTURE_EVERY_SECONDS} seconds"),
                    ));
                }
                if pricing.meter().map(|m| &m.unit) != Some(&crate::pricing::Unit::Seconds) {
                    return Err(invalid(field, "applies to per_second pricing only"));
                }
            }
            let m = r.match_;
            if m.route_name.is_none()
                && m.method.is_none()
                && m.path_prefix.is_none()
                && m.path_exact.is_none()
                && m.grpc_method.is_none()
            {
                return Err(ConfigError::EmptyMatch { index });
            }
            if let Some(name) = &m.route_name {
                check_text(&format!("routes[{index}].match.route_name"), name)?;
            }
            if let Some(method) = &m.method {
                let ok = !method.is_empty()
                    && method.len() <= 32
                    && method.bytes().all(|b| b.is_ascii_alphabetic());
                if !ok {
                    return Err(invalid(
                        format!("routes[{index}].match.method"),
                        "must be an HTTP method such as GET",
                    ));
                }
            }
            let grpc_field = format!("routes[{index}].match.grpc_method");
            let method = match (&m.grpc_method, m.method) {
                (Some(_), Some(method)) if !method.eq_ignore_ascii_case("POST") => {
                    return Err(invalid(grpc_field, "gRPC calls are POST; drop `method`"));
                }
                (Some(_), _) => Some("POST".to_owned()),
                (None, method) => method,
            };
            let path = match (m.path_prefix, m.path_exact, m.grpc_method) {
                (Some(_), Some(_), _) => return Err(ConfigError::AmbiguousPath { index }),
                (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                    return Err(invalid(
                        grpc_field,
                        "names the path itself; drop path_prefix and path_exact",
                    ))
                }
                (None, None, Some(grpc_method)) => crate::grpc::method_path(&grpc_method)
                    .map_err(|reason| invalid(grpc_field, reason))?,
                (Some(prefix), None, None) => {
                    check_path(format!("routes[{index}].match.path_prefix"), &prefix)?;
                    PathMatch::Prefix(prefix)
                }
                (None, Some(exact), None) => {
                    check_path(format!("routes[{index}].match.path_exact"), &exact)?;
                    PathMatch::Exact(exact)
                }
                (None, None, None) => PathMatch::Any,
            };
            routes.push(Route {
                name: r.name,
                matcher: Matcher {
                    route_name: m.route_name,
                    method: method.map(|s| s.to_ascii_uppercase()),
                    path,
                },
                price,
                price_decimal: amount::format_decimal(price, raw.asset_decimals),
                description: r.description,
                pricing,
                policy: crate::policy::compile(
                    index,
                    crate::policy::RawRoutePolicy {
                        rate_limit: r.rate_limit,
                        free_tier: r.free_tier,
                        global_limit: r.global_limit,
                        allow: r.allow,
                        failure_mode: r.failure_mode,
                        timeout_ms: r.timeout_ms,
                    },
                )?,
                capture_every_seconds: r.capture_every_seconds,
                challenge_template: None,
            });
        }
        if let Some(token) = &raw.settlement_token {
            if token.is_empty()
                || token.len() > 1024
                || !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    "settlement_token",
                    "must be 1-1024 printable ASCII characters without spaces",
                ));
            }
        }
        let mut config = Config {
            settlement_token: raw.settlement_token.map(SettlementToken),
            settlement_cluster: raw.settlement_cluster,
            settlement_timeout_ms: raw.settlement_timeout_ms,
            capture_window_ms: raw.capture_window_ms,
            network: raw.network,
            asset: raw.asset,
            asset_decimals: raw.asset_decimals,
            pay_to: raw.pay_to,
            max_timeout_seconds: raw.max_timeout_seconds,
            hold_ttl_seconds: raw.hold_ttl_seconds,
            clock_skew_seconds: raw.clock_skew_seconds,
            capture_below_status: raw.capture_below_status,
            one_phase_exact: raw.one_phase_exact,
            hold_request_headers: raw.hold_request_headers,
            grpc_void_codes,
            verify_signatures_in_filter: raw.verify_signatures_in_filter,
            discovery_path: raw.discovery_path,
            debug_crash_on_header: raw.debug_crash_on_header,
            routes,
        };
        let templates: Vec<_> = config
            .routes
            .iter()
            .map(|route| crate::request::ChallengeTemplate::new(&config, route))
            .collect();
        for (route, template) in config.routes.iter_mut().zip(templates) {
            route.challenge_template = template;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "settlement_cluster": "settlement",
            "pay_to": "merchant-demo",
            "routes": [{"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"}]
        })
    }

    #[test]
    fn capture_every_seconds_is_for_per_second_routes_only() {
        let with = |pricing: serde_json::Value, every: u32| {
            let mut c = minimal();
            c["routes"][0] = serde_json::json!({
                "name": "long", "match": {"path_prefix": "/long"},
                "pricing": pricing, "capture_every_seconds": every
            });
            Config::from_json(c.to_string().as_bytes())
        };
        let per_second =
            serde_json::json!({"per_second": {"unit_price": "0.001", "max_units": 30}});
        let c = with(per_second.clone(), 5).unwrap();
        assert_eq!(c.routes[0].capture_every_seconds, Some(5));
        for (pricing, every) in [
            (per_second, 0),
            (
                serde_json::json!({"per_kb": {"unit_price": "0.001", "max_units": 5}}),
                5,
            ),
        ] {
            match with(pricing, every) {
                Err(ConfigError::Invalid { field, .. }) => {
                    assert_eq!(field, "routes[0].capture_every_seconds")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn mistyped_missing_and_repeated_fields_are_refused_by_name() {
        let refused = |text: &str| Config::from_json(text.as_bytes()).unwrap_err().to_string();
        let route =
            |r: &str| format!(r#"{{"settlement_cluster":"s","pay_to":"m","routes":[{r}]}}"#);
        let cases = [
            (
                route(r#"{"name":"q","match":{"path_prefix":"/p"},"price":1}"#),
                "field `routes[0].price` is invalid: must be a string",
            ),
            (
                route(r#"{"name":"q","match":{"path_prefix":"/p"},"price":"1","timeout_ms":-5}"#),
                "field `routes[0].timeout_ms` is invalid",
            ),
            (
                route(r#"{"match":{"path_prefix":"/p"},"price":"1"}"#),
                "field `routes[0].name` is missing",
            ),
            (
                route(
                    r#"{"name":"q","match":{"path_prefix":"/p"},"price":"1","rate_limit":{"max_requests":1,"windows":2}}"#,
                ),
                "field `routes[0].rate_limit.windows` is not a known field",
            ),
            (
                route(
                    r#"{"name":"q","match":{"path_prefix":"/p"},"pricing":{"per_token":{"unit_price":"1","max_units":2,"tokens_from":{"header":7}}}}"#,
                ),
                "field `routes[0].pricing.per_token.tokens_from.header` is invalid",
            ),
            (
                route(r#"{"name":"q","match":{"path_prefix":"/p"},"price":"1","price":"2"}"#),
                "duplicate field `price`",
            ),
            (
                r#"{"settlement_cluster":"s","pay_to":"m","routes":[],"asset_decimals":300}"#
                    .to_owned(),
                "field `asset_decimals` is invalid",
            ),
            (
                r#"{"settlement_cluster":"s","pay_to":"m","routes":[],"grpc_void_codes":[1.5]}"#
                    .to_owned(),
                "field `grpc_void_codes[0]` is invalid",
            ),
        ];
        for (text, want) in cases {
            let err = refused(&text);
            assert!(err.contains(want), "{text}: {err}");
        }
        // Optional fields may be written as null; tokens_from takes both spellings.
        let c = Config::from_json(route(r#"{"name":"q","match":{"path_prefix":"/p","method":null},"pricing":{"per_token":{"unit_price":"1","max_units":2,"tokens_from":{"openai_usage":null}}}}"#).as_bytes()).unwrap();
        assert_eq!(
            c.routes[0].pricing.meter().unwrap().unit,
            crate::pricing::Unit::Tokens(crate::pricing::TokenSource::OpenAiUsage)
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::from_json(minimal().to_string().as_bytes()).unwrap();
        assert_eq!(c.settlement_timeout_ms, 2000);
        assert_eq!(c.network, "402x:local");
        assert_eq!(c.asset, "USD");
        assert_eq!(c.asset_decimals, 6);
        assert_eq!(c.max_timeout_seconds, 60);
        assert_eq!(c.hold_ttl_seconds, 300);
        assert_eq!(c.clock_skew_seconds, 30);
        assert!(c.one_phase_exact);
        assert_eq!(c.capture_below_status, 500);
        assert!(!c.verify_signatures_in_filter);
        assert_eq!(c.routes[0].price, 10_000);
        assert_eq!(c.routes[0].price_decimal, "0.01");
    }

    #[test]
    fn first_matching_route_wins_and_query_is_ignored() {
        let c = Config::from_json(
            serde_json::json!({
                "settlement_cluster": "s", "pay_to": "m",
                "routes": [
                    {"name": "report", "match": {"method": "post", "path_exact": "/paid/report"}, "price": "0.25"},
                    {"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"},
                    {"name": "named", "match": {"route_name": "named"}, "price": "0.02"}
                ]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let key = |route_name, method, path| RouteKey {
            route_name,
            method,
            path,
        };
        let name = |k: RouteKey<'_>| c.route_for(&k).map(|r| r.name.clone());
        assert_eq!(
            name(key(None, "POST", "/paid/report?x=1")),
            Some("report".into())
        );
        assert_eq!(name(key(None, "GET", "/paid/report")), Some("quote".into()));
        assert_eq!(name(key(None, "GET", "/paidx")), Some("quote".into()));
        assert_eq!(name(key(None, "GET", "/free")), None);
        assert_eq!(
            name(key(Some("named"), "GET", "/named/x")),
            Some("named".into())
        );
        assert_eq!(name(key(Some("other"), "GET", "/named/x")), None);
    }

    fn routes_on_paid_and_named() -> Config {
        Config::from_json(
            serde_json::json!({
                "settlement_cluster": "s", "pay_to": "m",
                "routes": [
                    {"name": "report", "match": {"method": "POST", "path_exact": "/paid/report"}, "price": "0.25"},
                    {"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"},
                    {"name": "named", "match": {"route_name": "named", "path_prefix": "/named"}, "price": "0.02"}
                ]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn route_name_for(c: &Config, method: &str, path: &str) -> Option<String> {
        c.route_for(&RouteKey {
            route_name: None,
            method,
            path,
        })
        .map(|r| r.name.clone())
    }

    #[test]
    fn paths_some_upstreams_read_as_another_route_are_found() {
        let c = routes_on_paid_and_named();
        let ambiguous = |method: &str, path: &str| {
            c.path_reads_as_another_route(&RouteKey {
                route_name: None,
                method,
                path,
            })
        };
        for path in [
            "/free%2F..%2Fpaid/x",
            "/free%2f..%2fpaid/x",
            "/free%5C..%5Cpaid/x",
            "/free\\..\\paid/x",
            "/free/..;/paid/x",
            "/free;a=b/..;/paid/x?q=1",
            "/paid%2F..%2Ffree",
        ] {
            assert!(ambiguous("GET", path), "{path}");
        }
        // Readings that land on the same route (or on none) are not refused.
        for path in [
            "/paid/a%2Fb",
            "/paid;v=1/x",
            "/paid\\x",
            "/free%2Fx",
            "/free;jsessionid=1/x",
            "/paid/x?next=%2F..%2Ffree",
            "/paid/x%zz",
            "/paid/x%2",
        ] {
            assert!(!ambiguous("GET", path), "{path}");
        }
        assert_eq!(lenient_path("/a/..;/b").as_deref(), Some("/b"));
        assert_eq!(lenient_path("/a%2Fb\\c;p/d").as_deref(), Some("/a/b/c/d"));
        assert_eq!(
            lenient_path("/é;x/ü%2F%C3%A9").as_deref(),
            Some("/é/ü/%C3%A9")
        );
        assert_eq!(lenient_path("/plain/path"), None);
        assert_eq!(lenient_path("/only%20space"), None);
    }

    #[test]
    fn unnormalized_paths_match_the_route_of_their_normal_form() {
        let c = routes_on_paid_and_named();
        for path in [
            "/paid/x",
            "//paid/x",
            "///paid//x",
            "/./paid/x",
            "/%70aid/x",
            "/%70%61%69%64/x",
            "/free/../paid/x",
            "/free//../paid/x",
            "/%2e%2E/paid/x",
            "/../paid/x",
            "/paid/x/../../paid/y?q=1",
        ] {
            assert_eq!(
                route_name_for(&c, "GET", path).as_deref(),
                Some("quote"),
                "{path}"
            );
        }
        for path in [
            "/paid/./report",
            "//paid/report",
            "/paid/%72eport",
            "/x/../paid/report",
        ] {
            assert_eq!(
                route_name_for(&c, "POST", path).as_deref(),
                Some("report"),
                "{path}"
            );
        }
        // Normalizing also takes paths out of a priced prefix, as the upstream does.
        for path in ["/paid/../free", "/paid/..", "/%70aid/../x"] {
            assert_eq!(route_name_for(&c, "GET", path), None, "{path}");
        }
        // needs_route_name scans the table the same way.
        assert!(c.needs_route_name("GET", "/named/x"));
        assert!(c.needs_route_name("GET", "//named/x"));
        assert!(c.needs_route_name("GET", "/%6Eamed/x"));
        assert!(!c.needs_route_name("GET", "/./paid/x"));
        assert!(!c.needs_route_name("GET", "/named/../free"));
    }

    #[test]
    fn paths_are_put_in_rfc_3986_normal_form() {
        for (path, normal) in [
            // RFC 3986 5.2.4's examples.
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            // `..` above the root stays at the root.
            ("/..", "/"),
            ("/../paid", "/paid"),
            ("/../../..", "/"),
            ("/paid/../../../x", "/x"),
            // A path ending in a slash, `.` or `..` keeps its trailing slash.
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/paid//", "/paid/"),
            ("//", "/"),
            // Repeated slashes are merged before `..` applies.
            ("/free//../paid", "/paid"),
            // Unreserved escapes decoded, once; the others keep upper-case hex.
            ("/%7Euser/%41%7a%30-%2D%2e%5F", "/~user/Az0--._"),
            ("/a%2fb%2F%20c%3f", "/a%2Fb%2F%20c%3F"),
            ("/%25%70aid", "/%25paid"),
            ("/%2e%2E/paid", "/paid"),
            // Query and fragment are left out, as before.
            ("/paid/./x?a=//b/../c#d", "/paid/x"),
            // Names that only start with a dot are names.
            ("/.well-known/x402", "/.well-known/x402"),
            ("/.../x", "/.../x"),
            ("/é/./%C3%A9", "/é/%C3%A9"),
        ] {
            assert_eq!(normalized_path(path), normal, "{path}");
        }
    }

    #[test]
    fn paths_already_normal_are_borrowed() {
        for (path, bare) in [
            ("/paid/x", "/paid/x"),
            ("/", "/"),
            ("/a.b/c.d./e..", "/a.b/c.d./e.."),
            ("/paid?q=//a/./b%20#/../x", "/paid"),
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("*", "*"),
            ("", ""),
        ] {
            match normalized_path(path) {
                Cow::Borrowed(got) => assert_eq!(got, bare, "{path}"),
                Cow::Owned(got) => panic!("{path} was copied to {got}"),
            }
        }
    }

    #[test]
    fn malformed_escapes_are_left_as_they_are() {
        for (path, normal) in [
            ("/paid%", "/paid%"),
            ("/paid/%7", "/paid/%7"),
            ("/%zz/paid", "/%zz/paid"),
            ("/%+1/x", "/%+1/x"),
            ("/%%70aid", "/%paid"),
            ("/%é/./x", "/%é/x"),
            ("/%7é", "/%7é"),
            ("/%", "/%"),
            ("%", "%"),
        ] {
            assert_eq!(normalized_path(path), normal, "{path}");
        }
    }

    /// Calls `check` on every string of 1 to 6 characters from `alphabet`.
    fn every_short_path(alphabet: &[char], check: impl Fn(&str)) {
        let mut longest = vec![String::new()];
        for _ in 0..6 {
            longest = longest
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            longest.iter().for_each(|path| check(path));
        }
    }

    #[test]
    fn every_short_path_normalizes_without_panicking() {
        // No panic, and the result has no repeated slash nor `.` or `..` segment left.
        every_short_path(&['/', '.', '%', '2', 'e', 'é'], |path| {
            let normal = normalized_path(path);
            assert!(
                !normal.contains("//") && !normal.split('/').any(|s| s == "." || s == ".."),
                "{path:?} gave {normal:?}"
            );
        });
    }

    #[test]
    fn every_short_path_reads_leniently_without_panicking() {
        // With the characters only the lenient reading treats apart: no panic, and what
        // it gives is in normal form with no separator of its own left.
        every_short_path(&['/', '.', '%', '2', 'f', '\\', ';', 'é'], |path| {
            if let Some(read) = lenient_path(path) {
                assert_eq!(normalized_path(&read), read.as_str(), "{path:?}");
                assert!(!read.contains(['\\', ';']), "{path:?} gave {read:?}");
                assert!(!read.to_ascii_uppercase().contains("%2F"), "{path:?}");
            }
        });
    }

    #[test]
    fn configured_paths_must_be_in_normal_form() {
        for (field, path, normal) in [
            ("path_prefix", "/%70aid", "/paid"),
            ("path_prefix", "//paid", "/paid"),
            ("path_exact", "/paid/./report", "/paid/report"),
            ("path_exact", "/free/../paid", "/paid"),
        ] {
            let mut c = minimal();
            c["routes"][0]["match"] = serde_json::json!({ field: path });
            let err = Config::from_json(c.to_string().as_bytes())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("routes[0].match.{field}"))
                    && err.contains(&format!("`{normal}`")),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn empty_route_table_prices_nothing() {
        let c =
            Config::from_json(br#"{"settlement_cluster":"s","pay_to":"m","routes":[]}"#).unwrap();
        assert!(c
            .route_for(&RouteKey {
                route_name: None,
                method: "GET",
                path: "/paid"
            })
            .is_none());
    }
}
