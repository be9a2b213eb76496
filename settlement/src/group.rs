//! Group commit: the data-plane items of many concurrent calls applied in one
//! transaction per group, with set-based statements.
//!
//! Calls hand their items to a queue; a few committer tasks each take whatever is
//! queued (up to [`MAX_GROUP`] items), apply it in one transaction and answer every
//! call. A call that arrives while the committers are busy joins the next group, so a
//! lone call starts at once and a busy server commits many items per transaction: the
//! merchant's balance row, which every payment shares, is written once per group.
//!
//! Results stay exact per item. The group transaction decides every outcome it can
//! decide alone (replays, unknown merchant or key, revoked key, signature, expiry,
//! nonce reuse, insufficient funds, holds not found or already resolved); an item
//! whose outcome depends on another item of the same group (a repeated request id,
//! nonce or hold) or on history (volume tiers, a global rate limit's window, a prior
//! resolution) runs on its own after the group commits, through the one-item path of
//! [`Ledger`]. If the group transaction fails as a whole, every item of it runs on its
//! own, so one bad item never fails the others.
//!
//! A group reads without locks, then writes everything in one statement that commits
//! on its own and re-checks under locks what the read decided on
//! (`x402_group_checks` rolls the statement back when something changed): two round
//! trips to Postgres where a transaction takes five (authorize) or six (capture and
//! void). A group that meets a change runs again in a transaction that takes its
//! locks first (payer keys; open-hold rows).
//!
//! Balance rows are locked last, just before COMMIT, so their locks are held
//! briefly, and in key order like every other ledger operation, so nothing waits on
//! anything in a cycle.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tonic::Status;
use x402_proto::settlement::v1::{
    AuthorizeOutcome, AuthorizeResult, ResolveOutcome, ResolveResult,
};

use crate::error::{constraint, LedgerError};
use crate::events::{fee_of, Event, CHANNEL, PLATFORM_ACCOUNT};
use crate::ledger::{
    balance_moves, is_overdraft, resolve_result, retrying, to_i64, to_u64, Attempt, Delta, Ledger,
    Moves, Resolution, DEBIT_REASON,
};
use crate::verify::{authorized, own_refusal, refused, unix_now, CheckedAuthorize};

/// Most items one group transaction takes (a single larger call still goes whole).
pub const MAX_GROUP: usize = 256;

/// What became of one item of a group.
#[derive(Debug)]
pub(crate) enum Slot<R> {
    Done(R),
    /// Decided on its own, after the group commits.
    Alone,
    /// The caller's deadline passed before the group committed: nothing was written.
    Late,
}

/// One call's items waiting for a committer.
struct Job<I, R> {
    items: Vec<I>,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Vec<Result<R, Status>>>,
}

/// The queue calls put their items on; committers take them in groups.
pub struct Queue<I, R> {
    tx: mpsc::UnboundedSender<Job<I, R>>,
}

impl<I, R> Clone for Queue<I, R> {
    fn clone(&self) -> Self {
        Queue {
            tx: self.tx.clone(),
        }
    }
}

impl<I, R> std::fmt::Debug for Queue<I, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queue")
    }
}

impl<I: Send + 'static, R: Send + 'static> Queue<I, R> {
    /// Starts `committers` tasks that apply groups with `apply` (they end when the
    /// last handle on the queue is dropped).
    fn start<F, Fut>(committers: usize, apply: F) -> Self
    where
        F: Fn(Vec<(I, Option<Instant>)>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<Result<R, Status>>> + Send,
    {
        let (tx, rx) = mpsc::unbounded_channel::<Job<I, R>>();
        let rx = Arc::new(Mutex::new(rx));
        let apply = Arc::new(apply);
        for _ in 0..committers.max(1) {
            let rx = rx.clone();
            let apply = apply.clone();
            tokio::spawn(async move {
                loop {
                    let jobs = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else {
                            return;
                        };
                        let mut n = first.items.len();
                        let mut jobs = vec![first];
                        while n < MAX_GROUP {
                            match rx.try_recv() {
                                Ok(job) => {
                                    n += job.items.len();
                                    jobs.push(job);
                                }
                                Err(_) => break,
                            }
                        }
                        jobs
                    };
                    run_jobs(jobs, apply.as_ref()).await;
                }
            });
        }
        Queue { tx }
    }

    /// Queues `items` and waits for each one's result, in item order. Items that
    /// failed wrote nothing; the others did, whatever became of their neighbours.
    pub async fn submit(
        &self,
        items: Vec<I>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Result<R, Status>>, Status> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                items,
                deadline,
                reply,
            })
            .map_err(|_| Status::unavailable("settlement is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::internal("settlement failed to process a batch"))
    }
}

async fn run_jobs<I, R, F, Fut>(jobs: Vec<Job<I, R>>, apply: &F)
where
    F: Fn(Vec<(I, Option<Instant>)>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<R, Status>>>,
{
    let mut sizes = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut items = Vec::new();
    for job in jobs {
        sizes.push(job.items.len());
        replies.push(job.reply);
        items.extend(job.items.into_iter().map(|i| (i, job.deadline)));
    }
    let mut results = apply(items).await.into_iter();
    for (size, reply) in sizes.into_iter().zip(replies) {
        let mut out: Vec<Result<R, Status>> = results.by_ref().take(size).collect();
        out.resize_with(size, || {
            Err(Status::internal("settlement lost an item of a batch"))
        });
        let _ = reply.send(out);
    }
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the call's deadline passed before its items were committed")
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| d <= Instant::now())
}

/// The group-commit queues of the data plane.
#[derive(Debug, Clone)]
pub struct Committers {
    pub authorize: Queue<CheckedAuthorize, AuthorizeResult>,
    pub resolve: Queue<(String, Resolution), ResolveResult>,
}

impl Committers {
    /// Starts `per_kind` committers for authorizations and as many for resolutions.
    pub fn start(ledger: Ledger, per_kind: usize) -> Self {
        let l = ledger.clone();
        let authorize = Queue::start(per_kind, move |items| {
            let ledger = l.clone();
            async move { authorize_items(&ledger, items).await }
        });
        let resolve = Queue::start(per_kind, move |items| {
            let ledger = ledger.clone();
            async move { resolve_items(&ledger, items).await }
        });
        Committers { authorize, resolve }
    }
}

async fn authorize_items(
    ledger: &Ledger,
    items: Vec<(CheckedAuthorize, Option<Instant>)>,
) -> Vec<Result<AuthorizeResult, Status>> {
    let slots = or_alone(ledger.authorize_group(&items).await, items.len());
    // An authorization whose caller has given up is not placed on its own either.
    answer_items(items, slots, true, |item| {
        let ledger = ledger.clone();
        async move { ledger.authorize_hold(&item).await.map_err(Status::from) }
    })
    .await
}

