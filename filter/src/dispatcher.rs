//! One dispatcher per plugin and Envoy worker: every settlement callout goes through
//! it. Calls are made on behalf of the root context, so Envoy ties them to the
//! plugin rather than to a request stream: a capture sent as its stream ends still
//! arrives. Authorize has up to [`MAX_AUTHORIZE_IN_FLIGHT`] calls in flight, Capture and
//! Void one each; work that arrives while an RPC is at its limit is gathered and sent
//! as one batch when a call returns. Captures and voids that
//! fail are retried a few times with a growing delay; a hold that is never resolved
//! expires in settlement, so giving up loses no money.
//!
//! An Authorize call that fails (a timeout, a reset) may still have been committed:
//! its requests are answered 503, and a payment captured as it was placed has no
//! expiry to fall back on. Such items are sent again later ([`Rpc::Recheck`]): the
//! request id makes the resend answer with the payment already placed, or place it
//! now, and either way the filter learns its transaction and voids it (a refund).

use std::collections::{HashMap, VecDeque};

use prost::Message;
use x402_proto::settlement::v1::{
    AuthorizeItem, AuthorizeOutcome, AuthorizeResponse, AuthorizeResult, CaptureItem,
    CaptureResponse, ResolveOutcome, ResolveResult, VoidItem, VoidResponse,
};
use x402_proto::wire::ErrorCode;

use crate::host::{Host, LogLevel};
use crate::metrics::{Metric, Metrics};
use crate::request::AuthorizeAnswer;

pub const SERVICE: &str = "x402.settlement.v1.DataPlane";
/// Most items in one call.
pub const MAX_BATCH: usize = 64;
/// Authorize calls in flight at once per worker. An authorization that arrives while
/// fewer are in flight goes out at once (light load adds no wait); beyond that they
/// gather into the next call. Since exact prices are captured at authorize, one gives
/// the most throughput at the same latency at half load as two; more calls only cost
/// Envoy and Postgres CPU (BENCHMARKS.md).
pub const MAX_AUTHORIZE_IN_FLIGHT: usize = 1;
/// Sends of one capture before it is left to expire. A lost capture is revenue the
/// merchant never gets, so the filter keeps trying for about half a minute (a settlement
/// restart) before it leaves the hold to expire. A void is resent until settlement
/// answers: for a payment captured at authorize it is the payer's refund, and there is
/// no expiry to fall back on.
pub const MAX_RESOLVE_ATTEMPTS: u32 = 12;
/// Delay before the n-th resend of a capture or void: n times this, at most
/// [`MAX_RETRY_BACKOFF_NANOS`].
pub const RETRY_BACKOFF_NANOS: u64 = 500_000_000;
pub const MAX_RETRY_BACKOFF_NANOS: u64 = 5_000_000_000;
/// gRPC status code OK.
pub const GRPC_OK: u32 = 0;
/// gRPC status reported for a call the host never finished.
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;
/// Grace beyond the call timeout before a call the host never finished is given up,
/// so one lost callback cannot block an RPC's queue for good.
pub const STALE_GRACE_NANOS: u64 = 5_000_000_000;
/// Most Authorize items kept to be sent again ([`Rpc::Recheck`]) per dispatcher.
pub const MAX_RECHECKS: usize = 512;
/// The reason of a void that refunds a payment whose Authorize answer never arrived.
pub const VOID_UNANSWERED: &str = "authorize_unanswered";
/// The reason of a void that refunds a payment captured at authorize whose request was
/// still going when its VM stopped (sent by the VM that takes over its journal).
pub const VOID_VM_STOPPED: &str = "filter_vm_stopped";

/// Which settlement call a callout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Authorize,
    Capture,
    Void,
    /// Running totals of long requests (`capture_every_seconds`); the hold stays open.
    CapturePartial,
    /// Authorize items captured at once whose call failed, sent again to learn whether
    /// they were placed (and then voided).
    Recheck,
}

impl Rpc {
    pub const fn method(self) -> &'static str {
        match self {
            Rpc::Authorize => "Authorize",
            Rpc::Capture => "Capture",
            Rpc::Void => "Void",
            Rpc::CapturePartial => "CapturePartial",
            Rpc::Recheck => "Authorize",
        }
    }
}

