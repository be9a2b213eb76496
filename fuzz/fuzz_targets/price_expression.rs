//! The price expression language: the first line is the expression (parsed as at
//! config load), the rest is a JSON request body it is evaluated against. Parsing
//! and evaluation return values or errors, never panic (overflow, division by zero
//! and deep nesting included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_filter::expr::{eval, parse, Inputs};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expression, body) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(expr) = parse(expression) else {
        return;
    };
    let body: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let headers = [("x-units".to_owned(), "7".to_owned())];
    let inputs = Inputs {
        body: body.as_ref(),
        path: "/paid/quote?n=3&units=12",
        headers: &headers,
    };
    let _ = eval(&expr, &inputs);
});