async fn resolve_items(
    ledger: &Ledger,
    items: Vec<((String, Resolution), Option<Instant>)>,
) -> Vec<Result<ResolveResult, Status>> {
    let slots = or_alone(ledger.resolve_group(&items).await, items.len());
    // Resolutions left to run on their own run even past their caller's deadline (a
    // hold resolves once; a resend is answered ALREADY_RESOLVED).
    answer_items(items, slots, false, |(id, resolution)| {
        let ledger = ledger.clone();
        async move { ledger.resolve(&id, &resolution).await.map_err(Status::from) }
    })
    .await
}

/// A group's slots, or every item on its own when the group transaction failed.
fn or_alone<R, E: std::fmt::Display>(group: Result<Vec<Slot<R>>, E>, n: usize) -> Vec<Slot<R>> {
    group.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "group transaction failed; its items run one by one");
        (0..n).map(|_| Slot::Alone).collect()
    })
}

/// Most items of one group that run on their own at the same time.
const ALONE_CONCURRENCY: usize = 8;

/// Each item's answer: the group's where it decided, else `alone(item)` (at most
/// [`ALONE_CONCURRENCY`] at once; skipped past its deadline when `late_stays_late`).
async fn answer_items<I, R, F, Fut>(
    items: Vec<(I, Option<Instant>)>,
    slots: Vec<Slot<R>>,
    late_stays_late: bool,
    alone: F,
) -> Vec<Result<R, Status>>
where
    R: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = Result<R, Status>> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(ALONE_CONCURRENCY));
    let mut pending = Vec::with_capacity(items.len());
    for ((item, deadline), slot) in items.into_iter().zip(slots) {
        pending.push(match slot {
            Slot::Done(r) => Answer::Ready(Ok(r)),
            Slot::Late => Answer::Ready(Err(deadline_exceeded())),
            Slot::Alone if late_stays_late && past(deadline) => {
                Answer::Ready(Err(deadline_exceeded()))
            }
            Slot::Alone => {
                let limit = limit.clone();
                let work = alone(item);
                Answer::Running(tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    work.await
                }))
            }
        });
    }
    let mut out = Vec::with_capacity(pending.len());
    for answer in pending {
        out.push(match answer {
            Answer::Ready(r) => r,
            Answer::Running(handle) => handle.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a batch item task failed");
                Err(Status::internal("settlement failed to process an item"))
            }),
        });
    }
    out
}

enum Answer<R> {
    Ready(Result<R, Status>),
    Running(tokio::task::JoinHandle<Result<R, Status>>),
}

/// Accepted so far: what the group will write for one authorize item.
struct NewHold {
    index: usize,
    payer_account: String,
    amount: i64,
    /// Captured as it is placed ([`CheckedAuthorize::capture`]), with this fee.
    capture: bool,
    fee: i64,
}

/// Balance row of a payer as the group read it.
#[derive(Clone)]
struct Locked {
    debits_pending: i64,
    debits_posted: i64,
    credits_posted: i64,
    guarded: bool,
}

impl Locked {
    /// Holds `amount` more if the payer's funds cover it.
    fn take(&mut self, amount: i64) -> bool {
        let Some(pending) = self.debits_pending.checked_add(amount) else {
            return false;
        };
        let within = !self.guarded
            || pending
                .checked_add(self.debits_posted)
                .is_some_and(|owed| owed <= self.credits_posted);
        if within {
            self.debits_pending = pending;
        }
        within
    }
}

/// Whether the funds as read cover every accepted hold, taken in order.
fn all_funded(
    accepted: &[NewHold],
    items: &[(CheckedAuthorize, Option<Instant>)],
    payer_rows: &BTreeMap<(String, String), Locked>,
) -> bool {
    let mut rows = payer_rows.clone();
    accepted.iter().all(|h| {
        let key = (
            h.payer_account.clone(),
            items[h.index].0.payload.accepted.asset.clone(),
        );
        rows.get_mut(&key).is_some_and(|b| b.take(h.amount))
    })
}

/// The group read of [`Ledger::authorize_group`], with `$lock` after the payer keys'
/// lookup (`" FOR SHARE"` inside a transaction).
macro_rules! group_lookup {
    ($lock:literal) => {
        concat!(
            "WITH d AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
               AS d(request_id, merchant, payer_key, asset, n)), \
             k AS (SELECT public_key, account_id, revoked_at IS NOT NULL AS revoked FROM payer_keys \
               WHERE public_key = ANY($3) ORDER BY public_key",
            $lock,
            ") SELECT d.n, r.kind AS prior_kind, r.id AS prior_id, r.request_hash AS prior_hash, \
               r.amount AS prior_amount, r.debit_account AS prior_payer, \
               m.kind AS merchant_kind, m.closed_at IS NOT NULL AS merchant_closed, \
               m.fee_bps AS merchant_fee_bps, \
               k.account_id, k.revoked, b.debits_pending, b.debits_posted, b.credits_posted, \
               b.debits_must_not_exceed_credits AS guarded \
             FROM d \
             LEFT JOIN transfers r ON r.request_id = d.request_id \
             LEFT JOIN accounts m ON m.id = d.merchant \
             LEFT JOIN k ON k.public_key = d.payer_key \
             LEFT JOIN balances b ON b.account_id = k.account_id AND b.asset = d.asset"
        )
    };
}

/// The write of [`Ledger::resolve_group`]: `$gone` is a CTE deleting the holds'
/// open-hold rows (or nothing) and `$holds_ok` its check. Parameters `$1`-`$6` are
/// the balance moves ([`balance_moves!`]), `$7`-`$23` the resolutions.
///
/// The checks' arguments run in order: the open-hold rows are deleted first (when
/// one is gone, `AND` stops there and nothing else is written), then the rows are
/// written (counted only so that they are written before), and the balance rows,
/// which every group of the merchant waits on, are locked last.
macro_rules! resolve_write {
    ($gone:literal, $holds_ok:literal) => {
        concat!(
            "WITH ",
            $gone,
            balance_moves!(),
            ", r AS ( \
               INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount, \
                 reason, http_status, upstream_micros) \
               SELECT * FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[], \
                 $13::bigint[], $14::text[], $15::int[], $16::bigint[]) RETURNING 1), \
             f AS ( \
               INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, reason) \
               SELECT 'fee', x.merchant, $17, x.asset, x.fee, x.hold_id, 'platform_fee' \
               FROM unnest($9::text[], $10::text[], $18::bigint[], $12::text[], $7::text[]) \
                 AS x(merchant, asset, fee, hold_id, kind) WHERE x.fee > 0 RETURNING 1), \
             p AS ( \
               INSERT INTO payment_refunds (hold_id, captured, fee) \
               SELECT x.hold_id, x.posted, x.fee FROM unnest($12::text[], $11::bigint[], $18::bigint[], $7::text[]) \
                 AS x(hold_id, posted, fee, kind) WHERE x.kind = 'capture' RETURNING 1), \
             a AS ( \
               INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount, fee, http_status, \
                 upstream_micros) \
               SELECT * FROM unnest($19::text[], $20::text[], $9::text[], $8::text[], $10::text[], $21::bigint[], \
                 $18::bigint[], $15::int[], $16::bigint[]) RETURNING 1), \
             w AS ( \
               INSERT INTO webhook_outbox (merchant, event_type, payload) \
               SELECT e.merchant, 'payment.captured', e.body::jsonb \
               FROM unnest($9::text[], $22::text[], $19::text[]) AS e(merchant, body, event) \
               JOIN webhook_endpoints h ON h.merchant = e.merchant WHERE e.event = 'captured' RETURNING 1) \
             SELECT x402_group_checks(true, ",
            $holds_ok,
            " AND (SELECT count(*) FROM r) + (SELECT count(*) FROM f) + (SELECT count(*) FROM p) \
                   + (SELECT count(*) FROM a) + (SELECT count(*) FROM w) >= cardinality($7::text[]), \
               (SELECT count(*) FROM locked) = cardinality($1::text[]) \
                 AND (SELECT count(*) FROM changed) = cardinality($1::text[])), \
               (SELECT count(pg_notify($23, b)) FROM unnest($22::text[]) AS b)"
        )
    };
}

