//! The ledger through its gRPC API, against a real PostgreSQL: money moves exactly,
//! every resolution is idempotent, and the database refuses what must not happen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use x402_proto::settlement::v1::*;
use x402_settlement::server::ServerConfig;

#[tokio::test]
async fn deposits_credit_the_payer_once_per_idempotency_key() {
    let h = start().await;
    let p = h.payer("alice", 0).await;
    let mut op = h.op.clone();
    let deposit = |amount: u64, key: &str| DepositRequest {
        account_id: p.account.clone(),
        asset: ASSET.into(),
        amount,
        idempotency_key: key.into(),
    };
    let first = op
        .deposit(deposit(1_000_000, "buy-1"))
        .await
        .unwrap()
        .into_inner();
    let again = op
        .deposit(deposit(1_000_000, "buy-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.transaction_id, again.transaction_id);
    let b = h.balance("alice").await;
    assert_eq!((b.credits_posted, b.available), (1_000_000, 1_000_000));

    let conflict = op.deposit(deposit(5, "buy-1")).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    op.deposit(deposit(250, "")).await.unwrap();
    assert_eq!(h.balance("alice").await.available, 1_000_250);
    let system = h.balance_of("system:credit").await;
    assert_eq!(system.debits_posted, 1_000_250);

    assert_eq!(
        op.deposit(deposit(0, "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut unknown = deposit(1, "");
    unknown.account_id = "nobody".into();
    assert_eq!(
        op.deposit(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    h.merchant(MERCHANT).await;
    let mut to_merchant = deposit(1, "");
    to_merchant.account_id = MERCHANT.into();
    assert_eq!(
        op.deposit(to_merchant).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn authorize_then_capture_moves_exactly_the_captured_amount() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("bob", 100_000).await;

    let r = h.authorize(paid(&p, "req-1", 10_000)).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::Authorized, "{}", r.message);
    assert_eq!((r.held_amount, r.payer_account.as_str()), (10_000, "bob"));
    let b = h.balance("bob").await;
    assert_eq!((b.debits_pending, b.available), (10_000, 90_000));
    assert_eq!(h.balance(MERCHANT).await.credits_pending, 10_000);
    assert_eq!(h.payment(&r.transaction_id).await.status, "held");

    let c = h.capture(&r.transaction_id, 10_000).await;
    assert_eq!((resolved(&c), c.amount), (ResolveOutcome::Captured, 10_000));
    let b = h.balance("bob").await;
    assert_eq!(
        (b.debits_pending, b.debits_posted, b.available),
        (0, 10_000, 90_000)
    );
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (0, 10_000));
    let pay = h.payment(&r.transaction_id).await;
    assert_eq!(
        (pay.status.as_str(), pay.held, pay.captured, pay.voided),
        ("captured", 10_000, 10_000, 0)
    );
    assert_eq!(
        (pay.payer_key.as_str(), pay.route.as_str()),
        (p.public_key.as_str(), "quote")
    );
}

#[tokio::test]
async fn capturing_less_than_the_hold_returns_the_rest_and_more_is_refused() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("carol", 100_000).await;
    let r = h.authorize(paid(&p, "req-1", 10_000)).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::Authorized);

    let over = h.capture(&r.transaction_id, 10_001).await;
    assert_eq!(resolved(&over), ResolveOutcome::ExceedsHold);
    let b = h.balance("carol").await;
    assert_eq!(
        (b.debits_pending, b.debits_posted),
        (10_000, 0),
        "nothing moves on EXCEEDS_HOLD"
    );
    assert_eq!(h.balance(MERCHANT).await.credits_posted, 0);

    let c = h.capture(&r.transaction_id, 4_000).await;
    assert_eq!((resolved(&c), c.amount), (ResolveOutcome::Captured, 4_000));
    let b = h.balance("carol").await;
    assert_eq!(
        (b.debits_pending, b.debits_posted, b.available),
        (0, 4_000, 96_000)
    );
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (0, 4_000));
    let pay = h.payment(&r.transaction_id).await;
    assert_eq!((pay.captured, pay.voided), (4_000, 6_000));
}

#[tokio::test]
async fn each_hold_resolves_once_and_repeats_return_the_same_outcome() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("dave", 100_000).await;

    let voided = h.authorize(paid(&p, "v", 3_000)).await.transaction_id;
    let v = h.void(&voided).await;
    assert_eq!((resolved(&v), v.amount), (ResolveOutcome::Voided, 3_000));
    assert_eq!(resolved(&h.void(&voided).await), ResolveOutcome::Voided);
    assert_eq!(
        resolved(&h.capture(&voided, 3_000).await),
        ResolveOutcome::AlreadyResolved
    );
    let b = h.balance("dave").await;
    assert_eq!(
        (b.debits_pending, b.debits_posted, b.available),
        (0, 0, 100_000)
    );
    assert_eq!(h.payment(&voided).await.status, "voided");

    let captured = h.authorize(paid(&p, "c", 2_000)).await.transaction_id;
    assert_eq!(
        resolved(&h.capture(&captured, 1_500).await),
        ResolveOutcome::Captured
    );
    let again = h.capture(&captured, 1_500).await;
    assert_eq!(
        (resolved(&again), again.amount),
        (ResolveOutcome::Captured, 1_500)
    );
    assert_eq!(
        resolved(&h.capture(&captured, 1_000).await),
        ResolveOutcome::AlreadyResolved
    );
    assert_eq!(
        resolved(&h.void(&captured).await),
        ResolveOutcome::AlreadyResolved
    );
    let b = h.balance("dave").await;
    assert_eq!(
        (b.debits_posted, b.available),
        (1_500, 98_500),
        "replays move nothing"
    );

    assert_eq!(
        resolved(&h.capture("no-such-hold", 1).await),
        ResolveOutcome::NotFound
    );
    assert_eq!(
        resolved(&h.void("no-such-hold").await),
        ResolveOutcome::NotFound
    );
}

#[tokio::test]
async fn request_ids_are_idempotency_keys() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("erin", 100_000).await;
    // One item sent again and again: the same content, byte for byte.
    let same = paid(&p, "same-id", 5_000);
    let first = h.authorize(same.clone()).await;
    let replay = h.authorize(same.clone()).await;
    assert_eq!(outcome(&replay), AuthorizeOutcome::Authorized);
    assert_eq!(replay.transaction_id, first.transaction_id);
    assert_eq!(h.balance("erin").await.debits_pending, 5_000, "held once");

    let mut different = same.clone();
    different.hold_amount = 4_000;
    let conflict = h.authorize(different).await;
    assert_eq!(outcome(&conflict), AuthorizeOutcome::IdempotencyConflict);
    assert!(conflict.transaction_id.is_empty());

    // A replay after capture still answers with the original hold.
    h.capture(&first.transaction_id, 5_000).await;
    assert_eq!(h.authorize(same).await.transaction_id, first.transaction_id);
}

#[tokio::test]
async fn every_refusal_has_its_outcome_and_holds_nothing() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("frank", 10_000).await;

    let t = terms(1_000, "frank-nonce");
    assert_eq!(
        outcome(&h.authorize(item("a", signed_proof(&p, &t), 1_000)).await),
        AuthorizeOutcome::Authorized
    );
    let reuse = h.authorize(item("b", signed_proof(&p, &t), 1_000)).await;
    assert_eq!(outcome(&reuse), AuthorizeOutcome::NonceReused);

    let stranger = Payer {
        account: "none".into(),
        key: key_for("stranger"),
        public_key: x402_proto::signing::public_key_hex(&key_for("stranger")),
    };
    assert_eq!(
        outcome(&h.authorize(paid(&stranger, "c", 1_000)).await),
        AuthorizeOutcome::UnknownKey
    );

    let mut t = terms(1_000, "expired");
    t.valid_before = unix_now() - 1;
    assert_eq!(
        outcome(&h.authorize(item("d", signed_proof(&p, &t), 1_000)).await),
        AuthorizeOutcome::Expired
    );

    let mut t = terms(1_000, "elsewhere");
    t.pay_to = "merchant-nobody".into();
    assert_eq!(
        outcome(&h.authorize(item("e", signed_proof(&p, &t), 1_000)).await),
        AuthorizeOutcome::UnknownMerchant
    );

    let t = terms(1_000, "over");
    assert_eq!(
        outcome(&h.authorize(item("f", signed_proof(&p, &t), 1_001)).await),
        AuthorizeOutcome::InvalidRequest
    );

    let mut forged = signed_proof(&p, &terms(1_000, "forged"));
    forged.amount = "1".into();
    let r = h.authorize(item("g", forged, 1)).await;
    assert_eq!(outcome(&r), AuthorizeOutcome::InvalidSignature);

    let mut malformed = signed_proof(&p, &terms(1_000, "malformed"));
    malformed.nonce = "xyz".into();
    assert_eq!(
        outcome(&h.authorize(item("h", malformed, 1_000)).await),
        AuthorizeOutcome::InvalidRequest
    );

    assert_eq!(
        outcome(&h.authorize(paid(&p, "i", 9_001)).await),
        AuthorizeOutcome::InsufficientFunds
    );
    assert_eq!(
        outcome(&h.authorize(paid(&p, "j", 9_000)).await),
        AuthorizeOutcome::Authorized
    );

    let b = h.balance("frank").await;
    assert_eq!(
        (b.debits_pending, b.available),
        (10_000, 0),
        "only the two authorized holds are held"
    );

    let mut op = h.op.clone();
    op.revoke_key(RevokeKeyRequest {
        public_key: p.public_key.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    op.deposit(DepositRequest {
        account_id: "frank".into(),
        asset: ASSET.into(),
        amount: 5_000,
        idempotency_key: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        outcome(&h.authorize(paid(&p, "k", 1_000)).await),
        AuthorizeOutcome::KeyRevoked
    );
    let again = op
        .add_key(AddKeyRequest {
            account_id: "frank".into(),
            public_key: p.public_key.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        again.unwrap_err().code(),
        Code::FailedPrecondition,
        "a revoked key stays revoked"
    );
}

#[tokio::test]
async fn published_vectors_verify_in_settlement_and_a_changed_byte_does_not() {
    let h = start().await;
    let vectors = x402_proto::vectors::vectors().unwrap();
    assert!(vectors.len() >= 5);
    let mut op = h.op.clone();
    let mut accounts: BTreeMap<String, String> = BTreeMap::new();
    for (i, v) in vectors.iter().enumerate() {
        let a = &v.payload.accepted;
        op.create_account(CreateAccountRequest {
            account_id: a.pay_to.clone(),
            kind: AccountKind::Merchant as i32,
            ..Default::default()
        })
        .await
        .unwrap();
        let account = accounts
            .entry(v.public_key.clone())
            .or_insert_with(|| format!("vector-payer-{i}"))
            .clone();
        op.create_account(CreateAccountRequest {
            account_id: account.clone(),
            kind: AccountKind::Payer as i32,
            ..Default::default()
        })
        .await
        .unwrap();
        op.add_key(AddKeyRequest {
            account_id: account.clone(),
            public_key: v.public_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        op.deposit(DepositRequest {
            account_id: account,
            asset: a.asset.clone(),
            amount: 10_000_000,
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    }
    for v in &vectors {
        let p = &v.payload;
        let proof = PaymentProof {
            scheme: p.accepted.scheme.clone(),
            network: p.accepted.network.clone(),
            asset: p.accepted.asset.clone(),
            amount: p.accepted.amount.clone(),
            pay_to: p.accepted.pay_to.clone(),
            resource: p.payload.resource.clone(),
            nonce: p.payload.nonce.clone(),
            valid_before: p.payload.valid_before.clone(),
            payer: p.payload.payer.clone(),
            signature: p.payload.signature.clone(),
        };
        // Hold at most 1 unit of currency: the proof's amount is the most it may cost.
        let amount = p.accepted.amount.parse::<u64>().unwrap().min(1_000_000);

        let mut tampered = proof.clone();
        let last = tampered.signature.pop().unwrap();
        tampered.signature.push(if last == '0' { '1' } else { '0' });
        let r = h
            .authorize(item(&format!("{}-tampered", v.name), tampered, amount))
            .await;
        assert_eq!(
            outcome(&r),
            AuthorizeOutcome::InvalidSignature,
            "{}",
            v.name
        );

        let mut moved = proof.clone();
        moved.resource.push('/');
        let r = h
            .authorize(item(&format!("{}-moved", v.name), moved, amount))
            .await;
        assert_eq!(
            outcome(&r),
            AuthorizeOutcome::InvalidSignature,
            "{}",
            v.name
        );

        let r = h.authorize(item(&v.name, proof, amount)).await;
        assert_eq!(
            outcome(&r),
            AuthorizeOutcome::Authorized,
            "{}: {}",
            v.name,
            r.message
        );
        assert_eq!(r.held_amount, amount);
    }
}

#[tokio::test]
async fn concurrent_authorizes_never_overdraw_the_payer() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("greta", 100 * 1_000).await;
    let items: Vec<_> = (0..200)
        .map(|i| paid(&p, &format!("burst-{i}"), 1_000))
        .collect();
    let mut tasks = Vec::new();
    for it in items {
        let mut client = h.data.clone();
        tasks.push(tokio::spawn(async move {
            client
                .authorize(AuthorizeRequest { items: vec![it] })
                .await
                .unwrap()
                .into_inner()
                .results
                .remove(0)
        }));
    }
    let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap().outcome).or_default() += 1;
    }
    assert_eq!(
        counts.get(&(AuthorizeOutcome::Authorized as i32)),
        Some(&100),
        "{counts:?}"
    );
    assert_eq!(
        counts.get(&(AuthorizeOutcome::InsufficientFunds as i32)),
        Some(&100),
        "{counts:?}"
    );
    let b = h.balance("greta").await;
    assert_eq!((b.debits_pending, b.available), (100_000, 0));
    assert_eq!(h.balance(MERCHANT).await.credits_pending, 100_000);
}

#[tokio::test]
async fn concurrent_capture_and_void_resolve_a_hold_once() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("hana", 1_000_000).await;
    let mut holds = Vec::new();
    for i in 0..20 {
        let r = h.authorize(paid(&p, &format!("race-{i}"), 1_000)).await;
        assert_eq!(outcome(&r), AuthorizeOutcome::Authorized);
        holds.push(r.transaction_id);
    }
    let mut tasks = Vec::new();
    for tx in &holds {
        let (mut a, mut b) = (h.data.clone(), h.data.clone());
        let (t1, t2) = (tx.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let capture = a.capture(CaptureRequest {
                items: vec![CaptureItem {
                    transaction_id: t1,
                    amount: 700,
                    upstream_micros: 0,
                    http_status: 200,
                }],
            });
            let void = b.void(VoidRequest {
                items: vec![VoidItem {
                    transaction_id: t2,
                    reason: "race".into(),
                }],
            });
            let (c, v) = tokio::join!(capture, void);
            (
                c.unwrap().into_inner().results.remove(0),
                v.unwrap().into_inner().results.remove(0),
            )
        }));
    }
    let mut captured = 0u64;
    for t in tasks {
        let (c, v) = t.await.unwrap();
        match (resolved(&c), resolved(&v)) {
            (ResolveOutcome::Captured, ResolveOutcome::AlreadyResolved) => captured += 700,
            (ResolveOutcome::AlreadyResolved, ResolveOutcome::Voided) => {}
            other => panic!("both or neither resolved: {other:?}"),
        }
    }
    let resolutions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transfers WHERE kind IN ('capture', 'void', 'expire') AND pending_id = ANY($1)",
    )
    .bind(&holds)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(resolutions, 20);
    let b = h.balance("hana").await;
    assert_eq!((b.debits_pending, b.debits_posted), (0, captured));
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (0, captured));
}

