//! Attacks on the paid path, end to end through Envoy: replays (also through a second
//! Envoy sharing the same settlement), a byte changed in every signed field, swapped
//! and revoked keys, expired and far-future proofs, amounts below the price, terms of
//! another route, oversized headers and bodies, and headers that are not base64, not
//! JSON, not UTF-8 or carry numbers that are not atomic units. Each gets its documented
//! status and error code, nothing reaches the upstream unpaid, and the ledger checker
//! shows that nothing moved except the one legitimate payment of each scenario.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use x402_client::wire::{encode_header, PaymentPayload, HEADER_PAYMENT_SIGNATURE};
use x402_e2e::envoy::{Envoy, EnvoyOptions};
use x402_e2e::stack::{default_filter_config, unix_now, Answer, Stack, PAID_PRICE};
use x402_settlement::check::{check_ledger, check_paid_responses, CheckOptions, PaidResponse};

const PATH: &str = "/paid/quote?sym=ABC";

/// The ledger passes every invariant, and the receipts are each captured once.
async fn assert_ledger_clean(stack: &Stack, paid: &[PaidResponse]) -> String {
    let pool = x402_settlement::db::connect(stack.settlement.database_url(), 2)
        .await
        .unwrap();
    // Captures land after the response; wait (bounded) until no hold is open.
    for _ in 0..200 {
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM open_holds")
            .fetch_one(&pool)
            .await
            .unwrap();
        if open == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    let v = check_paid_responses(&pool, paid, false).await.unwrap();
    assert!(v.is_empty(), "{v:?}");
    report.to_text()
}

fn receipt(answer: &Answer) -> PaidResponse {
    let r = x402_client::parse_receipt(&answer.headers).expect("a receipt");
    PaidResponse::from_receipt(r).unwrap()
}

/// Sends `header` as the payment and returns (status, error code).
async fn outcome(stack: &Stack, path: &str, header: &str) -> (u16, Option<String>) {
    let a = stack.send_with_header("GET", path, header).await.unwrap();
    (a.status, a.error_code())
}

fn flip_hex(s: &str, at: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[at] = if b[at] == b'0' { b'1' } else { b'0' };
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_pays_once_even_through_two_envoys_sharing_settlement() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let second = Envoy::start(EnvoyOptions::new(
        stack.upstream.port(),
        stack.settlement.port(),
        &default_filter_config(),
    ))
    .await
    .unwrap();
    // The proof names Envoy A's authority; an attacker replaying it through Envoy B
    // sends the same Host, so only the nonce can stop it.
    let authority = stack.envoy.authority();
    let send_b = |proof: PaymentPayload| {
        let http = stack.http.clone();
        let url = format!("http://{}{PATH}", second.authority());
        let authority = authority.clone();
        async move {
            Answer::read(
                http.get(url)
                    .header("host", authority)
                    .header(HEADER_PAYMENT_SIGNATURE, encode_header(&proof))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
            .unwrap()
        }
    };

    // Sequential replay: A pays, B refuses with nonce_reused, A again refuses.
    let proof = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
    let first = stack.send_with_payment("GET", PATH, &proof).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body_text());
    let mut paid = vec![receipt(&first)];
    let replay_b = send_b(proof.clone()).await;
    assert_eq!(
        (replay_b.status, replay_b.error_code().as_deref()),
        (402, Some("nonce_reused")),
        "{}",
        replay_b.body_text()
    );
    let replay_a = stack.send_with_payment("GET", PATH, &proof).await.unwrap();
    assert_eq!(
        (replay_a.status, replay_a.error_code().as_deref()),
        (402, Some("nonce_reused"))
    );

    // Concurrent replay: the same fresh proof through both Envoys at once, several
    // times over; exactly one of each pair is paid.
    for _ in 0..5 {
        let proof = stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
        let (a, b) = tokio::join!(
            stack.send_with_payment("GET", PATH, &proof),
            send_b(proof.clone())
        );
        let a = a.unwrap();
        let statuses = [a.status, b.status];
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}: {} / {}",
            a.body_text(),
            b.body_text()
        );
        for answer in [&a, &b] {
            if answer.status == 200 {
                paid.push(receipt(answer));
            } else {
                assert_eq!(answer.error_code().as_deref(), Some("nonce_reused"));
            }
        }
    }
    stack
        .wait_for_settled_balance(&payer, (funds - 6 * PAID_PRICE) as i64)
        .await
        .unwrap();
    assert_eq!(stack.upstream.served().count_path_prefix("/paid"), 6);
    assert_ledger_clean(&stack, &paid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_swapped_revoked_expired_and_mismatched_proofs_move_nothing() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let (other, other_key) = stack.new_payer(funds).await.unwrap();
    let (revoked, revoked_key) = stack.new_payer(funds).await.unwrap();
    stack
        .settlement
        .revoke_key(&revoked_key.public_key_hex())
        .await
        .unwrap();
    let good = || stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();

    let mut cases: Vec<(String, String, (u16, &str))> = Vec::new();
    let mut add = |what: String, p: PaymentPayload, expected: (u16, &'static str)| {
        cases.push((what, encode_header(&p), expected));
    };

    // One byte of each signed field changed after signing.
    let g = good();
    for at in [
        0,
        g.payload.signature.len() / 2,
        g.payload.signature.len() - 1,
    ] {
        let mut p = good();
        p.payload.signature = flip_hex(&p.payload.signature, at);
        add(
            format!("signature byte {at}"),
            p,
            (402, "invalid_signature"),
        );
    }
    for at in [0, g.payload.nonce.len() - 1] {
        let mut p = good();
        p.payload.nonce = flip_hex(&p.payload.nonce, at);
        add(format!("nonce byte {at}"), p, (402, "invalid_signature"));
    }
    let mut p = good();
    p.payload.valid_before = (p.payload.valid_before.parse::<u64>().unwrap() - 1).to_string();
    add(
        "validBefore one second earlier".into(),
        p,
        (402, "invalid_signature"),
    );
    let mut p = good();
    p.accepted.amount = (PAID_PRICE + 1).to_string();
    add(
        "amount one unit higher".into(),
        p,
        (402, "invalid_signature"),
    );
    let mut p = good();
    p.accepted.amount = (PAID_PRICE - 1).to_string();
    add(
        "amount one unit below the price".into(),
        p,
        (402, "amount_below_price"),
    );
    let mut p = good();
    p.accepted.amount = "0".into();
    add("amount zero".into(), p, (402, "amount_below_price"));
    let mut p = good();
    p.accepted.pay_to = "merchant-demp".into();
    add("payTo one byte changed".into(), p, (402, "wrong_pay_to"));
    let mut p = good();
    p.accepted.network = "402x-locam".into();
    add("network one byte changed".into(), p, (402, "wrong_network"));
    let mut p = good();
    p.accepted.asset = "USE".into();
    add("asset one byte changed".into(), p, (402, "wrong_asset"));
    let mut p = good();
    p.accepted.scheme = "exacu".into();
    add("scheme one byte changed".into(), p, (402, "wrong_scheme"));
    let mut p = good();
    p.payload.resource = p.payload.resource.replace("ABC", "ABD");
    add(
        "resource query one byte changed".into(),
        p,
        (402, "wrong_resource"),
    );
    let mut p = good();
    p.payload.resource = p.payload.resource.replacen("GET", "PUT", 1);
    add("resource method changed".into(), p, (402, "wrong_resource"));

    // Keys: another payer's key named on this payer's signature, a signature by the
    // other payer over this proof's terms with this payer named, and a revoked key.
    let mut p = good();
    p.payload.payer = other_key.public_key_hex();
    add(
        "payer swapped to another registered key".into(),
        p,
        (402, "invalid_signature"),
    );
    let mut p = stack
        .signed_proof(&other_key, "GET", PATH, PAID_PRICE)
        .unwrap();
    p.payload.payer = key.public_key_hex();
    add(
        "signature by another payer's key".into(),
        p,
        (402, "invalid_signature"),
    );
    add(
        "revoked key".into(),
        stack
            .signed_proof(&revoked_key, "GET", PATH, PAID_PRICE)
            .unwrap(),
        (402, "key_revoked"),
    );

    // Time.
    let resource = x402_client::resource_for("GET", &stack.parsed_url(PATH).unwrap()).unwrap();
    let sign_until = |valid_before: u64| {
        x402_client::sign_payment(
            &key,
            &stack.requirements(PAID_PRICE),
            &resource,
            &x402_client::random_nonce_hex(),
            valid_before,
        )
        .unwrap()
    };
    add(
        "expired a minute ago".into(),
        sign_until(unix_now() - 60),
        (402, "expired"),
    );
    add("valid until 1970".into(), sign_until(1), (402, "expired"));
    add(
        "valid for a day (far future)".into(),
        sign_until(unix_now() + 86_400),
        (402, "validity_too_long"),
    );
    add(
        "valid until the year 2500".into(),
        sign_until(16_725_225_600),
        (402, "validity_too_long"),
    );

    // Another route's terms: the named route costs more and a proof for /status
    // does not pay for /paid.
    add(
        "proof for another route's resource".into(),
        stack
            .signed_proof(&key, "GET", "/status/200", PAID_PRICE)
            .unwrap(),
        (402, "wrong_resource"),
    );

    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (what, header, expected) in &cases {
        let got = outcome(&stack, PATH, header).await;
        table.push(format!(
            "{what}: {} {}",
            got.0,
            got.1.clone().unwrap_or_default()
        ));
        if (got.0, got.1.as_deref()) != (expected.0, Some(expected.1)) {
            failures.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        stack.logs()
    );

    assert_eq!(
        stack.upstream.served().total(),
        0,
        "nothing unpaid got through"
    );
    for account in [&payer, &other, &revoked] {
        stack
            .wait_for_settled_balance(account, funds as i64)
            .await
            .unwrap();
    }
    let report = assert_ledger_clean(&stack, &[]).await;
    eprintln!("{} cases, checker: {report}", cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_non_atomic_inputs_are_refused_and_move_nothing() {
    let stack = Stack::start_default().await.unwrap();
    let funds = 1_000_000;
    let (payer, key) = stack.new_payer(funds).await.unwrap();
    let good = || stack.signed_proof(&key, "GET", PATH, PAID_PRICE).unwrap();
    let json_of = |p: &PaymentPayload| serde_json::to_value(p).unwrap();
    let with_amount = |amount: serde_json::Value| {
        let mut v = json_of(&good());
        v["accepted"]["amount"] = amount;
        STANDARD.encode(v.to_string())
    };

    let mut cases: Vec<(&str, String, u16)> = vec![
        ("not base64", "!!!not base64!!!".into(), 400),
        (
            "base64 with a bad tail",
            format!("{}@", encode_header(&good())),
            400,
        ),
        (
            "base64 of text that is not JSON",
            STANDARD.encode("{ nope"),
            400,
        ),
        ("base64 of a JSON array", STANDARD.encode("[1,2,3]"), 400),
        ("base64 of JSON null", STANDARD.encode("null"), 400),
        (
            "base64 of invalid UTF-8",
            STANDARD.encode([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d]),
            400,
        ),
        ("empty header", String::new(), 400),
        ("negative amount", with_amount("-10000".into()), 400),
        ("fractional amount", with_amount("10000.5".into()), 400),
        ("exponent amount", with_amount("1e4".into()), 400),
        (
            "huge amount (past u64)",
            with_amount("99999999999999999999999".into()),
            400,
        ),
        ("amount as a JSON number", with_amount(10000.into()), 400),
        ("amount with spaces", with_amount(" 10000".into()), 400),
        ("empty amount", with_amount("".into()), 400),
        (
            "validBefore negative",
            {
                let mut v = json_of(&good());
                v["payload"]["validBefore"] = "-1".into();
                STANDARD.encode(v.to_string())
            },
            400,
        ),
        (
            "validBefore past u64",
            {
                let mut v = json_of(&good());
                v["payload"]["validBefore"] = "18446744073709551616".into();
                STANDARD.encode(v.to_string())
            },
            400,
        ),
        ("payment header over 8 KiB", "A".repeat(9 * 1024), 400),
    ];
    // A valid proof padded past the limit with whitespace JSON allows.
    let padded = {
        let mut text = serde_json::to_string(&good()).unwrap();
        text.push_str(&" ".repeat(9 * 1024));
        STANDARD.encode(text)
    };
    cases.push(("valid proof padded past 8 KiB", padded, 400));

    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (what, header, expected) in &cases {
        let (status, code) = outcome(&stack, PATH, header).await;
        table.push(format!(
            "{what}: {status} {}",
            code.clone().unwrap_or_default()
        ));
        let code_ok = match status {
            400 => code.as_deref() == Some("malformed_payment"),
            402 => code.as_deref() == Some("payment_required"),
            _ => false,
        };
        if status != *expected || !code_ok {
            failures.push(format!(
                "{what}: expected {expected}, got {status} {code:?}"
            ));
        }
    }

    // Header bytes that are not UTF-8 at all (sent raw): malformed, like any other
    // undecodable payment header.
    let raw = reqwest::header::HeaderValue::from_bytes(b"eyJ\xff\xfe").unwrap();
    let a = Answer::read(
        stack
            .http
            .get(stack.url(PATH))
            .header(HEADER_PAYMENT_SIGNATURE, raw)
            .send()
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    table.push(format!(
        "raw non-UTF-8 header bytes: {} {}",
        a.status,
        a.error_code().unwrap_or_default()
    ));
    if (a.status, a.error_code().as_deref()) != (400, Some("malformed_payment")) {
        failures.push(format!("raw non-UTF-8 header: got {}", a.status));
    }

    // Headers past Envoy's limit: refused by Envoy itself (431), never forwarded.
    let huge = stack
        .http
        .get(stack.url(PATH))
        .header("x-padding", "a".repeat(100 * 1024))
        .send()
        .await;
    let huge_status = huge.map(|r| r.status().as_u16()).unwrap_or(0);
    table.push(format!("100 KiB of other headers: {huge_status}"));
    if huge_status != 431 {
        failures.push(format!("100 KiB headers: expected 431, got {huge_status}"));
    }

    // A large body with a bad payment: refused before the body matters.
    let big_body = stack
        .http
        .post(stack.url(PATH))
        .header(HEADER_PAYMENT_SIGNATURE, "!!!")
        .body(vec![b'x'; 4 * 1024 * 1024])
        .send()
        .await;
    let big_status = big_body.map(|r| r.status().as_u16()).unwrap_or(0);
    table.push(format!("4 MiB body with a malformed payment: {big_status}"));
    if big_status != 400 {
        failures.push(format!("4 MiB body: expected 400, got {big_status}"));
    }
    // A large body with no payment: the challenge.
    let unpaid_body = stack
        .http
        .post(stack.url(PATH))
        .body(vec![b'x'; 4 * 1024 * 1024])
        .send()
        .await;
    let unpaid_status = unpaid_body.map(|r| r.status().as_u16()).unwrap_or(0);
    table.push(format!("4 MiB body unpaid: {unpaid_status}"));
    if unpaid_status != 402 {
        failures.push(format!(
            "4 MiB unpaid body: expected 402, got {unpaid_status}"
        ));
    }

    eprintln!("{}", table.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        stack.logs()
    );
    assert_eq!(stack.upstream.served().total(), 0);
    stack
        .wait_for_settled_balance(&payer, funds as i64)
        .await
        .unwrap();

    // After all of it the payer can still pay, exactly once per proof.
    let ok = stack.send_with_payment("GET", PATH, &good()).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body_text());
    stack
        .wait_for_settled_balance(&payer, (funds - PAID_PRICE) as i64)
        .await
        .unwrap();
    let report = assert_ledger_clean(&stack, &[receipt(&ok)]).await;
    eprintln!("{} cases, checker: {report}", cases.len() + 4);
}

/// Calls to settlement's gRPC APIs without the bearer token (or with a wrong one) are
/// UNAUTHENTICATED and move nothing; the same calls with the token work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_data_plane_and_operator_calls_are_refused() {
    use tonic::metadata::MetadataValue;
    use tonic::transport::Channel;
    use x402_e2e::settlement::Settlement;
    use x402_proto::settlement::v1::data_plane_client::DataPlaneClient;
    use x402_proto::settlement::v1::operator_client::OperatorClient;
    use x402_proto::settlement::v1::{
        AccountKind, AddKeyRequest, AuthorizeItem, AuthorizeOutcome, AuthorizeRequest, CaptureItem,
        CaptureRequest, CreateAccountRequest, DepositRequest, GetBalanceRequest, VoidItem,
        VoidRequest,
    };

    const OPERATOR: &str = "operator-token-0123456789abcdef";
    const DATAPLANE: &str = "dataplane-token-0123456789abcdef";
    let url = tokio::task::spawn_blocking(x402_e2e::stack::fresh_database)
        .await
        .unwrap()
        .unwrap();
    let settlement = Settlement::start_with(
        &url,
        None,
        &["--operator-token", OPERATOR, "--dataplane-token", DATAPLANE],
    )
    .await
    .unwrap();
    let channel = Channel::from_shared(settlement.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = token {
            if let Ok(v) = MetadataValue::try_from(format!("Bearer {t}")) {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }
    let mut op = OperatorClient::new(channel.clone());
    let mut dp = DataPlaneClient::new(channel);
    fn refused(r: Result<(), tonic::Status>) -> bool {
        matches!(r, Err(s) if s.code() == tonic::Code::Unauthenticated)
    }

    // Operator API: no token, a wrong token, the data plane's token.
    for token in [None, Some("wrong"), Some(DATAPLANE)] {
        let create = CreateAccountRequest {
            account_id: "mallory".into(),
            kind: AccountKind::Payer.into(),
            ..Default::default()
        };
        assert!(
            refused(op.create_account(with(create, token)).await.map(|_| ())),
            "{token:?}"
        );
        let deposit = DepositRequest {
            account_id: "mallory".into(),
            asset: "USD".into(),
            amount: 1_000_000,
            idempotency_key: String::new(),
        };
        assert!(
            refused(op.deposit(with(deposit, token)).await.map(|_| ())),
            "{token:?}"
        );
    }

    // Set up with the operator token: a merchant and a funded payer.
    let key = x402_client::PayerKey::generate();
    for (id, kind) in [
        ("merchant-demo", AccountKind::Merchant),
        ("alice", AccountKind::Payer),
    ] {
        let create = CreateAccountRequest {
            account_id: id.into(),
            kind: kind.into(),
            ..Default::default()
        };
        op.create_account(with(create, Some(OPERATOR)))
            .await
            .unwrap();
    }
    let add_key = AddKeyRequest {
        account_id: "alice".into(),
        public_key: key.public_key_hex(),
        ..Default::default()
    };
    op.add_key(with(add_key, Some(OPERATOR))).await.unwrap();
    let deposit = DepositRequest {
        account_id: "alice".into(),
        asset: "USD".into(),
        amount: 100_000,
        idempotency_key: String::new(),
    };
    op.deposit(with(deposit, Some(OPERATOR))).await.unwrap();

    let mut extra = serde_json::Map::new();
    extra.insert("decimals".into(), 6.into());
    let requirements = x402_client::wire::PaymentRequirements {
        scheme: "exact".into(),
        network: "402x:local".into(),
        amount: PAID_PRICE.to_string(),
        asset: "USD".into(),
        pay_to: "merchant-demo".into(),
        max_timeout_seconds: 60,
        extra,
    };
    let item = |n: u32| {
        let p = x402_client::sign_payment(
            &key,
            &requirements,
            "GET 127.0.0.1:10000/paid/quote",
            &x402_client::random_nonce_hex(),
            unix_now() + 60,
        )
        .unwrap();
        AuthorizeItem {
            request_id: format!("req-{n}"),
            proof: Some(p.into()),
            hold_amount: PAID_PRICE,
            route: "quote".into(),
            hold_ttl_seconds: 60,
            volume_tiers: Vec::new(),
            global_limit: None,
            capture: false,
        }
    };

    // Data plane: no token, a wrong one, the operator's token.
    for token in [None, Some("wrong"), Some(OPERATOR)] {
        let auth = AuthorizeRequest {
            items: vec![item(1)],
        };
        assert!(
            refused(dp.authorize(with(auth, token)).await.map(|_| ())),
            "{token:?}"
        );
    }
    // A real hold, then capture and void attempts without the token.
    let held = dp
        .authorize(with(
            AuthorizeRequest {
                items: vec![item(2)],
            },
            Some(DATAPLANE),
        ))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(held.outcome, AuthorizeOutcome::Authorized as i32);
    let tx = held.transaction_id.clone();
    for token in [None, Some("wrong")] {
        let capture = CaptureRequest {
            items: vec![CaptureItem {
                transaction_id: tx.clone(),
                amount: PAID_PRICE,
                upstream_micros: 1,
                http_status: 200,
            }],
        };
        assert!(refused(dp.capture(with(capture, token)).await.map(|_| ())));
        let void = VoidRequest {
            items: vec![VoidItem {
                transaction_id: tx.clone(),
                reason: "attack".into(),
            }],
        };
        assert!(refused(dp.void(with(void, token)).await.map(|_| ())));
    }
    // The hold is still open and untouched; void it properly.
    let void = VoidRequest {
        items: vec![VoidItem {
            transaction_id: tx.clone(),
            reason: "test".into(),
        }],
    };
    dp.void(with(void, Some(DATAPLANE))).await.unwrap();
    let balance = op
        .get_balance(with(
            GetBalanceRequest {
                account_id: "alice".into(),
                asset: "USD".into(),
            },
            Some(OPERATOR),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.available, 100_000);

    let pool = x402_settlement::db::connect(&url, 2).await.unwrap();
    let moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transfers WHERE kind NOT IN ('deposit', 'hold', 'void')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(moved, 0, "nothing but the deposit, the hold and its void");
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts WHERE id = 'mallory'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(accounts, 0);
    let report = check_ledger(&pool, CheckOptions::default()).await.unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}