/// The SQLSTATE `x402_group_checks` raises when what a group read has changed.
const GROUP_CHECK_FAILED: &str = "X4G01";

/// Which of a group write's checks failed ("keys", "holds" or "balances"), if that
/// is what `err` is.
fn group_check_failed(err: &sqlx::Error) -> Option<&'static str> {
    let db = err.as_database_error()?;
    if db.code().as_deref() != Some(GROUP_CHECK_FAILED) {
        return None;
    }
    Some(match db.message() {
        "holds" => "holds",
        "balances" => "balances",
        _ => "keys",
    })
}

/// Where a group's statements run: one pooled connection in autocommit (each statement
/// commits on its own) or a transaction. Either way it is the connection to run on.
enum Session {
    Autocommit(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl Session {
    async fn start(pool: &PgPool, transaction: bool) -> Result<Session, sqlx::Error> {
        Ok(if transaction {
            Session::Transaction(pool.begin().await?)
        } else {
            Session::Autocommit(pool.acquire().await?)
        })
    }

    fn in_transaction(&self) -> bool {
        matches!(self, Session::Transaction(_))
    }

    /// Commits the transaction, if there is one (autocommit statements already have).
    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Session::Transaction(tx) => tx.commit().await,
            Session::Autocommit(_) => Ok(()),
        }
    }
}

impl std::ops::Deref for Session {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            Session::Autocommit(c) => c,
            Session::Transaction(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Session::Autocommit(c) => c,
            Session::Transaction(tx) => tx,
        }
    }
}

impl Ledger {
    /// Places the holds of a group of checked authorize items in one transaction.
    pub(crate) async fn authorize_group(
        &self,
        items: &[(CheckedAuthorize, Option<Instant>)],
    ) -> Result<Vec<Slot<AuthorizeResult>>, LedgerError> {
        let late: Vec<AtomicBool> = items.iter().map(|_| AtomicBool::new(false)).collect();
        let ensure_merchants = AtomicBool::new(false);
        let check_nonces = AtomicBool::new(false);
        let careful = AtomicBool::new(false);
        let read_first = AtomicBool::new(false);
        retrying(|| {
            self.try_authorize_group(
                items,
                &late,
                &ensure_merchants,
                &check_nonces,
                &careful,
                &read_first,
            )
        })
        .await
    }

