//! Pricing rules per route: how much a request costs, when that is known, and how
//! the filter meters it.
//!
//! | model | scheme | known | hold | capture |
//! | --- | --- | --- | --- | --- |
//! | flat `price` | exact | at headers | price | price |
//! | `time_of_day` | exact | at headers (UTC hour) | window price | same |
//! | `expression` | exact | after the request body | computed | same |
//! | `graphql` | exact | after the request body | sum of root fields | same |
//! | `per_token`, `per_second`, `per_kb`, `per_item` | upto | after the response | `max_units × unit_price` | `units × unit_price` ≤ hold |
//!
//! All amounts are exact: prices are decimal strings, computed in integers or exact
//! decimals ([`crate::decimal`]) and rounded half up to the asset's atomic unit.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::ConfigError;
use crate::decimal::UnitPrice;
use crate::expr::{self, Expr};
use crate::fields::{self, Obj};
use crate::graphql;

/// Default limit on a buffered request body (bodies of priced or validated routes).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 64 * 1024;
/// Default limit on the response body a meter keeps to read usage from.
pub const DEFAULT_MAX_RESPONSE_BODY_BYTES: u64 = 1024 * 1024;
/// Bytes per kilobyte for `per_kb` (SI kilobyte).
pub const BYTES_PER_KB: u64 = 1000;
pub(crate) const MICROS_PER_SECOND: u64 = 1_000_000;

/// The `pricing` object of a route: exactly one model.
#[derive(Debug, Clone)]
pub enum RawPricing {
    PerToken(RawTokenMeter),
    PerSecond(RawMeter),
    PerKb(RawMeter),
    PerItem(RawItemMeter),
    PerMessage(RawMessageMeter),
    Expression(RawExpression),
    Graphql(RawGraphQl),
    TimeOfDay(RawTimeOfDay),
    Volume(RawVolume),
}

#[derive(Debug, Clone)]
pub struct RawVolume {
    /// Ascending by `from_requests`, the first from 0; settlement picks the tier from
    /// the payer's captured requests on this route this calendar month (UTC).
    pub tiers: Vec<RawTier>,
}

#[derive(Debug, Clone)]
pub struct RawTier {
    pub from_requests: u64,
    pub price: String,
}

#[derive(Debug, Clone)]
pub struct RawMeter {
    /// Decimal price of one unit in asset units; may be finer than one atomic unit.
    pub unit_price: String,
    /// Most units one request may be charged for: the hold is `max_units × unit_price`.
    pub max_units: u64,
}

#[derive(Debug, Clone)]
pub struct RawTokenMeter {
    pub unit_price: String,
    pub max_units: u64,
    pub tokens_from: RawTokenSource,
}

/// Where the response says how many tokens it produced.
#[derive(Debug, Clone)]
pub enum RawTokenSource {
    /// A response header with a decimal count, e.g. `x-usage-tokens`.
    Header(String),
    /// A JSON pointer into the response body, e.g. `/usage/completion_tokens`.
    JsonPointer(String),
    /// The OpenAI-style `usage` object of a JSON body (`completion_tokens`, or
    /// `output_tokens`).
    OpenaiUsage,
    /// The last `usage` object in a server-sent-events stream's `data:` events.
    SseUsage,
    /// One token per server-sent event with data (a `data: [DONE]` marker is free),
    /// counted as the stream passes, so the stream is cut when the hold is spent.
    SseEvents,
}

#[derive(Debug, Clone)]
pub struct RawItemMeter {
    pub unit_price: String,
    pub max_units: u64,
    /// JSON pointer to the array whose length is charged, e.g. `/objects`.
    pub items_pointer: String,
}

#[derive(Debug, Clone)]
pub struct RawMessageMeter {
    pub unit_price: String,
    pub max_units: u64,
    /// Which WebSocket messages are charged: `both` (default), `client` or `upstream`.
    pub count: Direction,
}

/// Which side's WebSocket messages a `per_message` meter counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Direction {
    #[default]
    Both,
    /// Messages the client sends.
    Client,
    /// Messages the upstream sends.
    Upstream,
}

impl Direction {
    fn read(field: &str, value: Option<&Value>) -> Result<Direction, ConfigError> {
        let Some(value) = value else {
            return Ok(Direction::Both);
        };
        let (name, inner) = fields::variant(field, value, &["both", "client", "upstream"])?;
        unit_variant(field, inner)?;
        Ok(match name {
            "client" => Direction::Client,
            "upstream" => Direction::Upstream,
            _ => Direction::Both,
        })
    }

    pub fn counts_client(self) -> bool {
        matches!(self, Direction::Both | Direction::Client)
    }

    pub fn counts_upstream(self) -> bool {
        matches!(self, Direction::Both | Direction::Upstream)
    }
}

#[derive(Debug, Clone)]
pub struct RawExpression {
    /// See [`crate::expr`]; the result is the price in asset units.
    pub expr: String,
}

