//! The ledger as a state machine against a model: random sequences of deposit,
//! authorize (including overdrafts and reused nonces), capture (including more than
//! the hold), void, expire, refund (partial, full, more than is left, of a payment
//! never captured, and replays of an earlier refund's idempotency key), partial
//! captures (running totals: new, repeated, going backwards, above the hold, after the
//! hold was resolved; then a final capture below, at or above them, a void or an
//! expiry that releases the rest, and refunds of what they captured) and repeated
//! resolutions run against the real service and real PostgreSQL, with the merchant
//! paying a platform fee (none, round, rounding every amount, large). After every step each outcome matches what the model predicts;
//! after every sequence the balances equal the model's and the invariant checker
//! finds nothing.
//!
//! Expiry: the hold's queue entry is made due (`open_holds.expires_at` in the past,
//! as if its TTL had passed) and the sweeper's own function runs, so no test waits
//! on the clock. The server's own sweeper is slowed down so it never races the model.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_update
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use x402_proto::settlement::v1::{AuthorizeOutcome, ResolveOutcome};
use x402_settlement::check::{check_ledger, CheckOptions};
use x402_settlement::server::ServerConfig;
use x402_settlement::Ledger;

const PAYERS: usize = 3;
/// What each payer holds before the sequence starts (about two authorizations), so
/// the holds that later operations name exist from the first steps.
const OPENING: u64 = 40_000;

#[derive(Debug, Clone)]
enum Op {
    Deposit {
        payer: usize,
        amount: u64,
    },
    Authorize {
        payer: usize,
        amount: u64,
    },
    /// Authorize again with the nonce of an earlier hold (by index).
    ReuseNonce {
        hold: usize,
    },
    /// Capture `permille`/1000 of the hold; above 1000 asks for more than the hold.
    Capture {
        hold: usize,
        permille: u64,
    },
    /// A partial capture naming the running total `permille`/1000 of the hold (above
    /// 1000: more than the hold); `repeat` sends the hold's previous total again.
    Partial {
        hold: usize,
        permille: u64,
        repeat: bool,
    },
    Void {
        hold: usize,
    },
    Expire {
        hold: usize,
    },
    /// Refund `permille`/1000 of what the hold captured (0: everything not refunded
    /// yet; above 1000: more than was captured); `replay` sends the hold's previous
    /// refund again with its idempotency key instead.
    Refund {
        hold: usize,
        permille: u64,
        replay: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PAYERS, 1u64..50_000).prop_map(|(payer, amount)| Op::Deposit { payer, amount }),
        (0..PAYERS, 1u64..40_000).prop_map(|(payer, amount)| Op::Authorize { payer, amount }),
        (0..PAYERS, 1u64..40_000).prop_map(|(payer, amount)| Op::Authorize { payer, amount }),
        (0usize..16).prop_map(|hold| Op::ReuseNonce { hold }),
        (0usize..16, 0u64..1100).prop_map(|(hold, permille)| Op::Capture { hold, permille }),
        (0usize..12, 0u64..1100, any::<bool>()).prop_map(|(hold, permille, repeat)| {
            Op::Partial {
                hold,
                permille,
                repeat,
            }
        }),
        (0usize..12, 0u64..1100).prop_map(|(hold, permille)| Op::Partial {
            hold,
            permille,
            repeat: false
        }),
        (0usize..16).prop_map(|hold| Op::Void { hold }),
        (0usize..16).prop_map(|hold| Op::Expire { hold }),
        (0usize..16, 0u64..1200, any::<bool>()).prop_map(|(hold, permille, replay)| Op::Refund {
            hold,
            permille,
            replay
        }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    Open,
    Captured(u64),
    Voided,
    Expired,
}

#[derive(Clone)]
struct ModelHold {
    transaction: String,
    payer: usize,
    amount: u64,
    nonce_item: common::Terms,
    state: HoldState,
    /// Posted to the merchant so far: the partial captures' running total, then the
    /// final capture's total.
    captured: u64,
    /// The last total a partial capture named.
    last_partial: Option<u64>,
    /// Refunded so far.
    refunded: u64,
    /// The platform's fee of what was captured, and what refunds gave back of it.
    fee: u64,
    fee_refunded: u64,
    /// The last refund that went through: (idempotency key, amount asked, refund id,
    /// amount refunded).
    last_refund: Option<(String, u64, String, u64)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ModelPayer {
    deposited: u64,
    held: u64,
    spent: u64,
    refunded: u64,
}

struct Model {
    payers: [ModelPayer; PAYERS],
    holds: Vec<ModelHold>,
    merchant_pending: u64,
    merchant_posted: u64,
    /// The merchant's debits: platform fees, and its part of each refund.
    merchant_debited: u64,
    /// The merchant's fee in basis points of each captured total.
    fee_bps: u64,
    /// Fees the platform took, and gave back with refunds.
    fees: u64,
    fees_refunded: u64,
}

impl Model {
    /// Takes the fee of hold `hold`'s new captured total: the fee of the total less
    /// the fees already taken on that hold.
    fn take_fee(&mut self, hold: usize, total: u64) {
        let fee = total * self.fee_bps / 10_000;
        let h = &mut self.holds[hold];
        let step = fee - h.fee;
        h.fee = fee;
        self.fees += step;
        self.merchant_debited += step;
    }
}

type Seen = std::sync::Mutex<HashMap<&'static str, usize>>;

fn count(seen: &Seen, what: &'static str) {
    if let Ok(mut seen) = seen.lock() {
        *seen.entry(what).or_default() += 1;
    }
}

impl Model {
    /// The hold an operation names: its index modulo the holds made so far.
    fn pick(&self, hold: usize) -> Option<usize> {
        (!self.holds.is_empty()).then(|| hold % self.holds.len())
    }

