//! The life of one HTTP request as a pure state machine:
//! `step(config, state, event) -> (state, effects)`. No host calls happen here; the
//! glue in [`crate::plugin`] feeds events in and applies the effects.
//!
//! ```text
//! New --headers, unpriced--> Passthrough
//! New --headers, allow-listed--> Passthrough; over the rate limit--> Replied (429)
//! New --headers, within the free tier--> Free (+x-402-free-remaining)
//! New --headers, bad/missing proof--> Replied (400 / 402)
//! New --headers, proof passes the stateless checks--> Authorizing (Pause + Authorize)
//! Authorizing --AUTHORIZED--> Paid (Resume)      --refused/unavailable--> Replied (402 / 503)
//! Authorizing --unavailable, failure_mode open--> Passthrough (Resume, unpaid)
//! Paid --response headers--> Paid (+payment-response) --stream end--> Finished (Capture / Void)
//! Authorizing --stream end--> Abandoned --AUTHORIZED--> Finished (Void)
//! ```

use x402_proto::settlement::v1::{AuthorizeItem, CaptureItem, GlobalLimit, VoidItem, VolumeTier};
use x402_proto::signing::resource_string;
use x402_proto::wire::{
    self, ErrorBody, ErrorCode, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse,
    HEADER_PAYMENT_REQUIRED, HEADER_PAYMENT_RESPONSE, HEADER_PAYMENT_SIGNATURE,
    HEADER_PAYMENT_SIGNATURE_ALIAS,
};

use crate::config::{Config, Route, RouteKey};
use crate::metrics::Metric;
use crate::pricing::{self, Meter, Metered, PricedRequest, Quote, Usage};

/// What the filter knows about a request when its headers arrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `:scheme`, for the challenge's resource URL.
    pub scheme: String,
    pub method: String,
    /// `:authority` exactly as received.
    pub authority: String,
    /// `:path` including the query string.
    pub path: String,
    /// Envoy's `xds.route_name`, when the route has one.
    pub route_name: Option<String>,
    /// The `payment-signature` (or `x-402-payment`) header.
    pub payment: Option<String>,
    /// Idempotency key for settlement, unique to this request; empty when the request
    /// carries no payment header (nothing to authorize).
    pub request_id: String,
    pub now_secs: u64,
    /// A request body follows the headers (they did not end the stream).
    pub body_follows: bool,
    /// A body-priced request may hold its headers until paid: configured, and Envoy has
    /// not shown that it ignores the hold ([`crate::plugin`]).
    pub hold_headers: bool,
    /// Request headers that price expressions read, lower-case names.
    pub headers: Vec<(String, String)>,
    /// What the route's traffic policy decided ([`crate::policy::evaluate`]).
    pub policy: crate::policy::Verdict,
    /// The client address a route's `global_limit` counts by, when it counts by client
    /// ([`crate::policy::global_limit_client`]).
    pub limit_client: Option<String>,
}

/// Settlement's verdict on one authorization, as the filter acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeAnswer {
    Authorized {
        transaction: String,
        held_amount: u64,
        /// Settlement captured the payment as it placed the hold: nothing to capture
        /// later, and a Void refunds it.
        captured: bool,
    },
    /// A payable problem: answer 402 with this code and a fresh challenge.
    Refused(ErrorCode),
    /// Over the route's global limit: 429, nothing was held.
    Limited { retry_after_seconds: u64 },
    /// No usable answer (transport failure, timeout, unexpected outcome): 503.
    Unavailable,
}

// One event is built per callback and moved straight into `step`, which keeps the
// request's info in its state anyway: boxing it would add an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RequestHeaders(RequestInfo),
    AuthorizeAnswer {
        answer: AuthorizeAnswer,
        now_nanos: u64,
    },
    ResponseHeaders {
        status: Option<u16>,
        end_of_stream: bool,
        now_nanos: u64,
    },
    /// The last byte of the response (body or trailers) passed the filter.
    ResponseComplete,
    /// Request body data arrived; `size` is all of it so far, `body` the complete
    /// buffered body once the request ended.
    RequestBody {
        size: u64,
        body: Option<Vec<u8>>,
    },
    /// The value of a metered route's usage header.
    MeterHeader(Option<String>),
    /// What a gRPC response said about its `grpc-status` (headers, then trailers).
    Grpc(crate::grpc::GrpcResponse),
    /// A response body chunk of a paid request (empty for trailers); the chunk is
    /// only read for meters that need the body.
    ResponseBody {
        chunk: Vec<u8>,
        end_of_stream: bool,
        now_nanos: u64,
    },
    /// The stream is over (its context is deleted): resolve whatever is held.
    StreamEnd,
}

// Not `Eq`: prost derives only `PartialEq` for `AuthorizeItem` (it has repeated messages).
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Let the request headers through now.
    Continue,
    /// Hold the request headers until a later `Resume` or `Reply`.
    Pause,
    /// Release a paused request.
    Resume,
    RemoveRequestHeader(&'static str),
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Authorize(Box<AuthorizeItem>),
    SetResponseHeader(&'static str, String),
    Capture(CaptureItem),
    Void(VoidItem),
    Count(Metric, u64),
    /// A warning in Envoy's log, e.g. a request let through for later review.
    Log(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    New,
    /// Unpriced route: nothing to do.
    Passthrough,
    /// A local reply was sent; the response the filter sees next is its own.
    Replied,
    /// Headers held while a body-priced or validated request body is buffered.
    Buffering(Box<RequestInfo>),
    Authorizing(Pending),
    /// The stream ended before settlement answered; an eventual hold is voided.
    Abandoned,
    Paid(Paid),
    /// Passed unpaid within the free tier; the response says how many are left.
    Free {
        remaining: u64,
    },
    Finished,
}

impl State {
    /// A request that may still end in a capture (it is being priced, authorized or
    /// answered by the upstream).
    pub fn may_capture(&self) -> bool {
        matches!(
            self,
            State::New | State::Buffering(_) | State::Authorizing(_) | State::Paid(_)
        )
    }
}

/// A request waiting for settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub route: String,
    pub price: u64,
    pub payer: String,
    /// Kept to answer a refusal with a fresh challenge.
    pub challenge: ChallengeInput,
    /// What this request was asked to pay (scheme and amount).
    pub quote: Quote,
    /// The route's meter, for `upto` routes.
    pub meter: Option<Box<Meter>>,
}

/// A metered request's meter and what the response has shown so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metering {
    pub meter: Meter,
    pub usage: Usage,
    /// Counting and cutting while the response streams ([`crate::stream`]).
    pub stream: crate::stream::StreamState,
    /// Partial captures (`capture_every_seconds`): the period (0: none), when the
    /// next one is due, and the running total the last one named.
    pub partial_every_nanos: u64,
    pub partial_due_nanos: u64,
    pub partial_sent: u64,
}

