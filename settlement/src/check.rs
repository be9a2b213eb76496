//! The ledger invariant checker: SQL over the whole ledger that proves nothing was
//! lost, created or charged twice. The schema's constraints already refuse most bad
//! rows one at a time; the checker re-derives the invariants across rows (sums,
//! pairs, the balances against the transfers that made them), so it also catches a
//! bug that slipped between two constraints, a hand edit or a restore gone wrong.
//!
//! Every check is one query that returns the offending rows (nothing when the
//! invariant holds); [`check_ledger`] runs them all and reports each violation with
//! its invariant's name. [`check_paid_responses`] adds the end-to-end invariant:
//! every response a client saw as paid has exactly one capture.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{PgPool, Row};

/// One broken invariant and the row that breaks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Short stable name of the invariant (e.g. `asset_balanced`).
    pub invariant: &'static str,
    /// What is wrong, naming the account, asset, hold or nonce.
    pub detail: String,
}

/// What the checker looked at and what it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Names of the invariants checked, in order.
    pub invariants: Vec<&'static str>,
    pub violations: Vec<Violation>,
    /// Rows looked at, for the report.
    pub transfers: i64,
    pub holds: i64,
    pub balances: i64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.is_clean(),
            "invariants": self.invariants,
            "transfers": self.transfers,
            "holds": self.holds,
            "balances": self.balances,
            "violations": self.violations.iter().map(|v| json!({
                "invariant": v.invariant,
                "detail": v.detail,
            })).collect::<Vec<_>>(),
        })
    }

    /// A human summary: one line when clean, one line per violation otherwise.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} invariants over {} transfers ({} holds) and {} balances: {}",
            self.invariants.len(),
            self.transfers,
            self.holds,
            self.balances,
            if self.is_clean() {
                "all hold".to_owned()
            } else {
                format!("{} violations", self.violations.len())
            }
        );
        for v in &self.violations {
            out.push_str(&format!("\n  {}: {}", v.invariant, v.detail));
        }
        out
    }
}

/// Options of a check.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// How long past its `expires_at` an unresolved hold may stay open before it
    /// counts as a violation (the sweeper runs every second or so; a stopped
    /// settlement sweeps when it comes back).
    pub expiry_grace: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            expiry_grace: Duration::from_secs(60),
        }
    }
}

/// One invariant: a name and a query returning one text column `detail` per
/// offending row.
struct Invariant {
    name: &'static str,
    sql: &'static str,
}

/// The balance rows as the transfers imply them. Every kind but a hold and its
/// releases (deposit, capture, refund, fee, adjustment, ...) posts `amount` from
/// `debit_account` to `credit_account`; a hold adds to both pending counters; each
/// partial capture posts its step and takes it off them; the final resolution of a
/// hold (capture, void, expire) takes off what partial captures left
/// (`pending_amount - captured_before`), and a final capture posts its total less
/// what the partial captures posted.
const DERIVED_BALANCES: &str = "
    WITH t AS (
        SELECT debit_account, credit_account, asset,
               CASE WHEN kind IN ('hold', 'void', 'expire') THEN 0
                    WHEN kind = 'capture' THEN amount - coalesce(captured_before, 0)
                    ELSE amount END AS posted,
               CASE WHEN kind = 'hold' THEN amount
                    WHEN kind = 'partial_capture' THEN -amount
                    WHEN kind IN ('capture', 'void', 'expire') THEN -(pending_amount - coalesce(captured_before, 0))
                    ELSE 0 END AS pending
        FROM transfers
    ),
    moves AS (
        SELECT debit_account AS account_id, asset, posted AS debits_posted, pending AS debits_pending,
               0::bigint AS credits_posted, 0::bigint AS credits_pending
        FROM t
        UNION ALL
        SELECT credit_account, asset, 0, 0, posted, pending
        FROM t
    )
    SELECT account_id, asset,
           sum(debits_pending)::numeric AS debits_pending, sum(debits_posted)::numeric AS debits_posted,
           sum(credits_pending)::numeric AS credits_pending, sum(credits_posted)::numeric AS credits_posted
    FROM moves GROUP BY account_id, asset";