    /// Like `pick`, counted from the newest hold, which is the likeliest to be open.
    fn recent(&self, hold: usize) -> Option<usize> {
        self.pick(hold).map(|i| self.holds.len() - 1 - i)
    }
}

/// The platform account's (credits posted, debits posted): fees taken and returned.
async fn platform(h: &Harness) -> (u64, u64) {
    let (credits, debits): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(credits_posted), 0)::bigint, coalesce(sum(debits_posted), 0)::bigint \
         FROM balances WHERE account_id = $1",
    )
    .bind(x402_settlement::events::PLATFORM_ACCOUNT)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    (
        u64::try_from(credits).unwrap(),
        u64::try_from(debits).unwrap(),
    )
}

async fn run_sequence(
    h: &Harness,
    case: usize,
    fee_bps: u64,
    ops: &[Op],
    outcomes: &Seen,
) -> Result<(), TestCaseError> {
    let merchant = format!("model-merchant-{case}");
    h.merchant(&merchant).await;
    let mut payers = Vec::new();
    for i in 0..PAYERS {
        payers.push(h.payer(&format!("model-{case}-payer-{i}"), OPENING).await);
    }
    let mut model = Model {
        payers: [ModelPayer {
            deposited: OPENING,
            ..ModelPayer::default()
        }; PAYERS],
        holds: Vec::new(),
        merchant_pending: 0,
        merchant_posted: 0,
        merchant_debited: 0,
        fee_bps,
        fees: 0,
        fees_refunded: 0,
    };
    sqlx::query("UPDATE accounts SET fee_bps = $2 WHERE id = $1")
        .bind(&merchant)
        .bind(i32::try_from(fee_bps).unwrap())
        .execute(&h.pool)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let platform_before = platform(h).await;
    let ledger = Ledger::new(h.pool.clone());
    for (step, op) in ops.iter().enumerate() {
        let at = format!("step {step} {op:?}");
        match op.clone() {
            Op::Deposit { payer, amount } => {
                let mut client = h.op.clone();
                client
                    .deposit(x402_proto::settlement::v1::DepositRequest {
                        account_id: payers[payer].account.clone(),
                        asset: ASSET.into(),
                        amount,
                        idempotency_key: format!("model-{case}-{step}"),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| TestCaseError::fail(format!("{at}: {e}")))?;
                model.payers[payer].deposited += amount;
            }
            Op::Authorize { payer, amount } => {
                let mut t = terms(amount, &format!("model-{case}-{step}"));
                t.pay_to = merchant.clone();
                let proof = signed_proof(&payers[payer], &t);
                let r = h
                    .authorize(item(&format!("model-{case}-{step}"), proof, amount))
                    .await;
                let p = &mut model.payers[payer];
                let available = p.deposited + p.refunded - p.held - p.spent;
                if amount <= available {
                    prop_assert_eq!(outcome(&r), AuthorizeOutcome::Authorized, "{}", at);
                    p.held += amount;
                    model.merchant_pending += amount;
                    model.holds.push(ModelHold {
                        transaction: r.transaction_id.clone(),
                        payer,
                        amount,
                        nonce_item: t,
                        state: HoldState::Open,
                        captured: 0,
                        last_partial: None,
                        refunded: 0,
                        fee: 0,
                        fee_refunded: 0,
                        last_refund: None,
                    });
                } else {
                    prop_assert_eq!(outcome(&r), AuthorizeOutcome::InsufficientFunds, "{}", at);
                }
            }
            Op::ReuseNonce { hold } => {
                let Some(hold) = model.pick(hold) else {
                    continue;
                };
                let mh = model.holds[hold].clone();
                let proof = signed_proof(&payers[mh.payer], &mh.nonce_item);
                let r = h
                    .authorize(item(&format!("model-{case}-{step}"), proof, mh.amount))
                    .await;
                prop_assert_eq!(outcome(&r), AuthorizeOutcome::NonceReused, "{}", at);
            }
            Op::Capture { hold, permille } => {
                let Some(hold) = model.pick(hold) else {
                    continue;
                };
                let mh = model.holds[hold].clone();
                let amount = mh.amount * permille / 1000 + u64::from(permille > 1000);
                let r = h.capture(&mh.transaction, amount).await;
                let got = resolved(&r);
                match mh.state {
                    HoldState::Open if amount > mh.amount => {
                        prop_assert_eq!(got, ResolveOutcome::ExceedsHold, "{}", at);
                    }
                    // After partial captures the capture names the final total, never
                    // below what they posted: it posts the difference and releases
                    // what is still held.
                    HoldState::Open => {
                        let total = amount.max(mh.captured);
                        prop_assert_eq!(got, ResolveOutcome::Captured, "{}", at);
                        prop_assert_eq!(r.amount, total, "{}", at);
                        let rest = mh.amount - mh.captured;
                        let step = total - mh.captured;
                        let p = &mut model.payers[mh.payer];
                        p.held -= rest;
                        p.spent += step;
                        model.merchant_pending -= rest;
                        model.merchant_posted += step;
                        model.holds[hold].state = HoldState::Captured(total);
                        model.holds[hold].captured = total;
                        model.take_fee(hold, total);
                        if mh.captured > 0 {
                            count(outcomes, "final_capture_after_partials");
                        }
                    }
                    // The same capture again is answered the same; anything else is
                    // refused, and nothing moves.
                    HoldState::Captured(c) if c == amount => {
                        prop_assert_eq!(got, ResolveOutcome::Captured, "{}", at);
                    }
                    HoldState::Captured(_) | HoldState::Voided | HoldState::Expired => {
                        if amount > mh.amount {
                            prop_assert!(
                                got == ResolveOutcome::ExceedsHold
                                    || got == ResolveOutcome::AlreadyResolved,
                                "{}: {:?}",
                                at,
                                got
                            );
                        } else {
                            prop_assert_eq!(got, ResolveOutcome::AlreadyResolved, "{}", at);
                        }
                    }
                }
            }
            Op::Partial {
                hold,
                permille,
                repeat,
            } => {
                let Some(hold) = model.recent(hold) else {
                    continue;
                };
                let mh = model.holds[hold].clone();
                let total = match (mh.last_partial, repeat) {
                    (Some(t), true) => t,
                    _ => mh.amount * permille / 1000 + u64::from(permille > 1000),
                };
                let r = h.partial(&mh.transaction, total).await;
                let got = resolved(&r);
                model.holds[hold].last_partial = Some(total);
                if total > mh.amount {
                    prop_assert_eq!(got, ResolveOutcome::ExceedsHold, "{}", at);
                    prop_assert_eq!(r.amount, mh.amount, "{}", at);
                    count(outcomes, "partial_above_hold");
                    continue;
                }
                if mh.state != HoldState::Open {
                    prop_assert_eq!(got, ResolveOutcome::AlreadyResolved, "{}", at);
                    count(outcomes, "partial_after_resolution");
                    continue;
                }
                // A total at or below what is captured posts nothing and answers
                // the captured total; a higher one posts what it adds.
                prop_assert_eq!(got, ResolveOutcome::Captured, "{}", at);
                let after = total.max(mh.captured);
                prop_assert_eq!(r.amount, after, "{}", at);
                let step = after - mh.captured;
                if step == 0 {
                    count(outcomes, "partial_unchanged");
                    continue;
                }
                count(outcomes, "partial_posted");
                let p = &mut model.payers[mh.payer];
                p.held -= step;
                p.spent += step;
                model.merchant_pending -= step;
                model.merchant_posted += step;
                model.holds[hold].captured = after;
                model.take_fee(hold, after);
            }
            Op::Void { hold } => {
                let Some(hold) = model.pick(hold) else {
                    continue;
                };
                let mh = model.holds[hold].clone();
                let r = h.void(&mh.transaction).await;
                let got = resolved(&r);
                // A void releases what partial captures left held, and answers that.
                let rest = mh.amount - mh.captured;
                match mh.state {
                    HoldState::Open => {
                        prop_assert_eq!(got, ResolveOutcome::Voided, "{}", at);
                        prop_assert_eq!(r.amount, rest, "{}", at);
                        model.payers[mh.payer].held -= rest;
                        model.merchant_pending -= rest;
                        model.holds[hold].state = HoldState::Voided;
                        if mh.captured > 0 {
                            count(outcomes, "void_after_partials");
                        }
                    }
                    HoldState::Voided => {
                        prop_assert_eq!(got, ResolveOutcome::Voided, "{}", at);
                        prop_assert_eq!(r.amount, rest, "{}", at);
                    }
                    _ => prop_assert_eq!(got, ResolveOutcome::AlreadyResolved, "{}", at),
                }
            }
            Op::Expire { hold } => {
                let Some(hold) = model.pick(hold) else {
                    continue;
                };
                let mh = model.holds[hold].clone();
                // Time passes for this hold only: its queue entry falls due.
                sqlx::query(
                    "UPDATE open_holds SET expires_at = now() - interval '1 second' WHERE hold_id = $1",
                )
                .bind(&mh.transaction)
                .execute(&h.pool)
                .await
                .map_err(|e| TestCaseError::fail(format!("{at}: {e}")))?;
                let expired = ledger
                    .expire_due_holds(100)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("{at}: {e}")))?;
                if mh.state == HoldState::Open {
                    prop_assert_eq!(expired, 1, "{}", at);
                    let rest = mh.amount - mh.captured;
                    model.payers[mh.payer].held -= rest;
                    model.merchant_pending -= rest;
                    model.holds[hold].state = HoldState::Expired;
                    if mh.captured > 0 {
                        count(outcomes, "expire_after_partials");
                    }
                } else {
                    prop_assert_eq!(expired, 0, "{}", at);
                }
            }
            Op::Refund {
                hold,
                permille,
                replay,
            } => {
                let Some(hold) = model.pick(hold) else {
                    continue;
                };
                let mh = model.holds[hold].clone();
                let (key, amount) = match (&mh.last_refund, replay) {
                    (Some((key, asked, _, _)), true) => (key.clone(), *asked),
                    _ => {
                        let captured = if mh.captured > 0 {
                            mh.captured
                        } else {
                            mh.amount
                        };
                        (
                            format!("model-{case}-{step}"),
                            captured * permille / 1000 + u64::from(permille > 1000),
                        )
                    }
                };
                let mut client = h.op.clone();
                let answer = client
                    .refund(x402_proto::settlement::v1::RefundRequest {
                        transaction_id: mh.transaction.clone(),
                        amount,
                        reason: "model".into(),
                        idempotency_key: key.clone(),
                    })
                    .await
                    .map(|r| r.into_inner());
                // The same key and request: the same refund, nothing moves again.
                if let (Some((_, _, id, refunded)), true) = (&mh.last_refund, replay) {
                    let r = answer.map_err(|e| TestCaseError::fail(format!("{at}: {e}")))?;
                    prop_assert_eq!(&r.refund_id, id, "{}", at);
                    prop_assert_eq!(r.amount, *refunded, "{}", at);
                    continue;
                }
                // What was captured is refundable, by partial captures too (while
                // the hold is open, and after a void or expiry released the rest).
                let left = mh.captured - mh.refunded;
                let want = if amount == 0 { left } else { amount };
                if want == 0 || want > left {
                    let code = answer.err().map(|e| e.code());
                    prop_assert_eq!(code, Some(tonic::Code::FailedPrecondition), "{}", at);
                    continue;
                }
                let r = answer.map_err(|e| TestCaseError::fail(format!("{at}: {e}")))?;
                prop_assert_eq!(r.amount, want, "{}", at);
                if mh.last_partial.is_some() {
                    count(outcomes, "refund_after_partials");
                }
                // The platform returns its fee pro rata over all refunds so far (the
                // share of what is refunded after this one, rounded down, less what
                // earlier ones returned), never more than this refund; the refund that
                // empties the payment returns the rest of it.
                let after = mh.refunded + want;
                let share = if after >= mh.captured {
                    mh.fee
                } else {
                    after * mh.fee / mh.captured
                };
                let fee_part = share.saturating_sub(mh.fee_refunded).min(want);
                model.payers[mh.payer].refunded += want;
                model.merchant_debited += want - fee_part;
                model.fees_refunded += fee_part;
                model.holds[hold].fee_refunded += fee_part;
                model.holds[hold].refunded += want;
                model.holds[hold].last_refund = Some((key, amount, r.refund_id, want));
            }
        }
    }

    for (i, payer) in payers.iter().enumerate() {
        let b = h.balance(&payer.account).await;
        let m = model.payers[i];
        prop_assert_eq!(b.credits_posted, m.deposited + m.refunded, "payer {}", i);
        prop_assert_eq!(b.debits_pending, m.held, "payer {}", i);
        prop_assert_eq!(b.debits_posted, m.spent, "payer {}", i);
        prop_assert_eq!(
            b.available,
            i64::try_from(m.deposited + m.refunded - m.held - m.spent).unwrap(),
            "payer {}",
            i
        );
    }
    let b = h.balance(&merchant).await;
    prop_assert_eq!(b.credits_pending, model.merchant_pending);
    prop_assert_eq!(b.credits_posted, model.merchant_posted);
    prop_assert_eq!(b.debits_posted, model.merchant_debited);
    let platform_after = platform(h).await;
    prop_assert_eq!(platform_after.0 - platform_before.0, model.fees);
    prop_assert_eq!(platform_after.1 - platform_before.1, model.fees_refunded);

    let report = check_ledger(&h.pool, CheckOptions::default())
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(report.is_clean(), "{}", report.to_text());
    Ok(())
}

