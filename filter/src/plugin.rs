//! The glue between the host callbacks and the pure parts: it keeps the per-VM
//! state (plugins, i.e. root contexts, and request contexts), turns callbacks into
//! [`Event`]s for [`request::step`], and applies the resulting [`Effect`]s in one
//! place, [`Vm::apply`].

use std::collections::HashMap;

use x402_proto::wire::{HEADER_PAYMENT_SIGNATURE, HEADER_PAYMENT_SIGNATURE_ALIAS};

use crate::config::Config;
use crate::dispatcher::{Delivery, Dispatcher, Target};
use crate::host::{Host, LogLevel};
use crate::journal::{Journal, Owed};
use crate::metrics::{Metric, Metrics};
use crate::request::{self, Effect, Event, RequestInfo, State};

/// What a request callback tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    /// Headers: stop iteration. Body: stop and buffer (Envoy's buffer limit applies).
    Pause = 1,
    /// Body only: stop and buffer with flow control instead of a buffer limit.
    PauseWatermark = 2,
}

/// Whether Envoy honours a body-priced request's held headers
/// (`allow_on_headers_stop_iteration`), as this plugin has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeadersHold {
    #[default]
    Untried,
    /// A body arrived while the headers were held.
    Works,
    /// A body never arrived: the headers now go first, as without the setting.
    Ignored,
}

/// How long held headers wait for a first body callback before the plugin concludes
/// that Envoy holds the body with them, and lets them go.
const HEADERS_HOLD_PROBE_NANOS: u64 = 2_000_000_000;

/// How often the dispatcher wakes to resend captures and voids that failed.
pub const TICK_PERIOD_MS: u32 = 500;
/// Longest `x-request-id` reused in the settlement idempotency key.
const MAX_REQUEST_ID: usize = 128;

/// One configured plugin: the root context.
#[derive(Debug)]
pub struct Plugin {
    pub config: Config,
    pub dispatcher: Dispatcher,
    pub metrics: Metrics,
    pub target: Target,
    /// The captures and voids this plugin still owes, kept outside the VM so they
    /// survive a crash.
    pub journal: Journal,
    pub headers_hold: HeadersHold,
}

impl Plugin {
    /// Rewrites the journal when what the dispatcher owes has changed since last time.
    fn record_owed(&mut self, host: &mut dyn Host) {
        if self.dispatcher.take_owed_changed() {
            let d = &self.dispatcher;
            self.journal
                .record(host, d.owed_captures(), d.owed_voids(), d.owed_rechecks());
        }
    }
}

#[derive(Debug)]
struct RequestContext {
    root_id: u32,
    state: State,
    /// When the headers of a body-priced request were held, until its body arrives.
    headers_held_at: Option<u64>,
    /// A gRPC request: the filter's own answers become gRPC statuses ([`crate::grpc`]).
    grpc: bool,
}

/// Everything one wasm VM (one Envoy worker) keeps.
#[derive(Debug, Default)]
pub struct Vm {
    plugins: HashMap<u32, Plugin>,
    requests: HashMap<u32, RequestContext>,
    /// The request whose headers callback is running: a resume decided inline (a
    /// route failing open when the call cannot even start) becomes `Continue`, since
    /// Envoy must not be asked to continue a stream that was never paused.
    in_headers: Option<u32>,
    resumed_inline: bool,
}

impl Vm {
    pub fn on_context_create(&mut self, context_id: u32, root_id: u32) {
        if root_id != 0 {
            self.requests.insert(
                context_id,
                RequestContext {
                    root_id,
                    state: State::New,
                    headers_held_at: None,
                    grpc: false,
                },
            );
        }
    }