/// A request context waiting for its authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    pub context_id: u32,
    /// The route's own settlement timeout, when shorter than the plugin's.
    pub timeout_ms: Option<u32>,
}

/// An answer for a request context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub context_id: u32,
    pub answer: AuthorizeAnswer,
}

#[derive(Debug, Clone)]
struct Retryable<T> {
    item: T,
    /// Sends so far.
    attempts: u32,
    not_before_nanos: u64,
}

#[derive(Debug)]
enum InFlight {
    /// The items are kept (not copied) to match each result to its request id.
    Authorize(Vec<(Waiter, AuthorizeItem)>),
    Capture(Vec<Retryable<CaptureItem>>),
    Void(Vec<Retryable<VoidItem>>),
    CapturePartial(Vec<Retryable<CaptureItem>>),
    Recheck(Vec<Retryable<AuthorizeItem>>),
}

/// Where the dispatcher sends its calls.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster: String,
    pub timeout_ms: u32,
    /// The root context calls are attributed to.
    pub root_context: u32,
    /// gRPC metadata of every call (the settlement credential, when configured).
    pub metadata: Vec<(String, String)>,
    /// How long queued captures wait for more to share their call while other requests
    /// are in progress (`capture_window_ms`).
    pub capture_window_nanos: u64,
}

#[derive(Debug, Default)]
pub struct Dispatcher {
    authorize_queue: VecDeque<(Waiter, AuthorizeItem)>,
    capture_queue: VecDeque<Retryable<CaptureItem>>,
    void_queue: VecDeque<Retryable<VoidItem>>,
    partial_queue: VecDeque<Retryable<CaptureItem>>,
    recheck_queue: VecDeque<Retryable<AuthorizeItem>>,
    in_flight: HashMap<u32, InFlight>,
    /// When each call in flight was started.
    started_nanos: HashMap<u32, u64>,
    /// The captures or voids owed to settlement changed since
    /// [`Dispatcher::take_owed_changed`]: the VM's journal of them ([`crate::journal`])
    /// is out of date.
    owed_changed: bool,
    /// When the capture queue was first seen holding items since the last Capture call.
    captures_waiting_since: Option<u64>,
    /// Payments captured as they were placed whose requests (by context id) have not
    /// ended: the refund each is owed if this VM stops before its request ends.
    placed: HashMap<u32, VoidItem>,
}

impl Dispatcher {
    pub fn authorize(&mut self, context_id: u32, item: AuthorizeItem) {
        self.authorize_within(context_id, item, None);
    }

    /// [`Dispatcher::authorize`] with the route's timeout: a batch is sent with the
    /// shortest timeout among its requests.
    pub fn authorize_within(
        &mut self,
        context_id: u32,
        item: AuthorizeItem,
        timeout_ms: Option<u32>,
    ) {
        let waiter = Waiter {
            context_id,
            timeout_ms,
        };
        self.authorize_queue.push_back((waiter, item));
    }

    pub fn capture(&mut self, item: CaptureItem) {
        self.owed_changed = true;
        self.capture_queue.push_back(Retryable {
            item,
            attempts: 0,
            not_before_nanos: 0,
        });
    }

    /// Queues a partial capture; one still queued for the same hold is replaced,
    /// since its running total is superseded.
    pub fn capture_partial(&mut self, item: CaptureItem) {
        self.partial_queue
            .retain(|r| r.item.transaction_id != item.transaction_id);
        self.partial_queue.push_back(Retryable {
            item,
            attempts: 0,
            not_before_nanos: 0,
        });
    }

    pub fn void(&mut self, item: VoidItem) {
        self.owed_changed = true;
        self.void_queue.push_back(Retryable {
            item,
            attempts: 0,
            not_before_nanos: 0,
        });
    }

    /// Final captures not answered by settlement yet: in flight (one call at most),
    /// then queued or waiting to be resent.
    pub fn owed_captures(&self) -> impl Iterator<Item = &CaptureItem> {
        self.in_flight
            .values()
            .flat_map(|f| match f {
                InFlight::Capture(batch) => batch.as_slice(),
                _ => &[],
            })
            .chain(self.capture_queue.iter())
            .map(|r| &r.item)
    }

