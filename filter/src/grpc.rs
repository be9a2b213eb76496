//! gRPC on priced routes: matching a route by gRPC method, deciding from the upstream's
//! `grpc-status` whether a hold is captured or voided, and answering a gRPC client's
//! payment problems as a gRPC status it can read.
//!
//! A gRPC call is an HTTP/2 `POST /pkg.Service/Method` with `content-type:
//! application/grpc`; its outcome is `grpc-status` in the trailers (or in the headers
//! of a trailers-only response), while the HTTP status is 200 either way. So:
//!
//! - a route's `match.grpc_method` (`pkg.Service/Method`, or `pkg.Service/*` for every
//!   method of a service) is the same as `method: POST` with that path;
//! - a paid call whose response carries a `grpc-status` in `grpc_void_codes` (by
//!   default every code but OK) is voided, OK and the other codes capture;
//! - the filter's own answers (402, 400, 429, 503, ...) to a gRPC request become a
//!   trailers-only gRPC response: HTTP 200, `grpc-status` from [`grpc_code_for_http`],
//!   `grpc-message`, and the same metadata as the HTTP answer (the x402 challenge in
//!   `payment-required`, `retry-after`), so a gRPC client can pay and retry.

use crate::config::{ConfigError, PathMatch};

/// The canonical gRPC status codes, by number.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub const OK: u32 = 0;
pub const UNKNOWN: u32 = 2;
pub const INVALID_ARGUMENT: u32 = 3;
pub const NOT_FOUND: u32 = 5;
pub const PERMISSION_DENIED: u32 = 7;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;

/// A gRPC status code as an operator writes it: a number (`13`) or a name
/// (`"INTERNAL"`, any case).
#[derive(Debug, Clone)]
pub enum RawCode {
    Number(u64),
    Name(String),
}

impl RawCode {
    pub fn read(field: String, value: &serde_json::Value) -> Result<RawCode, ConfigError> {
        match value {
            serde_json::Value::String(name) => Ok(RawCode::Name(name.clone())),
            v => v.as_u64().map(RawCode::Number).ok_or(ConfigError::Invalid {
                field,
                reason: "must be a gRPC status code number or name".to_owned(),
            }),
        }
    }
}

/// A set of gRPC status codes (bit `n` = code `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeSet(u32);

impl CodeSet {
    /// Every code except OK: the default of `grpc_void_codes`.
    pub const ALL_ERRORS: CodeSet = CodeSet(((1 << CODE_NAMES.len()) - 1) & !1);

    pub fn contains(self, code: u32) -> bool {
        code < 32 && self.0 & (1 << code) != 0
    }

    /// Compiles `grpc_void_codes`; the error says which entry is wrong.
    pub fn compile(raw: &[RawCode]) -> Result<CodeSet, String> {
        let mut set = 0u32;
        for (i, code) in raw.iter().enumerate() {
            let n = match code {
                RawCode::Number(n) => u32::try_from(*n).ok().filter(|n| *n < 17),
                RawCode::Name(name) => CODE_NAMES
                    .iter()
                    .position(|known| known.eq_ignore_ascii_case(name))
                    .and_then(|n| u32::try_from(n).ok()),
            };
            match n {
                Some(OK) => return Err(format!("entry {i} is OK, which never voids")),
                Some(n) => set |= 1 << n,
                None => {
                    return Err(format!(
                        "entry {i} is not a gRPC status code (0-16 or a name such as INTERNAL)"
                    ))
                }
            }
        }
        Ok(CodeSet(set))
    }
}

/// The path a `match.grpc_method` stands for: `pkg.Service/Method` is exactly
/// `/pkg.Service/Method`, `pkg.Service/*` every path under `/pkg.Service/`.
pub fn method_path(grpc_method: &str) -> Result<PathMatch, &'static str> {
    const SHAPE: &str =
        "must be `package.Service/Method` or `package.Service/*`, without a leading '/'";
    let (service, method) = grpc_method.split_once('/').ok_or(SHAPE)?;
    let ident = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            && !s.starts_with('.')
            && !s.ends_with('.')
    };
    if !ident(service) {
        return Err(SHAPE);
    }
    if method == "*" {
        return Ok(PathMatch::Prefix(format!("/{service}/")));
    }
    if !ident(method) || method.contains('.') {
        return Err(SHAPE);
    }
    Ok(PathMatch::Exact(format!("/{service}/{method}")))
}

/// A `content-type` of a gRPC message stream (`application/grpc`, `+proto`, `+json`,
/// ...), as Envoy itself decides it. gRPC-Web is not gRPC here: its clients read HTTP.
pub fn is_grpc_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/grpc" || essence.starts_with("application/grpc+")
}