    async fn try_authorize_group(
        &self,
        items: &[(CheckedAuthorize, Option<Instant>)],
        late: &[AtomicBool],
        ensure_merchants: &AtomicBool,
        check_nonces: &AtomicBool,
        careful: &AtomicBool,
        read_first: &AtomicBool,
    ) -> Result<Vec<Slot<AuthorizeResult>>, Attempt> {
        let mut out: Vec<Option<Slot<AuthorizeResult>>> = items.iter().map(|_| None).collect();
        let done = |out: &mut Vec<Option<Slot<AuthorizeResult>>>, i: usize, r: AuthorizeResult| {
            out[i] = Some(Slot::Done(r));
        };
        let mut live = Vec::with_capacity(items.len());
        let mut request_ids = HashSet::with_capacity(items.len());
        for (i, (item, deadline)) in items.iter().enumerate() {
            if past(*deadline) {
                late[i].store(true, Ordering::Relaxed);
            }
            if late[i].load(Ordering::Relaxed) {
                out[i] = Some(Slot::Late);
            } else if !item.volume_tiers.is_empty()
                || item.global_limit.is_some()
                || !request_ids.insert(&item.request_id)
            {
                out[i] = Some(Slot::Alone);
            } else {
                live.push(i);
            }
        }
        if live.is_empty() {
            return Ok(finish(out));
        }
        // A group first reads without locks and then writes everything in one
        // statement that commits on its own: two round trips to Postgres. That
        // statement checks under locks what the read decided on (keys unrevoked,
        // nonces and request ids free, balance rows there; funds are the overdraft
        // CHECK's) and rolls back whole if any of it changed. A group that meets such
        // a change, or needs more than the read to decide (nonces to look up,
        // merchant balance rows to create), runs again in a transaction that reads
        // the payer keys under lock.
        let fast = !careful.load(Ordering::Relaxed)
            && !check_nonces.load(Ordering::Relaxed)
            && !ensure_merchants.load(Ordering::Relaxed);
        // A fast group whose payer keys are all known, and none of whose items is
        // refused on its own (signature, expiry, amounts), skips the read and writes at
        // once: one round trip. The write checks what the read would have (keys
        // unrevoked, merchants open, request ids and nonces free, funds, balance rows),
        // and if any of it fails the group runs again reading first, which decides
        // each item's outcome in the usual order.
        let now = unix_now();
        // The fees of the merchants of items captured as they are placed: from the
        // read, or remembered (the write checks they are still the merchants' fees).
        let mut fee_bps: HashMap<String, i32> = HashMap::new();
        let known = if fast
            && !read_first.load(Ordering::Relaxed)
            && live
                .iter()
                .all(|&i| own_refusal(&items[i].0, now).is_none())
        {
            let keys: Vec<&str> = live
                .iter()
                .map(|&i| items[i].0.payload.payload.payer.as_str())
                .collect();
            let capturing: Vec<&str> = live
                .iter()
                .filter(|&&i| items[i].0.capture)
                .map(|&i| items[i].0.payload.accepted.pay_to.as_str())
                .collect();
            self.key_accounts.all(&keys).and_then(|accounts| {
                let fees = self.merchant_fees.all(&capturing)?;
                fee_bps.extend(capturing.iter().map(|m| (*m).to_owned()).zip(fees));
                Some(accounts)
            })
        } else {
            None
        };
        let write_first = known.is_some();
        let mut db = Session::start(self.pool(), !fast).await?;

        // Everything the group reads, in one statement, one row per live item: a
        // hold already placed under its request id (a replay), its merchant, its
        // payer key (in a transaction FOR SHARE: a revocation that commits before
        // this group stops its holds) and the payer's balance row. The lookups join
        // on unique keys only, never on `kind = 'hold'`, so no plan scans a partial
        // index of holds.
        let col = |f: &dyn Fn(&CheckedAuthorize) -> &str| -> Vec<&str> {
            live.iter().map(|&i| f(&items[i].0)).collect()
        };
        let mut accepted: Vec<NewHold> = Vec::with_capacity(live.len());
        let mut nonces = HashSet::with_capacity(live.len());
        // The payers' balance rows as read (no lock yet: they are locked only by the
        // update just before COMMIT; if a concurrent debit got there first the
        // overdraft CHECK refuses the update and the group runs again).
        let mut payer_rows: BTreeMap<(String, String), Locked> = BTreeMap::new();
        // The items that may be held, with their payers' accounts: every live item when
        // the keys are known, else those the read does not refuse.
        let mut admitted: Vec<(usize, String)> = Vec::with_capacity(live.len());
        let looked = if let Some(accounts) = known {
            admitted.extend(live.iter().copied().zip(accounts));
            Vec::new()
        } else {
            let request_ids = col(&|c| c.request_id.as_str());
            let merchant_ids = col(&|c| c.payload.accepted.pay_to.as_str());
            let key_ids = col(&|c| c.payload.payload.payer.as_str());
            let asset_ids = col(&|c| c.payload.accepted.asset.as_str());
            let lookup = sqlx::query(if fast {
                group_lookup!("")
            } else {
                group_lookup!(" FOR SHARE")
            })
            .bind(&request_ids)
            .bind(&merchant_ids)
            .bind(&key_ids)
            .bind(&asset_ids);
            let rows = lookup.fetch_all(&mut *db).await?;
            let mut looked: Vec<Option<sqlx::postgres::PgRow>> =
                live.iter().map(|_| None).collect();
            for row in rows {
                let n: i64 = row.try_get("n")?;
                if let Some(slot) = usize::try_from(n)
                    .ok()
                    .and_then(|n| n.checked_sub(1))
                    .and_then(|n| looked.get_mut(n))
                {
                    *slot = Some(row);
                }
            }
            looked
        };
        for (&i, row) in live.iter().zip(looked) {
            let item = &items[i].0;
            let no = |o: AuthorizeOutcome, m: &str| refused(&item.request_id, o, m);
            let Some(row) = row else {
                return Err(LedgerError::FailedPrecondition(
                    "the group lookup lost an item".into(),
                )
                .into());
            };
            // Replays of request ids already used.
            if row.try_get::<Option<String>, _>("prior_kind")?.as_deref() == Some("hold") {
                let hash: String = row.try_get("prior_hash")?;
                let result = if hash != item.request_hash {
                    no(
                        AuthorizeOutcome::IdempotencyConflict,
                        "request_id was already used for a different request",
                    )
                } else {
                    authorized(
                        &item.request_id,
                        row.try_get("prior_id")?,
                        to_u64(row.try_get("prior_amount")?),
                        row.try_get("prior_payer")?,
                    )
                };
                done(&mut out, i, result);
                continue;
            }
            // A close racing this group may still see its holds placed; they then
            // resolve (capture, void, expiry) like any other.
            let merchant_kind: Option<String> = row.try_get("merchant_kind")?;
            let payer_account: Option<String> = row.try_get("account_id")?;
            if let Some(bps) = row.try_get::<Option<i32>, _>("merchant_fee_bps")? {
                let merchant = &item.payload.accepted.pay_to;
                self.merchant_fees.learn(merchant, &bps);
                if item.capture {
                    fee_bps.insert(merchant.clone(), bps);
                }
            }
            let refusal = if merchant_kind.as_deref() != Some("merchant") {
                Some(no(
                    AuthorizeOutcome::UnknownMerchant,
                    "payTo is not a merchant account",
                ))
            } else if row.try_get::<Option<bool>, _>("merchant_closed")? == Some(true) {
                Some(no(
                    AuthorizeOutcome::MerchantClosed,
                    "payTo is a closed merchant account",
                ))
            } else if payer_account.is_none() {
                Some(no(
                    AuthorizeOutcome::UnknownKey,
                    "payer key is not registered",
                ))
            } else if row.try_get::<Option<bool>, _>("revoked")? == Some(true) {
                self.key_accounts.forget(&item.payload.payload.payer);
                Some(no(AuthorizeOutcome::KeyRevoked, "payer key was revoked"))
            } else {
                if let Some(account) = &payer_account {
                    self.key_accounts
                        .learn(&item.payload.payload.payer, account);
                }
                own_refusal(item, now)
            };
            if let Some(r) = refusal {
                done(&mut out, i, r);
                continue;
            }
            let payer_account = payer_account.unwrap_or_default();
            if let Some(guarded) = row.try_get::<Option<bool>, _>("guarded")? {
                payer_rows
                    .entry((payer_account.clone(), item.payload.accepted.asset.clone()))
                    .or_insert(Locked {
                        debits_pending: row.try_get("debits_pending")?,
                        debits_posted: row.try_get("debits_posted")?,
                        credits_posted: row.try_get("credits_posted")?,
                        guarded,
                    });
            }
            admitted.push((i, payer_account));
        }
        for (i, payer_account) in admitted {
            let item = &items[i].0;
            // A nonce repeated inside the group is decided after the group commits.
            if !nonces.insert((payer_account.clone(), item.payload.payload.nonce.as_str())) {
                out[i] = Some(Slot::Alone);
                continue;
            }
            let amount = to_i64(item.hold_amount)?;
            let bps = fee_bps
                .get(&item.payload.accepted.pay_to)
                .filter(|_| item.capture);
            accepted.push(NewHold {
                index: i,
                payer_account,
                amount,
                capture: bps.is_some(),
                fee: bps.map_or(0, |&b| fee_of(amount, b)),
            });
        }
        if accepted.is_empty() {
            db.commit().await?;
            return Ok(finish(out));
        }

        // Nonces already used: the hold insert's unique index finds them, so they are
        // looked up only by an attempt after an insert came up short, or when an item
        // is about to be refused for funds (a reused nonce is the earlier outcome).
        if !write_first
            && (check_nonces.load(Ordering::Relaxed) || !all_funded(&accepted, items, &payer_rows))
        {
            let payers: Vec<&str> = accepted.iter().map(|h| h.payer_account.as_str()).collect();
            let nonce_list: Vec<&str> = accepted
                .iter()
                .map(|h| items[h.index].0.payload.payload.nonce.as_str())
                .collect();
            let used_nonces = sqlx::query(
                "SELECT t.debit_account, t.nonce FROM unnest($1::text[], $2::text[]) AS k(account, nonce) \
                 JOIN transfers t ON t.debit_account = k.account AND t.nonce = k.nonce AND t.kind = 'hold'",
            )
            .bind(&payers)
            .bind(&nonce_list);
            let used: HashSet<(String, String)> = used_nonces
                .fetch_all(&mut *db)
                .await?
                .into_iter()
                .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, _>>()?;
            if !used.is_empty() {
                accepted.retain(|h| {
                    let item = &items[h.index].0;
                    let key = (h.payer_account.clone(), item.payload.payload.nonce.clone());
                    if used.contains(&key) {
                        out[h.index] = Some(Slot::Done(refused(
                            &item.request_id,
                            AuthorizeOutcome::NonceReused,
                            "nonce was already used",
                        )));
                        false
                    } else {
                        true
                    }
                });
            }
        }

        // Funds: take the items in order against the balance rows as read (a group
        // that wrote first leaves them to the overdraft CHECK).
        if !write_first {
            accepted.retain(|h| {
                let item = &items[h.index].0;
                let key = (h.payer_account.clone(), item.payload.accepted.asset.clone());
                let funded = match payer_rows.get_mut(&key) {
                    Some(b) => b.take(h.amount),
                    None => false,
                };
                if !funded {
                    out[h.index] = Some(Slot::Done(refused(
                        &item.request_id,
                        AuthorizeOutcome::InsufficientFunds,
                        "insufficient funds",
                    )));
                }
                funded
            });
        }
        if accepted.is_empty() {
            db.commit().await?;
            return Ok(finish(out));
        }
        // The moves: a hold adds to its payer's pending debits and its merchant's
        // pending credits; a hold captured as it is placed posts them instead, with
        // the platform's fee.
        let item_of = |h: &NewHold| &items[h.index].0;
        let mut moves = Moves::default();
        for h in &accepted {
            let a = &item_of(h).payload.accepted;
            let (payer, merchant) = if h.capture {
                (
                    Delta {
                        debits_posted: h.amount,
                        ..Delta::default()
                    },
                    Delta {
                        credits_posted: h.amount,
                        debits_posted: h.fee,
                        ..Delta::default()
                    },
                )
            } else {
                (
                    Delta {
                        debits_pending: h.amount,
                        ..Delta::default()
                    },
                    Delta {
                        credits_pending: h.amount,
                        ..Delta::default()
                    },
                )
            };
            moves.push(&h.payer_account, &a.asset, payer)?;
            moves.push(&a.pay_to, &a.asset, merchant)?;
            if h.fee > 0 {
                moves.push(
                    PLATFORM_ACCOUNT,
                    &a.asset,
                    Delta {
                        credits_posted: h.fee,
                        ..Delta::default()
                    },
                )?;
            }
        }
        // Merchant and platform balance rows: created on first use (a group that finds
        // one missing runs again and creates it).
        if db.in_transaction() && ensure_merchants.load(Ordering::Relaxed) {
            let mut rows: BTreeSet<(&str, &str)> = BTreeSet::new();
            for h in &accepted {
                let a = &item_of(h).payload.accepted;
                rows.insert((a.pay_to.as_str(), a.asset.as_str()));
                if h.fee > 0 {
                    rows.insert((PLATFORM_ACCOUNT, a.asset.as_str()));
                }
            }
            let (m_accounts, m_assets): (Vec<&str>, Vec<&str>) = rows.into_iter().unzip();
            sqlx::query(
                "INSERT INTO balances (account_id, asset, debits_must_not_exceed_credits) \
                 SELECT a.id, d.asset, a.kind = 'payer' FROM unnest($1::text[], $2::text[]) AS d(id, asset) \
                 JOIN accounts a ON a.id = d.id ON CONFLICT (account_id, asset) DO NOTHING",
            )
            .bind(&m_accounts)
            .bind(&m_assets)
            .execute(&mut *db)
            .await?;
        }
        // The merchants, each with the fee its captures used (none: not checked).
        let mut merchant_fees: BTreeMap<&str, Option<i32>> = BTreeMap::new();
        for h in &accepted {
            let merchant = item_of(h).payload.accepted.pay_to.as_str();
            let used = merchant_fees.entry(merchant).or_default();
            if h.capture {
                *used = fee_bps.get(merchant).copied();
            }
        }
        let (fee_merchants, fee_checks): (Vec<&str>, Vec<Option<i32>>) =
            merchant_fees.into_iter().unzip();
        let capture_col: Vec<bool> = accepted.iter().map(|h| h.capture).collect();
        let fee_col: Vec<i64> = accepted.iter().map(|h| h.fee).collect();
        let col = |f: &dyn Fn(&NewHold) -> String| accepted.iter().map(f).collect::<Vec<_>>();
        let payer_col = col(&|h| h.payer_account.clone());
        let merchant_col = col(&|h| item_of(h).payload.accepted.pay_to.clone());
        let asset_col = col(&|h| item_of(h).payload.accepted.asset.clone());
        let amount_col: Vec<i64> = accepted.iter().map(|h| h.amount).collect();
        let request_col = col(&|h| item_of(h).request_id.clone());
        let hash_col = col(&|h| item_of(h).request_hash.clone());
        let key_col = col(&|h| item_of(h).payload.payload.payer.clone());
        let nonce_col = col(&|h| item_of(h).payload.payload.nonce.clone());
        let route_col = col(&|h| item_of(h).route.clone());
        let resource_col = col(&|h| item_of(h).payload.payload.resource.clone());
        let ttl_col: Vec<i32> = accepted
            .iter()
            .map(|h| i32::try_from(item_of(h).hold_ttl_seconds).unwrap_or(i32::MAX))
            .collect();
        let authorized_col = accepted
            .iter()
            .map(|h| to_i64(item_of(h).amount_authorized))
            .collect::<Result<Vec<_>, _>>()?;
        let keys = distinct(key_col.iter().map(String::as_str));

        // A caller that has given up must not leave money held: leave its items out.
        // (Checked again before COMMIT when there is a transaction.)
        let gone = |late: &[AtomicBool]| {
            let mut gone = false;
            for h in &accepted {
                if past(items[h.index].1) {
                    late[h.index].store(true, Ordering::Relaxed);
                    gone = true;
                }
            }
            gone
        };
        if !db.in_transaction() && gone(late) {
            return Err(Attempt::Again);
        }

        // The holds, their open-hold rows (or, for holds captured as they are placed,
        // their captures, fees, refund-cap rows, webhook outbox rows, one analytics event
        // that counts the authorization and the capture, and both their notifications,
        // which the recorder then leaves out) and the balance moves in one statement,
        // balance rows locked last and in key order. The checks are the first column of a
        // one-row SELECT, so they always run, and their arguments run in order: payer
        // keys locked, holds and their rows inserted, balance rows locked, then changed.
        let moves_columns = moves.columns();
        let write = moves_columns
            .bind(sqlx::query_as::<_, (bool, Vec<String>, Vec<String>, i64)>(concat!(
                "WITH ",
                balance_moves!(),
                ", keys AS (SELECT public_key FROM payer_keys \
                   WHERE public_key = ANY($7) AND revoked_at IS NULL ORDER BY public_key FOR SHARE), \
                 hold AS ( \
                   INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, request_id, \
                     request_hash, payer_key, nonce, route, resource, expires_at, amount_authorized) \
                   SELECT 'hold', d.payer, d.merchant, d.asset, d.amount, d.request_id, d.request_hash, \
                     d.payer_key, d.nonce, d.route, d.resource, now() + d.ttl * interval '1 second', d.authorized \
                   FROM unnest($8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[], $13::text[], \
                     $14::text[], $15::text[], $16::text[], $17::text[], $18::int[], $19::bigint[]) \
                     AS d(payer, merchant, asset, amount, request_id, request_hash, payer_key, nonce, route, \
                       resource, ttl, authorized) \
                   ON CONFLICT DO NOTHING \
                   RETURNING id, request_id, expires_at, debit_account, credit_account, asset, amount, route), \
                 hx AS (SELECT h.*, x.capture, x.fee FROM hold h \
                   JOIN unnest($12::text[], $20::bool[], $21::bigint[]) AS x(request_id, capture, fee) \
                     ON x.request_id = h.request_id), \
                 opened AS (INSERT INTO open_holds (hold_id, expires_at) \
                   SELECT id, expires_at FROM hx WHERE NOT capture RETURNING 1), \
                 cap AS ( \
                   INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, \
                     pending_amount, reason) \
                   SELECT 'capture', debit_account, credit_account, asset, amount, id, amount, $26 \
                   FROM hx WHERE capture RETURNING 1), \
                 fee AS ( \
                   INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, reason) \
                   SELECT 'fee', credit_account, $22, asset, fee, id, 'platform_fee' \
                   FROM hx WHERE capture AND fee > 0 RETURNING 1), \
                 refundable AS (INSERT INTO payment_refunds (hold_id, captured, fee) \
                   SELECT id, amount, fee FROM hx WHERE capture RETURNING 1), \
                 ev AS (SELECT credit_account AS merchant, debit_account AS payer, asset, amount, fee, \
                     coalesce(route, '') AS route, jsonb_build_object('type', 'captured', 'transaction_id', id, \
                       'payer_account', debit_account, 'merchant_account', credit_account, 'asset', asset, \
                       'route', coalesce(route, ''), 'amount', amount, 'fee', fee, \
                       'at_unix_ms', (extract(epoch FROM clock_timestamp()) * 1000)::bigint) AS body \
                   FROM hx WHERE capture), \
                 an AS (INSERT INTO analytics_pending (event, route, merchant, payer, asset, amount, fee) \
                   SELECT 'debited', route, merchant, payer, asset, amount, fee FROM ev RETURNING 1), \
                 wh AS (INSERT INTO webhook_outbox (merchant, event_type, payload) \
                   SELECT ev.merchant, 'payment.captured', ev.body \
                   FROM ev JOIN webhook_endpoints w ON w.merchant = ev.merchant RETURNING 1) \
                 SELECT x402_group_checks((SELECT count(*) FROM keys) = cardinality($7::text[]) \
                       AND (SELECT count(*) FROM unnest($23::text[], $24::int[]) AS f(id, bps) \
                         JOIN accounts a ON a.id = f.id AND a.kind = 'merchant' AND a.closed_at IS NULL \
                           AND (f.bps IS NULL OR a.fee_bps = f.bps)) = cardinality($23::text[]), \
                     (SELECT count(*) FROM hold) = cardinality($8::text[]) \
                       AND (SELECT count(*) FROM opened) + (SELECT count(*) FROM cap) \
                         + (SELECT count(*) FROM fee) + (SELECT count(*) FROM refundable) \
                         + (SELECT count(*) FROM an) + (SELECT count(*) FROM wh) >= 0, \
                     (SELECT count(*) FROM locked) = cardinality($1::text[]) \
                       AND (SELECT count(*) FROM changed) = cardinality($1::text[])), \
                   ARRAY(SELECT request_id FROM hold ORDER BY request_id), \
                   ARRAY(SELECT id FROM hold ORDER BY request_id), \
                   (SELECT count(pg_notify($25, body::text)) FROM ( \
                     SELECT b.body FROM ev CROSS JOIN LATERAL (VALUES \
                       (1, (ev.body - 'fee') || jsonb_build_object('type', 'authorized')), (2, ev.body)) AS b(o, body) \
                     ORDER BY ev.body->>'transaction_id', b.o) AS announced)"
            )))
            .bind(&keys)
            .bind(&payer_col)
            .bind(&merchant_col)
            .bind(&asset_col)
            .bind(&amount_col)
            .bind(&request_col)
            .bind(&hash_col)
            .bind(&key_col)
            .bind(&nonce_col)
            .bind(&route_col)
            .bind(&resource_col)
            .bind(&ttl_col)
            .bind(&authorized_col)
            .bind(&capture_col)
            .bind(&fee_col)
            .bind(PLATFORM_ACCOUNT)
            .bind(&fee_merchants)
            .bind(&fee_checks)
            .bind(CHANNEL)
            .bind(DEBIT_REASON);
        let written = write.fetch_one(&mut *db).await;
        if write_first && written.is_err() {
            read_first.store(true, Ordering::Relaxed);
        }
        let mut ids: HashMap<String, String> = match written {
            Ok((_, request_ids, ids, _)) => request_ids.into_iter().zip(ids).collect(),
            Err(e) if is_overdraft(&e) => return Err(Attempt::Again),
            Err(e) => {
                return Err(match group_check_failed(&e) {
                    // A nonce or request id was taken since the read (or is used
                    // already): run again, looking nonces up.
                    Some("holds") => {
                        check_nonces.store(true, Ordering::Relaxed);
                        Attempt::Again
                    }
                    // A merchant's first hold: run again, creating its balance row.
                    Some("balances") if !ensure_merchants.swap(true, Ordering::Relaxed) => {
                        Attempt::Again
                    }
                    Some("balances") => {
                        LedgerError::FailedPrecondition("a balance row of a hold is missing".into())
                            .into()
                    }
                    // A payer key was revoked, or a merchant closed, since the read.
                    Some(_) => {
                        careful.store(true, Ordering::Relaxed);
                        Attempt::Again
                    }
                    None => e.into(),
                });
            }
        };
        if db.in_transaction() && gone(late) {
            return Err(Attempt::Again);
        }
        db.commit().await?;
        for h in accepted {
            let item = &items[h.index].0;
            let transaction_id = ids.remove(&item.request_id).unwrap_or_default();
            if h.capture {
                crate::metrics::METRICS.resolved("capture", item.hold_amount, h.fee);
            }
            out[h.index] = Some(Slot::Done(AuthorizeResult {
                captured: h.capture,
                ..authorized(
                    &item.request_id,
                    transaction_id,
                    item.hold_amount,
                    h.payer_account,
                )
            }));
        }
        Ok(finish(out))
    }