    /// Voids not answered by settlement yet, like [`Dispatcher::owed_captures`], then
    /// the refunds of payments captured at authorize whose requests are still going
    /// (owed only if this VM stops first: Envoy then ends those requests with an error).
    pub fn owed_voids(&self) -> impl Iterator<Item = &VoidItem> {
        self.in_flight
            .values()
            .flat_map(|f| match f {
                InFlight::Void(batch) => batch.as_slice(),
                _ => &[],
            })
            .chain(self.void_queue.iter())
            .map(|r| &r.item)
            .chain(self.placed.values())
    }

    /// The request `context_id` has ended, and what its payment is owed (a void, if
    /// any) is queued: its payment is no longer refunded if this VM stops.
    pub fn request_ended(&mut self, context_id: u32) {
        if self.placed.remove(&context_id).is_some() {
            self.owed_changed = true;
        }
    }

    /// Payments captured as they are placed whose answer has not arrived: in an
    /// Authorize call in flight, or waiting to be checked again ([`Rpc::Recheck`]). A VM
    /// that crashes with them leaves their payers charged for requests Envoy never let
    /// through, so they are journaled too, and the VM that takes them over checks them.
    pub fn owed_rechecks(&self) -> impl Iterator<Item = &AuthorizeItem> {
        let awaited = self
            .in_flight
            .values()
            .flat_map(|f| match f {
                InFlight::Authorize(waiters) => waiters.as_slice(),
                _ => &[],
            })
            .map(|(_, item)| item)
            .filter(|item| item.capture);
        let rechecking = self
            .in_flight
            .values()
            .flat_map(|f| match f {
                InFlight::Recheck(batch) => batch.as_slice(),
                _ => &[],
            })
            .chain(self.recheck_queue.iter())
            .map(|r| &r.item);
        awaited.chain(rechecking)
    }

    /// Whether [`Dispatcher::owed_captures`], [`Dispatcher::owed_voids`] or
    /// [`Dispatcher::owed_rechecks`] changed since the last call.
    pub fn take_owed_changed(&mut self) -> bool {
        std::mem::take(&mut self.owed_changed)
    }

    /// Records a call that went out.
    fn started(&mut self, token: u32, call: InFlight, now: u64) {
        self.in_flight.insert(token, call);
        self.started_nanos.insert(token, now);
    }

    /// Calls of `rpc` in flight.
    pub fn in_flight(&self, rpc: Rpc) -> usize {
        self.in_flight
            .values()
            .filter(|f| {
                matches!(
                    (f, rpc),
                    (InFlight::Authorize(_), Rpc::Authorize)
                        | (InFlight::Capture(_), Rpc::Capture)
                        | (InFlight::Void(_), Rpc::Void)
                        | (InFlight::CapturePartial(_), Rpc::CapturePartial)
                        | (InFlight::Recheck(_), Rpc::Recheck)
                )
            })
            .count()
    }

    /// Work waiting to be sent: (authorizations, captures, voids).
    pub fn queued(&self) -> (usize, usize, usize) {
        (
            self.authorize_queue.len(),
            self.capture_queue.len(),
            self.void_queue.len(),
        )
    }