#[test]
fn random_ledger_operations_match_the_model_and_keep_every_invariant() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(start_with(ServerConfig {
        hold_sweep_interval: Duration::from_secs(3600),
        ..ServerConfig::default()
    }));
    let cases: u32 = std::env::var("X402_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    let seen: Seen = Default::default();
    // What partial captures met: posted, unchanged, refused, and what followed them.
    let outcomes: Seen = Default::default();
    // No fee, a round one, one that rounds every amount, and a large one.
    let fees = proptest::sample::select(vec![0u64, 250, 333, 1999]);
    let sequences = (fees, proptest::collection::vec(op(), 1..40));
    let result = runner.run(&sequences, |(fee_bps, ops)| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut seen) = seen.lock() {
            for o in &ops {
                let name = match o {
                    Op::Deposit { .. } => "deposit",
                    Op::Authorize { .. } => "authorize",
                    Op::ReuseNonce { .. } => "reuse_nonce",
                    Op::Capture { .. } => "capture",
                    Op::Partial { repeat: true, .. } => "partial_or_repeat",
                    Op::Partial { .. } => "partial",
                    Op::Void { .. } => "void",
                    Op::Expire { .. } => "expire",
                    Op::Refund { replay: true, .. } => "refund_or_replay",
                    Op::Refund { .. } => "refund",
                };
                *seen.entry(name).or_default() += 1;
            }
        }
        rt.block_on(run_sequence(&h, n, fee_bps, &ops, &outcomes))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner().unwrap();
    eprintln!(
        "model: {} sequences, {} operations {:?}, partial captures {:?}",
        case.into_inner(),
        seen.values().sum::<usize>(),
        seen,
        outcomes.into_inner().unwrap()
    );
    drop(h);
}