    /// Captures and voids a group of holds in one transaction.
    pub(crate) async fn resolve_group(
        &self,
        items: &[((String, Resolution), Option<Instant>)],
    ) -> Result<Vec<Slot<ResolveResult>>, LedgerError> {
        let careful = AtomicBool::new(false);
        retrying(|| self.try_resolve_group(items, &careful)).await
    }

    async fn try_resolve_group(
        &self,
        items: &[((String, Resolution), Option<Instant>)],
        careful: &AtomicBool,
    ) -> Result<Vec<Slot<ResolveResult>>, Attempt> {
        let mut out: Vec<Option<Slot<ResolveResult>>> = items.iter().map(|_| None).collect();
        let mut seen = HashSet::with_capacity(items.len());
        let mut live = Vec::with_capacity(items.len());
        for (i, ((id, _), _)) in items.iter().enumerate() {
            if seen.insert(id.as_str()) {
                live.push(i);
            } else {
                out[i] = Some(Slot::Alone);
            }
        }
        // Like an authorize group, a resolve group first reads without locks and
        // writes in one statement that commits on its own: it deletes the holds'
        // open-hold rows (the lock every resolution and the sweeper take) and checks
        // that it deleted every one, so a hold resolved or expired meanwhile rolls it
        // back whole. Such a group, or one whose balance rows are not all there, runs
        // again in a transaction that deletes the open-hold rows first.
        let fast = !careful.load(Ordering::Relaxed);
        let mut db = Session::start(self.pool(), !fast).await?;
        let ids: Vec<&str> = live.iter().map(|&i| items[i].0 .0.as_str()).collect();
        // `open`: whether the hold still has the open-hold row this group would delete.
        // One that does not (resolved or expired already, captured at authorize, or
        // partly captured) is answered on its own, rather than failing the group's
        // write for everyone.
        let details = sqlx::query(
            "SELECT t.id, t.kind, t.debit_account, t.credit_account, t.asset, t.amount, \
               coalesce(t.route, '') AS route, a.fee_bps, \
               EXISTS (SELECT 1 FROM open_holds o WHERE o.hold_id = t.id AND o.captured = 0) AS open \
             FROM transfers t JOIN accounts a ON a.id = t.credit_account \
             WHERE t.id = ANY($1)",
        )
        .bind(&ids);
        let rows = details.fetch_all(&mut *db).await?;
        let mut holds = HashMap::with_capacity(rows.len());
        let mut closed = HashSet::new();
        let mut bps: HashMap<String, i32> = HashMap::new();
        for row in rows {
            // Looked up by id alone: a `kind = 'hold'` filter lets the planner scan a
            // partial index of every hold.
            if row.try_get::<String, _>("kind")? != "hold" {
                continue;
            }
            let id: String = row.try_get("id")?;
            let payer: String = row.try_get("debit_account")?;
            let merchant: String = row.try_get("credit_account")?;
            let asset: String = row.try_get("asset")?;
            let amount: i64 = row.try_get("amount")?;
            let route: String = row.try_get("route")?;
            if !row.try_get::<bool, _>("open")? {
                closed.insert(id.clone());
            }
            bps.insert(merchant.clone(), row.try_get("fee_bps")?);
            holds.insert(id, (payer, merchant, asset, amount, route));
        }
        let mut candidates = Vec::with_capacity(live.len());
        for i in live {
            let (id, resolution) = &items[i].0;
            let Some(hold) = holds.get(id) else {
                out[i] = Some(Slot::Done(resolve_result(
                    id,
                    ResolveOutcome::NotFound,
                    0,
                    "no such hold",
                )));
                continue;
            };
            let hold_amount = to_u64(hold.3);
            if let Resolution::Capture { amount, .. } = resolution {
                if *amount > hold_amount {
                    out[i] = Some(Slot::Done(resolve_result(
                        id,
                        ResolveOutcome::ExceedsHold,
                        hold_amount,
                        "capture amount exceeds the hold",
                    )));
                    continue;
                }
            }
            if closed.contains(id) {
                out[i] = Some(Slot::Alone);
                continue;
            }
            candidates.push(i);
        }
        if candidates.is_empty() {
            db.commit().await?;
            return Ok(finish(out));
        }

        // Deleting the open-hold rows is the lock every resolution (and the sweeper)
        // takes; a hold someone else resolved is answered on its own afterwards. Holds
        // with partial captures settle on their own path (ledger.rs). Without a
        // transaction the write statement deletes them (and needs all of them).
        let mine = if !db.in_transaction() {
            candidates
        } else {
            let mut open_ids: Vec<&str> =
                candidates.iter().map(|&i| items[i].0 .0.as_str()).collect();
            open_ids.sort_unstable();
            let opened: HashSet<String> = sqlx::query_scalar(
                "DELETE FROM open_holds WHERE hold_id = ANY($1) AND captured = 0 RETURNING hold_id",
            )
            .bind(&open_ids)
            .fetch_all(&mut *db)
            .await?
            .into_iter()
            .collect();
            let mut mine = Vec::with_capacity(candidates.len());
            for i in candidates {
                if opened.contains(&items[i].0 .0) {
                    mine.push(i);
                } else {
                    out[i] = Some(Slot::Alone);
                }
            }
            mine
        };
        if mine.is_empty() {
            db.commit().await?;
            return Ok(finish(out));
        }

        struct Done<'a> {
            index: usize,
            id: &'a str,
            kind: &'static str,
            payer: &'a str,
            merchant: &'a str,
            asset: &'a str,
            route: &'a str,
            hold: i64,
            posted: i64,
            fee: i64,
        }
        let mut done = Vec::with_capacity(mine.len());
        for i in mine {
            let (id, resolution) = &items[i].0;
            let Some((payer, merchant, asset, hold, route)) = holds.get(id) else {
                continue;
            };
            let (kind, posted, fee) = match resolution {
                Resolution::Capture { amount, .. } => {
                    let posted = to_i64(*amount)?;
                    let fee = fee_of(posted, bps.get(merchant).copied().unwrap_or(0));
                    ("capture", posted, fee)
                }
                Resolution::Void { .. } => ("void", *hold, 0),
            };
            done.push(Done {
                index: i,
                id,
                kind,
                payer,
                merchant,
                asset,
                route,
                hold: *hold,
                posted,
                fee,
            });
        }
        // The platform's balance row of each fee asset (a group without a transaction
        // finds one missing by its check, and runs again in one).
        let fee_assets: Vec<&str> = distinct(done.iter().filter(|d| d.fee > 0).map(|d| d.asset));
        if db.in_transaction() && !fee_assets.is_empty() {
            sqlx::query(
                "INSERT INTO balances (account_id, asset, debits_must_not_exceed_credits) \
                 SELECT $1, a, false FROM unnest($2::text[]) AS a ON CONFLICT (account_id, asset) DO NOTHING",
            )
            .bind(PLATFORM_ACCOUNT)
            .bind(&fee_assets)
            .execute(&mut *db)
            .await?;
        }