    /// Sends queued work on every RPC below its in-flight limit. `current` is the
    /// context the host is running, restored after each call. Returns answers for
    /// authorizations whose call could not be started. `more_captures_coming`: whether
    /// requests in progress may soon queue captures that could share a call (asked only
    /// when queued captures could go).
    pub fn flush(
        &mut self,
        host: &mut dyn Host,
        target: &Target,
        current: u32,
        metrics: &Metrics,
        more_captures_coming: &dyn Fn() -> bool,
    ) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        let now = host.now_nanos();
        let mut authorize_in_flight = self.in_flight(Rpc::Authorize);
        while authorize_in_flight < MAX_AUTHORIZE_IN_FLIGHT && !self.authorize_queue.is_empty() {
            let n = self.authorize_queue.len().min(MAX_BATCH);
            let waiters: Vec<(Waiter, AuthorizeItem)> = self.authorize_queue.drain(..n).collect();
            let message = encode_items(waiters.iter().map(|(_, item)| item));
            let shortest = waiters
                .iter()
                .filter_map(|(w, _)| w.timeout_ms)
                .fold(target.timeout_ms, u32::min);
            match call(host, target, shortest, current, Rpc::Authorize, &message) {
                Some(token) => {
                    self.owed_changed |= captures_at_once(&waiters);
                    self.started(token, InFlight::Authorize(waiters), now);
                    authorize_in_flight += 1;
                }
                None => {
                    metrics.add(host, Metric::CalloutFailures, 1);
                    deliveries.extend(waiters.into_iter().map(|(w, _)| Delivery {
                        context_id: w.context_id,
                        answer: AuthorizeAnswer::Unavailable,
                    }));
                }
            }
        }
        // Captures are off every request's path: while requests in progress may add more,
        // they wait up to the window (or until half a batch is queued) to share a call.
        let waiting_since = if self.capture_queue.is_empty() {
            None
        } else {
            Some(*self.captures_waiting_since.get_or_insert(now))
        };
        self.captures_waiting_since = waiting_since;
        let window_over = || {
            self.capture_queue.len() >= MAX_BATCH / 2
                || waiting_since
                    .is_some_and(|t| now.saturating_sub(t) >= target.capture_window_nanos)
                || !more_captures_coming()
        };
        if waiting_since.is_some() && self.in_flight(Rpc::Capture) == 0 && window_over() {
            self.captures_waiting_since = None;
            let queue = &mut self.capture_queue;
            if let Some((token, batch)) =
                send_due(host, target, current, Rpc::Capture, queue, now, metrics)
            {
                self.started(token, InFlight::Capture(batch), now);
            }
        }
        if self.in_flight(Rpc::Void) == 0 {
            let queue = &mut self.void_queue;
            if let Some((token, batch)) =
                send_due(host, target, current, Rpc::Void, queue, now, metrics)
            {
                self.started(token, InFlight::Void(batch), now);
            }
        }
        if self.in_flight(Rpc::CapturePartial) == 0 {
            let queue = &mut self.partial_queue;
            if let Some((token, batch)) = send_due(
                host,
                target,
                current,
                Rpc::CapturePartial,
                queue,
                now,
                metrics,
            ) {
                self.started(token, InFlight::CapturePartial(batch), now);
            }
        }
        if self.in_flight(Rpc::Recheck) == 0 {
            let queue = &mut self.recheck_queue;
            if let Some((token, batch)) =
                send_due(host, target, current, Rpc::Recheck, queue, now, metrics)
            {
                self.started(token, InFlight::Recheck(batch), now);
            }
        }
        deliveries
    }

    /// Queues `item`, whose Authorize call failed, to be sent again after the first
    /// backoff. Only items captured as they are placed: a plain hold that was placed
    /// expires on its own.
    fn recheck(&mut self, host: &mut dyn Host, metrics: &Metrics, item: AuthorizeItem, now: u64) {
        if item.capture {
            self.push_recheck(host, metrics, item, now.saturating_add(RETRY_BACKOFF_NANOS));
        }
    }

    /// Queues for a check at once a payment a stopped VM left unanswered
    /// ([`Dispatcher::owed_rechecks`], taken over from its journal).
    pub fn recheck_taken_over(
        &mut self,
        host: &mut dyn Host,
        metrics: &Metrics,
        item: AuthorizeItem,
    ) {
        self.push_recheck(host, metrics, item, 0);
    }

    fn push_recheck(
        &mut self,
        host: &mut dyn Host,
        metrics: &Metrics,
        item: AuthorizeItem,
        not_before_nanos: u64,
    ) {
        self.owed_changed = true;
        if self.recheck_queue.len() >= MAX_RECHECKS {
            // Settlement has been failing for a long while; the oldest goes.
            self.recheck_queue.pop_front();
            metrics.add(host, Metric::ResolutionsDropped, 1);
            host.log(
                LogLevel::Error,
                "too many unanswered payments to check again: the oldest is dropped",
            );
        }
        self.recheck_queue.push_back(Retryable {
            item,
            attempts: 0,
            not_before_nanos,
        });
    }

    /// Fails calls still in flight long after their timeout; returns the answers for
    /// the requests that waited on them.
    pub fn expire_stale(
        &mut self,
        host: &mut dyn Host,
        target: &Target,
        metrics: &Metrics,
    ) -> Vec<Delivery> {
        let now = host.now_nanos();
        let limit = u64::from(target.timeout_ms)
            .saturating_mul(1_000_000)
            .saturating_add(STALE_GRACE_NANOS);
        let stale: Vec<u32> = self
            .started_nanos
            .iter()
            .filter(|(_, started)| now.saturating_sub(**started) > limit)
            .map(|(token, _)| *token)
            .collect();
        stale
            .into_iter()
            .flat_map(|token| self.on_response(host, token, Err(GRPC_DEADLINE_EXCEEDED), metrics))
            .collect()
    }

    /// Whether `token` is a call of this dispatcher.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.contains_key(&token)
    }

    /// Handles the end of a call: `Ok(body)` on gRPC status OK, `Err(status)` otherwise.
    /// Returns the answers for the request contexts that waited on it.
    pub fn on_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        result: Result<Vec<u8>, u32>,
        metrics: &Metrics,
    ) -> Vec<Delivery> {
        let Some(flight) = self.in_flight.remove(&token) else {
            return Vec::new();
        };
        self.started_nanos.remove(&token);
        let now = host.now_nanos();
        if let Err(status) = &result {
            metrics.add(host, Metric::CalloutFailures, 1);
            host.log(
                LogLevel::Warn,
                &format!("settlement call failed with gRPC status {status}"),
            );
        }
        match flight {
            InFlight::Authorize(waiters) => {
                self.owed_changed |= captures_at_once(&waiters);
                let results =
                    result
                        .ok()
                        .and_then(|body| match AuthorizeResponse::decode(body.as_slice()) {
                            Ok(r) => Some(r.results),
                            Err(e) => {
                                host.log(
                                    LogLevel::Error,
                                    &format!("undecodable AuthorizeResponse: {e}"),
                                );
                                None
                            }
                        });
                let mut deliveries = Vec::with_capacity(waiters.len());
                for (i, (w, item)) in waiters.into_iter().enumerate() {
                    let answer = match results.as_ref().and_then(|r| r.get(i)) {
                        Some(result) if result.request_id == item.request_id => {
                            let placed = result.outcome() == AuthorizeOutcome::Authorized
                                && result.captured
                                && !result.transaction_id.is_empty();
                            if placed {
                                let refund = VoidItem {
                                    transaction_id: result.transaction_id.clone(),
                                    reason: VOID_VM_STOPPED.to_owned(),
                                };
                                self.placed.insert(w.context_id, refund);
                            }
                            answer_for(host, result)
                        }
                        other => {
                            if other.is_some() {
                                host.log(
                                    LogLevel::Error,
                                    "AuthorizeResponse results are out of order",
                                );
                            }
                            // No answer for this item: it may have been placed.
                            self.recheck(host, metrics, item, now);
                            AuthorizeAnswer::Unavailable
                        }
                    };
                    deliveries.push(Delivery {
                        context_id: w.context_id,
                        answer,
                    });
                }
                deliveries
            }
            InFlight::Recheck(batch) => {
                self.owed_changed = true;
                let results = result
                    .ok()
                    .and_then(|body| AuthorizeResponse::decode(body.as_slice()).ok())
                    .map(|r| r.results);
                let mut again = Vec::new();
                for (i, r) in batch.into_iter().enumerate() {
                    match results.as_ref().and_then(|results| results.get(i)) {
                        Some(result) if result.request_id == r.item.request_id => {
                            match result.outcome() {
                                AuthorizeOutcome::Authorized
                                    if !result.transaction_id.is_empty() =>
                                {
                                    host.log(
                                        LogLevel::Warn,
                                        &format!(
                                            "x402 filter: payment {} was placed but its answer was lost; refunding it",
                                            result.transaction_id
                                        ),
                                    );
                                    self.void(VoidItem {
                                        transaction_id: result.transaction_id.clone(),
                                        reason: VOID_UNANSWERED.to_owned(),
                                    });
                                }
                                AuthorizeOutcome::Unavailable => again.push(r),
                                // Refused now (expired, nonce spent elsewhere, ...): nothing
                                // was placed under this request id.
                                _ => {}
                            }
                        }
                        _ => again.push(r),
                    }
                }
                requeue(
                    host,
                    Rpc::Recheck,
                    &mut self.recheck_queue,
                    again,
                    now,
                    metrics,
                );
                Vec::new()
            }
            InFlight::Capture(batch) => {
                self.owed_changed = true;
                match result.map(|body| CaptureResponse::decode(body.as_slice()).map(|r| r.results))
                {
                    Ok(Ok(results)) => record_resolutions(host, metrics, &results),
                    _ => requeue(
                        host,
                        Rpc::Capture,
                        &mut self.capture_queue,
                        batch,
                        now,
                        metrics,
                    ),
                }
                Vec::new()
            }
            InFlight::Void(batch) => {
                self.owed_changed = true;
                match result.map(|body| VoidResponse::decode(body.as_slice()).map(|r| r.results)) {
                    Ok(Ok(results)) => record_resolutions(host, metrics, &results),
                    _ => requeue(host, Rpc::Void, &mut self.void_queue, batch, now, metrics),
                }
                Vec::new()
            }
            InFlight::CapturePartial(batch) => {
                match result.map(|body| CaptureResponse::decode(body.as_slice()).map(|r| r.results))
                {
                    Ok(Ok(results)) => record_partials(host, &results),
                    _ => requeue(
                        host,
                        Rpc::CapturePartial,
                        &mut self.partial_queue,
                        batch,
                        now,
                        metrics,
                    ),
                }
                Vec::new()
            }
        }
    }
}

