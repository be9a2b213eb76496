//! HTTP wire types of the x402 v2 transport as 402x speaks it, their base64/JSON
//! encoding, and the stateless checks of a payment header.
//!
//! Headers: `PAYMENT-REQUIRED` (402 challenge), `PAYMENT-SIGNATURE` (alias
//! `X-402-Payment`, the client's proof) and `PAYMENT-RESPONSE` (receipt). Each carries
//! standard base64 (RFC 4648, padded) of a UTF-8 JSON document.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::amount;
use crate::signing::SignedFields;

pub const HEADER_PAYMENT_REQUIRED: &str = "payment-required";
pub const HEADER_PAYMENT_SIGNATURE: &str = "payment-signature";
pub const HEADER_PAYMENT_SIGNATURE_ALIAS: &str = "x-402-payment";
pub const HEADER_PAYMENT_RESPONSE: &str = "payment-response";

/// Largest payment header accepted, before decoding. A proof is about 1 KB.
pub const MAX_PAYMENT_HEADER_BYTES: usize = 8 * 1024;
/// Nonce length bounds in bytes.
pub const MIN_NONCE_BYTES: usize = 16;
pub const MAX_NONCE_BYTES: usize = 64;
/// Longest accepted value of a short string field (scheme, network, asset, payTo).
pub const MAX_SHORT_FIELD: usize = 128;
/// Longest accepted resource string.
pub const MAX_RESOURCE: usize = 4096;

/// What a resource server accepts as payment for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    /// `exact` (fixed price) or `upto` (metered; `amount` is the most it may cost).
    pub scheme: String,
    pub network: String,
    /// Atomic units as a decimal string.
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mime_type: String,
}

/// The 402 challenge: sent base64 in `PAYMENT-REQUIRED` and as the JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    pub x402_version: u32,
    /// Machine-readable reason (see [`ErrorCode`]); `payment_required` when no proof came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub resource: ResourceInfo,
    pub accepts: Vec<PaymentRequirements>,
    /// Human price of the first requirement as a decimal string, e.g. `"0.01"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    /// The merchant account that is paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_address: Option<String>,
    /// Free requests this client has left on the route in the current window, on
    /// routes with a free tier (`0`: used up, so the price applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_remaining: Option<u64>,
}

/// The signed part of an `exact`/`upto` payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentAuthorization {
    /// Lowercase hex ed25519 public key.
    pub payer: String,
    /// Lowercase hex, 16 to 64 random bytes.
    pub nonce: String,
    /// Unix seconds as a decimal string; the proof is refused at or after this time.
    pub valid_before: String,
    /// `METHOD authority path?query`, see [`crate::signing::resource_string`].
    pub resource: String,
    /// Lowercase hex ed25519 signature over the canonical bytes.
    pub signature: String,
}

/// The client's proof: sent base64 in `PAYMENT-SIGNATURE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    pub x402_version: u32,
    pub accepted: PaymentRequirements,
    pub payload: PaymentAuthorization,
}

/// The receipt: sent base64 in `PAYMENT-RESPONSE` on success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    pub transaction: String,
    pub network: String,
    pub payer: String,
    /// Atomic units: the charged amount for `exact`, the held maximum for `upto`.
    pub amount: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
}