#[tokio::test]
async fn the_database_refuses_a_second_resolution_and_an_overdraft() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("ivan", 1_000).await;
    let tx = h.authorize(paid(&p, "x", 1_000)).await.transaction_id;
    h.capture(&tx, 400).await;
    let second = sqlx::query(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount) \
         VALUES ('void', 'ivan', $1, 'USD', 1000, $2, 1000)",
    )
    .bind(MERCHANT)
    .bind(&tx)
    .execute(&h.pool)
    .await;
    assert!(second.is_err(), "a hold resolves at most once");
    let inflated = sqlx::query(
        "INSERT INTO transfers (kind, debit_account, credit_account, asset, amount, pending_id, pending_amount) \
         VALUES ('capture', 'ivan', $1, 'USD', 5000, $2, 5000)",
    )
    .bind(MERCHANT)
    .bind(&tx)
    .execute(&h.pool)
    .await;
    assert!(
        inflated.is_err(),
        "pending_amount must be the hold's amount"
    );
    let overdraft = sqlx::query("UPDATE balances SET debits_posted = credits_posted - debits_pending + 1 WHERE account_id = 'ivan'")
        .execute(&h.pool)
        .await;
    assert!(
        overdraft.is_err(),
        "a payer's debits never exceed its credits"
    );
}