/// Whether an Authorize call carries payments captured as they are placed: its start
/// and its answer change [`Dispatcher::owed_rechecks`].
fn captures_at_once(waiters: &[(Waiter, AuthorizeItem)]) -> bool {
    waiters.iter().any(|(_, item)| item.capture)
}

fn call(
    host: &mut dyn Host,
    target: &Target,
    timeout_ms: u32,
    current: u32,
    rpc: Rpc,
    message: &[u8],
) -> Option<u32> {
    host.set_effective_context(target.root_context);
    let result = host.grpc_call(
        &target.cluster,
        SERVICE,
        rpc.method(),
        message,
        timeout_ms,
        &target.metadata,
    );
    host.set_effective_context(current);
    match result {
        Ok(token) => Some(token),
        Err(_) => {
            host.log(
                LogLevel::Warn,
                &format!(
                    "could not start settlement {} call on cluster {}",
                    rpc.method(),
                    target.cluster
                ),
            );
            None
        }
    }
}

/// The bytes of an `AuthorizeRequest`, `CaptureRequest` or `VoidRequest` (each is
/// `repeated Item items = 1`) holding `items`, encoded from references: no copy of
/// the items per call.
fn encode_items<'a, M: Message + 'a>(items: impl Iterator<Item = &'a M> + Clone) -> Vec<u8> {
    const ITEMS_TAG: u32 = 1;
    let len: usize = items
        .clone()
        .map(|m| prost::encoding::message::encoded_len(ITEMS_TAG, m))
        .sum();
    let mut buf = Vec::with_capacity(len);
    for m in items {
        prost::encoding::message::encode(ITEMS_TAG, m, &mut buf);
    }
    buf
}

