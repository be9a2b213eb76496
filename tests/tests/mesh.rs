//! Many Envoys on one ledger: two Envoys, each calling its own settlement process, both
//! settlement processes on one PostgreSQL database, one payer under concurrent load.
//! Balances come out exact, a payer short of funds is charged for exactly as many
//! requests as it can afford, and the same proof sent through both Envoys at once is
//! paid once. A route's global rate limit, counted by settlement in Postgres, holds
//! exactly across both Envoys and both settlement processes. The ledger checker runs
//! after.

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

async fn second_side(stack: &Stack, filter_config: &str) -> SecondSide {
    let settlement = Settlement::start(stack.settlement.database_url())
        .await
        .unwrap();
    let mut options = EnvoyOptions::new(stack.upstream.port(), settlement.port(), filter_config);
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
    send_to(tasks, stack, envoy_index, envoy_authority, PATH, proof);
}

/// [`send`] for another path.
fn send_to(
    tasks: &mut JoinSet<(usize, Answer)>,
    stack: &Stack,
    envoy_index: usize,
    envoy_authority: String,
    path: &'static str,
    proof: &PaymentPayload,
) {
    let http = stack.http.clone();
    let host = stack.envoy.authority();
    let header = encode_header(proof);
    tasks.spawn(async move {
        let response = http
            .get(format!("http://{envoy_authority}{path}"))
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
    PaidResponse::from_receipt(r).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_and_two_settlements_on_one_ledger_charge_exactly() {
    let stack = Stack::start_with(&default_filter_config(), |o| o.concurrency = 2)
        .await
        .unwrap();
    let second = second_side(&stack, &default_filter_config()).await;
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

/// The default routes behind two with a global limit: 30 per payer, and 10 per client
/// address. The window is the longest allowed (30 days, aligned to the epoch), so a run
/// never straddles two windows.
fn global_limit_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(&default_filter_config()).unwrap();
    let window = 30 * 86_400;
    let limited = serde_json::json!([
        { "name": "per-payer", "match": { "path_prefix": "/paid/global" }, "price": "0.01",
          "global_limit": { "max_requests": PER_PAYER_LIMIT, "window_seconds": window, "message": "30 a month" } },
        { "name": "per-client", "match": { "path_prefix": "/paid/byclient" }, "price": "0.01",
          "global_limit": { "max_requests": PER_CLIENT_LIMIT, "window_seconds": window, "key": "client" } }
    ]);
    let routes = config["routes"].as_array_mut().unwrap();
    for (i, route) in limited.as_array().unwrap().iter().enumerate() {
        routes.insert(i, route.clone());
    }
    config.to_string()
}

const PER_PAYER_LIMIT: usize = 30;
const PER_CLIENT_LIMIT: usize = 10;
const GLOBAL_PATH: &str = "/paid/global?sym=G";
const BY_CLIENT_PATH: &str = "/paid/byclient?sym=C";

/// Sends `count` fresh proofs per key for `path` at once, alternating between the two
/// Envoys; returns the answers with the Envoy each came through.
async fn burst(
    stack: &Stack,
    authorities: &[String; 2],
    keys: &[&x402_client::PayerKey],
    path: &'static str,
    count: usize,
) -> Vec<(usize, Answer)> {
    let mut tasks = JoinSet::new();
    for i in 0..count {
        for key in keys {
            let proof = stack.signed_proof(key, "GET", path, PAID_PRICE).unwrap();
            send_to(
                &mut tasks,
                stack,
                i % 2,
                authorities[i % 2].clone(),
                path,
                &proof,
            );
        }
    }
    let mut answers = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        answers.push(joined.unwrap());
    }
    answers
}

/// Asserts that every answer is a 200 or a global-limit 429; returns the receipts and
/// how many 200s each Envoy gave.
fn paid_or_limited(
    stack: &Stack,
    answers: &[(usize, Answer)],
    message: &str,
) -> (Vec<PaidResponse>, [usize; 2]) {
    let mut paid = Vec::new();
    let mut per_envoy = [0usize; 2];
    for (envoy_index, answer) in answers {
        match answer.status {
            200 => {
                paid.push(receipt(answer));
                per_envoy[*envoy_index] += 1;
            }
            429 => {
                let retry_after: u64 = answer.header("retry-after").unwrap().parse().unwrap();
                assert!((1..=30 * 86_400).contains(&retry_after), "{retry_after}");
                let json = answer.json().unwrap();
                assert_eq!(json["error"], "rate_limited");
                assert_eq!(json["message"], message);
                assert!(answer.header("payment-response").is_none());
            }
            other => panic!(
                "unexpected {other}: {}\n{}",
                answer.body_text(),
                stack.logs()
            ),
        }
    }
    (paid, per_envoy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_is_exact_across_two_envoys_and_two_settlements() {
    let config = global_limit_config();
    let stack = Stack::start_with(&config, |o| o.concurrency = 2)
        .await
        .unwrap();
    let second = second_side(&stack, &config).await;
    let authorities = [stack.envoy.authority(), second.envoy.authority()];
    let funds = 1_000 * PAID_PRICE;

    // Per payer: 80 concurrent paid requests from one payer, half through each Envoy
    // (each with its own settlement process): exactly 30 are served and charged.
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let answers = burst(&stack, &authorities, &[&key], GLOBAL_PATH, 80).await;
    let (mut paid, per_envoy) = paid_or_limited(&stack, &answers, "30 a month");
    assert_eq!(paid.len(), PER_PAYER_LIMIT, "{}", stack.logs());
    assert!(
        per_envoy.iter().all(|n| *n > 0),
        "both Envoys served: {per_envoy:?}"
    );
    // Another payer has a window of its own.
    let (payer2, key2) = stack.new_payer(funds).await.unwrap();
    let answers = burst(&stack, &authorities, &[&key2], GLOBAL_PATH, 4).await;
    let (paid2, _) = paid_or_limited(&stack, &answers, "30 a month");
    assert_eq!(paid2.len(), 4);
    paid.extend(paid2);
    // An unpaid request never reaches settlement: it is challenged as usual.
    let unpaid = stack.send_unpaid("GET", GLOBAL_PATH).await.unwrap();
    assert_eq!(unpaid.status, 402);

    // Per client address: two payers on one address share its 10.
    let (payer3, key3) = stack.new_payer(funds).await.unwrap();
    let (payer4, key4) = stack.new_payer(funds).await.unwrap();
    let answers = burst(&stack, &authorities, &[&key3, &key4], BY_CLIENT_PATH, 15).await;
    let (paid3, _) = paid_or_limited(&stack, &answers, "too many requests; retry later");
    assert_eq!(paid3.len(), PER_CLIENT_LIMIT, "{}", stack.logs());
    paid.extend(paid3);

    // The upstream saw only what was paid, and payers paid only for it: a 429 held
    // nothing.
    assert_eq!(
        stack.upstream.served().count_path_prefix("/paid/global"),
        PER_PAYER_LIMIT + 4
    );
    assert_eq!(
        stack.upstream.served().count_path_prefix("/paid/byclient"),
        PER_CLIENT_LIMIT
    );
    let price = PAID_PRICE as i64;
    let funds = funds as i64;
    stack
        .wait_for_settled_balance(&payer, funds - PER_PAYER_LIMIT as i64 * price)
        .await
        .unwrap();
    stack
        .wait_for_settled_balance(&payer2, funds - 4 * price)
        .await
        .unwrap();
    let served = (PER_PAYER_LIMIT + 4 + PER_CLIENT_LIMIT) as i64;
    stack
        .wait_for_settled_balance(MERCHANT, served * price)
        .await
        .unwrap();
    let spent3 = funds - stack.balance(&payer3).await.unwrap();
    let spent4 = funds - stack.balance(&payer4).await.unwrap();
    assert_eq!(spent3 + spent4, PER_CLIENT_LIMIT as i64 * price);

    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    let violations = check_paid_responses(&pool, &paid, false).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
}