#[tokio::test]
async fn the_sweeper_expires_unresolved_holds() {
    let h = start_with(ServerConfig {
        hold_sweep_interval: Duration::from_millis(100),
        ..ServerConfig::default()
    })
    .await;
    h.merchant(MERCHANT).await;
    let p = h.payer("judy", 10_000).await;
    let mut short = paid(&p, "short", 2_500);
    short.hold_ttl_seconds = 1;
    let tx = h.authorize(short).await.transaction_id;
    let kept = h.authorize(paid(&p, "kept", 1_000)).await.transaction_id;
    assert_eq!(h.balance("judy").await.available, 6_500);

    let deadline = Instant::now() + Duration::from_secs(30);
    while h.payment(&tx).await.status != "expired" {
        assert!(Instant::now() < deadline, "hold was not expired in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = h.balance("judy").await;
    assert_eq!((b.debits_pending, b.available), (1_000, 9_000));
    assert_eq!(h.balance(MERCHANT).await.credits_pending, 1_000);
    assert_eq!(
        resolved(&h.capture(&tx, 2_500).await),
        ResolveOutcome::AlreadyResolved
    );
    assert_eq!(h.payment(&kept).await.status, "held");
}

#[tokio::test]
async fn payments_are_listed_newest_first_page_by_page() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("kim", 10_000).await;
    let q = h.payer("lee", 10_000).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            h.authorize(paid(&p, &format!("k{i}"), 100))
                .await
                .transaction_id,
        );
    }
    h.authorize(paid(&q, "l0", 100)).await;
    let mut op = h.op.clone();
    let page = |token: String| ListPaymentsRequest {
        payer_account: "kim".into(),
        merchant_account: String::new(),
        page_size: 2,
        page_token: token,
        ..Default::default()
    };
    let first = op
        .list_payments(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first
            .payments
            .iter()
            .map(|p| p.transaction_id.clone())
            .collect::<Vec<_>>(),
        vec![ids[2].clone(), ids[1].clone()]
    );
    assert!(!first.next_page_token.is_empty());
    let second = op
        .list_payments(page(first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second
            .payments
            .iter()
            .map(|p| p.transaction_id.clone())
            .collect::<Vec<_>>(),
        vec![ids[0].clone()]
    );
    assert!(second.next_page_token.is_empty());
    let by_merchant = op
        .list_payments(ListPaymentsRequest {
            merchant_account: MERCHANT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_merchant.payments.len(), 4);
}

#[tokio::test]
async fn accounts_and_keys_are_validated() {
    let h = start().await;
    let mut op = h.op.clone();
    let create = |id: &str, kind: AccountKind| CreateAccountRequest {
        account_id: id.into(),
        kind: kind as i32,
        ..Default::default()
    };
    let a = op
        .create_account(create("m1", AccountKind::Merchant))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.kind, AccountKind::Merchant as i32);
    op.create_account(create("m1", AccountKind::Merchant))
        .await
        .unwrap();
    assert_eq!(
        op.create_account(create("m1", AccountKind::Payer))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        op.create_account(create("bad id!", AccountKind::Payer))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        op.create_account(create("s", AccountKind::System))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let missing = op
        .get_account(GetAccountRequest {
            account_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let p = h.payer("p1", 0).await;
    let bad_key = AddKeyRequest {
        account_id: "p1".into(),
        public_key: "zz".repeat(32),
        ..Default::default()
    };
    assert_eq!(
        op.add_key(bad_key).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let merchant_key = AddKeyRequest {
        account_id: "m1".into(),
        public_key: x402_proto::signing::public_key_hex(&key_for("m")),
        ..Default::default()
    };
    assert_eq!(
        op.add_key(merchant_key).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    h.payer("p2", 0).await;
    let stolen = AddKeyRequest {
        account_id: "p2".into(),
        public_key: p.public_key.clone(),
        ..Default::default()
    };
    assert_eq!(
        op.add_key(stolen).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let unknown = RevokeKeyRequest {
        public_key: "ab".repeat(32),
        ..Default::default()
    };
    assert_eq!(
        op.revoke_key(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn health_reports_serving_for_both_services() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let h = start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in [
        "x402.settlement.v1.DataPlane",
        "x402.settlement.v1.Operator",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
}

#[tokio::test]
async fn the_operator_cli_speaks_to_the_server() {
    let h = start().await;
    let server = format!("http://{}", h.addr);
    let key = x402_proto::signing::public_key_hex(&key_for("cli"));
    let cli_ok = tokio::task::spawn_blocking(move || {
        let cli = |args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_x402-settlement"))
                .arg("--server")
                .arg(&server)
                .args(args)
                .env_remove("X402_SETTLEMENT_URL")
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let run = |args: &[&str]| {
            let (ok, out, err) = cli(args);
            assert!(ok, "{args:?}: {err}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        };
        assert_eq!(
            run(&[
                "account",
                "create",
                "--id",
                "cli-payer",
                "--kind",
                "payer",
                "--json"
            ])["kind"],
            "payer"
        );
        run(&[
            "account", "create", "--id", "cli-shop", "--kind", "merchant", "--json",
        ]);
        assert_eq!(
            run(&[
                "key",
                "add",
                "--account",
                "cli-payer",
                "--public-key",
                &key,
                "--json"
            ])["revoked"],
            false
        );
        let d = run(&[
            "deposit",
            "--account",
            "cli-payer",
            "--asset",
            "USD",
            "--amount",
            "2500000",
            "--idempotency-key",
            "k1",
            "--json",
        ]);
        assert_eq!(d["balance"]["available"], 2_500_000);
        let again = run(&[
            "deposit",
            "--account",
            "cli-payer",
            "--asset",
            "USD",
            "--amount",
            "2500000",
            "--idempotency-key",
            "k1",
            "--json",
        ]);
        assert_eq!(again["transaction_id"], d["transaction_id"]);
        assert_eq!(
            run(&[
                "balance",
                "--account",
                "cli-payer",
                "--asset",
                "USD",
                "--json"
            ])["credits_posted"],
            2_500_000
        );
        assert_eq!(
            run(&["payments", "list", "--payer", "cli-payer", "--json"])["payments"],
            serde_json::json!([])
        );
        assert_eq!(
            run(&["key", "revoke", "--public-key", &key, "--json"])["revoked"],
            true
        );
        let (ok, _, err) = cli(&["balance", "--account", "nobody", "--asset", "USD"]);
        assert!(!ok && err.contains("does not exist"), "{err}");
        let (ok, out, _) = cli(&["balance", "--account", "cli-payer", "--asset", "USD"]);
        assert!(ok && out.contains("available 2500000"), "{out}");
    });
    cli_ok.await.unwrap();
}

#[tokio::test]
async fn a_batch_answers_every_item_in_order() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("mia", 3_000).await;
    let stranger = Payer {
        account: "none".into(),
        key: key_for("batch-stranger"),
        public_key: x402_proto::signing::public_key_hex(&key_for("batch-stranger")),
    };
    let mut items = vec![paid(&stranger, "b-unknown", 1_000)];
    items.extend((0..10).map(|i| paid(&p, &format!("b-{i}"), 1_000)));
    let mut malformed = paid(&p, "b-malformed", 1_000);
    malformed.proof = None;
    items.push(malformed);
    // Signatures are checked together: a forged one fails itself alone.
    let mut forged = paid(&p, "b-forged", 1_000);
    let signature = &mut forged.proof.as_mut().unwrap().signature;
    let first = if signature.starts_with('0') { "1" } else { "0" };
    signature.replace_range(0..1, first);
    items.push(forged);
    let results = h
        .data
        .clone()
        .authorize(AuthorizeRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 13);
    assert_eq!(results[0].request_id, "b-unknown");
    assert_eq!(outcome(&results[0]), AuthorizeOutcome::UnknownKey);
    for (i, r) in results[1..11].iter().enumerate() {
        assert_eq!(r.request_id, format!("b-{i}"));
    }
    let authorized: Vec<_> = results[1..11]
        .iter()
        .filter(|r| outcome(r) == AuthorizeOutcome::Authorized)
        .collect();
    assert_eq!(authorized.len(), 3, "funded for exactly three");
    assert!(results[1..11]
        .iter()
        .all(|r| outcome(r) != AuthorizeOutcome::InvalidSignature));
    assert_eq!(outcome(&results[11]), AuthorizeOutcome::InvalidRequest);
    assert_eq!(results[12].request_id, "b-forged");
    assert_eq!(outcome(&results[12]), AuthorizeOutcome::InvalidSignature);

    let captures = authorized
        .iter()
        .map(|r| CaptureItem {
            transaction_id: r.transaction_id.clone(),
            amount: 500,
            upstream_micros: 0,
            http_status: 200,
        })
        .chain(std::iter::once(CaptureItem {
            transaction_id: "missing".into(),
            amount: 1,
            upstream_micros: 0,
            http_status: 200,
        }))
        .collect();
    let captured = h
        .data
        .clone()
        .capture(CaptureRequest { items: captures })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<_> = captured.iter().map(resolved).collect();
    assert_eq!(
        outcomes,
        vec![
            ResolveOutcome::Captured,
            ResolveOutcome::Captured,
            ResolveOutcome::Captured,
            ResolveOutcome::NotFound
        ]
    );
    assert_eq!(captured[3].transaction_id, "missing");
    let b = h.balance("mia").await;
    assert_eq!(
        (b.debits_pending, b.debits_posted, b.available),
        (0, 1_500, 1_500)
    );
}

#[tokio::test]
async fn the_serve_binary_migrates_serves_and_stops_on_sigterm() {
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let port = x402_e2e::pg::free_port().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_x402-settlement"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            &url,
            "--hold-sweep-interval-ms",
            "200",
        ])
        .env_remove("DATABASE_URL")
        .env_remove("X402_LISTEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let account = loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_x402-settlement"))
            .args([
                "--server", &server, "account", "create", "--id", "bin-shop", "--kind", "merchant",
                "--json",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "serve did not come up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(account["kind"], "merchant");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn one_call_with_repeats_decides_each_item_as_separate_calls_would() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("gus", 10_000).await;
    let q = h.payer("hal", 1_500).await;
    let r = h.payer("ivy", 10_000).await;
    let mut op = h.op.clone();
    op.revoke_key(RevokeKeyRequest {
        public_key: r.public_key.clone(),
        idempotency_key: String::new(),
    })
    .await
    .unwrap();
    let prior_item = paid(&p, "g-prior", 1_000);
    let prior = h.authorize(prior_item.clone()).await;
    assert_eq!(outcome(&prior), AuthorizeOutcome::Authorized);

    let first = paid(&p, "g-1", 1_000);
    let mut same_nonce = first.clone();
    same_nonce.request_id = "g-2".into();
    let mut old_nonce = prior_item.clone();
    old_nonce.request_id = "g-old-nonce".into();
    let items = vec![
        first.clone(),
        same_nonce,
        first,
        prior_item,
        old_nonce,
        paid(&q, "h-1", 1_000),
        paid(&q, "h-2", 1_000),
        paid(&r, "i-1", 100),
        paid(&q, "h-3", 500),
    ];
    let results = h
        .data
        .clone()
        .authorize(AuthorizeRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<_> = results.iter().map(outcome).collect();
    use AuthorizeOutcome::*;
    assert_eq!(
        outcomes,
        vec![
            Authorized,
            NonceReused,
            Authorized,
            Authorized,
            NonceReused,
            Authorized,
            InsufficientFunds,
            KeyRevoked,
            Authorized
        ]
    );
    assert_eq!(results[2].transaction_id, results[0].transaction_id);
    assert_eq!(results[3].transaction_id, prior.transaction_id);
    assert_eq!(h.balance("gus").await.debits_pending, 2_000);
    assert_eq!(h.balance("hal").await.available, 0);
    assert_eq!(h.balance("ivy").await.debits_pending, 0);

    let capture = |tx: &str, amount: u64| CaptureItem {
        transaction_id: tx.into(),
        amount,
        upstream_micros: 0,
        http_status: 200,
    };
    let g1 = results[0].transaction_id.clone();
    let h1 = results[5].transaction_id.clone();
    let captured = h
        .data
        .clone()
        .capture(CaptureRequest {
            items: vec![
                capture(&g1, 600),
                capture(&g1, 600),
                capture(&h1, 2_000),
                capture(&prior.transaction_id, 1_000),
                capture(&h1, 1_000),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<_> = captured.iter().map(resolved).collect();
    assert_eq!(
        outcomes,
        vec![
            ResolveOutcome::Captured,
            ResolveOutcome::Captured,
            ResolveOutcome::ExceedsHold,
            ResolveOutcome::Captured,
            ResolveOutcome::Captured
        ]
    );
    let gus = h.balance("gus").await;
    assert_eq!((gus.debits_pending, gus.debits_posted), (0, 1_600));
    let hal = h.balance("hal").await;
    assert_eq!((hal.debits_pending, hal.debits_posted), (500, 1_000));
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (500, 2_600));
}

#[tokio::test]
async fn an_authorize_past_its_deadline_holds_nothing() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("jay", 10_000).await;
    let mut late = tonic::Request::new(AuthorizeRequest {
        items: vec![paid(&p, "too-late", 1_000)],
    });
    late.set_timeout(Duration::from_nanos(1));
    assert!(h.data.clone().authorize(late).await.is_err());
    // A call with time to spare goes through; the late one never holds money.
    let on_time = h.authorize(paid(&p, "on-time", 2_000)).await;
    assert_eq!(outcome(&on_time), AuthorizeOutcome::Authorized);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transfers WHERE request_id = 'too-late'")
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(held, 0);
    assert_eq!(h.balance("jay").await.debits_pending, 2_000);
}

/// Ledger statements run on one generic plan per connection (`db::SESSION_SETTINGS`), so
/// Postgres does not plan them again on every call.
#[tokio::test]
async fn ledger_statements_are_not_planned_per_call() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("p-plans", 1_000_000).await;
    for i in 0..8 {
        let r = h.authorize(paid(&p, &format!("plans-{i}"), 1_000)).await;
        assert_eq!(outcome(&r), AuthorizeOutcome::Authorized);
        assert_eq!(
            resolved(&h.capture(&r.transaction_id, 1_000).await),
            ResolveOutcome::Captured
        );
    }
    // Every pooled connection, held at once so each is looked at exactly once.
    let mut held = Vec::new();
    for _ in 0..h.pool.size() {
        held.push(h.pool.acquire().await.unwrap());
    }
    let (mut generic, mut custom) = (0i64, 0i64);
    for conn in &mut held {
        let (g, c): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(generic_plans), 0)::bigint, coalesce(sum(custom_plans), 0)::bigint \
             FROM pg_prepared_statements",
        )
        .fetch_one(&mut **conn)
        .await
        .unwrap();
        generic += g;
        custom += c;
    }
    assert!(generic > 0, "no prepared statement ran on the pool");
    assert_eq!(custom, 0, "statements were planned per call");
}

/// The one generic plan per connection is made on first use, often while the ledger is
/// small; the key lookups must still use their indexes, or a plan made on an empty
/// table scans the whole table on every call once it has grown.
#[tokio::test]
async fn plans_made_on_an_empty_ledger_look_rows_up_by_key() {
    let h = start().await;
    let mut conn = h.pool.acquire().await.unwrap();
    for (name, statement, argument) in [
        (
            "transfers",
            "SELECT id, amount FROM transfers WHERE id = ANY($1)",
            "'{a,b}'::text[]",
        ),
        (
            "balances",
            "SELECT debits_pending FROM balances b JOIN unnest($1::text[]) AS x(id) \
             ON b.account_id = x.id AND b.asset = 'USD'",
            "'{a,b}'::text[]",
        ),
        (
            "payer_keys",
            "SELECT account_id FROM payer_keys WHERE public_key = ANY($1)",
            "'{a,b}'::text[]",
        ),
    ] {
        sqlx::raw_sql(&format!("PREPARE look_{name}(text[]) AS {statement}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> =
            sqlx::query_scalar(&format!("EXPLAIN EXECUTE look_{name}({argument})"))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index") && !plan.contains("Seq Scan"),
            "{name}: {plan}"
        );
    }
}

/// Whether a statement of this test's database that `is_it` picks waits on a lock,
/// within ~10 s; also every statement waiting on one when last looked (for the failure
/// message). pg_stat_activity keeps the first 1 KB of each statement.
async fn waits_on_a_lock(h: &Harness, is_it: impl Fn(&str) -> bool) -> (bool, Vec<String>) {
    let mut waiting = Vec::new();
    for _ in 0..400 {
        waiting = sqlx::query_scalar(
            "SELECT query FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_all(&h.pool)
        .await
        .unwrap();
        if waiting.iter().any(|q: &String| is_it(q)) {
            return (true, waiting);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (false, waiting)
}

/// One Authorize call of `item`, running while the test holds locks.
fn authorize_in_background(
    h: &Harness,
    item: AuthorizeItem,
) -> tokio::task::JoinHandle<Result<AuthorizeResponse, tonic::Status>> {
    let mut data = h.data.clone();
    tokio::spawn(async move {
        data.authorize(AuthorizeRequest { items: vec![item] })
            .await
            .map(|r| r.into_inner())
    })
}

/// A group reads without locks and writes in one statement that checks, under locks,
/// what the read decided on. A key revoked after the read, while the write waits for
/// its lock, stops the write: nothing of it commits, and the group runs again in a
/// transaction that sees the revocation.
#[tokio::test]
async fn a_key_revoked_while_its_group_is_written_places_no_hold() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("kim", 10_000).await;
    // The merchant's balance row exists and kim's key is known, so the next group
    // needs nothing but its write.
    let first = h.authorize(paid(&p, "kim-1", 1_000)).await;
    assert_eq!(outcome(&first), AuthorizeOutcome::Authorized);

    // A revocation that has not committed yet holds the key's row lock.
    let mut revoke = h.pool.begin().await.unwrap();
    sqlx::query("UPDATE payer_keys SET revoked_at = now() WHERE public_key = $1")
        .bind(&p.public_key)
        .execute(&mut *revoke)
        .await
        .unwrap();
    let call = authorize_in_background(&h, paid(&p, "kim-2", 2_000));
    // The group's write (straight away: kim's key is known since kim-1) waits on the
    // key's lock.
    let (write_waits, waiting) = waits_on_a_lock(&h, |q| {
        q.starts_with("WITH m AS") && q.contains("keys AS (SELECT public_key FROM payer_keys")
    })
    .await;
    assert!(
        write_waits,
        "the group's write should be what waits, not its read: {waiting:?}"
    );
    revoke.commit().await.unwrap();

    let answer = call.await.unwrap().unwrap();
    assert_eq!(outcome(&answer.results[0]), AuthorizeOutcome::KeyRevoked);
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM transfers WHERE request_id = 'kim-2'")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(held, 0);
    assert_eq!(h.balance("kim").await.debits_pending, 1_000);
    assert_eq!(h.balance(MERCHANT).await.credits_pending, 1_000);
}

/// A group whose payer keys settlement has seen writes at once, without its read: one
/// round trip instead of two. A key seen for the first time is read first (which is
/// how it becomes known). Shown by what waits on a table lock: the read or the write.
#[tokio::test]
async fn a_group_of_known_payer_keys_writes_without_reading_first() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let known = h.payer("kit", 10_000).await;
    let first = h.authorize(paid(&known, "kit-1", 1_000)).await;
    assert_eq!(outcome(&first), AuthorizeOutcome::Authorized);
    let new = h.payer("ned", 10_000).await;

    for (payer, request, statement) in
        [(&new, "ned-1", "WITH d AS"), (&known, "kit-2", "WITH m AS")]
    {
        // Both the read and the write of a group touch balances.
        let mut lock = h.pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE balances IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *lock)
            .await
            .unwrap();
        let call = authorize_in_background(&h, paid(payer, request, 2_000));
        let (waits, waiting) = waits_on_a_lock(&h, |q| q.starts_with("WITH ")).await;
        assert!(waits, "nothing of {request}'s group waited: {waiting:?}");
        assert!(
            waiting
                .iter()
                .all(|q| q.starts_with(statement) || !q.starts_with("WITH ")),
            "{request}: expected {statement:?} to wait, got {waiting:?}"
        );
        lock.commit().await.unwrap();
        let answer = call.await.unwrap().unwrap();
        assert_eq!(outcome(&answer.results[0]), AuthorizeOutcome::Authorized);
    }
    assert_eq!(h.balance("kit").await.debits_pending, 3_000);
    assert_eq!(h.balance("ned").await.debits_pending, 2_000);
    assert_eq!(h.balance(MERCHANT).await.credits_pending, 5_000);
}

/// A known payer key takes the write-first path, and whatever that write meets is
/// still decided as it would be after a read: each refusal with its own outcome, a
/// replay with the original hold, nothing held for any of them.
#[tokio::test]
async fn a_known_payer_key_meets_every_refusal_the_read_would_give() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    h.merchant("merchant-closing").await;
    let p = h.payer("kay", 10_000).await;
    let t = terms(1_000, "kay-nonce");
    let first = h
        .authorize(item("kay-1", signed_proof(&p, &t), 1_000))
        .await;
    assert_eq!(outcome(&first), AuthorizeOutcome::Authorized);

    let replay = h
        .authorize(item("kay-1", signed_proof(&p, &t), 1_000))
        .await;
    assert_eq!(outcome(&replay), AuthorizeOutcome::Authorized);
    assert_eq!(replay.transaction_id, first.transaction_id);
    let reuse = h
        .authorize(item("kay-2", signed_proof(&p, &t), 1_000))
        .await;
    assert_eq!(outcome(&reuse), AuthorizeOutcome::NonceReused);
    let short = h.authorize(paid(&p, "kay-3", 9_001)).await;
    assert_eq!(outcome(&short), AuthorizeOutcome::InsufficientFunds);
    let mut t = terms(1_000, "kay-elsewhere");
    t.pay_to = "merchant-nobody".into();
    let unknown = h
        .authorize(item("kay-4", signed_proof(&p, &t), 1_000))
        .await;
    assert_eq!(outcome(&unknown), AuthorizeOutcome::UnknownMerchant);
    let mut t = terms(1_000, "kay-closing");
    t.pay_to = "merchant-closing".into();
    let open = h
        .authorize(item("kay-5", signed_proof(&p, &t), 1_000))
        .await;
    assert_eq!(outcome(&open), AuthorizeOutcome::Authorized);
    h.capture(&open.transaction_id, 1_000).await;
    sqlx::query("UPDATE accounts SET closed_at = now() WHERE id = 'merchant-closing'")
        .execute(&h.pool)
        .await
        .unwrap();
    let mut t = terms(1_000, "kay-closed");
    t.pay_to = "merchant-closing".into();
    let closed = h
        .authorize(item("kay-6", signed_proof(&p, &t), 1_000))
        .await;
    assert_eq!(outcome(&closed), AuthorizeOutcome::MerchantClosed);

    let b = h.balance("kay").await;
    assert_eq!(
        (b.debits_pending, b.available),
        (1_000, 8_000),
        "only kay-1 is held; kay-5 was captured"
    );
}

/// A resolve group reads without locks and deletes its holds' open-hold rows in the
/// same statement that writes the resolutions and balances; waiting on one of those
/// rows is waiting in that statement, and once the row is free the capture lands whole.
#[tokio::test]
async fn a_capture_claims_its_open_hold_in_the_statement_that_writes_it() {
    let h = start().await;
    h.merchant(MERCHANT).await;
    let p = h.payer("lou", 10_000).await;
    let held = h.authorize(paid(&p, "lou-1", 3_000)).await;
    assert_eq!(outcome(&held), AuthorizeOutcome::Authorized);

    // Someone else (a sweeper pass, say) has the open-hold row locked for a while.
    let mut other = h.pool.begin().await.unwrap();
    sqlx::query("SELECT hold_id FROM open_holds WHERE hold_id = $1 FOR UPDATE")
        .bind(&held.transaction_id)
        .execute(&mut *other)
        .await
        .unwrap();
    let mut data = h.data.clone();
    let tx = held.transaction_id.clone();
    let call = tokio::spawn(async move {
        data.capture(CaptureRequest {
            items: vec![CaptureItem {
                transaction_id: tx,
                amount: 2_000,
                http_status: 200,
                upstream_micros: 10,
            }],
        })
        .await
        .map(|r| r.into_inner())
    });
    let (write_waits, waiting) = waits_on_a_lock(&h, |q| {
        q.starts_with("WITH gone AS (DELETE FROM open_holds")
    })
    .await;
    assert!(
        write_waits,
        "the capture should wait in its write statement: {waiting:?}"
    );
    other.rollback().await.unwrap();

    let answer = call.await.unwrap().unwrap();
    assert_eq!(resolved(&answer.results[0]), ResolveOutcome::Captured);
    let lou = h.balance("lou").await;
    assert_eq!((lou.debits_pending, lou.debits_posted), (0, 2_000));
    let m = h.balance(MERCHANT).await;
    assert_eq!((m.credits_pending, m.credits_posted), (0, 2_000));
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM open_holds")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(open, 0);
}