#[derive(Debug, Clone)]
pub struct RawGraphQl {
    /// Price per root field, keyed `Type.field` (`Query.user`, `Mutation.createPost`).
    pub fields: BTreeMap<String, String>,
    /// Price of a root field not in `fields`; without it such a request is refused (400).
    pub default_price: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RawTimeOfDay {
    /// UTC hour ranges `[from_hour, to_hour)` with their own price; outside every
    /// window the route's `price` applies.
    pub windows: Vec<RawWindow>,
}

#[derive(Debug, Clone)]
pub struct RawWindow {
    pub from_hour: u8,
    pub to_hour: u8,
    pub price: String,
}

/// One request-validation rule over a JSON body field.
#[derive(Debug, Clone)]
pub struct RawFieldRule {
    /// Dotted path into the JSON body (`prompt`, `options.size`).
    pub field: String,
    pub required: bool,
    /// Longest string (in characters) or array accepted.
    pub max_length: Option<usize>,
    /// The only values accepted.
    pub allowed: Option<Vec<Value>>,
}

/// A variant without a value, written `"name"` (or `{"name": null}`).
fn unit_variant(field: &str, inner: Option<&Value>) -> Result<(), ConfigError> {
    match inner {
        None | Some(Value::Null) => Ok(()),
        Some(_) => Err(fields::invalid(field.to_owned(), "takes no value")),
    }
}

impl RawPricing {
    /// Reads `routes[i].pricing` (at `path`): an object with exactly one model.
    pub fn read(path: &str, value: &Value) -> Result<RawPricing, ConfigError> {
        const MODELS: &[&str] = &[
            "per_token",
            "per_second",
            "per_kb",
            "per_item",
            "per_message",
            "expression",
            "graphql",
            "time_of_day",
            "volume",
        ];
        let (name, inner) = fields::variant(path, value, MODELS)?;
        let field = fields::join(path, name);
        let Some(inner) = inner else {
            return Err(fields::invalid(field, "must be a JSON object"));
        };
        let meter = |extra: &[&str]| {
            let mut known = vec!["unit_price", "max_units"];
            known.extend_from_slice(extra);
            Obj::new(field.clone(), inner, &known)
        };
        let plain = |o: &Obj<'_>| -> Result<RawMeter, ConfigError> {
            Ok(RawMeter {
                unit_price: o.string("unit_price")?,
                max_units: o.uint("max_units")?,
            })
        };
        Ok(match name {
            "per_token" => {
                let o = meter(&["tokens_from"])?;
                let source = o.req("tokens_from")?;
                let source_field = o.field("tokens_from");
                let (kind, arg) = fields::variant(
                    &source_field,
                    source,
                    &[
                        "header",
                        "json_pointer",
                        "openai_usage",
                        "sse_usage",
                        "sse_events",
                    ],
                )?;
                let text = |arg: Option<&Value>| {
                    let f = fields::join(&source_field, kind);
                    match arg {
                        Some(v) => fields::string(f, v),
                        None => Err(fields::invalid(f, "must be a string")),
                    }
                };
                let tokens_from = match kind {
                    "header" => RawTokenSource::Header(text(arg)?),
                    "json_pointer" => RawTokenSource::JsonPointer(text(arg)?),
                    other => {
                        unit_variant(&source_field, arg)?;
                        match other {
                            "openai_usage" => RawTokenSource::OpenaiUsage,
                            "sse_usage" => RawTokenSource::SseUsage,
                            _ => RawTokenSource::SseEvents,
                        }
                    }
                };
                RawPricing::PerToken(RawTokenMeter {
                    unit_price: o.string("unit_price")?,
                    max_units: o.uint("max_units")?,
                    tokens_from,
                })
            }
            "per_second" => RawPricing::PerSecond(plain(&meter(&[])?)?),
            "per_kb" => RawPricing::PerKb(plain(&meter(&[])?)?),
            "per_item" => {
                let o = meter(&["items_pointer"])?;
                RawPricing::PerItem(RawItemMeter {
                    unit_price: o.string("unit_price")?,
                    max_units: o.uint("max_units")?,
                    items_pointer: o.string("items_pointer")?,
                })
            }
            "per_message" => {
                let o = meter(&["count"])?;
                RawPricing::PerMessage(RawMessageMeter {
                    unit_price: o.string("unit_price")?,
                    max_units: o.uint("max_units")?,
                    count: Direction::read(&o.field("count"), o.get("count"))?,
                })
            }
            "expression" => {
                let o = Obj::new(field, inner, &["expr"])?;
                RawPricing::Expression(RawExpression {
                    expr: o.string("expr")?,
                })
            }
            "graphql" => {
                let o = Obj::new(field, inner, &["fields", "default_price"])?;
                let prices_field = o.field("fields");
                let Some(prices) = o.req("fields")?.as_object() else {
                    return Err(fields::invalid(prices_field, "must be a JSON object"));
                };
                let priced = prices
                    .iter()
                    .map(|(k, v)| {
                        let price = fields::string(format!("{prices_field}[{k:?}]"), v)?;
                        Ok((k.clone(), price))
                    })
                    .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
                RawPricing::Graphql(RawGraphQl {
                    fields: priced,
                    default_price: o.opt_string("default_price")?,
                })
            }
            "time_of_day" => {
                let o = Obj::new(field, inner, &["windows"])?;
                let windows = o
                    .list("windows", true)?
                    .into_iter()
                    .map(|(f, v)| {
                        let w = Obj::new(f, v, &["from_hour", "to_hour", "price"])?;
                        Ok(RawWindow {
                            from_hour: w.uint("from_hour")?,
                            to_hour: w.uint("to_hour")?,
                            price: w.string("price")?,
                        })
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()?;
                RawPricing::TimeOfDay(RawTimeOfDay { windows })
            }
            _ => {
                let o = Obj::new(field, inner, &["tiers"])?;
                let tiers = o
                    .list("tiers", true)?
                    .into_iter()
                    .map(|(f, v)| {
                        let t = Obj::new(f, v, &["from_requests", "price"])?;
                        Ok(RawTier {
                            from_requests: t.uint("from_requests")?,
                            price: t.string("price")?,
                        })
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()?;
                RawPricing::Volume(RawVolume { tiers })
            }
        })
    }
}

impl RawFieldRule {
    /// Reads one `routes[i].validate[j]` rule (at `path`).
    pub fn read(path: String, value: &Value) -> Result<RawFieldRule, ConfigError> {
        let o = Obj::new(path, value, &["field", "required", "max_length", "allowed"])?;
        let allowed = match o.opt("allowed") {
            None => None,
            Some(v) => match v.as_array() {
                Some(items) => Some(items.clone()),
                None => return Err(fields::invalid(o.field("allowed"), "must be a JSON array")),
            },
        };
        Ok(RawFieldRule {
            field: o.string("field")?,
            required: o.flag("required")?,
            max_length: o.opt_uint("max_length")?,
            allowed,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Header(String),
    JsonPointer(String),
    OpenAiUsage,
    SseUsage,
    SseEvents,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    Tokens(TokenSource),
    Seconds,
    Kilobytes,
    Items(String),
    /// WebSocket messages, counted in the given direction(s).
    Messages(Direction),
}

impl Unit {
    /// Whether the meter parses the response body: reads it ([`Unit::reads_body`]) or
    /// counts its server-sent events. A body the upstream compressed would read as no
    /// usage at all.
    pub fn parses_response_body(&self) -> bool {
        self.reads_body() || matches!(self, Unit::Tokens(TokenSource::SseEvents))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Unit::Tokens(_) => "token",
            Unit::Seconds => "second",
            Unit::Kilobytes => "kilobyte",
            Unit::Items(_) => "item",
            Unit::Messages(_) => "message",
        }
    }

    /// How many of the meter's counting units make one priced unit: microseconds per
    /// second, bytes per kilobyte, otherwise one.
    pub fn per(&self) -> u64 {
        match self {
            Unit::Seconds => MICROS_PER_SECOND,
            Unit::Kilobytes => BYTES_PER_KB,
            _ => 1,
        }
    }

    /// Whether the meter reads the response body (per-KB only counts its bytes).
    pub fn reads_body(&self) -> bool {
        matches!(
            self,
            Unit::Items(_)
                | Unit::Tokens(
                    TokenSource::JsonPointer(_) | TokenSource::OpenAiUsage | TokenSource::SseUsage
                )
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub unit: Unit,
    pub unit_price: UnitPrice,
    pub max_units: u64,
    /// The hold: `max_units × unit_price` in atomic units.
    pub max_amount: u64,
    pub max_response_body_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub from_hour: u8,
    pub to_hour: u8,
    pub price: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Model {
    /// The route's flat `price`.
    Flat,
    TimeOfDay(Vec<Window>),
    Expression(Expr),
    GraphQl {
        fields: BTreeMap<String, u64>,
        default_price: Option<u64>,
    },
    Metered(Meter),
    /// `(from_requests, price)` ascending; quoted by settlement at authorize time.
    Volume(Vec<(u64, u64)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRule {
    pub field: String,
    pub path: Vec<String>,
    pub required: bool,
    pub max_length: Option<usize>,
    pub allowed: Option<Vec<Value>>,
}

/// The compiled pricing of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePricing {
    pub model: Model,
    pub validate: Vec<FieldRule>,
    pub max_request_body_bytes: u64,
    /// Request headers the price expression reads (lower-case).
    pub headers: Vec<String>,
}

impl Default for RoutePricing {
    fn default() -> Self {
        RoutePricing {
            model: Model::Flat,
            validate: Vec::new(),
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            headers: Vec::new(),
        }
    }
}

impl RoutePricing {
    /// Whether the price or the validation needs the request body before deciding.
    pub fn needs_request_body(&self) -> bool {
        !self.validate.is_empty()
            || matches!(self.model, Model::GraphQl { .. })
            || matches!(&self.model, Model::Expression(e) if expr::uses_body(e))
    }

    pub fn meter(&self) -> Option<&Meter> {
        match &self.model {
            Model::Metered(m) => Some(m),
            _ => None,
        }
    }
}

/// A load-time problem: the field (relative to the route) and why.
pub type CompileError = (String, String);

fn unit_price(field: &str, text: &str, decimals: u8) -> Result<UnitPrice, CompileError> {
    UnitPrice::parse(text, decimals).map_err(|e| (field.to_owned(), format!("{text:?} {e}")))
}

fn atomic_price(field: &str, text: &str, decimals: u8) -> Result<u64, CompileError> {
    x402_proto::amount::parse_decimal(text, decimals).map_err(|e| {
        (
            field.to_owned(),
            format!("{text:?} is not a valid price: {e}"),
        )
    })
}

fn meter(
    field: &str,
    unit: Unit,
    price: &str,
    max_units: u64,
    decimals: u8,
    max_response_body_bytes: u64,
) -> Result<Meter, CompileError> {
    let unit_price = unit_price(&format!("{field}.unit_price"), price, decimals)?;
    if max_units == 0 {
        return Err((format!("{field}.max_units"), "must be positive".into()));
    }
    let per = unit.per();
    let max_count = max_units
        .checked_mul(per)
        .ok_or_else(|| (format!("{field}.max_units"), "is too large".to_owned()))?;
    let max_amount = unit_price
        .amount_for(max_count, per)
        .filter(|a| i64::try_from(*a).is_ok())
        .ok_or_else(|| {
            (
                format!("{field}.max_units"),
                "max_units × unit_price exceeds the largest amount".to_owned(),
            )
        })?;
    if max_amount == 0 {
        return Err((
            format!("{field}.unit_price"),
            "max_units × unit_price rounds to zero atomic units".into(),
        ));
    }
    Ok(Meter {
        unit,
        unit_price,
        max_units,
        max_amount,
        max_response_body_bytes,
    })
}

fn json_pointer(field: &str, pointer: &str) -> Result<String, CompileError> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err((field.to_owned(), "a JSON pointer starts with '/'".into()));
    }
    Ok(pointer.to_owned())
}

/// Compiles a route's `pricing`, `validate` and body limits. `flat_price` is the
/// route's `price` in atomic units, when it has one.
pub fn compile(
    raw: Option<RawPricing>,
    validate: Vec<RawFieldRule>,
    max_request_body_bytes: Option<u64>,
    max_response_body_bytes: Option<u64>,
    flat_price: Option<u64>,
    decimals: u8,
) -> Result<RoutePricing, CompileError> {
    let max_request_body_bytes = max_request_body_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES);
    if max_request_body_bytes == 0 || max_request_body_bytes > 16 * 1024 * 1024 {
        return Err((
            "max_request_body_bytes".into(),
            "must be between 1 and 16777216".into(),
        ));
    }
    let max_response = max_response_body_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BODY_BYTES);
    if max_response == 0 || max_response > 16 * 1024 * 1024 {
        return Err((
            "max_response_body_bytes".into(),
            "must be between 1 and 16777216".into(),
        ));
    }
    let needs_flat = matches!(raw, None | Some(RawPricing::TimeOfDay(_)));
    match (needs_flat, flat_price) {
        (true, None) => return Err(("price".into(), "is required for this pricing".into())),
        (false, Some(_)) => {
            return Err((
                "price".into(),
                "must not be set: the pricing model computes the price".into(),
            ))
        }
        _ => {}
    }
    let model = match raw {
        None => Model::Flat,
        Some(RawPricing::PerToken(m)) => {
            let source = match m.tokens_from {
                RawTokenSource::Header(name) => {
                    let ok = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err((
                            "pricing.per_token.tokens_from.header".into(),
                            "must be a header name".into(),
                        ));
                    }
                    TokenSource::Header(name.to_ascii_lowercase())
                }
                RawTokenSource::JsonPointer(p) => TokenSource::JsonPointer(json_pointer(
                    "pricing.per_token.tokens_from.json_pointer",
                    &p,
                )?),
                RawTokenSource::OpenaiUsage => TokenSource::OpenAiUsage,
                RawTokenSource::SseUsage => TokenSource::SseUsage,
                RawTokenSource::SseEvents => TokenSource::SseEvents,
            };
            Model::Metered(meter(
                "pricing.per_token",
                Unit::Tokens(source),
                &m.unit_price,
                m.max_units,
                decimals,
                max_response,
            )?)
        }
        Some(RawPricing::PerSecond(m)) => Model::Metered(meter(
            "pricing.per_second",
            Unit::Seconds,
            &m.unit_price,
            m.max_units,
            decimals,
            max_response,
        )?),
        Some(RawPricing::PerKb(m)) => Model::Metered(meter(
            "pricing.per_kb",
            Unit::Kilobytes,
            &m.unit_price,
            m.max_units,
            decimals,
            max_response,
        )?),
        Some(RawPricing::PerItem(m)) => {
            let pointer = json_pointer("pricing.per_item.items_pointer", &m.items_pointer)?;
            Model::Metered(meter(
                "pricing.per_item",
                Unit::Items(pointer),
                &m.unit_price,
                m.max_units,
                decimals,
                max_response,
            )?)
        }
        Some(RawPricing::PerMessage(m)) => Model::Metered(meter(
            "pricing.per_message",
            Unit::Messages(m.count),
            &m.unit_price,
            m.max_units,
            decimals,
            max_response,
        )?),
        Some(RawPricing::Expression(e)) => Model::Expression(
            expr::parse(&e.expr)
                .map_err(|err| ("pricing.expression.expr".to_owned(), err.to_string()))?,
        ),
        Some(RawPricing::Graphql(g)) => {
            if g.fields.is_empty() && g.default_price.is_none() {
                return Err((
                    "pricing.graphql.fields".into(),
                    "must price at least one field or set default_price".into(),
                ));
            }
            let mut fields = BTreeMap::new();
            for (name, price) in g.fields {
                let field = format!("pricing.graphql.fields[{name:?}]");
                let valid = name.split_once('.').is_some_and(|(t, f)| {
                    ["Query", "Mutation", "Subscription"].contains(&t)
                        && !f.is_empty()
                        && f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                });
                if !valid {
                    return Err((
                        field,
                        "must be Query.<field>, Mutation.<field> or Subscription.<field>".into(),
                    ));
                }
                let atomic = atomic_price(&field, &price, decimals)?;
                fields.insert(name, atomic);
            }
            let default_price = g
                .default_price
                .map(|p| atomic_price("pricing.graphql.default_price", &p, decimals))
                .transpose()?;
            Model::GraphQl {
                fields,
                default_price,
            }
        }
        Some(RawPricing::TimeOfDay(t)) => {
            if t.windows.is_empty() {
                return Err((
                    "pricing.time_of_day.windows".into(),
                    "must not be empty".into(),
                ));
            }
            let mut windows: Vec<Window> = Vec::new();
            for (i, w) in t.windows.into_iter().enumerate() {
                let field = format!("pricing.time_of_day.windows[{i}]");
                if w.from_hour >= w.to_hour || w.to_hour > 24 {
                    return Err((
                        field,
                        "needs 0 <= from_hour < to_hour <= 24 (UTC hours)".into(),
                    ));
                }
                if windows
                    .iter()
                    .any(|o| w.from_hour < o.to_hour && o.from_hour < w.to_hour)
                {
                    return Err((field, "overlaps an earlier window".into()));
                }
                let price = atomic_price(&format!("{field}.price"), &w.price, decimals)?;
                windows.push(Window {
                    from_hour: w.from_hour,
                    to_hour: w.to_hour,
                    price,
                });
            }
            Model::TimeOfDay(windows)
        }
        Some(RawPricing::Volume(v)) => {
            let mut tiers: Vec<(u64, u64)> = Vec::with_capacity(v.tiers.len());
            for (i, t) in v.tiers.into_iter().enumerate() {
                let field = format!("pricing.volume.tiers[{i}]");
                let first_ok = i > 0 || t.from_requests == 0;
                let ascending = tiers.last().is_none_or(|(from, _)| t.from_requests > *from);
                if !first_ok || !ascending {
                    return Err((
                        format!("{field}.from_requests"),
                        "tiers start at 0 and ascend strictly".into(),
                    ));
                }
                let price = atomic_price(&format!("{field}.price"), &t.price, decimals)?;
                tiers.push((t.from_requests, price));
            }
            if tiers.iter().all(|(_, p)| *p == 0) {
                return Err((
                    "pricing.volume.tiers".into(),
                    "needs at least one tier with a positive price".into(),
                ));
            }
            Model::Volume(tiers)
        }
    };
    let mut rules = Vec::with_capacity(validate.len());
    for (i, r) in validate.into_iter().enumerate() {
        let path: Vec<String> = r.field.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err((
                format!("validate[{i}].field"),
                "must be a dotted field path".into(),
            ));
        }
        if !r.required && r.max_length.is_none() && r.allowed.is_none() {
            return Err((
                format!("validate[{i}]"),
                "sets no check: use required, max_length or allowed".into(),
            ));
        }
        if r.allowed.as_ref().is_some_and(Vec::is_empty) {
            return Err((format!("validate[{i}].allowed"), "must not be empty".into()));
        }
        rules.push(FieldRule {
            field: r.field,
            path,
            required: r.required,
            max_length: r.max_length,
            allowed: r.allowed,
        });
    }
    let mut headers = Vec::new();
    if let Model::Expression(e) = &model {
        expr::headers_used(e, &mut headers);
    }
    Ok(RoutePricing {
        model,
        validate: rules,
        max_request_body_bytes,
        headers,
    })
}

/// What a request is asked to pay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// `exact` or `upto`.
    pub scheme: &'static str,
    /// The price, or for `upto` the most the request may cost: also the hold.
    pub amount: u64,
}

/// Why a request is refused before anything is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: &'static str,
    pub message: String,
}

fn bad_request(message: String) -> Refusal {
    Refusal {
        status: 400,
        error: "invalid_request",
        message,
    }
}

/// The request as pricing sees it.
pub struct PricedRequest<'a> {
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    /// The complete request body, for routes that buffer it.
    pub body: Option<&'a [u8]>,
    pub now_secs: u64,
}

/// Checks the request and computes its price; nothing is held before this passes.
pub fn quote(
    pricing: &RoutePricing,
    flat_price: u64,
    decimals: u8,
    request: &PricedRequest<'_>,
) -> Result<Quote, Refusal> {
    let json = match request.body {
        Some(bytes) if pricing.needs_request_body() => Some(parse_body(bytes)?),
        _ => None,
    };
    if !pricing.validate.is_empty() {
        validate(&pricing.validate, json.as_ref())?;
    }
    let exact = |amount| Quote {
        scheme: "exact",
        amount,
    };
    match &pricing.model {
        Model::Flat => Ok(exact(flat_price)),
        Model::TimeOfDay(windows) => {
            let hour = u8::try_from((request.now_secs % 86_400) / 3_600).unwrap_or(0);
            let price = windows
                .iter()
                .find(|w| w.from_hour <= hour && hour < w.to_hour)
                .map_or(flat_price, |w| w.price);
            Ok(exact(price))
        }
        Model::Expression(e) => {
            let inputs = expr::Inputs {
                body: json.as_ref(),
                path: request.path,
                headers: request.headers,
            };
            let price = expr::eval(e, &inputs).map_err(|err| bad_request(err.to_string()))?;
            let atomic = price
                .to_atomic(decimals)
                .map_err(|err| bad_request(format!("the computed price {err}")))?;
            Ok(exact(atomic))
        }
        Model::GraphQl {
            fields,
            default_price,
        } => {
            let body = json.unwrap_or(serde_json::Value::Null);
            let roots = graphql::root_fields(&body).map_err(|e| bad_request(e.to_string()))?;
            let mut total: u64 = 0;
            for root in roots {
                let price = match (fields.get(&root), default_price) {
                    (Some(p), _) => *p,
                    (None, _) if root.ends_with(".__typename") => 0,
                    (None, Some(d)) => *d,
                    (None, None) => {
                        return Err(bad_request(format!("field `{root}` is not offered")))
                    }
                };
                total = total
                    .checked_add(price)
                    .filter(|t| i64::try_from(*t).is_ok())
                    .ok_or_else(|| bad_request("the computed price is too large".into()))?;
            }
            Ok(exact(total))
        }
        Model::Metered(m) => Ok(Quote {
            scheme: "upto",
            amount: m.max_amount,
        }),
        // The most any tier costs; settlement holds the payer's tier price.
        Model::Volume(tiers) => Ok(exact(tiers.iter().map(|(_, p)| *p).max().unwrap_or(0))),
    }
}

/// Parses a request body that prices or validates a request. An object that repeats a
/// key is refused, naming it: JSON parsers disagree on which value counts (serde_json
/// keeps the last, some keep the first), so the price could be read from one value and
/// the upstream serve the other.
fn parse_body(bytes: &[u8]) -> Result<Value, Refusal> {
    x402_proto::json::parse_strict(bytes).map_err(|e| {
        if e.is_data() {
            // The only data error a strict parse makes: "duplicate field `key`".
            bad_request(format!("the request body repeats a key: {e}"))
        } else {
            bad_request("the request body is not valid JSON".into())
        }
    })
}

fn validate(rules: &[FieldRule], body: Option<&serde_json::Value>) -> Result<(), Refusal> {
    let Some(body) = body else {
        return Err(bad_request("the request body must be a JSON object".into()));
    };
    for rule in rules {
        let value = expr::json_path(body, &rule.path).filter(|v| !v.is_null());
        let Some(value) = value else {
            if rule.required {
                return Err(bad_request(format!("field `{}` is required", rule.field)));
            }
            continue;
        };
        if let Some(max) = rule.max_length {
            let len = match value {
                serde_json::Value::String(s) => Some(s.chars().count()),
                serde_json::Value::Array(a) => Some(a.len()),
                _ => None,
            };
            if len.is_some_and(|l| l > max) {
                return Err(bad_request(format!(
                    "field `{}` is longer than {max}",
                    rule.field
                )));
            }
        }
        if let Some(allowed) = &rule.allowed {
            if !allowed.contains(value) {
                return Err(bad_request(format!(
                    "field `{}` must be one of {}",
                    rule.field,
                    serde_json::Value::from(allowed.clone())
                )));
            }
        }
    }
    Ok(())
}

/// `extra` entries of an `upto` challenge, so a client can judge the price.
pub fn challenge_extra(meter: &Meter) -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("unit", meter.unit.name().into()),
        ("unitPrice", meter.unit_price.text.clone().into()),
        ("maxUnits", meter.max_units.into()),
    ]
}

