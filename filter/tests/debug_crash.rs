//! The test-only `debug_crash_on_header` switch: a request carrying the configured
//! header traps the VM before anything is decided or sent; without the switch, or
//! without the header, the request is handled as usual.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use x402_filter::host::{Call, FakeHost};
use x402_filter::plugin::Vm;

const ROOT: u32 = 1;
const CTX: u32 = 2;

fn config(crash_header: Option<&str>) -> String {
    let mut c = serde_json::json!({
        "settlement_cluster": "settlement",
        "pay_to": "merchant-demo",
        "routes": [{"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"}]
    });
    if let Some(name) = crash_header {
        c["debug_crash_on_header"] = name.into();
    }
    c.to_string()
}

/// Sends one unpaid `GET /paid/quote` (with `extra` headers) and returns the host.
fn request(crash_header: Option<&str>, extra: &[(&str, &str)]) -> FakeHost {
    let mut vm = Vm::default();
    let mut host = FakeHost {
        now_nanos: 1_800_000_000 * 1_000_000_000,
        ..FakeHost::default()
    };
    vm.on_context_create(ROOT, 0);
    assert!(vm.on_configure(&mut host, ROOT, config(crash_header).as_bytes()));
    vm.on_context_create(CTX, ROOT);
    let mut headers: Vec<(String, String)> = vec![
        (":method".into(), "GET".into()),
        (":path".into(), "/paid/quote".into()),
        (":authority".into(), "127.0.0.1:10000".into()),
        (":scheme".into(), "http".into()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    host.headers.insert(CTX, headers);
    host.effective = CTX;
    vm.on_request_headers(&mut host, CTX);
    host
}

fn statuses(host: &FakeHost) -> Vec<u16> {
    host.calls
        .iter()
        .filter_map(|c| match c {
            Call::LocalReply { status, .. } => Some(*status),
            _ => None,
        })
        .collect()
}

#[test]
fn the_configured_header_traps_before_anything_is_answered_or_sent() {
    let host = request(Some("x-debug-crash"), &[("x-debug-crash", "1")]);
    assert!(host.trapped);
    assert!(host.calls.is_empty(), "{:?}", host.calls);
}

#[test]
fn without_the_header_the_request_is_challenged_as_usual() {
    let host = request(Some("x-debug-crash"), &[("x-other", "1")]);
    assert!(!host.trapped);
    assert_eq!(statuses(&host), [402]);
}

#[test]
fn without_the_switch_the_header_means_nothing() {
    let host = request(None, &[("x-debug-crash", "1")]);
    assert!(!host.trapped);
    assert_eq!(statuses(&host), [402]);
}