        let reasons: Vec<Option<&str>> = done
            .iter()
            .map(|d| match &items[d.index].0 .1 {
                Resolution::Void { reason } => Some(reason.as_str()),
                Resolution::Capture { .. } => None,
            })
            .collect();
        let statuses: Vec<Option<i32>> = done
            .iter()
            .map(|d| match &items[d.index].0 .1 {
                Resolution::Capture { http_status, .. } => {
                    Some(i32::try_from(*http_status).unwrap_or(i32::MAX))
                }
                Resolution::Void { .. } => None,
            })
            .collect();
        let micros: Vec<Option<i64>> = done
            .iter()
            .map(|d| match &items[d.index].0 .1 {
                Resolution::Capture {
                    upstream_micros, ..
                } => Some(i64::try_from(*upstream_micros).unwrap_or(i64::MAX)),
                Resolution::Void { .. } => None,
            })
            .collect();
        let kinds: Vec<&str> = done.iter().map(|d| d.kind).collect();
        let payers: Vec<&str> = done.iter().map(|d| d.payer).collect();
        let merchants: Vec<&str> = done.iter().map(|d| d.merchant).collect();
        let assets: Vec<&str> = done.iter().map(|d| d.asset).collect();
        let posted: Vec<i64> = done.iter().map(|d| d.posted).collect();
        let hold_ids: Vec<&str> = done.iter().map(|d| d.id).collect();
        let held: Vec<i64> = done.iter().map(|d| d.hold).collect();
        let fees: Vec<i64> = done.iter().map(|d| d.fee).collect();
        // Analytics, webhook outbox rows and notifications: what every event says.
        let events: Vec<&str> = done
            .iter()
            .map(|d| {
                if d.kind == "capture" {
                    "captured"
                } else {
                    "voided"
                }
            })
            .collect();
        let routes: Vec<&str> = done.iter().map(|d| d.route).collect();
        let amounts: Vec<i64> = done
            .iter()
            .map(|d| {
                if d.kind == "capture" {
                    d.posted
                } else {
                    d.hold
                }
            })
            .collect();
        let bodies: Vec<String> = done
            .iter()
            .zip(&statuses)
            .zip(&amounts)
            .map(|((d, status), amount)| {
                let event = Event {
                    kind: if d.kind == "capture" {
                        "captured"
                    } else {
                        "voided"
                    },
                    transaction_id: d.id,
                    payer: d.payer,
                    merchant: d.merchant,
                    asset: d.asset,
                    route: d.route,
                    amount: *amount,
                };
                let mut body = event.json();
                if d.kind == "capture" {
                    body["fee"] = json!(d.fee);
                    body["http_status"] = json!(status.unwrap_or(0));
                }
                body.to_string()
            })
            .collect();
        // Balances: payers, merchants and the platform, once per row.
        let mut moves = Moves::default();
        for d in &done {
            moves.push(
                d.payer,
                d.asset,
                Delta {
                    debits_pending: -d.hold,
                    debits_posted: if d.kind == "capture" { d.posted } else { 0 },
                    ..Delta::default()
                },
            )?;
            moves.push(
                d.merchant,
                d.asset,
                Delta {
                    credits_pending: -d.hold,
                    credits_posted: if d.kind == "capture" { d.posted } else { 0 },
                    debits_posted: d.fee,
                    ..Delta::default()
                },
            )?;
            if d.fee > 0 {
                moves.push(
                    PLATFORM_ACCOUNT,
                    d.asset,
                    Delta {
                        credits_posted: d.fee,
                        ..Delta::default()
                    },
                )?;
            }
        }