/// JSON body of a 400, 429 or 503 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// Machine-readable error codes, the `error` field of challenges and error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No payment header was sent.
    PaymentRequired,
    /// 400: the payment header could not be decoded or is malformed.
    MalformedPayment,
    Expired,
    /// validBefore is further in the future than the route allows.
    ValidityTooLong,
    AmountBelowPrice,
    WrongScheme,
    WrongPayTo,
    WrongNetwork,
    WrongAsset,
    WrongResource,
    InvalidSignature,
    UnknownKey,
    KeyRevoked,
    InsufficientFunds,
    NonceReused,
    /// 503: settlement could not be reached and the route fails closed.
    SettlementUnavailable,
    /// 503: the seller's merchant account is closed; no payment is taken.
    MerchantClosed,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::PaymentRequired,
        ErrorCode::MalformedPayment,
        ErrorCode::Expired,
        ErrorCode::ValidityTooLong,
        ErrorCode::AmountBelowPrice,
        ErrorCode::WrongScheme,
        ErrorCode::WrongPayTo,
        ErrorCode::WrongNetwork,
        ErrorCode::WrongAsset,
        ErrorCode::WrongResource,
        ErrorCode::InvalidSignature,
        ErrorCode::UnknownKey,
        ErrorCode::KeyRevoked,
        ErrorCode::InsufficientFunds,
        ErrorCode::NonceReused,
        ErrorCode::SettlementUnavailable,
        ErrorCode::MerchantClosed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::PaymentRequired => "payment_required",
            ErrorCode::MalformedPayment => "malformed_payment",
            ErrorCode::Expired => "expired",
            ErrorCode::ValidityTooLong => "validity_too_long",
            ErrorCode::AmountBelowPrice => "amount_below_price",
            ErrorCode::WrongScheme => "wrong_scheme",
            ErrorCode::WrongPayTo => "wrong_pay_to",
            ErrorCode::WrongNetwork => "wrong_network",
            ErrorCode::WrongAsset => "wrong_asset",
            ErrorCode::WrongResource => "wrong_resource",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::UnknownKey => "unknown_key",
            ErrorCode::KeyRevoked => "key_revoked",
            ErrorCode::InsufficientFunds => "insufficient_funds",
            ErrorCode::NonceReused => "nonce_reused",
            ErrorCode::SettlementUnavailable => "settlement_unavailable",
            ErrorCode::MerchantClosed => "merchant_closed",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status this code is answered with.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::MalformedPayment => 400,
            ErrorCode::SettlementUnavailable | ErrorCode::MerchantClosed => 503,
            _ => 402,
        }
    }
}

/// Why a payment header is malformed (always a 400, never a 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("payment header is larger than {MAX_PAYMENT_HEADER_BYTES} bytes")]
    TooLarge,
    #[error("payment header is not valid base64")]
    Base64,
    #[error("payment header is not valid UTF-8 JSON: {0}")]
    Json(String),
    #[error("unsupported x402Version {0}, expected 2")]
    Version(u32),
    #[error("field `{field}` is invalid: {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
}

fn field(field: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Field { field, reason }
}

/// Standard base64 of the compact JSON of `value`.
pub fn encode_header<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail; fall back to an empty object anyway.
    let json = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    encode_header_json(&json)
}

/// [`encode_header`] of a document already serialized (e.g. also sent as a body).
pub fn encode_header_json(json: &[u8]) -> String {
    crate::b64::encode(json)
}

/// Decodes standard base64 (padded or not) of a JSON document.
pub fn decode_header<T: for<'de> Deserialize<'de>>(value: &str) -> Result<T, DecodeError> {
    serde_json::from_slice(&header_bytes(value)?).map_err(|e| DecodeError::Json(e.to_string()))
}

/// The bytes a header's base64 carries.
fn header_bytes(value: &str) -> Result<Vec<u8>, DecodeError> {
    if value.len() > MAX_PAYMENT_HEADER_BYTES {
        return Err(DecodeError::TooLarge);
    }
    crate::b64::decode(value.trim()).ok_or(DecodeError::Base64)
}

fn check_short(name: &'static str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() {
        return Err(field(name, "must not be empty"));
    }
    if value.len() > MAX_SHORT_FIELD {
        return Err(field(name, "is too long"));
    }
    if value.chars().any(char::is_control) {
        return Err(field(name, "contains a control character"));
    }
    Ok(())
}

fn check_hex(
    name: &'static str,
    value: &str,
    min_bytes: usize,
    max_bytes: usize,
) -> Result<(), DecodeError> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok_chars || !value.len().is_multiple_of(2) {
        return Err(field(name, "must be lowercase hex"));
    }
    let n = value.len() / 2;
    if n < min_bytes || n > max_bytes {
        return Err(field(name, "has the wrong length"));
    }
    Ok(())
}

/// A payment payload that passed every stateless syntax check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPayment {
    pub payload: PaymentPayload,
    /// `accepted.amount` parsed.
    pub amount: u64,
    /// `payload.validBefore` parsed.
    pub valid_before: u64,
}