/// Sends the due items of one resolution queue (capture, void or partial capture) as
/// one call: `(token, items)` when it went out; a call that cannot be made puts the
/// items back with their backoff.
fn send_due<T: Message>(
    host: &mut dyn Host,
    target: &Target,
    current: u32,
    rpc: Rpc,
    queue: &mut VecDeque<Retryable<T>>,
    now: u64,
    metrics: &Metrics,
) -> Option<(u32, Vec<Retryable<T>>)> {
    let batch = take_due(queue, now);
    if batch.is_empty() {
        return None;
    }
    let message = encode_items(batch.iter().map(|r| &r.item));
    match call(host, target, target.timeout_ms, current, rpc, &message) {
        Some(token) => Some((token, batch)),
        None => {
            metrics.add(host, Metric::CalloutFailures, 1);
            requeue(host, rpc, queue, batch, now, metrics);
            None
        }
    }
}

fn take_due<T>(queue: &mut VecDeque<Retryable<T>>, now: u64) -> Vec<Retryable<T>> {
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(r) = queue.pop_front() {
        if batch.len() < MAX_BATCH && r.not_before_nanos <= now {
            batch.push(r);
        } else {
            rest.push_back(r);
        }
    }
    *queue = rest;
    batch
}

fn requeue<T>(
    host: &mut dyn Host,
    rpc: Rpc,
    queue: &mut VecDeque<Retryable<T>>,
    batch: Vec<Retryable<T>>,
    now: u64,
    metrics: &Metrics,
) {
    for mut r in batch {
        r.attempts = r.attempts.saturating_add(1);
        if r.attempts >= MAX_RESOLVE_ATTEMPTS && !matches!(rpc, Rpc::Void | Rpc::Recheck) {
            metrics.add(host, Metric::ResolutionsDropped, 1);
            host.log(LogLevel::Error, "giving up on a capture after retries");
            continue;
        }
        let backoff = RETRY_BACKOFF_NANOS
            .saturating_mul(u64::from(r.attempts))
            .min(MAX_RETRY_BACKOFF_NANOS);
        r.not_before_nanos = now.saturating_add(backoff);
        queue.push_back(r);
    }
}