        // Resolution rows, fee transfers, refund-cap rows, analytics, webhook outbox
        // rows, notifications and the balance moves, in one statement; without a
        // transaction it also deletes the open-hold rows, first. Its checks need
        // every open-hold row deleted and every balance row there.
        let moves_columns = moves.columns();
        let write = moves_columns
            .bind(sqlx::query_as::<_, (bool, i64)>(if !db.in_transaction() {
                resolve_write!(
                    "gone AS (DELETE FROM open_holds WHERE hold_id = ANY($12::text[]) AND captured = 0 \
                       RETURNING hold_id), ",
                    "(SELECT count(*) FROM gone) = cardinality($12::text[])"
                )
            } else {
                resolve_write!("", "true")
            }))
            .bind(&kinds)
            .bind(&payers)
            .bind(&merchants)
            .bind(&assets)
            .bind(&posted)
            .bind(&hold_ids)
            .bind(&held)
            .bind(&reasons)
            .bind(&statuses)
            .bind(&micros)
            .bind(PLATFORM_ACCOUNT)
            .bind(&fees)
            .bind(&events)
            .bind(&routes)
            .bind(&amounts)
            .bind(&bodies)
            .bind(CHANNEL);
        let written = write.fetch_one(&mut *db).await;
        match written {
            Ok(_) => {}
            Err(e) if constraint(&e) == Some("transfers_one_resolution") => {
                return Err(Attempt::Retry(e))
            }
            Err(e) => {
                return Err(match (group_check_failed(&e), db.in_transaction()) {
                    (Some("balances"), true) => LedgerError::FailedPrecondition(
                        "balance of a held account is missing".into(),
                    )
                    .into(),
                    // A hold resolved or expired since the read, or a platform
                    // balance row still to create.
                    (Some(_), _) => {
                        careful.store(true, Ordering::Relaxed);
                        Attempt::Again
                    }
                    (None, _) => e.into(),
                });
            }
        }
        db.commit().await?;
        for d in done {
            let posted = to_u64(d.posted);
            crate::metrics::METRICS.resolved(d.kind, posted, d.fee);
            let outcome = if d.kind == "capture" {
                ResolveOutcome::Captured
            } else {
                ResolveOutcome::Voided
            };
            out[d.index] = Some(Slot::Done(resolve_result(d.id, outcome, posted, "")));
        }
        Ok(finish(out))
    }
}

fn finish<R>(out: Vec<Option<Slot<R>>>) -> Vec<Slot<R>> {
    out.into_iter().map(|s| s.unwrap_or(Slot::Alone)).collect()
}

fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