    /// Compiles the plugin configuration; `false` makes Envoy refuse the plugin.
    pub fn on_configure(
        &mut self,
        host: &mut dyn Host,
        root_id: u32,
        configuration: &[u8],
    ) -> bool {
        let config = match Config::from_json(configuration) {
            Ok(c) => c,
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!("x402 filter: rejected configuration: {e}"),
                );
                return false;
            }
        };
        // Before traffic: the lock that keeps workers from racing to create counters.
        crate::ratelimit::prepare(host);
        let target = Target {
            cluster: config.settlement_cluster.clone(),
            timeout_ms: config.settlement_timeout_ms,
            root_context: root_id,
            metadata: config
                .settlement_token
                .iter()
                .map(|t| ("authorization".to_owned(), format!("Bearer {}", t.0)))
                .collect(),
            capture_window_nanos: u64::from(config.capture_window_ms) * 1_000_000,
        };
        let metrics = match self.plugins.remove(&root_id) {
            Some(old) => old.metrics,
            None => Metrics::define(host),
        };
        host.log(
            LogLevel::Info,
            &format!(
                "x402 filter: configured {} priced route(s), paying {}",
                config.routes.len(),
                config.pay_to
            ),
        );
        let journal = Journal::new(host, &config.settlement_cluster);
        self.plugins.insert(
            root_id,
            Plugin {
                config,
                dispatcher: Dispatcher::default(),
                metrics,
                target,
                journal,
                headers_hold: HeadersHold::Untried,
            },
        );
        // Listed at once, so captures are not lost even if this VM crashes before it ticks.
        self.tick_journal(host, root_id);
        true
    }

    /// Beats the plugin's journal and queues the captures it takes over from VMs that
    /// stopped ([`crate::journal`]).
    fn tick_journal(&mut self, host: &mut dyn Host, root_id: u32) {
        let Some(p) = self.plugins.get_mut(&root_id) else {
            return;
        };
        let now = host.now_nanos();
        let recovered = p.journal.tick(host, now);
        if recovered.is_empty() {
            return;
        }
        host.log(
            LogLevel::Warn,
            "took over captures or voids of a stopped filter VM or replaced configuration",
        );
        p.metrics.add(
            host,
            Metric::CapturesRecovered,
            u64::try_from(recovered.len()).unwrap_or(u64::MAX),
        );
        for owed in recovered {
            match owed {
                Owed::Capture(item) => p.dispatcher.capture(item),
                Owed::Void(item) => p.dispatcher.void(item),
                Owed::Recheck(item) => p.dispatcher.recheck_taken_over(host, &p.metrics, *item),
            }
        }
        // In this VM's journal at once: they are no longer in the one they came from.
        p.record_owed(host);
    }

    pub fn plugin(&self, root_id: u32) -> Option<&Plugin> {
        self.plugins.get(&root_id)
    }

    pub fn state(&self, context_id: u32) -> Option<&State> {
        self.requests.get(&context_id).map(|r| &r.state)
    }

    /// Request headers that end the stream (no body follows).
    pub fn on_request_headers(&mut self, host: &mut dyn Host, context_id: u32) -> Action {
        self.on_request_headers_with_body(host, context_id, false)
    }

    /// Request headers; `body_follows` when they did not end the stream.
    pub fn on_request_headers_with_body(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        body_follows: bool,
    ) -> Action {
        let Some(root_id) = self.requests.get(&context_id).map(|r| r.root_id) else {
            return Action::Continue;
        };
        // Test-only fault switch: the real host never returns from `trap`.
        let crash_header = self
            .plugins
            .get(&root_id)
            .and_then(|p| p.config.debug_crash_on_header.as_deref());
        if crash_header.is_some_and(|name| host.request_header(name).is_some()) {
            host.trap();
            return Action::Pause;
        }
        let mut info = read_request(host);
        if self
            .plugins
            .get(&root_id)
            .is_some_and(|p| p.config.needs_route_name(&info.method, &info.path))
        {
            info.route_name = host
                .property(&["xds", "route_name"])
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| !s.is_empty());
        }
        info.body_follows = body_follows;
        if let Some(request) = self.requests.get_mut(&context_id) {
            request.grpc = host
                .request_header("content-type")
                .is_some_and(|ct| crate::grpc::is_grpc_content_type(&ct));
        }
        if let Some(plugin) = self.plugins.get(&root_id) {
            info.hold_headers =
                plugin.config.hold_request_headers && plugin.headers_hold != HeadersHold::Ignored;
            info.policy = crate::policy::evaluate_request(host, &plugin.config, &info);
            info.limit_client = crate::policy::global_limit_client(host, &plugin.config, &info);
            // Only the headers some price expression reads are copied, every value of
            // a repeated one (an expression refuses a header repeated with different
            // values: upstreams disagree on which counts).
            for route in &plugin.config.routes {
                for name in &route.pricing.headers {
                    if info.headers.iter().all(|(k, _)| k != name) {
                        for value in host.request_header_values(name) {
                            info.headers.push((name.clone(), value));
                        }
                    }
                }
            }
        }
        self.in_headers = Some(context_id);
        self.resumed_inline = false;
        let action = self.advance(host, context_id, root_id, Event::RequestHeaders(info));
        self.in_headers = None;
        if action == Action::Pause {
            if let Some(r) = self.requests.get_mut(&context_id) {
                if matches!(r.state, State::Buffering(_)) {
                    r.headers_held_at = Some(host.now_nanos());
                }
            }
        }
        if std::mem::take(&mut self.resumed_inline) {
            Action::Continue
        } else {
            action
        }
    }

    /// Request body data; `size` is everything buffered so far. While a body-priced
    /// request is buffered the answer is `Pause` (stop and buffer).
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Some(request) = self.requests.get_mut(&context_id) else {
            return Action::Continue;
        };
        let root_id = request.root_id;
        if request.headers_held_at.take().is_some() {
            if let Some(plugin) = self.plugins.get_mut(&root_id) {
                plugin.headers_hold = HeadersHold::Works;
            }
        }
        match self.state(context_id) {
            Some(State::Paid(_)) => {
                return self
                    .streamed_chunk(host, context_id, root_id, size, end_of_stream, true)
                    .unwrap_or(Action::Continue);
            }
            Some(State::Buffering(_)) => {}
            // Only reached when Envoy honours held headers: the body waits for the
            // answer under flow control, not against Envoy's buffer limit (a 413).
            Some(State::Authorizing(_)) => return Action::PauseWatermark,
            Some(State::Replied) => return Action::Pause,
            _ => return Action::Continue,
        }
        let body = if end_of_stream {
            Some(host.request_body(size).unwrap_or_default())
        } else {
            None
        };
        let event = Event::RequestBody {
            size: u64::try_from(size).unwrap_or(u64::MAX),
            body,
        };
        self.advance(host, context_id, root_id, event)
    }

    /// Request trailers, which end a request whose body did not end with
    /// `end_of_stream`. Envoy lets the whole request go on at trailers the filter does
    /// not stop, so while the filter holds the request (buffering a body to price it,
    /// waiting for settlement, answering) it stops them too; a buffered body is
    /// complete now, and is priced as at its last chunk.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host, context_id: u32) -> Action {
        match self.state(context_id) {
            Some(State::Buffering(_)) => {
                let size = host.request_body_size().unwrap_or(0);
                match self.on_request_body(host, context_id, size, true) {
                    Action::Continue => Action::Continue,
                    Action::Pause | Action::PauseWatermark => Action::Pause,
                }
            }
            Some(State::Authorizing(_) | State::Replied) => Action::Pause,
            _ => Action::Continue,
        }
    }

    /// A response body chunk of `size` bytes; metered routes read it.
    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Some(root_id) = self.requests.get(&context_id).map(|r| r.root_id) else {
            return Action::Continue;
        };
        if let Some(action) =
            self.streamed_chunk(host, context_id, root_id, size, end_of_stream, false)
        {
            return action;
        }
        let Some(State::Paid(paid)) = self.state(context_id) else {
            return Action::Continue;
        };
        let reads = paid
            .metering
            .as_ref()
            .is_some_and(|m| m.meter.unit != crate::pricing::Unit::Seconds);
        let chunk = if reads && size > 0 {
            host.response_body(size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let event = Event::ResponseBody {
            chunk,
            end_of_stream,
            now_nanos: host.now_nanos(),
        };
        self.advance(host, context_id, root_id, event);
        Action::Continue
    }

    pub fn on_response_headers(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        end_of_stream: bool,
    ) -> Action {
        let Some(root_id) = self.requests.get(&context_id).map(|r| r.root_id) else {
            return Action::Continue;
        };
        if !matches!(
            self.state(context_id),
            Some(State::Paid(_) | State::Free { .. })
        ) {
            return Action::Continue;
        }
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        let event = Event::ResponseHeaders {
            status,
            end_of_stream,
            now_nanos: host.now_nanos(),
        };
        self.advance(host, context_id, root_id, event);
        let meter_header = match self.state(context_id) {
            Some(State::Paid(paid)) => paid.metering.as_ref().and_then(|m| match &m.meter.unit {
                crate::pricing::Unit::Tokens(crate::pricing::TokenSource::Header(name)) => {
                    Some(name.clone())
                }
                _ => None,
            }),
            _ => None,
        };
        if let Some(name) = meter_header {
            let value = host.response_header(&name);
            self.advance(host, context_id, root_id, Event::MeterHeader(value));
        }
        if let Some(State::Paid(paid)) = self.requests.get_mut(&context_id).map(|r| &mut r.state) {
            if let Some(m) = paid.metering.as_deref_mut() {
                let content_type = host.response_header("content-type");
                crate::stream::on_response_headers(
                    &mut m.stream,
                    &m.meter,
                    status,
                    content_type.as_deref(),
                );
            }
        }
        if matches!(self.state(context_id), Some(State::Paid(_))) {
            let grpc = crate::grpc::GrpcResponse::from_headers(
                host.response_header("content-type").as_deref(),
                host.response_header("grpc-status").as_deref(),
            );
            if grpc != crate::grpc::GrpcResponse::NotGrpc {
                self.advance(host, context_id, root_id, Event::Grpc(grpc));
            }
        }
        Action::Continue
    }

    /// A body chunk of a paid request whose meter counts while streaming
    /// ([`crate::stream`]); `None` when the meter does not.
    fn streamed_chunk(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        root_id: u32,
        size: usize,
        end_of_stream: bool,
        from_client: bool,
    ) -> Option<Action> {
        let now = host.now_nanos();
        let mut mask = [0u8; 4];
        if from_client {
            host.random_bytes(&mut mask);
        }
        let Some(State::Paid(paid)) = self.requests.get_mut(&context_id).map(|r| &mut r.state)
        else {
            return None;
        };
        let m = paid.metering.as_deref_mut()?;
        if !crate::stream::meters_while_streaming(&m.meter) {
            return None;
        }
        if from_client && m.stream.kind != crate::stream::Kind::WebSocket {
            // Only WebSocket frames are metered on the way in.
            return Some(Action::Continue);
        }
        let chunk = match (size, from_client) {
            (0, _) => Vec::new(),
            (_, true) => host.request_body(size).unwrap_or_default(),
            (_, false) => host.response_body(size).unwrap_or_default(),
        };
        let elapsed = now.saturating_sub(paid.resumed_at_nanos) / 1_000;
        let verdict = if from_client {
            crate::stream::on_request_chunk(
                &mut m.stream,
                &m.meter,
                &mut m.usage,
                &chunk,
                elapsed,
                mask,
            )
        } else {
            crate::stream::on_response_chunk(
                &mut m.stream,
                &m.meter,
                &mut m.usage,
                &chunk,
                end_of_stream,
                elapsed,
                crate::stream::Payment {
                    transaction: &paid.transaction,
                    held: paid.held_amount,
                },
            )
        };
        match (&verdict.replace, from_client) {
            (Some(bytes), true) => host.replace_request_body(size, bytes),
            (Some(bytes), false) => host.replace_response_body(size, bytes),
            (None, _) => {}
        }
        if verdict.close_now {
            host.close_stream();
        }
        if verdict.ended {
            let event = Event::ResponseBody {
                chunk: Vec::new(),
                end_of_stream: true,
                now_nanos: now,
            };
            self.advance(host, context_id, root_id, event);
        }
        Some(Action::Continue)
    }

    /// Resets streams whose final bytes went out, or whose time ran out.
    fn tick_streams(&mut self, host: &mut dyn Host, root_id: u32) {
        let now = host.now_nanos();
        let mut ended = Vec::new();
        let mut partials = Vec::new();
        for (id, request) in &mut self.requests {
            let State::Paid(paid) = &mut request.state else {
                continue;
            };
            let Some(m) = paid.metering.as_deref_mut() else {
                continue;
            };
            if request.root_id != root_id || !crate::stream::meters_while_streaming(&m.meter) {
                continue;
            }
            let elapsed = now.saturating_sub(paid.resumed_at_nanos) / 1_000;
            if let Some(total) = m.partial_due(paid.held_amount, now, elapsed) {
                partials.push(x402_proto::settlement::v1::CaptureItem {
                    transaction_id: paid.transaction.clone(),
                    amount: total,
                    upstream_micros: elapsed,
                    http_status: 0,
                });
            }
            let verdict = crate::stream::on_tick(&mut m.stream, &m.meter, &mut m.usage, elapsed);
            if verdict.close_now && host.set_effective_context(*id) {
                host.close_stream();
            }
            if verdict.ended {
                ended.push(*id);
            }
        }
        if let Some(plugin) = self.plugins.get_mut(&root_id) {
            for item in partials {
                plugin.dispatcher.capture_partial(item);
            }
        }
        for id in ended {
            let event = Event::ResponseBody {
                chunk: Vec::new(),
                end_of_stream: true,
                now_nanos: now,
            };
            self.advance(host, id, root_id, event);
        }
        host.set_effective_context(root_id);
    }

    /// Response trailers: a gRPC call's `grpc-status` arrives here; they end the response.
    pub fn on_response_trailers(&mut self, host: &mut dyn Host, context_id: u32) -> Action {
        if matches!(self.state(context_id), Some(State::Paid(_))) {
            if let (Some(root_id), Some(status)) = (
                self.requests.get(&context_id).map(|r| r.root_id),
                host.response_trailer("grpc-status"),
            ) {
                let seen = crate::grpc::GrpcResponse::from_status(&status);
                self.advance(host, context_id, root_id, Event::Grpc(seen));
            }
        }
        self.on_response_data(host, context_id, true)
    }

    /// Response body or trailers; `end_of_stream` marks a complete response.
    pub fn on_response_data(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        end_of_stream: bool,
    ) -> Action {
        if end_of_stream && matches!(self.state(context_id), Some(State::Paid(_))) {
            if let Some(root_id) = self.requests.get(&context_id).map(|r| r.root_id) {
                let event = Event::ResponseBody {
                    chunk: Vec::new(),
                    end_of_stream: true,
                    now_nanos: host.now_nanos(),
                };
                self.advance(host, context_id, root_id, event);
            }
        }
        Action::Continue
    }

    /// The end of a stream (its context is deleted) or of a plugin (its root context).
    /// A stream's end is handled here rather than in an access-log callback: the module
    /// exports no `proxy_on_log`, so Envoy makes one call into the VM fewer per request.
    pub fn on_delete(&mut self, host: &mut dyn Host, context_id: u32) {
        if let Some(request) = self.requests.remove(&context_id) {
            if let Some(plugin) = self.plugins.get(&request.root_id) {
                let (_, effects) = request::step(&plugin.config, request.state, Event::StreamEnd);
                self.apply(host, context_id, request.root_id, effects);
                self.request_ended(request.root_id, context_id);
                // Also sends captures that were waiting for this request to finish.
                self.flush(host, request.root_id, request.root_id);
            }
        } else if let Some(plugin) = self.plugins.remove(&context_id) {
            // A configuration replaced (new prices through LDS or ECDS) or removed: Envoy
            // deletes its root context once its last request is gone, cancelling its
            // calls. What it still owes stays in its journal, which a plugin sending to
            // the same settlement cluster takes over once the journal stops beating.
            let d = &plugin.dispatcher;
            let owes = d.owed_captures().next().is_some()
                || d.owed_voids().next().is_some()
                || d.owed_rechecks().next().is_some();
            if owes {
                host.log(
                    LogLevel::Warn,
                    "x402 filter: a replaced configuration left captures or voids to its journal",
                );
            }
        }
    }

    /// Held headers whose body has not come: unless Envoy has shown it honours the
    /// hold, it does not (it holds the body with the headers), so they are let go. Envoy
    /// then passes the body it held to the filter, as without the hold, and later
    /// body-priced requests send their headers first at once.
    fn tick_held_headers(&mut self, host: &mut dyn Host, root_id: u32) {
        let Some(plugin) = self.plugins.get_mut(&root_id) else {
            return;
        };
        if !plugin.config.hold_request_headers || plugin.headers_hold == HeadersHold::Works {
            return;
        }
        let now = host.now_nanos();
        let mut stuck = Vec::new();
        for (id, request) in &mut self.requests {
            if request.root_id == root_id
                && request
                    .headers_held_at
                    .is_some_and(|at| now.saturating_sub(at) >= HEADERS_HOLD_PROBE_NANOS)
            {
                request.headers_held_at = None;
                stuck.push(*id);
            }
        }
        if stuck.is_empty() {
            return;
        }
        if plugin.headers_hold == HeadersHold::Untried {
            plugin.headers_hold = HeadersHold::Ignored;
            host.log(
                LogLevel::Warn,
                "x402: held request headers got no body: set allow_on_headers_stop_iteration: true in the filter's plugin config; until then headers go first",
            );
        }
        for id in stuck {
            if host.set_effective_context(id) {
                host.resume_request();
            }
        }
        host.set_effective_context(root_id);
    }

    pub fn on_tick(&mut self, host: &mut dyn Host, root_id: u32) {
        self.tick_streams(host, root_id);
        self.tick_held_headers(host, root_id);
        self.tick_journal(host, root_id);
        let stale = match self.plugins.get_mut(&root_id) {
            Some(p) => p.dispatcher.expire_stale(host, &p.target, &p.metrics),
            None => return,
        };
        self.deliver(host, root_id, stale);
        self.flush(host, root_id, root_id);
    }

    /// A gRPC call ended: `Ok(body)` after `proxy_on_grpc_receive`, `Err(status)`
    /// after `proxy_on_grpc_close` with a non-OK status.
    pub fn on_grpc_result(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        result: Result<Vec<u8>, u32>,
    ) {
        let Some(root_id) = self
            .plugins
            .iter()
            .find(|(_, p)| p.dispatcher.owns(token))
            .map(|(id, _)| *id)
        else {
            return;
        };
        let deliveries = match self.plugins.get_mut(&root_id) {
            Some(p) => p.dispatcher.on_response(host, token, result, &p.metrics),
            None => return,
        };
        // The next call goes out, and the journal trades the answered payments' items
        // for their refunds, before their requests are let through ([`crate::journal`]).
        self.flush(host, root_id, root_id);
        self.deliver(host, root_id, deliveries);
        self.flush(host, root_id, root_id);
    }

    /// Steps one request and applies what it decided.
    fn advance(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        root_id: u32,
        event: Event,
    ) -> Action {
        let Some(plugin) = self.plugins.get(&root_id) else {
            return Action::Continue;
        };
        let Some(request) = self.requests.get_mut(&context_id) else {
            return Action::Continue;
        };
        let state = std::mem::take(&mut request.state);
        let (state, effects) = request::step(&plugin.config, state, event);
        request.state = state;
        let action = self.apply(host, context_id, root_id, effects);
        self.flush(host, root_id, context_id);
        action
    }

    fn flush(&mut self, host: &mut dyn Host, root_id: u32, current: u32) {
        // Failed starts answer requests, whose replies may queue voids: a few rounds settle it.
        for _ in 0..4 {
            let requests = &self.requests;
            let more_coming = || requests.values().any(|r| r.state.may_capture());
            let deliveries = match self.plugins.get_mut(&root_id) {
                Some(p) => p
                    .dispatcher
                    .flush(host, &p.target, current, &p.metrics, &more_coming),
                None => return,
            };
            if deliveries.is_empty() {
                break;
            }
            self.deliver(host, root_id, deliveries);
            host.set_effective_context(current);
        }
        // Every change to what is owed passes here (queued, answered, taken over).
        if let Some(p) = self.plugins.get_mut(&root_id) {
            p.record_owed(host);
        }
    }

    /// Hands authorization answers to their request contexts, or voids the hold of a
    /// request that is gone.
    fn deliver(&mut self, host: &mut dyn Host, root_id: u32, deliveries: Vec<Delivery>) {
        for d in deliveries {
            let Some(plugin) = self.plugins.get(&root_id) else {
                return;
            };
            let alive = self.requests.contains_key(&d.context_id)
                && host.set_effective_context(d.context_id);
            let event = Event::AuthorizeAnswer {
                answer: d.answer,
                now_nanos: host.now_nanos(),
            };
            if alive {
                if let Some(request) = self.requests.get_mut(&d.context_id) {
                    let state = std::mem::take(&mut request.state);
                    let (state, effects) = request::step(&plugin.config, state, event);
                    request.state = state;
                    self.apply(host, d.context_id, root_id, effects);
                }
            } else {
                let (_, effects) = request::step(&plugin.config, State::Abandoned, event);
                self.apply(host, d.context_id, root_id, effects);
                self.request_ended(root_id, d.context_id);
            }
            host.set_effective_context(root_id);
        }
    }

    /// A request's end has been applied (its void, if any, queued): its payment is no
    /// longer refunded if this VM stops ([`Dispatcher::request_ended`]).
    fn request_ended(&mut self, root_id: u32, context_id: u32) {
        if let Some(p) = self.plugins.get_mut(&root_id) {
            p.dispatcher.request_ended(context_id);
        }
    }

    /// The one place where decisions become host calls and the Action for Envoy.
    fn apply(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        root_id: u32,
        effects: Vec<Effect>,
    ) -> Action {
        let grpc_request = self.requests.get(&context_id).is_some_and(|r| r.grpc);
        let Some(plugin) = self.plugins.get_mut(&root_id) else {
            return Action::Continue;
        };
        let mut action = Action::Continue;
        for effect in effects {
            match effect {
                Effect::Continue => action = Action::Continue,
                Effect::Pause => action = Action::Pause,
                Effect::Resume if self.in_headers == Some(context_id) => {
                    self.resumed_inline = true;
                }
                Effect::Resume => host.resume_request(),
                Effect::RemoveRequestHeader(name) => host.remove_request_header(name),
                Effect::Reply {
                    status,
                    headers,
                    body,
                } => {
                    let grpc = grpc_request
                        .then(|| crate::grpc::reply(status, &headers, &body))
                        .flatten();
                    match grpc {
                        Some(g) => host.send_grpc_reply(g.grpc_status, &g.headers, &g.message),
                        None => host.send_local_reply(status, &headers, &body),
                    }
                    action = Action::Pause;
                }
                Effect::Authorize(item) => {
                    let timeout_ms = plugin
                        .config
                        .route_named(&item.route)
                        .and_then(|r| r.policy.timeout_ms);
                    plugin
                        .dispatcher
                        .authorize_within(context_id, *item, timeout_ms);
                }
                Effect::SetResponseHeader(name, value) => host.set_response_header(name, &value),
                Effect::Capture(item) => plugin.dispatcher.capture(item),
                Effect::Void(item) => plugin.dispatcher.void(item),
                Effect::Count(metric, by) => plugin.metrics.add(host, metric, by),
                Effect::Log(message) => host.log(LogLevel::Warn, &message),
            }
        }
        action
    }
}