impl Metering {
    /// The running total to capture now, when a partial capture is due at `now` and
    /// the cost so far grew since the last one; `elapsed_micros` is the time since
    /// the request was let through. Marks it sent.
    pub fn partial_due(&mut self, held: u64, now: u64, elapsed_micros: u64) -> Option<u64> {
        if self.partial_every_nanos == 0 || now < self.partial_due_nanos || self.stream.closed {
            return None;
        }
        self.partial_due_nanos = now.saturating_add(self.partial_every_nanos);
        let mut usage = Usage {
            upstream_micros: self.usage.upstream_micros.max(elapsed_micros),
            ..Usage::default()
        };
        // Never past the time the hold pays for.
        usage.upstream_micros = usage.upstream_micros.min(
            self.meter
                .max_units
                .saturating_mul(pricing::MICROS_PER_SECOND),
        );
        let total = match pricing::metered_amount(&self.meter, &usage, held) {
            Metered::Charge { capture, .. } => capture,
            Metered::Unmetered => return None,
        };
        if total <= self.partial_sent {
            return None;
        }
        self.partial_sent = total;
        Some(total)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeInput {
    pub scheme: String,
    pub authority: String,
    pub path: String,
    /// Free requests the client has left (the route's free tier), stated in the
    /// challenge and in `x-402-free-remaining`.
    pub free_remaining: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paid {
    pub transaction: String,
    pub price: u64,
    pub held_amount: u64,
    /// Captured at authorize ([`AuthorizeAnswer::Authorized`]).
    pub captured: bool,
    pub payer: String,
    pub resumed_at_nanos: u64,
    pub status: Option<u16>,
    pub upstream_micros: u64,
    pub complete: bool,
    /// Set on `upto` routes: the capture is metered, at most the hold.
    pub metering: Option<Box<Metering>>,
    /// The call's `grpc-status`, when the response is gRPC.
    pub grpc: crate::grpc::GrpcResponse,
}

/// Advances one request by one event.
pub fn step(config: &Config, state: State, event: Event) -> (State, Vec<Effect>) {
    match (state, event) {
        (State::New, Event::RequestHeaders(info)) => on_request_headers(config, info),
        (State::Authorizing(p), Event::AuthorizeAnswer { answer, now_nanos }) => {
            on_answer(config, p, answer, now_nanos)
        }
        (State::Abandoned, Event::AuthorizeAnswer { answer, .. }) => match answer {
            AuthorizeAnswer::Authorized { transaction, .. } => {
                (State::Finished, vec![void(transaction, "abandoned")])
            }
            _ => (State::Finished, vec![]),
        },
        (State::Authorizing(_), Event::StreamEnd) => (State::Abandoned, vec![]),
        (State::Buffering(info), Event::RequestBody { size, body }) => {
            on_request_body(config, *info, size, body)
        }
        (State::Buffering(_), Event::StreamEnd) => (State::Finished, vec![]),
        (State::Paid(mut paid), Event::Grpc(seen)) => {
            paid.grpc = paid.grpc.then(seen);
            (State::Paid(paid), vec![])
        }
        (State::Paid(mut paid), Event::MeterHeader(value)) => {
            if let Some(m) = paid.metering.as_mut() {
                m.usage.set_header(value.as_deref());
            }
            (State::Paid(paid), vec![])
        }
        (
            State::Paid(mut paid),
            Event::ResponseBody {
                chunk,
                end_of_stream,
                now_nanos,
            },
        ) => {
            if end_of_stream {
                // Upstream time runs to the last response byte.
                paid.upstream_micros = now_nanos.saturating_sub(paid.resumed_at_nanos) / 1_000;
                paid.complete = paid.status.is_some();
            }
            if let Some(m) = paid.metering.as_mut() {
                let Metering { meter, usage, .. } = &mut **m;
                usage.add_chunk(meter, &chunk);
                usage.upstream_micros = paid.upstream_micros;
            }
            (State::Paid(paid), vec![])
        }
        (
            State::Paid(mut paid),
            Event::ResponseHeaders {
                status,
                end_of_stream,
                now_nanos,
            },
        ) => {
            paid.status = status;
            paid.complete = end_of_stream;
            paid.upstream_micros = now_nanos.saturating_sub(paid.resumed_at_nanos) / 1_000;
            if let Some(m) = paid.metering.as_mut() {
                m.usage.upstream_micros = paid.upstream_micros;
            }
            let receipt = SettleResponse {
                success: true,
                transaction: paid.transaction.clone(),
                network: config.network.clone(),
                payer: paid.payer.clone(),
                amount: paid.held_amount.to_string(),
                error_reason: None,
            };
            let effects = vec![Effect::SetResponseHeader(
                HEADER_PAYMENT_RESPONSE,
                wire::encode_header(&receipt),
            )];
            (State::Paid(paid), effects)
        }
        (State::Free { remaining }, Event::ResponseHeaders { .. }) => (
            State::Free { remaining },
            vec![Effect::SetResponseHeader(
                crate::policy::HEADER_FREE_REMAINING,
                remaining.to_string(),
            )],
        ),
        (State::Paid(mut paid), Event::ResponseComplete) => {
            paid.complete = paid.status.is_some();
            (State::Paid(paid), vec![])
        }
        (State::Paid(paid), Event::StreamEnd) => (State::Finished, resolve(config, &paid)),
        (state, _) => (state, vec![]),
    }
}

fn void(transaction: String, reason: &str) -> Effect {
    Effect::Void(VoidItem {
        transaction_id: transaction,
        reason: reason.to_owned(),
    })
}

/// Capture when the upstream answered completely below `capture_below_status`;
/// otherwise release the hold.
fn resolve(config: &Config, paid: &Paid) -> Vec<Effect> {
    let transaction = paid.transaction.clone();
    // A WebSocket has no complete response: what it used is what it pays.
    let complete = paid.complete
        || paid
            .metering
            .as_ref()
            .is_some_and(|m| m.stream.settles_incomplete());
    if complete {
        // A failed gRPC call answers HTTP 200: its grpc-status decides.
        if let Some(reason) = paid.grpc.void_reason(config.grpc_void_codes) {
            return vec![void(transaction, &reason)];
        }
    }
    match paid.status {
        Some(status) if complete && status < config.capture_below_status => {
            // Already captured at authorize: a success leaves it so.
            if paid.captured {
                return Vec::new();
            }
            let mut effects = Vec::new();
            let amount = match &paid.metering {
                None => paid.price.min(paid.held_amount),
                Some(m) => match pricing::metered_amount(&m.meter, &m.usage, paid.held_amount) {
                    Metered::Charge { capture, overage } => {
                        if overage > 0 {
                            effects.push(Effect::Count(Metric::MeteredOverage, overage));
                        }
                        capture
                    }
                    // Usage the response never reported is never charged.
                    Metered::Unmetered => {
                        return vec![
                            void(transaction, "unmetered"),
                            Effect::Count(Metric::Unmetered, 1),
                        ]
                    }
                },
            };
            effects.insert(
                0,
                Effect::Capture(CaptureItem {
                    transaction_id: transaction,
                    amount,
                    upstream_micros: paid.upstream_micros,
                    http_status: u32::from(status),
                }),
            );
            effects
        }
        Some(status) if status >= config.capture_below_status => {
            let reason = if status >= 500 {
                "upstream_5xx"
            } else {
                "upstream_error_status"
            };
            vec![void(transaction, reason)]
        }
        Some(_) => vec![void(transaction, "incomplete_response")],
        None => vec![void(transaction, "upstream_reset")],
    }
}

fn on_request_headers(config: &Config, info: RequestInfo) -> (State, Vec<Effect>) {
    if let Some(listing) = crate::discovery::reply(config, &info) {
        return (State::Replied, vec![listing]);
    }
    let key = RouteKey {
        route_name: info.route_name.as_deref(),
        method: &info.method,
        path: &info.path,
    };
    if config.path_reads_as_another_route(&key) {
        let message = "the path names another route when escaped slashes, backslashes or ';' parameters are read as some servers read them; send it without them";
        return (
            State::Replied,
            vec![json_reply(400, "invalid_request", message)],
        );
    }
    let Some(route) = config.route_for(&key) else {
        return (
            State::Passthrough,
            vec![Effect::Count(Metric::Unpriced, 1), Effect::Continue],
        );
    };
    if let Some(decided) = crate::policy::before_payment(route, &info.policy) {
        return decided;
    }
    if route.pricing.needs_request_body() && info.body_follows {
        // By default proxy-wasm turns StopIteration on headers into StopAllIteration,
        // which delivers no body to the filter: the headers go on, without any payment
        // header, and the body is held until the price is known and paid (a refused
        // request is reset before the upstream sees its body). With Envoy's
        // `allow_on_headers_stop_iteration` the headers wait with the body.
        let headers = if info.hold_headers {
            Effect::Pause
        } else {
            Effect::Continue
        };
        return (
            State::Buffering(Box::new(info)),
            vec![
                Effect::RemoveRequestHeader(HEADER_PAYMENT_SIGNATURE),
                Effect::RemoveRequestHeader(HEADER_PAYMENT_SIGNATURE_ALIAS),
                headers,
            ],
        );
    }
    price_request(config, route, info, None)
}

/// Buffers the body of a body-priced request up to the route's limit (413 above),
/// then prices it.
fn on_request_body(
    config: &Config,
    info: RequestInfo,
    size: u64,
    body: Option<Vec<u8>>,
) -> (State, Vec<Effect>) {
    let key = RouteKey {
        route_name: info.route_name.as_deref(),
        method: &info.method,
        path: &info.path,
    };
    let Some(route) = config.route_for(&key) else {
        return (State::Passthrough, vec![Effect::Resume]);
    };
    if size > route.pricing.max_request_body_bytes {
        let message = format!(
            "the request body is larger than {} bytes",
            route.pricing.max_request_body_bytes
        );
        return replied(vec![
            json_reply(413, "body_too_large", &message),
            Effect::Count(Metric::Rejected, 1),
        ]);
    }
    let Some(body) = body else {
        return (State::Buffering(Box::new(info)), vec![Effect::Pause]);
    };
    // In a body callback `Continue` lets the buffered body go, `Pause` keeps holding it.
    price_request(config, route, info, Some(&body))
}

/// Validates and prices the request, then challenges it or checks its proof and
/// asks settlement for the hold.
fn price_request(
    config: &Config,
    route: &Route,
    info: RequestInfo,
    body: Option<&[u8]>,
) -> (State, Vec<Effect>) {
    let priced = PricedRequest {
        path: &info.path,
        headers: &info.headers,
        body,
        now_secs: info.now_secs,
    };
    let quote = match pricing::quote(&route.pricing, route.price, config.asset_decimals, &priced) {
        Ok(q) => q,
        Err(refusal) => {
            return replied(vec![
                json_reply(refusal.status, refusal.error, &refusal.message),
                Effect::Count(Metric::Rejected, 1),
            ])
        }
    };
    if quote.amount == 0 {
        // A computed price of zero (e.g. an empty batch) costs nothing to serve.
        return (
            State::Passthrough,
            vec![Effect::Count(Metric::Unpriced, 1), Effect::Continue],
        );
    }
    let challenge = ChallengeInput {
        scheme: info.scheme.clone(),
        authority: info.authority.clone(),
        path: info.path.clone(),
        free_remaining: crate::policy::free_remaining(&info.policy),
    };
    let Some(header) = info.payment.as_deref() else {
        return replied(vec![
            quoted_challenge_reply(
                config,
                route,
                &challenge,
                &quote,
                ErrorCode::PaymentRequired,
            ),
            Effect::Count(Metric::Challenged, 1),
        ]);
    };
    let payment = match wire::decode_payment(header) {
        Ok(p) => p,
        Err(e) => {
            return replied(vec![
                error_reply(ErrorCode::MalformedPayment, &e.to_string()),
                Effect::Count(Metric::Rejected, 1),
            ])
        }
    };
    if let Err(code) = check_quoted_payment(config, &quote, &info, &payment) {
        return replied(vec![
            quoted_challenge_reply(config, route, &challenge, &quote, code),
            Effect::Count(Metric::Rejected, 1),
        ]);
    }
    let payer = payment.payload.payload.payer.clone();
    let item = AuthorizeItem {
        request_id: info.request_id,
        proof: Some(payment.payload.into()),
        hold_amount: quote.amount,
        route: route.name.clone(),
        hold_ttl_seconds: config.hold_ttl_seconds,
        capture: config.one_phase_exact && quote.scheme == "exact",
        volume_tiers: match &route.pricing.model {
            pricing::Model::Volume(tiers) => tiers
                .iter()
                .map(|(from_requests, price)| VolumeTier {
                    from_requests: *from_requests,
                    price: *price,
                })
                .collect(),
            _ => Vec::new(),
        },
        global_limit: route.policy.global_limit.as_ref().map(|l| GlobalLimit {
            max_requests: l.max_requests,
            window_seconds: l.window_seconds,
            client_address: match l.key {
                crate::policy::GlobalLimitKey::Payer => String::new(),
                crate::policy::GlobalLimitKey::Client => {
                    info.limit_client.clone().unwrap_or_default()
                }
            },
        }),
    };
    let pending = Pending {
        route: route.name.clone(),
        price: quote.amount,
        payer,
        challenge,
        quote,
        meter: route.pricing.meter().map(|m| Box::new(m.clone())),
    };
    (
        State::Authorizing(pending),
        vec![Effect::Pause, Effect::Authorize(Box::new(item))],
    )
}

fn replied(effects: Vec<Effect>) -> (State, Vec<Effect>) {
    (State::Replied, effects)
}

/// What a route asks before the request is known: its flat price, or the `upto`
/// maximum of a metered route.
pub fn static_quote(route: &Route) -> Quote {
    Quote {
        scheme: if route.pricing.meter().is_some() {
            "upto"
        } else {
            "exact"
        },
        amount: route.price,
    }
}

/// The stateless checks against the route's static price ([`static_quote`]).
pub fn check_payment(
    config: &Config,
    route: &Route,
    info: &RequestInfo,
    payment: &wire::CheckedPayment,
) -> Result<(), ErrorCode> {
    check_quoted_payment(config, &static_quote(route), info, payment)
}

/// The stateless checks, in a fixed order, so a mismatched proof never costs a callout.
pub fn check_quoted_payment(
    config: &Config,
    quote: &Quote,
    info: &RequestInfo,
    payment: &wire::CheckedPayment,
) -> Result<(), ErrorCode> {
    let accepted = &payment.payload.accepted;
    if accepted.scheme != quote.scheme {
        return Err(ErrorCode::WrongScheme);
    }
    if accepted.network != config.network {
        return Err(ErrorCode::WrongNetwork);
    }
    if accepted.asset != config.asset {
        return Err(ErrorCode::WrongAsset);
    }
    if accepted.pay_to != config.pay_to {
        return Err(ErrorCode::WrongPayTo);
    }
    if payment.amount < quote.amount {
        return Err(ErrorCode::AmountBelowPrice);
    }
    if payment.payload.payload.resource
        != resource_string(&info.method, &info.authority, &info.path)
    {
        return Err(ErrorCode::WrongResource);
    }
    if payment.valid_before <= info.now_secs {
        return Err(ErrorCode::Expired);
    }
    let latest = info
        .now_secs
        .saturating_add(config.max_timeout_seconds)
        .saturating_add(config.clock_skew_seconds);
    if payment.valid_before > latest {
        return Err(ErrorCode::ValidityTooLong);
    }
    if config.verify_signatures_in_filter {
        let p = &payment.payload.payload;
        if x402_proto::signing::verify_hex(&p.payer, &p.signature, &payment.signed_fields())
            .is_err()
        {
            return Err(ErrorCode::InvalidSignature);
        }
    }
    Ok(())
}

fn on_answer(
    config: &Config,
    pending: Pending,
    answer: AuthorizeAnswer,
    now_nanos: u64,
) -> (State, Vec<Effect>) {
    match answer {
        AuthorizeAnswer::Authorized {
            transaction,
            held_amount,
            captured,
        } => {
            let paid = Paid {
                transaction,
                price: pending.price,
                held_amount,
                captured,
                payer: pending.payer,
                resumed_at_nanos: now_nanos,
                status: None,
                upstream_micros: 0,
                complete: false,
                metering: pending.meter.map(|meter| {
                    let every = config
                        .route_named(&pending.route)
                        .and_then(|r| r.capture_every_seconds)
                        .map_or(0, |s| u64::from(s).saturating_mul(1_000_000_000));
                    Box::new(Metering {
                        meter: *meter,
                        usage: Usage::default(),
                        stream: crate::stream::StreamState::default(),
                        partial_every_nanos: every,
                        partial_due_nanos: now_nanos.saturating_add(every),
                        partial_sent: 0,
                    })
                }),
                grpc: crate::grpc::GrpcResponse::NotGrpc,
            };
            let mut effects = vec![
                Effect::RemoveRequestHeader(HEADER_PAYMENT_SIGNATURE),
                Effect::RemoveRequestHeader(HEADER_PAYMENT_SIGNATURE_ALIAS),
                Effect::Count(Metric::Paid, 1),
            ];
            // A meter that parses the response cannot read a compressed one (it would
            // count no usage and release the hold): the upstream is asked for identity.
            if paid
                .metering
                .as_ref()
                .is_some_and(|m| m.meter.unit.parses_response_body())
            {
                effects.push(Effect::RemoveRequestHeader("accept-encoding"));
            }
            if captured {
                effects.push(Effect::Count(Metric::Captures, 1));
                effects.push(Effect::Count(Metric::RevenueAtomic, held_amount));
            }
            effects.push(Effect::Resume);
            (State::Paid(paid), effects)
        }
        // Not payable (the seller's account is closed): a JSON error, no challenge.
        AuthorizeAnswer::Refused(code) if code.http_status() != 402 => replied(vec![
            error_reply(
                code,
                "the seller's account is closed: this route accepts no payments",
            ),
            Effect::Count(Metric::Rejected, 1),
        ]),
        AuthorizeAnswer::Refused(code) => {
            let Some(route) = config.route_named(&pending.route) else {
                return replied(vec![
                    unavailable_reply(),
                    Effect::Count(Metric::Unavailable, 1),
                ]);
            };
            replied(vec![
                quoted_challenge_reply(config, route, &pending.challenge, &pending.quote, code),
                Effect::Count(Metric::Rejected, 1),
            ])
        }
        AuthorizeAnswer::Limited {
            retry_after_seconds,
        } => {
            let message = config
                .route_named(&pending.route)
                .and_then(|r| r.policy.global_limit.as_ref())
                .map(|l| l.message.as_str())
                .unwrap_or_default();
            replied(crate::policy::rate_limited(message, retry_after_seconds))
        }
        AuthorizeAnswer::Unavailable => {
            let fails_open = config
                .route_named(&pending.route)
                .is_some_and(|r| r.policy.failure_mode == crate::policy::FailureMode::Open);
            if fails_open {
                // Nothing was held, so nothing is captured or voided later.
                return (
                    State::Passthrough,
                    vec![
                        Effect::RemoveRequestHeader(HEADER_PAYMENT_SIGNATURE),
                        Effect::RemoveRequestHeader(HEADER_PAYMENT_SIGNATURE_ALIAS),
                        Effect::Count(Metric::FailedOpen, 1),
                        Effect::Log(format!(
                            "x402 filter: settlement unavailable, route {} failed open: payer {} served unpaid",
                            pending.route, pending.payer
                        )),
                        Effect::Resume,
                    ],
                );
            }
            replied(vec![
                unavailable_reply(),
                Effect::Count(Metric::Unavailable, 1),
            ])
        }
    }
}

/// The x402 challenge for `route` at its static price ([`static_quote`]).
pub fn challenge(
    config: &Config,
    route: &Route,
    input: &ChallengeInput,
    code: ErrorCode,
) -> PaymentRequired {
    quoted_challenge(config, route, input, &static_quote(route), code)
}

/// The x402 challenge for one request's quote; `upto` challenges describe the
/// meter in `extra` (`unit`, `unitPrice`, `maxUnits`).
pub fn quoted_challenge(
    config: &Config,
    route: &Route,
    input: &ChallengeInput,
    quote: &Quote,
    code: ErrorCode,
) -> PaymentRequired {
    challenge_for_url(
        config,
        route,
        resource_url(input),
        input.free_remaining,
        quote,
        code,
    )
}

/// The URL a challenge names as its resource.
fn resource_url(input: &ChallengeInput) -> String {
    let scheme = if input.scheme.is_empty() {
        "http"
    } else {
        input.scheme.as_str()
    };
    format!("{scheme}://{}{}", input.authority, input.path)
}

fn challenge_for_url(
    config: &Config,
    route: &Route,
    url: String,
    free_remaining: Option<u64>,
    quote: &Quote,
    code: ErrorCode,
) -> PaymentRequired {
    let mut extra = serde_json::Map::new();
    extra.insert(
        "decimals".into(),
        serde_json::Value::from(config.asset_decimals),
    );
    extra.insert("name".into(), serde_json::Value::from(config.asset.clone()));
    if let Some(meter) = route.pricing.meter() {
        for (key, value) in pricing::challenge_extra(meter) {
            extra.insert(key.into(), value);
        }
    }
    PaymentRequired {
        x402_version: x402_proto::X402_VERSION,
        error: Some(code.as_str().to_owned()),
        resource: ResourceInfo {
            url,
            description: route.description.clone(),
            mime_type: String::new(),
        },
        accepts: vec![PaymentRequirements {
            scheme: quote.scheme.to_owned(),
            network: config.network.clone(),
            amount: quote.amount.to_string(),
            asset: config.asset.clone(),
            pay_to: config.pay_to.clone(),
            max_timeout_seconds: config.max_timeout_seconds,
            extra,
        }],
        price: Some(x402_proto::amount::format_decimal(
            quote.amount,
            config.asset_decimals,
        )),
        payment_address: Some(config.pay_to.clone()),
        free_remaining,
    }
}

/// A route's most common challenge (`payment_required` at its static price, no free
/// tier count) as JSON, cut where the resource URL goes: built once per
/// configuration, so such a 402 only writes its URL into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeTemplate {
    before_url: Vec<u8>,
    after_url: Vec<u8>,
}

impl ChallengeTemplate {
    /// The template of `route`'s challenge under `config`; `None` if the JSON could
    /// not be cut (it always can: the mark serializes to one unique string).
    pub fn new(config: &Config, route: &Route) -> Option<ChallengeTemplate> {
        // Control characters are escaped in JSON, so the mark cannot occur anywhere
        // else in the challenge.
        const MARK: &str = "\u{1}x402 resource url\u{1}";
        let challenge = challenge_for_url(
            config,
            route,
            MARK.to_owned(),
            None,
            &static_quote(route),
            ErrorCode::PaymentRequired,
        );
        let json = serde_json::to_vec(&challenge).ok()?;
        let mark = serde_json::to_vec(MARK).ok()?;
        let at = json
            .windows(mark.len())
            .position(|w| w == mark.as_slice())?;
        Some(ChallengeTemplate {
            before_url: json[..at].to_vec(),
            after_url: json[at + mark.len()..].to_vec(),
        })
    }

    /// The challenge's JSON with `url` as its resource.
    pub fn render(&self, url: &str) -> Vec<u8> {
        let mut json =
            Vec::with_capacity(self.before_url.len() + url.len() + 8 + self.after_url.len());
        json.extend_from_slice(&self.before_url);
        // A string always serializes (to a Vec it cannot fail).
        let _ = serde_json::to_writer(&mut json, url);
        json.extend_from_slice(&self.after_url);
        json
    }
}

fn json_headers() -> Vec<(String, String)> {
    vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("cache-control".to_owned(), "no-store".to_owned()),
    ]
}

fn quoted_challenge_reply(
    config: &Config,
    route: &Route,
    input: &ChallengeInput,
    quote: &Quote,
    code: ErrorCode,
) -> Effect {
    // The header is the body's JSON in base64: serialized once for both.
    let body = match &route.challenge_template {
        Some(template)
            if code == ErrorCode::PaymentRequired
                && input.free_remaining.is_none()
                && *quote == static_quote(route) =>
        {
            template.render(&resource_url(input))
        }
        _ => serde_json::to_vec(&quoted_challenge(config, route, input, quote, code))
            .unwrap_or_default(),
    };
    let mut headers = json_headers();
    headers.push((
        HEADER_PAYMENT_REQUIRED.to_owned(),
        wire::encode_header_json(&body),
    ));
    if let Some(left) = input.free_remaining {
        headers.push((
            crate::policy::HEADER_FREE_REMAINING.to_owned(),
            left.to_string(),
        ));
    }
    Effect::Reply {
        status: code.http_status(),
        headers,
        body,
    }
}

fn error_reply(code: ErrorCode, message: &str) -> Effect {
    let body = ErrorBody {
        error: code.as_str().to_owned(),
        message: message.to_owned(),
    };
    Effect::Reply {
        status: code.http_status(),
        headers: json_headers(),
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// A JSON error answer that is not about payment (400 invalid request, 413).
fn json_reply(status: u16, error: &str, message: &str) -> Effect {
    let body = ErrorBody {
        error: error.to_owned(),
        message: message.to_owned(),
    };
    Effect::Reply {
        status,
        headers: json_headers(),
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

fn unavailable_reply() -> Effect {
    error_reply(
        ErrorCode::SettlementUnavailable,
        "payment settlement is temporarily unavailable; retry later",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn config() -> Config {
        Config::from_json(br#"{"settlement_cluster":"s","pay_to":"m","routes":[{"name":"q","match":{"path_prefix":"/paid"},"price":"0.01"}]}"#).unwrap()
    }

    fn paid(status: Option<u16>, complete: bool) -> State {
        State::Paid(Paid {
            transaction: "tx".into(),
            price: 10_000,
            held_amount: 10_000,
            captured: false,
            payer: "p".into(),
            resumed_at_nanos: 0,
            status,
            upstream_micros: 0,
            complete,
            metering: None,
            grpc: crate::grpc::GrpcResponse::NotGrpc,
        })
    }

    fn get_paid_x() -> RequestInfo {
        RequestInfo {
            method: "GET".into(),
            authority: "api".into(),
            path: "/paid/x".into(),
            ..RequestInfo::default()
        }
    }

    /// The headers and body of the 402 `effects` start with.
    fn reply_402(effects: &[Effect]) -> (&[(String, String)], &[u8]) {
        match effects.first() {
            Some(Effect::Reply {
                status: 402,
                headers,
                body,
            }) => (headers, body),
            _ => panic!("{effects:?}"),
        }
    }

    #[test]
    fn a_used_up_free_tier_is_stated_in_the_challenge_json_and_a_header() {
        let info = RequestInfo {
            policy: crate::policy::Verdict::ChargeFreeExhausted,
            ..get_paid_x()
        };
        let (state, effects) = step(&config(), State::New, Event::RequestHeaders(info.clone()));
        assert_eq!(state, State::Replied);
        let (headers, body) = reply_402(&effects);
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["freeRemaining"], 0);
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let challenge =
            wire::decode_header::<PaymentRequired>(header(HEADER_PAYMENT_REQUIRED).unwrap())
                .unwrap();
        assert_eq!(challenge.free_remaining, Some(0));
        assert_eq!(header(crate::policy::HEADER_FREE_REMAINING).unwrap(), "0");

        // Without a free tier the challenge says nothing about one.
        let info = RequestInfo {
            policy: crate::policy::Verdict::Charge,
            ..info
        };
        let (_, effects) = step(&config(), State::New, Event::RequestHeaders(info));
        let Effect::Reply { headers, body, .. } = &effects[0] else {
            panic!("{effects:?}");
        };
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert!(json.get("freeRemaining").is_none(), "{json}");
        assert!(!headers
            .iter()
            .any(|(n, _)| n == crate::policy::HEADER_FREE_REMAINING));
    }

    #[test]
    fn a_402_without_payment_is_written_from_the_route_template() {
        let mut c = config();
        // A template that differs from the challenge shows where the body came from.
        c.routes[0].challenge_template = Some(ChallengeTemplate {
            before_url: br#"{"from":"template","url":"#.to_vec(),
            after_url: b"}".to_vec(),
        });
        let info = get_paid_x();
        let (_, effects) = step(&c, State::New, Event::RequestHeaders(info.clone()));
        let (headers, body) = reply_402(&effects);
        assert_eq!(body, br#"{"from":"template","url":"http://api/paid/x"}"#);
        let header = headers
            .iter()
            .find(|(n, _)| n == HEADER_PAYMENT_REQUIRED)
            .map(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(header, wire::encode_header_json(body));

        // A challenge that refuses a proof (here: for too little) is built whole.
        let proof = x402_proto::wire::PaymentPayload {
            x402_version: 2,
            accepted: PaymentRequirements {
                scheme: "exact".into(),
                network: c.network.clone(),
                amount: "1".into(),
                asset: c.asset.clone(),
                pay_to: "m".into(),
                max_timeout_seconds: 60,
                extra: serde_json::Map::new(),
            },
            payload: x402_proto::wire::PaymentAuthorization {
                payer: "00".repeat(32),
                nonce: "11".repeat(16),
                valid_before: "4000000000".into(),
                resource: "GET api/paid/x".into(),
                signature: "22".repeat(64),
            },
        };
        let info = RequestInfo {
            payment: Some(wire::encode_header(&proof)),
            ..info
        };
        let (_, effects) = step(&c, State::New, Event::RequestHeaders(info));
        let (_, body) = reply_402(&effects);
        let refused: PaymentRequired = serde_json::from_slice(body).unwrap();
        assert_ne!(refused.error.as_deref(), Some("payment_required"));
        assert_eq!(refused.resource.url, "http://api/paid/x");
    }

    #[test]
    fn a_meter_that_parses_the_response_asks_the_upstream_for_it_uncompressed() {
        // A compressed body reads as no usage, which releases the hold: a client could
        // get every metered answer free by asking for gzip.
        let c = Config::from_json(
            br#"{"settlement_cluster":"s","pay_to":"m","routes":[
                {"name":"json","match":{"path_prefix":"/json"},
                 "pricing":{"per_token":{"unit_price":"0.001","max_units":3,"tokens_from":{"json_pointer":"/usage/n"}}}},
                {"name":"sse","match":{"path_prefix":"/sse"},
                 "pricing":{"per_token":{"unit_price":"0.001","max_units":3,"tokens_from":"sse_usage"}}},
                {"name":"header","match":{"path_prefix":"/header"},
                 "pricing":{"per_token":{"unit_price":"0.001","max_units":3,"tokens_from":{"header":"x-n"}}}},
                {"name":"bytes","match":{"path_prefix":"/bytes"},
                 "pricing":{"per_kb":{"unit_price":"0.001","max_units":3}}},
                {"name":"flat","match":{"path_prefix":"/flat"},"price":"0.001"}]}"#,
        )
        .unwrap();
        for (route, uncompressed) in [
            ("json", true),
            ("sse", true),
            ("header", false),
            ("bytes", false),
            ("flat", false),
        ] {
            let r = c.route_named(route).unwrap();
            let pending = Pending {
                route: route.into(),
                price: 3_000,
                payer: "p".into(),
                challenge: ChallengeInput {
                    scheme: "http".into(),
                    authority: "a".into(),
                    path: format!("/{route}"),
                    free_remaining: None,
                },
                quote: static_quote(r),
                meter: r.pricing.meter().cloned().map(Box::new),
            };
            let answer = AuthorizeAnswer::Authorized {
                transaction: "tx".into(),
                held_amount: 3_000,
                captured: false,
            };
            let (_, effects) = on_answer(&c, pending, answer, 0);
            assert_eq!(
                effects.contains(&Effect::RemoveRequestHeader("accept-encoding")),
                uncompressed,
                "{route}: {effects:?}"
            );
        }
    }

    #[test]
    fn partial_captures_name_the_running_cost_once_per_period_within_the_hold() {
        let c = Config::from_json(
            br#"{"settlement_cluster":"s","pay_to":"m","routes":[{"name":"long","match":{"path_prefix":"/long"},
                "pricing":{"per_second":{"unit_price":"0.001","max_units":3}},"capture_every_seconds":1}]}"#,
        )
        .unwrap();
        let pending = Pending {
            route: "long".into(),
            price: 3_000,
            payer: "p".into(),
            challenge: ChallengeInput {
                scheme: "http".into(),
                authority: "a".into(),
                path: "/long".into(),
                free_remaining: None,
            },
            quote: static_quote(&c.routes[0]),
            meter: c.routes[0].pricing.meter().cloned().map(Box::new),
        };
        let second = 1_000_000_000u64;
        let start = 7 * second;
        let answer = AuthorizeAnswer::Authorized {
            transaction: "tx".into(),
            held_amount: 3_000,
            captured: false,
        };
        let (State::Paid(mut paid), _) = on_answer(&c, pending, answer, start) else {
            panic!("not paid");
        };
        let m = paid.metering.as_deref_mut().unwrap();
        let at = |s: u64, extra: u64| start + s * second + extra;
        // Not before the first period; then the cost so far, once per period.
        assert_eq!(m.partial_due(3_000, at(0, second / 2), 500_000), None);
        assert_eq!(m.partial_due(3_000, at(1, 0), 1_000_000), Some(1_000));
        assert_eq!(m.partial_due(3_000, at(1, second / 2), 1_500_000), None);
        assert_eq!(m.partial_due(3_000, at(2, 200), 2_000_000), Some(2_000));
        // Past the time the hold pays for, the total stops at the hold, sent once.
        assert_eq!(m.partial_due(3_000, at(9, 0), 9_000_000), Some(3_000));
        assert_eq!(m.partial_due(3_000, at(10, 0), 10_000_000), None);
    }

    #[test]
    fn unpriced_requests_continue_and_stay_out_of_the_way() {
        let info = RequestInfo {
            method: "GET".into(),
            path: "/free".into(),
            ..RequestInfo::default()
        };
        let (state, effects) = step(&config(), State::New, Event::RequestHeaders(info));
        assert_eq!(state, State::Passthrough);
        assert_eq!(
            effects,
            vec![Effect::Count(Metric::Unpriced, 1), Effect::Continue]
        );
        let (state, effects) = step(&config(), state, Event::StreamEnd);
        assert_eq!((state, effects), (State::Passthrough, vec![]));
    }

    #[test]
    fn the_filters_own_reply_gets_no_receipt() {
        let (state, effects) = step(
            &config(),
            State::Replied,
            Event::ResponseHeaders {
                status: Some(402),
                end_of_stream: false,
                now_nanos: 0,
            },
        );
        assert_eq!((state, effects), (State::Replied, vec![]));
    }

    #[test]
    fn a_payment_captured_at_authorize_is_only_ever_voided() {
        let captured = |status: Option<u16>, complete: bool| match paid(status, complete) {
            State::Paid(p) => State::Paid(Paid {
                captured: true,
                ..p
            }),
            other => other,
        };
        let end = |state| step(&config(), state, Event::StreamEnd);
        // A success (or a client error below the threshold) sends nothing more.
        assert_eq!(end(captured(Some(200), true)), (State::Finished, vec![]));
        assert_eq!(end(captured(Some(404), true)), (State::Finished, vec![]));
        // A failure voids it, which refunds it; the same as for a hold.
        for (status, complete, reason) in [
            (Some(503), true, "upstream_5xx"),
            (Some(200), false, "incomplete_response"),
            (None, false, "upstream_reset"),
        ] {
            let (state, effects) = end(captured(status, complete));
            assert_eq!(state, State::Finished);
            assert!(
                matches!(&effects[..], [Effect::Void(v)] if v.reason == reason && v.transaction_id == "tx"),
                "{status:?}: {effects:?}"
            );
        }
    }

    #[test]
    fn client_errors_below_the_threshold_are_captured() {
        let (_, effects) = step(&config(), paid(Some(404), true), Event::StreamEnd);
        assert!(
            matches!(&effects[..], [Effect::Capture(c)] if c.amount == 10_000 && c.http_status == 404)
        );
    }

    #[test]
    fn response_completion_is_tracked_until_the_end() {
        let (state, _) = step(
            &config(),
            paid(None, false),
            Event::ResponseHeaders {
                status: Some(200),
                end_of_stream: false,
                now_nanos: 5_000,
            },
        );
        let (state, _) = step(&config(), state, Event::ResponseComplete);
        let (state, effects) = step(&config(), state, Event::StreamEnd);
        assert_eq!(state, State::Finished);
        assert!(matches!(&effects[..], [Effect::Capture(c)] if c.upstream_micros == 5));
        // Nothing happens twice.
        assert_eq!(step(&config(), State::Finished, Event::StreamEnd).1, vec![]);
    }

    #[test]
    fn a_grpc_call_voids_on_its_error_status_and_captures_on_ok() {
        use crate::grpc::GrpcResponse;
        let outcome = |seen: &[GrpcResponse]| {
            let mut state = paid(Some(200), true);
            for s in seen {
                state = step(&config(), state, Event::Grpc(*s)).0;
            }
            step(&config(), state, Event::StreamEnd).1
        };
        // Trailers-only error (grpc-status in the headers).
        let effects = outcome(&[GrpcResponse::Status(13)]);
        assert!(matches!(&effects[..], [Effect::Void(v)] if v.reason == "grpc_internal"));
        // Headers without a status, then OK in the trailers.
        let effects = outcome(&[GrpcResponse::AwaitingStatus, GrpcResponse::Status(0)]);
        assert!(matches!(&effects[..], [Effect::Capture(c)] if c.amount == 10_000));
        // A gRPC response that ended without any status failed for its client.
        let effects = outcome(&[GrpcResponse::AwaitingStatus]);
        assert!(matches!(&effects[..], [Effect::Void(v)] if v.reason == "grpc_status_missing"));
        // Codes left out of grpc_void_codes capture.
        let only_internal = Config::from_json(br#"{"settlement_cluster":"s","pay_to":"m","grpc_void_codes":["INTERNAL"],"routes":[]}"#).unwrap();
        let state = step(
            &only_internal,
            paid(Some(200), true),
            Event::Grpc(GrpcResponse::Status(5)),
        )
        .0;
        let (_, effects) = step(&only_internal, state, Event::StreamEnd);
        assert!(matches!(&effects[..], [Effect::Capture(_)]));
    }

    #[test]
    fn an_abandoned_request_voids_only_a_real_hold() {
        let answer = AuthorizeAnswer::Refused(ErrorCode::InsufficientFunds);
        assert_eq!(
            step(
                &config(),
                State::Abandoned,
                Event::AuthorizeAnswer {
                    answer,
                    now_nanos: 0
                }
            )
            .1,
            vec![]
        );
        let answer = AuthorizeAnswer::Authorized {
            transaction: "tx".into(),
            held_amount: 1,
            captured: false,
        };
        let (_, effects) = step(
            &config(),
            State::Abandoned,
            Event::AuthorizeAnswer {
                answer,
                now_nanos: 0,
            },
        );
        assert!(matches!(&effects[..], [Effect::Void(v)] if v.reason == "abandoned"));
    }
}