/// What a metered response has shown so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Response body bytes that passed the filter.
    pub bytes: u64,
    /// The response body kept for reading usage (up to the route's limit).
    pub body: Vec<u8>,
    pub body_truncated: bool,
    /// Tokens from a response header.
    pub header_units: Option<u64>,
    /// Unfinished line of an SSE stream.
    pub sse_partial: Vec<u8>,
    /// Tokens from the latest SSE `usage` event.
    pub sse_units: Option<u64>,
    /// An `openai_usage` response turned out to be a server-sent-events stream (a request
    /// with `"stream": true`): its usage is read from the events, as `sse_usage` does.
    /// `None` until the body's first byte that is not white space.
    pub openai_stream: Option<bool>,
    /// Upstream time in microseconds, from resume to the last response byte.
    pub upstream_micros: u64,
    /// Server-sent events with data that were forwarded (`sse_events` meters).
    pub events: u64,
    /// WebSocket messages forwarded in the counted direction(s).
    pub messages: u64,
}

fn usage_tokens(value: &serde_json::Value) -> Option<u64> {
    let usage = value.get("usage")?;
    usage
        .get("completion_tokens")
        .or_else(|| usage.get("output_tokens"))
        .and_then(serde_json::Value::as_u64)
}

impl Usage {
    /// Records a response body chunk.
    pub fn add_chunk(&mut self, meter: &Meter, chunk: &[u8]) {
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
        match &meter.unit {
            Unit::Tokens(TokenSource::SseUsage) => self.scan_sse(chunk, meter),
            Unit::Tokens(TokenSource::OpenAiUsage) if self.openai_stream_after(chunk) => {
                self.scan_sse(chunk, meter);
            }
            unit if unit.reads_body() => {
                let room = usize::try_from(meter.max_response_body_bytes)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(self.body.len());
                if chunk.len() > room {
                    self.body_truncated = true;
                }
                self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => {}
        }
    }

    /// Whether an `openai_usage` body is a stream, decided by its first byte that is not
    /// white space (a JSON answer starts with `{`), `chunk` included.
    fn openai_stream_after(&mut self, chunk: &[u8]) -> bool {
        if self.openai_stream.is_none() {
            let first = chunk.iter().find(|b| !b.is_ascii_whitespace());
            self.openai_stream = first.map(|b| *b != b'{');
        }
        self.openai_stream == Some(true)
    }

    fn scan_sse(&mut self, chunk: &[u8], meter: &Meter) {
        self.sse_partial.extend_from_slice(chunk);
        while let Some(end) = self.sse_partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.sse_partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                if let Ok(value) =
                    serde_json::from_slice::<serde_json::Value>(data.trim().as_bytes())
                {
                    if let Some(tokens) = usage_tokens(&value) {
                        self.sse_units = Some(tokens);
                    }
                }
            }
        }
        if u64::try_from(self.sse_partial.len()).unwrap_or(u64::MAX) > meter.max_response_body_bytes
        {
            // One line longer than the limit cannot be an event we read.
            self.sse_partial.clear();
            self.body_truncated = true;
        }
    }

    /// Records the metering header's value.
    pub fn set_header(&mut self, value: Option<&str>) {
        self.header_units = value.and_then(|v| v.trim().parse::<u64>().ok());
    }

    /// Units consumed, or `None` when the response did not say (the meter's source is
    /// missing, malformed, or past the body limit).
    pub fn units(&self, meter: &Meter) -> Option<u64> {
        let body_json = || -> Option<serde_json::Value> {
            if self.body_truncated {
                return None;
            }
            serde_json::from_slice(&self.body).ok()
        };
        match &meter.unit {
            Unit::Tokens(TokenSource::Header(_)) => self.header_units,
            Unit::Tokens(TokenSource::JsonPointer(p)) => {
                body_json()?.pointer(p).and_then(serde_json::Value::as_u64)
            }
            Unit::Tokens(TokenSource::OpenAiUsage) if self.openai_stream == Some(true) => {
                self.sse_units
            }
            Unit::Tokens(TokenSource::OpenAiUsage) => usage_tokens(&body_json()?),
            Unit::Tokens(TokenSource::SseUsage) => self.sse_units,
            Unit::Tokens(TokenSource::SseEvents) => Some(self.events),
            Unit::Messages(_) => Some(self.messages),
            Unit::Items(p) => body_json()?
                .pointer(p)
                .and_then(serde_json::Value::as_array)
                .map(|a| u64::try_from(a.len()).unwrap_or(u64::MAX)),
            Unit::Seconds => Some(self.upstream_micros),
            Unit::Kilobytes => Some(self.bytes),
        }
    }
}