/// The request's headers the filter works from (Envoy's route name is read apart, and
/// only when matching needs it: [`crate::config::Config::needs_route_name`]).
fn read_request(host: &mut dyn Host) -> RequestInfo {
    let authority = host
        .request_header(":authority")
        .or_else(|| host.request_header("host"))
        .unwrap_or_default();
    let payment = host
        .request_header(HEADER_PAYMENT_SIGNATURE)
        .or_else(|| host.request_header(HEADER_PAYMENT_SIGNATURE_ALIAS));
    // The settlement idempotency key, only needed (and made) when there is a proof to
    // authorize: a 402 costs two host calls less. The random part makes the key unique
    // to this request even when a client sends its own x-request-id: a replayed proof
    // must meet the nonce check, never an idempotent replay of an earlier authorization.
    let request_id = if payment.is_some() {
        let envoy_id = host.request_header("x-request-id").filter(|id| {
            !id.is_empty() && id.len() <= MAX_REQUEST_ID && !id.contains(char::is_control)
        });
        let mut random = [0u8; 12];
        host.random_bytes(&mut random);
        match envoy_id {
            Some(id) => format!("{id}.{}", hex::encode(random)),
            None => hex::encode(random),
        }
    } else {
        String::new()
    };
    let header = |name: &str| host.request_header(name).unwrap_or_default();
    RequestInfo {
        scheme: header(":scheme"),
        method: header(":method"),
        authority,
        path: header(":path"),
        route_name: None,
        payment,
        request_id,
        now_secs: host.now_nanos() / 1_000_000_000,
        policy: crate::policy::Verdict::Charge,
        limit_client: None,
        body_follows: false,
        hold_headers: false,
        headers: Vec::new(),
    }
}