impl CheckedPayment {
    /// The fields the signature binds.
    pub fn signed_fields(&self) -> SignedFields<'_> {
        self.payload.signed_fields()
    }
}

impl PaymentPayload {
    pub fn signed_fields(&self) -> SignedFields<'_> {
        SignedFields {
            scheme: &self.accepted.scheme,
            network: &self.accepted.network,
            asset: &self.accepted.asset,
            amount: &self.accepted.amount,
            pay_to: &self.accepted.pay_to,
            resource: &self.payload.resource,
            nonce: &self.payload.nonce,
            valid_before: &self.payload.valid_before,
        }
    }
}

impl From<PaymentPayload> for crate::settlement::v1::PaymentProof {
    /// The signed fields as settlement's data-plane API carries them, verbatim, so
    /// settlement rebuilds exactly the bytes the payer signed.
    fn from(p: PaymentPayload) -> Self {
        Self {
            scheme: p.accepted.scheme,
            network: p.accepted.network,
            asset: p.accepted.asset,
            amount: p.accepted.amount,
            pay_to: p.accepted.pay_to,
            resource: p.payload.resource,
            nonce: p.payload.nonce,
            valid_before: p.payload.valid_before,
            payer: p.payload.payer,
            signature: p.payload.signature,
        }
    }
}

/// Decodes a `PAYMENT-SIGNATURE` header and checks its syntax: version 2, every
/// signed field present and well formed, amounts and times exact integers.
/// Semantic checks (price, payTo, expiry, resource) belong to the caller.
pub fn decode_payment(value: &str) -> Result<CheckedPayment, DecodeError> {
    let json = crate::json::parse_strict(&header_bytes(value)?)
        .map_err(|e| DecodeError::Json(e.to_string()))?;
    check_payment(read_payment(&json)?)
}

/// Reads a payment payload from its JSON, accepting what the derived `Deserialize`
/// accepts from a JSON object: unknown fields ignored except in `payload`, `extra`
/// optional. Read by hand so that a module decoding proofs carries no serde visitor
/// for numbers, whose error messages format floating point.
fn read_payment(json: &Value) -> Result<PaymentPayload, DecodeError> {
    let top = object("payload document", json)?;
    let accepted = object("accepted", required(top, "accepted", "accepted")?)?;
    let payload = object("payload", required(top, "payload", "payload")?)?;
    const SIGNED: [&str; 5] = ["payer", "nonce", "validBefore", "resource", "signature"];
    if payload.keys().any(|k| !SIGNED.contains(&k.as_str())) {
        return Err(field("payload", "has a field that is not signed"));
    }
    let extra = match accepted.get("extra") {
        None => serde_json::Map::new(),
        Some(v) => object("accepted.extra", v)?.clone(),
    };
    let version = uint("x402Version", required(top, "x402Version", "x402Version")?)?;
    Ok(PaymentPayload {
        x402_version: u32::try_from(version)
            .map_err(|_| field("x402Version", "must be an unsigned 32-bit integer"))?,
        accepted: PaymentRequirements {
            scheme: string(accepted, "scheme", "accepted.scheme")?,
            network: string(accepted, "network", "accepted.network")?,
            amount: string(accepted, "amount", "accepted.amount")?,
            asset: string(accepted, "asset", "accepted.asset")?,
            pay_to: string(accepted, "payTo", "accepted.payTo")?,
            max_timeout_seconds: uint(
                "accepted.maxTimeoutSeconds",
                required(accepted, "maxTimeoutSeconds", "accepted.maxTimeoutSeconds")?,
            )?,
            extra,
        },
        payload: PaymentAuthorization {
            payer: string(payload, "payer", "payload.payer")?,
            nonce: string(payload, "nonce", "payload.nonce")?,
            valid_before: string(payload, "validBefore", "payload.validBefore")?,
            resource: string(payload, "resource", "payload.resource")?,
            signature: string(payload, "signature", "payload.signature")?,
        },
    })
}

type Object = serde_json::Map<String, Value>;

fn object<'v>(path: &'static str, value: &'v Value) -> Result<&'v Object, DecodeError> {
    value
        .as_object()
        .ok_or_else(|| field(path, "must be a JSON object"))
}