fn invariants() -> Vec<Invariant> {
    vec![
        Invariant {
            name: "asset_balanced",
            // Double entry: per asset, all debits equal all credits, posted and pending.
            sql: "SELECT format('asset %s: debits posted %s / pending %s, credits posted %s / pending %s', \
                    asset, sum(debits_posted), sum(debits_pending), sum(credits_posted), sum(credits_pending)) \
                  FROM balances GROUP BY asset \
                  HAVING sum(debits_posted::numeric) <> sum(credits_posted::numeric) \
                      OR sum(debits_pending::numeric) <> sum(credits_pending::numeric)",
        },
        Invariant {
            name: "balances_match_transfers",
            // Every counter equals what the immutable transfers add up to, and no
            // transfer moves money on an account without a balance row.
            sql: "WITH derived AS (DERIVED) \
                  SELECT format('%s/%s: balance row (dp %s, dP %s, cp %s, cP %s) but transfers say (dp %s, dP %s, cp %s, cP %s)', \
                    coalesce(b.account_id, d.account_id), coalesce(b.asset, d.asset), \
                    b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, \
                    d.debits_pending, d.debits_posted, d.credits_pending, d.credits_posted) \
                  FROM balances b FULL OUTER JOIN derived d ON d.account_id = b.account_id AND d.asset = b.asset \
                  WHERE coalesce(b.debits_pending, 0) <> coalesce(d.debits_pending, 0) \
                     OR coalesce(b.debits_posted, 0) <> coalesce(d.debits_posted, 0) \
                     OR coalesce(b.credits_pending, 0) <> coalesce(d.credits_pending, 0) \
                     OR coalesce(b.credits_posted, 0) <> coalesce(d.credits_posted, 0)",
        },
        Invariant {
            name: "balance_within_bounds",
            // Counters never negative; a payer never owes (held or spent) more than
            // it paid in; exactly payers carry that guard.
            sql: "SELECT format('%s/%s (%s): dp %s dP %s cp %s cP %s guard %s', \
                    b.account_id, b.asset, a.kind, b.debits_pending, b.debits_posted, \
                    b.credits_pending, b.credits_posted, b.debits_must_not_exceed_credits) \
                  FROM balances b JOIN accounts a ON a.id = b.account_id \
                  WHERE b.debits_pending < 0 OR b.debits_posted < 0 OR b.credits_pending < 0 OR b.credits_posted < 0 \
                     OR b.debits_must_not_exceed_credits <> (a.kind = 'payer') \
                     OR (a.kind = 'payer' AND b.debits_pending::numeric + b.debits_posted > b.credits_posted)",
        },
        Invariant {
            name: "money_flows_right_way",
            // Deposits come from system:credit to a payer; holds go from a payer to
            // a merchant; a resolution repeats its hold's accounts and asset.
            sql: "SELECT format('%s %s: %s -> %s (%s)', t.kind, t.id, t.debit_account, t.credit_account, t.asset) \
                  FROM transfers t \
                  JOIN accounts d ON d.id = t.debit_account JOIN accounts c ON c.id = t.credit_account \
                  LEFT JOIN transfers h ON h.id = t.pending_id \
                  WHERE (t.kind = 'deposit' AND (t.debit_account <> 'system:credit' OR c.kind <> 'payer')) \
                     OR (t.kind = 'hold' AND (d.kind <> 'payer' OR c.kind <> 'merchant')) \
                     OR (t.kind IN ('capture', 'void', 'expire', 'partial_capture') AND (h.id IS NULL OR h.kind <> 'hold' \
                         OR h.debit_account <> t.debit_account OR h.credit_account <> t.credit_account \
                         OR h.asset <> t.asset))",
        },
        Invariant {
            name: "hold_resolved_at_most_once",
            sql: "SELECT format('hold %s has %s resolutions (%s)', pending_id, count(*), string_agg(kind, ',')) \
                  FROM transfers WHERE kind IN ('capture', 'void', 'expire') \
                  GROUP BY pending_id HAVING count(*) > 1",
        },
        Invariant {
            name: "hold_resolved_or_unexpired",
            // An open hold is in the work queue and not overdue; a resolved one is not
            // in the queue any more.
            sql: "SELECT format('hold %s: expires %s, resolution %s, queued %s', h.id, h.expires_at, \
                    coalesce(r.kind, 'none'), o.hold_id IS NOT NULL) \
                  FROM transfers h \
                  LEFT JOIN transfers r ON r.pending_id = h.id AND r.kind IN ('capture', 'void', 'expire') \
                  LEFT JOIN open_holds o ON o.hold_id = h.id \
                  WHERE h.kind = 'hold' AND ( \
                     (r.id IS NULL AND (o.hold_id IS NULL OR h.expires_at < now() - $1 * interval '1 millisecond')) \
                     OR (r.id IS NOT NULL AND o.hold_id IS NOT NULL))",
        },
        Invariant {
            name: "open_holds_are_holds",
            sql: "SELECT format('queued %s is not a hold', o.hold_id) FROM open_holds o \
                  LEFT JOIN transfers h ON h.id = o.hold_id AND h.kind = 'hold' WHERE h.id IS NULL",
        },
        Invariant {
            name: "captured_within_held",
            // A capture posts at most its hold and no less than its partial
            // captures, a void or expiry releases exactly what they left held, and a
            // hold is never more than the client authorized.
            sql: "SELECT format('%s %s of hold %s: amount %s, captured before %s, hold %s, authorized %s', \
                    r.kind, r.id, h.id, r.amount, r.captured_before, h.amount, h.amount_authorized) \
                  FROM transfers r JOIN transfers h ON h.id = r.pending_id \
                  WHERE r.kind IN ('capture', 'void', 'expire', 'partial_capture') AND ( \
                     r.pending_amount <> h.amount OR r.amount > h.amount \
                     OR coalesce(r.captured_before, 0) < 0 \
                     OR (r.kind = 'capture' AND coalesce(r.captured_before, 0) > r.amount) \
                     OR (r.kind IN ('void', 'expire') AND r.amount + coalesce(r.captured_before, 0) <> h.amount) \
                     OR (r.kind = 'partial_capture' AND (r.amount <= 0 OR r.captured_before IS NULL \
                         OR r.captured_before + r.amount > h.amount))) \
                  UNION ALL \
                  SELECT format('hold %s: amount %s above authorized %s', id, amount, amount_authorized) \
                  FROM transfers WHERE kind = 'hold' AND (amount_authorized IS NULL OR amount > amount_authorized)",
        },
        Invariant {
            name: "partial_captures_within_held",
            // The partial captures of a hold sum to at most the hold, each starts
            // where the previous ended, and the hold's final resolution (or, while
            // it is open, its captured counter) accounts for exactly their sum.
            sql: "WITH parts AS ( \
                    SELECT pending_id AS id, sum(amount)::numeric AS total, count(*) AS n, \
                      count(DISTINCT captured_before) AS starts, max(captured_before + amount)::numeric AS reached \
                    FROM transfers WHERE kind = 'partial_capture' GROUP BY pending_id) \
                  SELECT format('hold %s: partial captures %s (%s rows, %s starts, reaching %s), hold %s, \
                    resolution %s with captured before %s, open counter %s', \
                    h.id, coalesce(p.total, 0), coalesce(p.n, 0), coalesce(p.starts, 0), coalesce(p.reached, 0), \
                    h.amount, coalesce(r.kind, 'none'), r.captured_before, o.captured) \
                  FROM transfers h \
                  LEFT JOIN parts p ON p.id = h.id \
                  LEFT JOIN transfers r ON r.pending_id = h.id AND r.kind IN ('capture', 'void', 'expire') \
                  LEFT JOIN open_holds o ON o.hold_id = h.id \
                  WHERE h.kind = 'hold' AND (p.id IS NOT NULL OR coalesce(r.captured_before, 0) <> 0 \
                      OR coalesce(o.captured, 0) <> 0) AND ( \
                     coalesce(p.total, 0) > h.amount OR coalesce(p.starts, 0) <> coalesce(p.n, 0) \
                     OR coalesce(p.reached, 0) <> coalesce(p.total, 0) \
                     OR (r.id IS NOT NULL AND coalesce(r.captured_before, 0) <> coalesce(p.total, 0)) \
                     OR (o.hold_id IS NOT NULL AND o.captured <> coalesce(p.total, 0)))",
        },
        Invariant {
            name: "refunded_within_captured",
            // What refunds (and refunded fees) of one payment return to its payer never
            // exceeds what it captured, and its fees never exceed the capture either.
            // One join and one pass over the payments' rows (a subquery per payment scans
            // transfers once per hold: no partial index covers all of these kinds).
            sql: "WITH per_hold AS ( \
                    SELECT h.id, \
                      coalesce(sum(CASE WHEN c.kind = 'capture' THEN c.amount - coalesce(c.captured_before, 0) \
                                        WHEN c.kind = 'partial_capture' THEN c.amount END), 0) AS captured, \
                      coalesce(sum(CASE WHEN c.kind IN ('refund', 'fee_refund') \
                                         AND c.credit_account = h.debit_account THEN c.amount END), 0) AS returned, \
                      coalesce(sum(CASE WHEN c.kind = 'fee' THEN c.amount END), 0) AS fees \
                    FROM transfers h LEFT JOIN transfers c ON c.pending_id = h.id \
                      AND c.kind IN ('capture', 'partial_capture', 'refund', 'fee_refund', 'fee') \
                    WHERE h.kind = 'hold' GROUP BY h.id) \
                  SELECT format('payment %s: captured %s, returned to payer %s, fees %s', id, captured, returned, fees) \
                  FROM per_hold WHERE returned > captured OR fees > captured \
                  UNION ALL \
                  SELECT format('%s %s points at %s, which is not a payment', f.kind, f.id, coalesce(f.pending_id, '(nothing)')) \
                  FROM transfers f LEFT JOIN transfers h ON h.id = f.pending_id AND h.kind = 'hold' \
                  WHERE f.kind IN ('refund', 'fee_refund', 'fee') AND h.id IS NULL",
        },
        Invariant {
            name: "nonce_used_once",
            // Per payer account and per key: one hold per nonce, ever.
            sql: "SELECT format('nonce %s of account %s: %s holds', nonce, debit_account, count(*)) \
                  FROM transfers WHERE kind = 'hold' GROUP BY debit_account, nonce HAVING count(*) > 1 \
                  UNION ALL \
                  SELECT format('nonce %s of key %s: %s holds', nonce, payer_key, count(*)) \
                  FROM transfers WHERE kind = 'hold' GROUP BY payer_key, nonce HAVING count(*) > 1",
        },
        Invariant {
            name: "hold_key_belongs_to_payer",
            sql: "SELECT format('hold %s: key %s is not a key of %s', t.id, t.payer_key, t.debit_account) \
                  FROM transfers t LEFT JOIN payer_keys k ON k.public_key = t.payer_key \
                  WHERE t.kind = 'hold' AND (k.public_key IS NULL OR k.account_id <> t.debit_account)",
        },
    ]
}