/// What the response of a paid call has said about its gRPC status so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GrpcResponse {
    /// Not a gRPC response (or none yet): HTTP rules decide.
    #[default]
    NotGrpc,
    /// A gRPC response with no `grpc-status` yet.
    AwaitingStatus,
    /// The call's `grpc-status`.
    Status(u32),
    /// A `grpc-status` that is not a number: gRPC clients take it as an error.
    Garbled,
}

impl GrpcResponse {
    /// From the response headers: `None` when the response is not gRPC.
    pub fn from_headers(content_type: Option<&str>, grpc_status: Option<&str>) -> GrpcResponse {
        if !content_type.is_some_and(is_grpc_content_type) {
            return GrpcResponse::NotGrpc;
        }
        match grpc_status {
            None => GrpcResponse::AwaitingStatus,
            Some(value) => GrpcResponse::from_status(value),
        }
    }

    pub fn from_status(value: &str) -> GrpcResponse {
        match value.trim().parse::<u32>() {
            Ok(code) => GrpcResponse::Status(code),
            Err(_) => GrpcResponse::Garbled,
        }
    }

    /// Folds a later observation in: trailers overrule headers, nothing overrules a
    /// status with "no status".
    pub fn then(self, later: GrpcResponse) -> GrpcResponse {
        match (self, later) {
            (_, GrpcResponse::NotGrpc) => self,
            (GrpcResponse::NotGrpc, GrpcResponse::AwaitingStatus) => later,
            (_, GrpcResponse::AwaitingStatus) => self,
            (_, status) => status,
        }
    }

    /// Why a complete gRPC response releases its hold, or `None` when HTTP rules decide
    /// (not gRPC, OK, or a code the operator captures).
    pub fn void_reason(self, void_codes: CodeSet) -> Option<String> {
        match self {
            GrpcResponse::NotGrpc => None,
            GrpcResponse::Status(code) if code == OK || !void_codes.contains(code) => None,
            GrpcResponse::Status(code) => Some(format!(
                "grpc_{}",
                CODE_NAMES
                    .get(code as usize)
                    .map_or("unknown".to_owned(), |n| n.to_ascii_lowercase())
            )),
            // A call that ended without a status failed for its client.
            GrpcResponse::AwaitingStatus => Some("grpc_status_missing".to_owned()),
            GrpcResponse::Garbled => Some("grpc_status_invalid".to_owned()),
        }
    }
}

/// The gRPC status a gRPC client gets for one of the filter's HTTP answers.
///
/// | HTTP | gRPC |
/// | --- | --- |
/// | 402 payment required (any x402 error code) | 16 UNAUTHENTICATED |
/// | 400 malformed payment or invalid request | 3 INVALID_ARGUMENT |
/// | 401 | 16 UNAUTHENTICATED |
/// | 403 not allowed | 7 PERMISSION_DENIED |
/// | 404 | 5 NOT_FOUND |
/// | 413 body too large, 429 rate limited | 8 RESOURCE_EXHAUSTED |
/// | 502, 503 settlement unavailable, 504 | 14 UNAVAILABLE |
/// | other 5xx | 13 INTERNAL |
/// | anything else | 2 UNKNOWN |
pub fn grpc_code_for_http(status: u16) -> u32 {
    match status {
        402 | 401 => UNAUTHENTICATED,
        400 => INVALID_ARGUMENT,
        403 => PERMISSION_DENIED,
        404 => NOT_FOUND,
        413 | 429 => RESOURCE_EXHAUSTED,
        502..=504 => UNAVAILABLE,
        500..=599 => INTERNAL,
        _ => UNKNOWN,
    }
}

/// A filter answer rewritten for a gRPC client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcReply {
    pub grpc_status: u32,
    /// `grpc-message` (Envoy percent-encodes it).
    pub message: String,
    /// Metadata: the HTTP answer's headers without the ones that describe its body.
    pub headers: Vec<(String, String)>,
}