fn required<'v>(o: &'v Object, name: &str, path: &'static str) -> Result<&'v Value, DecodeError> {
    o.get(name).ok_or_else(|| field(path, "is missing"))
}

fn string(o: &Object, name: &str, path: &'static str) -> Result<String, DecodeError> {
    match required(o, name, path)? {
        Value::String(s) => Ok(s.clone()),
        _ => Err(field(path, "must be a string")),
    }
}

fn uint(path: &'static str, value: &Value) -> Result<u64, DecodeError> {
    value
        .as_u64()
        .ok_or_else(|| field(path, "must be a non-negative integer"))
}

/// The syntax checks of [`decode_payment`] on an already decoded payload.
pub fn check_payment(payload: PaymentPayload) -> Result<CheckedPayment, DecodeError> {
    if payload.x402_version != crate::X402_VERSION {
        return Err(DecodeError::Version(payload.x402_version));
    }
    let a = &payload.accepted;
    check_short("accepted.scheme", &a.scheme)?;
    check_short("accepted.network", &a.network)?;
    check_short("accepted.asset", &a.asset)?;
    check_short("accepted.payTo", &a.pay_to)?;
    let amount = amount::parse_atomic(&a.amount).map_err(|_| {
        field(
            "accepted.amount",
            "must be a non-negative integer of atomic units",
        )
    })?;
    let p = &payload.payload;
    check_hex("payload.payer", &p.payer, 32, 32)?;
    check_hex("payload.nonce", &p.nonce, MIN_NONCE_BYTES, MAX_NONCE_BYTES)?;
    check_hex("payload.signature", &p.signature, 64, 64)?;
    if p.resource.is_empty()
        || p.resource.len() > MAX_RESOURCE
        || p.resource.chars().any(char::is_control)
    {
        return Err(field(
            "payload.resource",
            "must be 1-4096 characters without control characters",
        ));
    }
    let valid_before = amount::parse_atomic(&p.valid_before).map_err(|_| {
        field(
            "payload.validBefore",
            "must be unix seconds as a decimal string",
        )
    })?;
    Ok(CheckedPayment {
        payload,
        amount,
        valid_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    fn sample() -> PaymentPayload {
        PaymentPayload {
            x402_version: 2,
            accepted: PaymentRequirements {
                scheme: "exact".into(),
                network: "402x:local".into(),
                amount: "10000".into(),
                asset: "USD".into(),
                pay_to: "merchant-demo".into(),
                max_timeout_seconds: 60,
                extra: serde_json::Map::new(),
            },
            payload: PaymentAuthorization {
                payer: "ab".repeat(32),
                nonce: "cd".repeat(16),
                valid_before: "1900000000".into(),
                resource: "GET localhost:10000/paid".into(),
                signature: "ef".repeat(64),
            },
        }
    }

    #[test]
    fn payment_round_trips_through_the_header() {
        let header = encode_header(&sample());
        let checked = decode_payment(&header).unwrap();
        assert_eq!(checked.payload, sample());
        assert_eq!(checked.amount, 10_000);
        assert_eq!(checked.valid_before, 1_900_000_000);
    }

    /// The hand reader accepts exactly what the derived `Deserialize` accepts from a JSON
    /// object, and reads the same values: every field of the sample, and one unknown
    /// field at each level, set to each kind of JSON value or left out.
    #[test]
    fn the_payment_reader_agrees_with_the_derived_deserializer() {
        let base = serde_json::to_value(sample()).unwrap();
        let values = serde_json::json!([
            null, true, 0, 1, 2, -1, 1.5, 2.0, 1e2, 4294967295u64, 4294967296u64,
            18446744073709551615u64, "2", "", "x", [], [1], {}, {"k": 1}
        ]);
        let mut paths: Vec<Vec<&str>> = vec![vec!["unknown"], vec!["accepted", "unknown"]];
        paths.push(vec!["payload", "unknown"]);
        for (parent, o) in base.as_object().unwrap() {
            paths.push(vec![parent.as_str()]);
            if let Some(o) = o.as_object() {
                paths.extend(o.keys().map(|k| vec![parent.as_str(), k.as_str()]));
            }
        }
        paths.push(vec!["accepted", "extra"]);
        let mut documents = vec![base.clone()];
        for path in &paths {
            let (last, parents) = path.split_last().unwrap();
            let mut removed = base.clone();
            let mut at = &mut removed;
            for p in parents {
                at = &mut at[*p];
            }
            at.as_object_mut().unwrap().remove(*last);
            documents.push(removed);
            for v in values.as_array().unwrap() {
                let mut doc = base.clone();
                let mut at = &mut doc;
                for p in path {
                    at = &mut at[*p];
                }
                *at = v.clone();
                documents.push(doc);
            }
        }
        let mut accepted = 0;
        for doc in &documents {
            let derived = serde_json::from_value::<PaymentPayload>(doc.clone()).ok();
            assert_eq!(read_payment(doc).ok(), derived, "{doc}");
            accepted += usize::from(derived.is_some());
        }
        assert!(
            accepted > 20 && accepted < documents.len() / 2,
            "{accepted}"
        );
        for not_an_object in [
            serde_json::json!([]),
            serde_json::json!(null),
            serde_json::json!(2),
        ] {
            assert!(read_payment(&not_an_object).is_err());
        }
    }

    #[test]
    fn a_key_written_twice_is_refused_at_any_depth() {
        let json = serde_json::to_string(&sample()).unwrap();
        for (from, to) in [
            (
                "{\"x402Version\":2,",
                "{\"x402Version\":2,\"x402Version\":2,",
            ),
            ("\"amount\":", "\"amount\":\"1\",\"amount\":"),
            ("\"payer\":", "\"payer\":\"ab\",\"payer\":"),
        ] {
            assert!(json.contains(from));
            let twice = json.replacen(from, to, 1);
            assert!(matches!(
                decode_payment(&encode_header_json(twice.as_bytes())),
                Err(DecodeError::Json(e)) if e.contains("duplicate field")
            ));
        }
        assert!(decode_payment(&encode_header_json(json.as_bytes())).is_ok());
    }

    #[test]
    fn json_uses_x402_field_names() {
        let v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["x402Version"], 2);
        assert_eq!(v["accepted"]["payTo"], "merchant-demo");
        assert_eq!(v["accepted"]["maxTimeoutSeconds"], 60);
        assert_eq!(v["payload"]["validBefore"], "1900000000");
    }

    #[test]
    fn malformed_headers_name_the_problem() {
        assert_eq!(decode_payment("%%%"), Err(DecodeError::Base64));
        assert!(matches!(
            decode_payment(&STANDARD.encode("not json")),
            Err(DecodeError::Json(_))
        ));
        assert_eq!(
            decode_payment(&"A".repeat(MAX_PAYMENT_HEADER_BYTES + 1)),
            Err(DecodeError::TooLarge)
        );
        let mut p = sample();
        p.x402_version = 1;
        assert_eq!(
            decode_payment(&encode_header(&p)),
            Err(DecodeError::Version(1))
        );
        for (amount, ok) in [
            ("-1", false),
            ("1.5", false),
            ("99999999999999999999", false),
            ("01", false),
            ("0", true),
        ] {
            let mut p = sample();
            p.accepted.amount = amount.into();
            assert_eq!(
                decode_payment(&encode_header(&p)).is_ok(),
                ok,
                "amount {amount}"
            );
        }
        let mut p = sample();
        p.payload.nonce = "cd".repeat(8);
        assert!(matches!(
            decode_payment(&encode_header(&p)),
            Err(DecodeError::Field {
                field: "payload.nonce",
                ..
            })
        ));
        let mut p = sample();
        p.payload.payer = "AB".repeat(32);
        assert!(matches!(
            decode_payment(&encode_header(&p)),
            Err(DecodeError::Field {
                field: "payload.payer",
                ..
            })
        ));
        let bad_utf8 = STANDARD.encode([0x7b, 0xff, 0xfe, 0x7d]);
        assert!(matches!(
            decode_payment(&bad_utf8),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::MalformedPayment.http_status(), 400);
        assert_eq!(ErrorCode::SettlementUnavailable.http_status(), 503);
        assert_eq!(ErrorCode::MerchantClosed.http_status(), 503);
        assert_eq!(ErrorCode::NonceReused.http_status(), 402);
    }
}