/// Checks every ledger invariant over the whole database.
pub async fn check_ledger(pool: &PgPool, options: CheckOptions) -> Result<Report, sqlx::Error> {
    // One snapshot for every query, so a ledger in use is checked consistently.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The checker reads whole tables: sequential scans are its right plans (the pool's
    // sessions turn them off for the paid path's key lookups, `db::SESSION_SETTINGS`).
    sqlx::query("SET LOCAL enable_seqscan = on")
        .execute(&mut *tx)
        .await?;
    let grace_ms = i64::try_from(options.expiry_grace.as_millis()).unwrap_or(i64::MAX);
    let mut report = Report::default();
    for inv in invariants() {
        report.invariants.push(inv.name);
        let sql = inv.sql.replace("DERIVED", DERIVED_BALANCES);
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        if sql.contains("$1") {
            q = q.bind(grace_ms);
        }
        for detail in q.fetch_all(&mut *tx).await? {
            report.violations.push(Violation {
                invariant: inv.name,
                detail,
            });
        }
    }
    let counts = sqlx::query(
        "SELECT (SELECT count(*) FROM transfers) AS transfers, \
                (SELECT count(*) FROM transfers WHERE kind = 'hold') AS holds, \
                (SELECT count(*) FROM balances) AS balances",
    )
    .fetch_one(&mut *tx)
    .await?;
    report.transfers = counts.try_get("transfers")?;
    report.holds = counts.try_get("holds")?;
    report.balances = counts.try_get("balances")?;
    tx.commit().await?;
    Ok(report)
}