fn record_resolutions(host: &mut dyn Host, metrics: &Metrics, results: &[ResolveResult]) {
    for r in results {
        match r.outcome() {
            ResolveOutcome::Captured => {
                metrics.add(host, Metric::Captures, 1);
                metrics.add(host, Metric::RevenueAtomic, r.amount);
            }
            ResolveOutcome::Voided => metrics.add(host, Metric::Voids, 1),
            other => host.log(
                LogLevel::Warn,
                &format!(
                    "settlement refused to resolve {}: {} {}",
                    r.transaction_id,
                    other.as_str_name(),
                    r.message
                ),
            ),
        }
    }
}

/// Partial captures are counted when their hold's final capture is; a hold already
/// resolved (the final capture overtook a partial one) is expected.
fn record_partials(host: &mut dyn Host, results: &[ResolveResult]) {
    for r in results {
        match r.outcome() {
            ResolveOutcome::Captured | ResolveOutcome::AlreadyResolved => {}
            other => host.log(
                LogLevel::Warn,
                &format!(
                    "settlement refused a partial capture of {}: {} {}",
                    r.transaction_id,
                    other.as_str_name(),
                    r.message
                ),
            ),
        }
    }
}

/// What the filter does with one Authorize result.
pub fn answer_for(host: &dyn Host, result: &AuthorizeResult) -> AuthorizeAnswer {
    let refused = |code| AuthorizeAnswer::Refused(code);
    match result.outcome() {
        AuthorizeOutcome::Authorized if !result.transaction_id.is_empty() => {
            AuthorizeAnswer::Authorized {
                transaction: result.transaction_id.clone(),
                held_amount: result.held_amount,
                captured: result.captured,
            }
        }
        AuthorizeOutcome::InvalidSignature => refused(ErrorCode::InvalidSignature),
        AuthorizeOutcome::UnknownKey => refused(ErrorCode::UnknownKey),
        AuthorizeOutcome::KeyRevoked => refused(ErrorCode::KeyRevoked),
        AuthorizeOutcome::InsufficientFunds => refused(ErrorCode::InsufficientFunds),
        AuthorizeOutcome::NonceReused => refused(ErrorCode::NonceReused),
        AuthorizeOutcome::Expired => refused(ErrorCode::Expired),
        // The same request id came with other content: its proof is spent.
        AuthorizeOutcome::IdempotencyConflict => refused(ErrorCode::NonceReused),
        AuthorizeOutcome::RateLimited => AuthorizeAnswer::Limited {
            retry_after_seconds: u64::from(result.retry_after_seconds),
        },
        // The seller's account is closed: no payment can succeed, whatever the client
        // sends, and no route fails open on it (settlement answered).
        AuthorizeOutcome::MerchantClosed => refused(ErrorCode::MerchantClosed),
        // Settlement failed this item while it decided others of the call: nothing is
        // held for it, as when a whole call fails.
        AuthorizeOutcome::Unavailable => AuthorizeAnswer::Unavailable,
        // The operator's side is wrong (unknown merchant, a hold above the proof,
        // an answer without a transaction): fail closed without leaking details.
        other => {
            host.log(
                LogLevel::Error,
                &format!(
                    "settlement answered {} for request {}: {}",
                    other.as_str_name(),
                    result.request_id,
                    result.message
                ),
            );
            AuthorizeAnswer::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use x402_proto::settlement::v1::{AuthorizeRequest, CaptureRequest, VoidRequest};

    #[test]
    fn items_encode_as_the_request_message_would() {
        let authorize: Vec<AuthorizeItem> = (0..3)
            .map(|i| AuthorizeItem {
                request_id: format!("req-{i}"),
                hold_amount: 10 + i,
                route: "quote".into(),
                ..Default::default()
            })
            .collect();
        assert_eq!(
            encode_items(authorize.iter()),
            AuthorizeRequest {
                items: authorize.clone()
            }
            .encode_to_vec()
        );
        let capture: Vec<CaptureItem> = (0..2)
            .map(|i| CaptureItem {
                transaction_id: format!("tx-{i}"),
                amount: i,
                upstream_micros: 1234,
                http_status: 200,
            })
            .collect();
        let bytes = encode_items(capture.iter());
        assert_eq!(
            bytes,
            CaptureRequest {
                items: capture.clone()
            }
            .encode_to_vec()
        );
        assert_eq!(
            CaptureRequest::decode(bytes.as_slice()).unwrap().items,
            capture
        );
        let void = vec![VoidItem {
            transaction_id: "tx-9".into(),
            ..Default::default()
        }];
        assert_eq!(
            encode_items(void.iter()),
            VoidRequest {
                items: void.clone()
            }
            .encode_to_vec()
        );
        assert!(encode_items(Vec::<VoidItem>::new().iter()).is_empty());
    }

    /// Only payments captured as they are placed are owed while unanswered: a plain
    /// hold expires on its own.
    #[test]
    fn unanswered_payments_captured_at_once_are_owed_until_answered() {
        let mut host = crate::host::FakeHost::default();
        let metrics = Metrics::default();
        let target = Target {
            cluster: "settlement".into(),
            timeout_ms: 1000,
            root_context: 1,
            metadata: Vec::new(),
            capture_window_nanos: 0,
        };
        let item = |id: &str, capture: bool| AuthorizeItem {
            request_id: id.into(),
            capture,
            ..Default::default()
        };
        let mut d = Dispatcher::default();
        d.authorize(2, item("held", false));
        d.authorize(3, item("paid", true));
        d.flush(&mut host, &target, 1, &metrics, &|| false);
        assert!(d.take_owed_changed());
        let owed: Vec<&str> = d.owed_rechecks().map(|i| i.request_id.as_str()).collect();
        assert_eq!(owed, ["paid"]);

        // The call fails: the paid one waits for its check, still owed.
        let token = *d.in_flight.keys().next().unwrap();
        d.on_response(&mut host, token, Err(14), &metrics);
        assert!(d.take_owed_changed());
        assert_eq!(d.owed_rechecks().count(), 1);

        // Checked: settlement placed nothing under it; nothing is owed.
        host.now_nanos += RETRY_BACKOFF_NANOS;
        d.flush(&mut host, &target, 1, &metrics, &|| false);
        assert_eq!(d.in_flight(Rpc::Recheck), 1);
        assert_eq!(d.owed_rechecks().count(), 1);
        let token = *d.in_flight.keys().next().unwrap();
        let refused = AuthorizeResponse {
            results: vec![AuthorizeResult {
                request_id: "paid".into(),
                outcome: AuthorizeOutcome::Expired as i32,
                ..Default::default()
            }],
        };
        d.on_response(&mut host, token, Ok(refused.encode_to_vec()), &metrics);
        assert!(d.take_owed_changed());
        assert_eq!(d.owed_rechecks().count(), 0);
        assert_eq!(d.owed_voids().count(), 0);
    }
}
