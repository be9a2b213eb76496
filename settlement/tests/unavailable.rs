//! With its database gone, settlement answers UNAVAILABLE (never UNKNOWN), so the
//! filter's failure policy decides; once Postgres is back, it serves again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tonic::Code;
use x402_e2e::pg::TestPostgres;
use x402_proto::settlement::v1::*;
use x402_settlement::server::ServerConfig;

#[tokio::test]
async fn a_stopped_database_is_unavailable_and_recovery_needs_no_restart() {
    let mut pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .unwrap()
        .unwrap();
    let url = pg.create_database("unavailable").unwrap();
    let h = start_on(&url, ServerConfig::default()).await;
    h.merchant(MERCHANT).await;
    let p = h.payer("zoe", 10_000).await;
    let held = h.authorize(paid(&p, "before", 1_000)).await;
    assert_eq!(outcome(&held), AuthorizeOutcome::Authorized);

    let mut pg = tokio::task::spawn_blocking(move || {
        pg.stop().unwrap();
        pg
    })
    .await
    .unwrap();

    let mut data = h.data.clone();
    let mut op = h.op.clone();
    let auth = data
        .authorize(AuthorizeRequest {
            items: vec![paid(&p, "during", 1_000)],
        })
        .await
        .unwrap_err();
    assert_eq!(auth.code(), Code::Unavailable, "{auth:?}");
    let capture = data
        .capture(CaptureRequest {
            items: vec![CaptureItem {
                transaction_id: held.transaction_id.clone(),
                amount: 1_000,
                upstream_micros: 0,
                http_status: 200,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(capture.code(), Code::Unavailable);
    let balance = op
        .get_balance(GetBalanceRequest {
            account_id: "zoe".into(),
            asset: ASSET.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(balance.code(), Code::Unavailable);
    assert!(
        !balance.message().contains("127.0.0.1"),
        "no internals leak: {}",
        balance.message()
    );

    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again().unwrap();
        pg
    })
    .await
    .unwrap();
    let c = h.capture(&held.transaction_id, 1_000).await;
    assert_eq!(resolved(&c), ResolveOutcome::Captured);
    assert_eq!(h.balance("zoe").await.available, 9_000);
    drop(h);
    drop(pg);
}