/// A response a client saw as paid: 2xx with a `PAYMENT-RESPONSE` receipt naming
/// `transaction` (the hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidResponse {
    pub transaction: String,
    /// The amount the receipt names.
    pub amount: u64,
}

impl PaidResponse {
    /// The response a receipt names; `None` when its amount is not an integer.
    pub fn from_receipt(receipt: x402_proto::wire::SettleResponse) -> Option<PaidResponse> {
        Some(PaidResponse {
            amount: receipt.amount.parse().ok()?,
            transaction: receipt.transaction,
        })
    }
}

/// Checks that every paid response has exactly one capture of its hold, for at most
/// the receipt's amount. When `settlement_was_unreachable` (the run made settlement
/// unreachable around capture time and says so), an expired hold is accepted in
/// place of the capture; a void never is (nor, for a payment captured at authorize,
/// the refund a Void makes), and neither is a transaction id seen twice.
pub async fn check_paid_responses(
    pool: &PgPool,
    paid: &[PaidResponse],
    settlement_was_unreachable: bool,
) -> Result<Vec<Violation>, sqlx::Error> {
    let mut violations = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in paid {
        if !seen.insert(p.transaction.as_str()) {
            violations.push(Violation {
                invariant: "paid_response_captured_once",
                detail: format!("transaction {} was receipted twice", p.transaction),
            });
        }
    }
    let ids: Vec<String> = paid.iter().map(|p| p.transaction.clone()).collect();
    let rows = sqlx::query(
        "SELECT want.id, h.amount AS held, \
           (SELECT count(*) FROM transfers c WHERE c.pending_id = want.id AND c.kind = 'capture') AS captures, \
           (SELECT max(c.amount) FROM transfers c WHERE c.pending_id = want.id AND c.kind = 'capture') AS captured, \
           (SELECT string_agg(CASE WHEN r.kind = 'refund' THEN 'void' ELSE r.kind END, ',') \
              FROM transfers r WHERE r.pending_id = want.id \
              AND (r.kind IN ('void', 'expire') OR (r.kind = 'refund' AND r.idempotency_key = $2 || want.id))) \
              AS released \
         FROM unnest($1::text[]) AS want(id) \
         LEFT JOIN transfers h ON h.id = want.id AND h.kind = 'hold'",
    )
    .bind(&ids)
    .bind(crate::ledger::VOID_REFUND_KEY_PREFIX)
    .fetch_all(pool)
    .await?;
    let amounts: std::collections::HashMap<&str, u64> = paid
        .iter()
        .map(|p| (p.transaction.as_str(), p.amount))
        .collect();
    for r in rows {
        let id: String = r.try_get("id")?;
        let held: Option<i64> = r.try_get("held")?;
        let captures: i64 = r.try_get("captures")?;
        let captured: Option<i64> = r.try_get("captured")?;
        let released: Option<String> = r.try_get("released")?;
        let receipted = amounts.get(id.as_str()).copied().unwrap_or(0);
        let problem = if held.is_none() {
            Some("no such hold".to_owned())
        } else if captures == 1 && released.is_none() {
            match captured.and_then(|c| u64::try_from(c).ok()) {
                Some(c) if c <= receipted => None,
                other => Some(format!(
                    "captured {other:?}, above the receipt's {receipted}"
                )),
            }
        } else if captures == 0
            && settlement_was_unreachable
            && released.as_deref() == Some("expire")
        {
            None
        } else if captures == 0 && released.is_none() {
            Some("not captured (hold still open)".to_owned())
        } else {
            Some(format!(
                "{captures} captures, released by {}",
                released.as_deref().unwrap_or("nothing")
            ))
        };
        if let Some(problem) = problem {
            violations.push(Violation {
                invariant: "paid_response_captured_once",
                detail: format!("transaction {id}: {problem}"),
            });
        }
    }
    Ok(violations)
}