/// The amount to capture for a metered response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// Capture `capture` (≤ hold); `overage` atomic units were used beyond the hold
    /// and are not charged.
    Charge { capture: u64, overage: u64 },
    /// The response did not report its usage: nothing is charged.
    Unmetered,
}

/// `units × unit_price`, rounded half up, capped at the hold.
pub fn metered_amount(meter: &Meter, usage: &Usage, held: u64) -> Metered {
    let Some(units) = usage.units(meter) else {
        return Metered::Unmetered;
    };
    let per = meter.unit.per();
    match meter.unit_price.amount_for(units, per) {
        Some(amount) if amount <= held => Metered::Charge {
            capture: amount,
            overage: 0,
        },
        Some(amount) => Metered::Charge {
            capture: held,
            overage: amount - held,
        },
        None => Metered::Charge {
            capture: held,
            overage: u64::MAX - held,
        },
    }
}

/// Parses a decimal price for display (`"0.015"`), for challenges of computed prices.
pub fn format_atomic(amount: u64, decimals: u8) -> String {
    x402_proto::amount::format_decimal(amount, decimals)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn compile_json(
        pricing: serde_json::Value,
        flat: Option<u64>,
    ) -> Result<RoutePricing, CompileError> {
        let raw = RawPricing::read("pricing", &pricing).unwrap();
        compile(Some(raw), vec![], None, None, flat, 6)
    }

    fn request(body: &str) -> PricedRequest<'_> {
        PricedRequest {
            path: "/",
            headers: &[],
            body: Some(body.as_bytes()),
            now_secs: 0,
        }
    }

    #[test]
    fn token_meter_holds_the_maximum_and_captures_usage() {
        let p = compile_json(
            serde_json::json!({"per_token": {"unit_price": "0.00002", "max_units": 1000, "tokens_from": {"header": "X-Usage-Tokens"}}}),
            None,
        )
        .unwrap();
        let m = p.meter().unwrap().clone();
        assert_eq!(m.max_amount, 20_000);
        assert_eq!(
            quote(&p, 0, 6, &request("")).unwrap(),
            Quote {
                scheme: "upto",
                amount: 20_000
            }
        );
        let mut usage = Usage::default();
        usage.set_header(Some("250"));
        assert_eq!(
            metered_amount(&m, &usage, 20_000),
            Metered::Charge {
                capture: 5_000,
                overage: 0
            }
        );
        usage.set_header(Some("0"));
        assert_eq!(
            metered_amount(&m, &usage, 20_000),
            Metered::Charge {
                capture: 0,
                overage: 0
            }
        );
        usage.set_header(Some("1500"));
        assert_eq!(
            metered_amount(&m, &usage, 20_000),
            Metered::Charge {
                capture: 20_000,
                overage: 10_000
            }
        );
        usage.set_header(Some(&u64::MAX.to_string()));
        assert!(matches!(
            metered_amount(&m, &usage, 20_000),
            Metered::Charge {
                capture: 20_000,
                ..
            }
        ));
        usage.set_header(Some("-1"));
        assert_eq!(metered_amount(&m, &usage, 20_000), Metered::Unmetered);
        usage.set_header(None);
        assert_eq!(metered_amount(&m, &usage, 20_000), Metered::Unmetered);
    }

    #[test]
    fn sse_usage_is_read_across_chunks() {
        let p = compile_json(
            serde_json::json!({"per_token": {"unit_price": "0.000001", "max_units": 100, "tokens_from": "sse_usage"}}),
            None,
        )
        .unwrap();
        let m = p.meter().unwrap();
        let mut usage = Usage::default();
        let stream = "data: {\"choices\":[]}\n\ndata: {\"usage\":{\"completion_tokens\":4\r\n\ndata: {\"usage\":{\"completion_tokens\":42}}\n\ndata: [DONE]\n\n";
        for chunk in stream.as_bytes().chunks(7) {
            usage.add_chunk(m, chunk);
        }
        assert_eq!(usage.units(m), Some(42));
        assert_eq!(
            metered_amount(m, &usage, 100),
            Metered::Charge {
                capture: 42,
                overage: 0
            }
        );
    }

    /// `"stream": true` makes an OpenAI-style API answer with server-sent events; the
    /// usage in them is charged, as `sse_usage` would (OpenAI sends it with
    /// `stream_options.include_usage`, Anthropic-style APIs in `message_delta`).
    #[test]
    fn openai_usage_reads_a_streamed_answer_too() {
        let p = compile_json(
            serde_json::json!({"per_token": {"unit_price": "1", "max_units": 100, "tokens_from": "openai_usage"}}),
            None,
        )
        .unwrap();
        let m = p.meter().unwrap();
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":17}}\n\ndata: [DONE]\n\n";
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":23}}\n\n";
        let json = "\n  {\"usage\":{\"completion_tokens\":9}}";
        let unreported = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        for (body, units) in [
            (openai, Some(17)),
            (anthropic, Some(23)),
            (json, Some(9)),
            (unreported, None),
        ] {
            let mut usage = Usage::default();
            // A first chunk of white space decides nothing yet.
            usage.add_chunk(m, b" \n");
            for chunk in body.as_bytes().chunks(5) {
                usage.add_chunk(m, chunk);
            }
            assert_eq!(usage.units(m), units, "{body}");
        }
    }

    #[test]
    fn body_meters_read_pointers_usage_and_items() {
        let body = br#"{"usage":{"completion_tokens":7,"prompt_tokens":3},"objects":[1,2,3]}"#;
        for (pricing, units) in [
            (
                serde_json::json!({"per_token": {"unit_price": "1", "max_units": 10, "tokens_from": {"json_pointer": "/usage/prompt_tokens"}}}),
                3,
            ),
            (
                serde_json::json!({"per_token": {"unit_price": "1", "max_units": 10, "tokens_from": "openai_usage"}}),
                7,
            ),
            (
                serde_json::json!({"per_item": {"unit_price": "1", "max_units": 10, "items_pointer": "/objects"}}),
                3,
            ),
        ] {
            let p = compile_json(pricing, None).unwrap();
            let m = p.meter().unwrap();
            let mut usage = Usage::default();
            usage.add_chunk(m, &body[..10]);
            usage.add_chunk(m, &body[10..]);
            assert_eq!(usage.units(m), Some(units));
        }
        // Past the body limit nothing is charged rather than guessed.
        let raw = RawPricing::read("pricing", &serde_json::json!({"per_item": {"unit_price": "1", "max_units": 10, "items_pointer": "/objects"}})).unwrap();
        let p = compile(Some(raw), vec![], None, Some(16), None, 6).unwrap();
        let m = p.meter().unwrap();
        let mut usage = Usage::default();
        usage.add_chunk(m, body);
        assert_eq!(metered_amount(m, &usage, 10_000_000), Metered::Unmetered);
    }

    #[test]
    fn seconds_and_kilobytes_round_half_up() {
        let p = compile_json(
            serde_json::json!({"per_second": {"unit_price": "0.001", "max_units": 30}}),
            None,
        )
        .unwrap();
        let m = p.meter().unwrap();
        assert_eq!(m.max_amount, 30_000);
        let usage = Usage {
            upstream_micros: 1_500_500,
            ..Usage::default()
        };
        assert_eq!(
            metered_amount(m, &usage, m.max_amount),
            Metered::Charge {
                capture: 1_501,
                overage: 0
            }
        );
        let p = compile_json(
            serde_json::json!({"per_kb": {"unit_price": "0.0001", "max_units": 1000}}),
            None,
        )
        .unwrap();
        let m = p.meter().unwrap();
        assert_eq!(m.max_amount, 100_000);
        // 0.0001 per 1000 bytes = 100 atomic per KB: 2_505 bytes = 250.5 -> 251.
        let usage = Usage {
            bytes: 2_505,
            ..Usage::default()
        };
        assert_eq!(
            metered_amount(m, &usage, m.max_amount),
            Metered::Charge {
                capture: 251,
                overage: 0
            }
        );
    }

    #[test]
    fn computed_prices_round_half_up_to_atomic_units() {
        let p = compile_json(
            serde_json::json!({"expression": {"expr": "audioDuration / 60 * 0.10"}}),
            None,
        )
        .unwrap();
        assert_eq!(
            quote(&p, 0, 6, &request(r#"{"audioDuration": 90}"#))
                .unwrap()
                .amount,
            150_000
        );
        // 1 second: 0.001666.. -> 1667 atomic.
        assert_eq!(
            quote(&p, 0, 6, &request(r#"{"audioDuration": 1}"#))
                .unwrap()
                .amount,
            1_667
        );
        assert_eq!(
            quote(&p, 0, 6, &request(r#"{"audioDuration": 0}"#))
                .unwrap()
                .amount,
            0
        );
        let refused = quote(&p, 0, 6, &request(r#"{"audioDuration": -60}"#)).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(refused.message.contains("negative"), "{}", refused.message);
        let refused = quote(&p, 0, 6, &request(r#"{"audio": 1}"#)).unwrap_err();
        assert!(
            refused.message.contains("audioDuration"),
            "{}",
            refused.message
        );
        assert_eq!(
            quote(&p, 0, 6, &request("not json")).unwrap_err().status,
            400
        );
        let refused = quote(&p, 0, 6, &request(r#"{"audioDuration": 1e30}"#)).unwrap_err();
        assert_eq!(refused.status, 400);
    }

    #[test]
    fn a_body_key_written_twice_is_refused() {
        let p = compile_json(
            serde_json::json!({"expression": {"expr": "input.pages * 0.01"}}),
            None,
        )
        .unwrap();
        let price = |body: &str| quote(&p, 0, 6, &request(body));
        for (body, key) in [
            (r#"{"input": {"pages": 1, "pages": 1000}}"#, "pages"),
            (r#"{"input": {"pages": 1, "pag\u0065s": 1000}}"#, "pages"),
            (
                r#"{"input": {"pages": 1}, "input": {"pages": 1000}}"#,
                "input",
            ),
            (
                r#"{"input": {"pages": 1}, "x": [0, {"a": 1, "a": 2}]}"#,
                "a",
            ),
            (r#"{"input": {"pages": 3, "pages": 3}}"#, "pages"),
        ] {
            let refused = price(body).unwrap_err();
            assert_eq!(refused.status, 400);
            assert_eq!(refused.error, "invalid_request");
            assert!(
                refused.message.starts_with(&format!(
                    "the request body repeats a key: duplicate field `{key}`"
                )),
                "{body}: {}",
                refused.message
            );
        }
        assert_eq!(price(r#"{"input": {"pages": 3}}"#).unwrap().amount, 30_000);
        assert_eq!(
            price(r#"{"input": {"pages": 3}} x"#).unwrap_err().message,
            "the request body is not valid JSON"
        );
    }

    #[test]
    fn graphql_sums_root_fields() {
        let p = compile_json(
            serde_json::json!({"graphql": {"fields": {"Query.user": "0.001", "Query.posts": "0.002", "Mutation.createPost": "0.01"}}}),
            None,
        )
        .unwrap();
        let q = |query: &str| {
            quote(
                &p,
                0,
                6,
                &request(&serde_json::json!({"query": query}).to_string()),
            )
        };
        assert_eq!(
            q("{ user { id } posts { id } __typename }").unwrap().amount,
            3_000
        );
        assert_eq!(q("mutation { createPost { id } }").unwrap().amount, 10_000);
        let refused = q("{ admin }").unwrap_err();
        assert!(
            refused.message.contains("Query.admin"),
            "{}",
            refused.message
        );
        let with_default = compile_json(
            serde_json::json!({"graphql": {"fields": {}, "default_price": "0.005"}}),
            None,
        )
        .unwrap();
        let body = serde_json::json!({"query": "{ a b }"}).to_string();
        assert_eq!(
            quote(&with_default, 0, 6, &request(&body)).unwrap().amount,
            10_000
        );
    }

    #[test]
    fn time_of_day_picks_the_window_of_the_utc_hour() {
        let p = compile_json(
            serde_json::json!({"time_of_day": {"windows": [{"from_hour": 0, "to_hour": 8, "price": "0.005"}, {"from_hour": 18, "to_hour": 24, "price": "0.02"}]}}),
            Some(10_000),
        )
        .unwrap();
        let at = |secs| {
            quote(
                &p,
                10_000,
                6,
                &PricedRequest {
                    path: "/",
                    headers: &[],
                    body: None,
                    now_secs: secs,
                },
            )
            .unwrap()
            .amount
        };
        assert_eq!(at(0), 5_000);
        assert_eq!(at(8 * 3600 - 1), 5_000);
        assert_eq!(at(8 * 3600), 10_000);
        assert_eq!(at(18 * 3600), 20_000);
        assert_eq!(at(86_400 + 23 * 3600 + 3599), 20_000);
    }

    #[test]
    fn volume_tiers_quote_the_highest_price_and_must_ascend() {
        let p = compile_json(
            serde_json::json!({"volume": {"tiers": [{"from_requests": 0, "price": "0.01"}, {"from_requests": 3, "price": "0.006"}]}}),
            None,
        )
        .unwrap();
        assert_eq!(p.model, Model::Volume(vec![(0, 10_000), (3, 6_000)]));
        assert_eq!(quote(&p, 0, 6, &request("")).unwrap().amount, 10_000);
        let err = |v| compile_json(v, None).unwrap_err().0;
        assert_eq!(
            err(serde_json::json!({"volume": {"tiers": [{"from_requests": 1, "price": "0.01"}]}})),
            "pricing.volume.tiers[0].from_requests"
        );
        assert_eq!(
            err(
                serde_json::json!({"volume": {"tiers": [{"from_requests": 0, "price": "0.01"}, {"from_requests": 0, "price": "0.02"}]}})
            ),
            "pricing.volume.tiers[1].from_requests"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let rules: Vec<RawFieldRule> = [
            serde_json::json!({"field": "prompt", "required": true, "max_length": 5}),
            serde_json::json!({"field": "options.size", "allowed": ["small", "large"]}),
        ]
        .iter()
        .map(|v| RawFieldRule::read("validate[0]".into(), v).unwrap())
        .collect();
        let p = compile(None, rules, None, None, Some(1), 6).unwrap();
        assert!(p.needs_request_body());
        let check = |body: &str| quote(&p, 1, 6, &request(body)).map_err(|r| r.message);
        assert!(check(r#"{"prompt": "hi"}"#).is_ok());
        assert!(check(r#"{}"#).unwrap_err().contains("`prompt` is required"));
        assert!(check(r#"{"prompt": "toolong"}"#)
            .unwrap_err()
            .contains("`prompt` is longer than 5"));
        assert!(check(r#"{"prompt": "a", "options": {"size": "huge"}}"#)
            .unwrap_err()
            .contains("`options.size` must be one of"));
    }

    #[test]
    fn load_time_errors_name_the_field() {
        let err = |v: serde_json::Value, flat| compile_json(v, flat).unwrap_err().0;
        assert_eq!(
            err(
                serde_json::json!({"per_second": {"unit_price": "0.001", "max_units": 0}}),
                None
            ),
            "pricing.per_second.max_units"
        );
        assert_eq!(
            err(
                serde_json::json!({"per_kb": {"unit_price": "-1", "max_units": 1}}),
                None
            ),
            "pricing.per_kb.unit_price"
        );
        assert_eq!(
            err(
                serde_json::json!({"per_kb": {"unit_price": "0.0000000001", "max_units": 1}}),
                None
            ),
            "pricing.per_kb.unit_price"
        );
        assert_eq!(
            err(
                serde_json::json!({"per_token": {"unit_price": "1000000", "max_units": 18446744073709551615u64, "tokens_from": "sse_usage"}}),
                None
            ),
            "pricing.per_token.max_units"
        );
        assert_eq!(
            err(
                serde_json::json!({"per_item": {"unit_price": "1", "max_units": 1, "items_pointer": "objects"}}),
                None
            ),
            "pricing.per_item.items_pointer"
        );
        assert_eq!(
            err(serde_json::json!({"expression": {"expr": "nope(1)"}}), None),
            "pricing.expression.expr"
        );
        assert_eq!(
            err(
                serde_json::json!({"graphql": {"fields": {"user": "1"}}}),
                None
            ),
            "pricing.graphql.fields[\"user\"]"
        );
        assert_eq!(
            err(
                serde_json::json!({"time_of_day": {"windows": [{"from_hour": 8, "to_hour": 8, "price": "1"}]}}),
                Some(1)
            ),
            "pricing.time_of_day.windows[0]"
        );
        assert_eq!(
            err(
                serde_json::json!({"time_of_day": {"windows": [{"from_hour": 0, "to_hour": 9, "price": "1"}, {"from_hour": 8, "to_hour": 10, "price": "1"}]}}),
                Some(1)
            ),
            "pricing.time_of_day.windows[1]"
        );
        assert_eq!(
            err(serde_json::json!({"time_of_day": {"windows": []}}), None),
            "price"
        );
        assert_eq!(
            err(
                serde_json::json!({"per_kb": {"unit_price": "1", "max_units": 1}}),
                Some(1)
            ),
            "price"
        );
    }
}