/// Turns the filter's HTTP answer (status, headers, JSON body) into a gRPC status for
/// a gRPC client; `None` for a successful answer (e.g. discovery), which stays HTTP.
pub fn reply(status: u16, headers: &[(String, String)], body: &[u8]) -> Option<GrpcReply> {
    if status < 400 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |key: &str| json.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    let error = text("error");
    let message = if status == 402 {
        let code = if error.is_empty() {
            "payment_required"
        } else {
            error
        };
        match json.get("price").and_then(|v| v.as_str()) {
            Some(price) => format!(
                "{code}: this call costs {price}; pay with the x402 challenge in the payment-required metadata"
            ),
            None => format!(
                "{code}: pay with the x402 challenge in the payment-required metadata"
            ),
        }
    } else {
        match (error, text("message")) {
            ("", "") => format!("request refused with HTTP status {status}"),
            (e, "") => e.to_owned(),
            ("", m) => m.to_owned(),
            (e, m) => format!("{e}: {m}"),
        }
    };
    let headers = headers
        .iter()
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("content-type") && !k.eq_ignore_ascii_case("content-length")
        })
        .cloned()
        .collect();
    Some(GrpcReply {
        grpc_status: grpc_code_for_http(status),
        message,
        headers,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn grpc_methods_become_paths() {
        assert_eq!(
            method_path("quotes.v1.Quotes/GetQuote"),
            Ok(PathMatch::Exact("/quotes.v1.Quotes/GetQuote".into()))
        );
        assert_eq!(
            method_path("quotes.v1.Quotes/*"),
            Ok(PathMatch::Prefix("/quotes.v1.Quotes/".into()))
        );
        for bad in [
            "/quotes.v1.Quotes/GetQuote",
            "quotes.v1.Quotes",
            "quotes.v1.Quotes/",
            "quotes.v1.Quotes/a/b",
            "quotes v1/Get",
            ".x/Get",
            "x/Get?y",
        ] {
            assert!(method_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grpc_content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC; charset=x",
        ] {
            assert!(is_grpc_content_type(ct), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/json",
            "application/grpcx",
        ] {
            assert!(!is_grpc_content_type(ct), "{ct}");
        }
    }

    #[test]
    fn void_codes_by_number_or_name() {
        let set =
            CodeSet::compile(&[RawCode::Number(13), RawCode::Name("unavailable".into())]).unwrap();
        assert!(set.contains(INTERNAL) && set.contains(UNAVAILABLE));
        assert!(!set.contains(NOT_FOUND) && !set.contains(OK));
        assert!(CodeSet::compile(&[RawCode::Number(0)]).is_err());
        assert!(CodeSet::compile(&[RawCode::Number(17)]).is_err());
        assert!(CodeSet::compile(&[RawCode::Name("BROKEN".into())]).is_err());
        assert!(!CodeSet::ALL_ERRORS.contains(OK));
        assert!((1..=16).all(|c| CodeSet::ALL_ERRORS.contains(c)));
        assert!(!CodeSet::ALL_ERRORS.contains(17));
    }

    #[test]
    fn a_grpc_error_voids_and_ok_captures() {
        let all = CodeSet::ALL_ERRORS;
        assert_eq!(GrpcResponse::NotGrpc.void_reason(all), None);
        assert_eq!(GrpcResponse::Status(OK).void_reason(all), None);
        assert_eq!(
            GrpcResponse::Status(INTERNAL).void_reason(all).as_deref(),
            Some("grpc_internal")
        );
        let only_internal = CodeSet::compile(&[RawCode::Number(13)]).unwrap();
        assert_eq!(
            GrpcResponse::Status(NOT_FOUND).void_reason(only_internal),
            None
        );
        assert_eq!(
            GrpcResponse::AwaitingStatus.void_reason(all).as_deref(),
            Some("grpc_status_missing")
        );
        assert_eq!(
            GrpcResponse::from_status("x").void_reason(all).as_deref(),
            Some("grpc_status_invalid")
        );
    }

    #[test]
    fn trailers_overrule_headers() {
        let headers = GrpcResponse::from_headers(Some("application/grpc"), None);
        assert_eq!(headers, GrpcResponse::AwaitingStatus);
        assert_eq!(
            headers.then(GrpcResponse::from_status("13")),
            GrpcResponse::Status(13)
        );
        assert_eq!(
            GrpcResponse::Status(0).then(GrpcResponse::AwaitingStatus),
            GrpcResponse::Status(0)
        );
        assert_eq!(
            GrpcResponse::NotGrpc.then(GrpcResponse::AwaitingStatus),
            GrpcResponse::AwaitingStatus
        );
        assert_eq!(
            GrpcResponse::from_headers(Some("application/json"), Some("13")),
            GrpcResponse::NotGrpc
        );
    }

    #[test]
    fn payment_answers_become_grpc_statuses() {
        let headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("payment-required".to_owned(), "eyJ9".to_owned()),
        ];
        let body = br#"{"x402Version":2,"error":"insufficient_funds","price":"0.01"}"#;
        let r = reply(402, &headers, body).unwrap();
        assert_eq!(r.grpc_status, UNAUTHENTICATED);
        assert!(r
            .message
            .starts_with("insufficient_funds: this call costs 0.01"));
        assert_eq!(
            r.headers,
            vec![("payment-required".to_owned(), "eyJ9".to_owned())]
        );
        let r = reply(
            400,
            &[],
            br#"{"error":"malformed_payment","message":"bad base64"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.grpc_status, r.message.as_str()),
            (INVALID_ARGUMENT, "malformed_payment: bad base64")
        );
        assert_eq!(
            reply(429, &[], b"").unwrap().grpc_status,
            RESOURCE_EXHAUSTED
        );
        assert_eq!(reply(503, &[], b"{}").unwrap().grpc_status, UNAVAILABLE);
        assert_eq!(reply(200, &[], b"{}"), None);
    }
}
