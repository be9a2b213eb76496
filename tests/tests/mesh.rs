//! Many Envoys on one ledger: two Envoys, each calling its own settlement process, both
//! settlement processes on one PostgreSQL database, one payer under concurrent load.
//! Balances come out exact, a payer short of funds is charged for exactly as many
//! requests as it can afford, and the same proof sent through both Envoys at once is
//! paid once. The ledger checker runs after.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tokio::task::JoinSet;
use x402_client::wire::{encode_header, PaymentPayload, HEADER_PAYMENT_SIGNATURE};
use x402_e2e::envoy::{Envoy, EnvoyOptions};
use x402_e2e::settlement::Settlement;
use x402_e2e::stack::{default_filter_config, Answer, Stack, MERCHANT, PAID_PRICE};
use x402_settlement::check::{check_ledger, check_paid_responses, CheckOptions, PaidResponse};

const PATH: &str = "/paid/quote?sym=MESH";

/// The second half of the mesh: a settlement process on the stack's database and an
/// Envoy that calls it, in front of the same upstream.
struct SecondSide {
    envoy: Envoy,
    settlement: Settlement,
}

async fn second_side(stack: &Stack) -> SecondSide {
    let settlement = Settlement::start(stack.settlement.database_url())
        .await
        .unwrap();
    let mut options = EnvoyOptions::new(
        stack.upstream.port(),
        settlement.port(),
        &default_filter_config(),
    );
    options.concurrency = 2;
    let envoy = Envoy::start(options).await.unwrap();
    SecondSide { envoy, settlement }
}

/// Sends `proof` for [`PATH`] through the Envoy at `envoy_authority`. The proof is bound
/// to the first Envoy's authority, which every request carries as its Host, as a load
/// balancer in front of both would.
fn send(
    tasks: &mut JoinSet<(usize, Answer)>,
    stack: &Stack,
    envoy_index: usize,
    envoy_authority: String,
    proof: &PaymentPayload,
) {
    let http = stack.http.clone();
    let host = stack.envoy.authority();
    let header = encode_header(proof);
    tasks.spawn(async move {
        let response = http
            .get(format!("http://{envoy_authority}{PATH}"))
            .header("host", host)
            .header(HEADER_PAYMENT_SIGNATURE, header)
            .send()
            .await
            .unwrap();
        (envoy_index, Answer::read(response).await.unwrap())
    });
}

fn receipt(answer: &Answer) -> PaidResponse {
    let r = x402_client::parse_receipt(&answer.headers).expect("a receipt on a paid answer");
    PaidResponse {
        transaction: r.transaction,
        amount: r.amount.parse().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_and_two_settlements_on_one_ledger_charge_exactly() {
    let stack = Stack::start_with(&default_filter_config(), |o| o.concurrency = 2)
        .await
        .unwrap();
    let second = second_side(&stack).await;
    let authorities = [stack.envoy.authority(), second.envoy.authority()];
    let mut paid: Vec<PaidResponse> = Vec::new();
    let mut paid_per_envoy = [0usize; 2];

    // Load: 80 requests at once, alternating between the Envoys, from a payer who can
    // afford exactly 60 of them (plus change that buys nothing).
    let affordable = 60u64;
    let change = PAID_PRICE / 2;
    let funds = affordable * PAID_PRICE + change;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let mut tasks = JoinSet::new();
    for i in 0..80 {
        let proof = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
        send(
            &mut tasks,
            &stack,
            i % 2,
            authorities[i % 2].clone(),
            &proof,
        );
    }
    let mut refused = 0;
    while let Some(joined) = tasks.join_next().await {
        let (envoy_index, answer) = joined.unwrap();
        match answer.status {
            200 => {
                paid.push(receipt(&answer));
                paid_per_envoy[envoy_index] += 1;
            }
            402 => {
                assert_eq!(
                    answer.error_code().as_deref(),
                    Some("insufficient_funds"),
                    "{}",
                    answer.body_text()
                );
                refused += 1;
            }
            other => panic!(
                "unexpected {other}: {}\n{}",
                answer.body_text(),
                stack.logs()
            ),
        }
    }
    // Every refusal happened with less than the price left after the holds of requests
    // that were all captured, so the payer is charged for exactly what it can afford.
    assert_eq!(paid.len() as u64, affordable, "{refused} refused");
    assert_eq!(refused, 80 - affordable as usize);
    assert!(
        paid_per_envoy.iter().all(|n| *n > 0),
        "both Envoys and both settlements served paid requests: {paid_per_envoy:?}"
    );
    stack
        .wait_for_settled_balance(&payer, change as i64)
        .await
        .unwrap();

    // Replays across the mesh: each fresh proof sent through both Envoys at the same
    // moment is paid exactly once; the other copy is refused as a reused nonce.
    let funds2 = 1_000 * PAID_PRICE;
    let (payer2, key2) = stack.new_payer(funds2).await.unwrap();
    let pairs = 15;
    let mut tasks = JoinSet::new();
    for _ in 0..pairs {
        let proof = stack.signed_proof(&key2, "GET", PATH, PAID_PRICE).unwrap();
        send(&mut tasks, &stack, 0, authorities[0].clone(), &proof);
        send(&mut tasks, &stack, 1, authorities[1].clone(), &proof);
    }
    let mut replays_paid = Vec::new();
    let mut reused = 0;
    while let Some(joined) = tasks.join_next().await {
        let (_, answer) = joined.unwrap();
        match (answer.status, answer.error_code().as_deref()) {
            (200, _) => replays_paid.push(receipt(&answer)),
            (402, Some("nonce_reused")) => reused += 1,
            (status, code) => panic!(
                "unexpected {status} {code:?}: {}\n{}",
                answer.body_text(),
                stack.logs()
            ),
        }
    }
    assert_eq!((replays_paid.len(), reused), (pairs, pairs));
    paid.extend(replays_paid);
    stack
        .wait_for_settled_balance(&payer2, (funds2 - pairs as u64 * PAID_PRICE) as i64)
        .await
        .unwrap();

    // The merchant received exactly what the payers paid, once per receipt.
    let total = (affordable + pairs as u64) * PAID_PRICE;
    stack
        .wait_for_settled_balance(MERCHANT, total as i64)
        .await
        .unwrap();
    // Both settlement processes read the same ledger.
    let seen_by_second = second.settlement.balance(MERCHANT, "USD").await.unwrap();
    assert_eq!(seen_by_second.available, total as i64);

    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    let violations = check_paid_responses(&pool, &paid, false).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
}
