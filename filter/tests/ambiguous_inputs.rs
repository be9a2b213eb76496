//! A price input the request gives more than once with different values is refused
//! with 400 naming it, before any challenge or hold: upstreams disagree on which value
//! counts, so the filter could price one and the upstream serve another.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use x402_filter::host::{Call, FakeHost};
use x402_filter::plugin::{Action, Vm};
use x402_proto::wire::ErrorBody;

const ROOT: u32 = 1;
const NOW: u64 = 1_800_000_000;

fn filter() -> (Vm, FakeHost) {
    let config = serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "routes": [
            {"name": "pages", "match": {"path_prefix": "/paid/pages"},
             "pricing": {"expression": {"expr": "query(\"n\") * 0.01"}}},
            {"name": "units", "match": {"method": "POST", "path_exact": "/paid/units"},
             "pricing": {"expression": {"expr": "units * 0.01"}}},
            {"name": "seats", "match": {"path_prefix": "/paid/seats"},
             "pricing": {"expression": {"expr": "header(\"x-seats\") * 0.01"}}}
        ]
    })
    .to_string();
    let mut vm = Vm::default();
    let mut host = FakeHost {
        now_nanos: NOW * 1_000_000_000,
        ..FakeHost::default()
    };
    vm.on_context_create(ROOT, 0);
    assert!(vm.on_configure(&mut host, ROOT, config.as_bytes()));
    (vm, host)
}

/// Request headers on a new context; a POST's body follows.
fn request(vm: &mut Vm, host: &mut FakeHost, ctx: u32, method: &str, path: &str) -> Action {
    request_with(vm, host, ctx, method, path, &[])
}

/// [`request`] with more headers.
fn request_with(
    vm: &mut Vm,
    host: &mut FakeHost,
    ctx: u32,
    method: &str,
    path: &str,
    more: &[(&str, &str)],
) -> Action {
    vm.on_context_create(ctx, ROOT);
    let headers = [
        (":method", method),
        (":path", path),
        (":authority", "127.0.0.1:10000"),
        (":scheme", "http"),
    ];
    host.headers.insert(
        ctx,
        headers
            .iter()
            .chain(more)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    host.effective = ctx;
    vm.on_request_headers_with_body(host, ctx, method == "POST")
}

/// The local reply to `ctx`: status and body.
fn reply(host: &FakeHost, ctx: u32) -> (u16, Vec<u8>) {
    host.calls
        .iter()
        .rev()
        .find_map(|c| match c {
            Call::LocalReply {
                context,
                status,
                body,
                ..
            } if *context == ctx => Some((*status, body.clone())),
            _ => None,
        })
        .expect("a local reply")
}

/// `ctx` was answered 400 `invalid_request` with a message that starts with `message`,
/// and nothing was held.
fn assert_refused(host: &FakeHost, ctx: u32, message: &str) {
    let (status, body) = reply(host, ctx);
    assert_eq!(status, 400);
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(body.error, "invalid_request");
    assert!(body.message.starts_with(message), "{}", body.message);
    assert!(host.grpc_calls().is_empty(), "nothing is held");
}

#[test]
fn a_query_parameter_repeated_with_different_values_is_a_400_naming_it() {
    let (mut vm, mut host) = filter();
    assert_eq!(
        request(&mut vm, &mut host, 2, "GET", "/paid/pages?n=1&n=1000"),
        Action::Pause
    );
    assert_refused(
        &host,
        2,
        "query parameter n is given more than once with different values",
    );

    // The same value twice is priced as given once: a 402 challenge.
    request(&mut vm, &mut host, 3, "GET", "/paid/pages?n=7&n=7");
    assert_eq!(reply(&host, 3).0, 402);
}

#[test]
fn a_body_key_written_twice_is_a_400_naming_it() {
    let (mut vm, mut host) = filter();
    request(&mut vm, &mut host, 2, "POST", "/paid/units");
    let body = br#"{"units": 1, "units": 1000}"#;
    host.request_bodies.insert(2, body.to_vec());
    host.effective = 2;
    assert_eq!(
        vm.on_request_body(&mut host, 2, body.len(), true),
        Action::Pause
    );
    assert_refused(
        &host,
        2,
        "the request body repeats a key: duplicate field `units`",
    );
}

#[test]
fn a_header_repeated_with_different_values_is_a_400_naming_it() {
    let (mut vm, mut host) = filter();
    let repeated = [("x-seats", "1"), ("X-Seats", "1000")];
    assert_eq!(
        request_with(&mut vm, &mut host, 2, "GET", "/paid/seats", &repeated),
        Action::Pause
    );
    assert_refused(
        &host,
        2,
        "header x-seats is given more than once with different values",
    );
}
