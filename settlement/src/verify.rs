//! Checks of an authorize item that need no database: syntax (the same rules the
//! filter and clients apply, from `x402_proto::wire`), the ed25519 signature
//! (natively, before any row is touched, a call's items together:
//! [`crate::signatures`]) and the request hash that makes `request_id` an
//! idempotency key.

use crate::signatures::Signed;
use sha2::{Digest, Sha256};
use x402_proto::settlement::v1::{AuthorizeItem, AuthorizeOutcome, AuthorizeResult};
use x402_proto::wire::{check_payment, PaymentAuthorization, PaymentPayload, PaymentRequirements};

/// Longest accepted request id and route name.
pub const MAX_ID_LEN: usize = 256;
/// Hold lifetime when the caller sends 0, and the longest one accepted.
pub const DEFAULT_HOLD_TTL_SECONDS: u32 = 300;
pub const MAX_HOLD_TTL_SECONDS: u32 = 7 * 24 * 3600;
/// Longest window of a global rate limit (30 days, as the filter allows).
pub const MAX_LIMIT_WINDOW_SECONDS: u32 = 30 * 86_400;

/// An authorize item whose syntax is valid, with its signature already checked.
#[derive(Debug, Clone)]
pub struct CheckedAuthorize {
    pub request_id: String,
    /// The proof as the client signed it (scheme, network, ..., signature).
    pub payload: PaymentPayload,
    /// `proof.amount`, the most the payer authorized.
    pub amount_authorized: u64,
    pub valid_before: u64,
    pub hold_amount: u64,
    pub route: String,
    pub hold_ttl_seconds: u32,
    /// Volume tiers `(from_requests, price)`, ascending; empty for a fixed hold.
    pub volume_tiers: Vec<(u64, u64)>,
    /// A rate limit across all Envoys, counted before the hold is placed.
    pub global_limit: Option<crate::limits::GlobalLimit>,
    /// Capture the hold as it is placed (asked for, and the proof is `exact`).
    pub capture: bool,
    /// Whether the signature verified; reported only after the key checks, so the
    /// outcomes follow the documented order.
    pub signature_valid: bool,
    /// Hex sha256 of everything the request asked for: the same `request_id` with
    /// another hash is an idempotency conflict.
    pub request_hash: String,
}

/// The outcome for an item that fails before the ledger is consulted.
pub fn refused(
    request_id: &str,
    outcome: AuthorizeOutcome,
    message: impl Into<String>,
) -> AuthorizeResult {
    AuthorizeResult {
        request_id: request_id.to_owned(),
        outcome: outcome as i32,
        message: message.into(),
        ..Default::default()
    }
}

/// An item's answer once its hold is placed (or found placed by an earlier call).
pub fn authorized(
    request_id: &str,
    transaction_id: String,
    held_amount: u64,
    payer_account: String,
) -> AuthorizeResult {
    AuthorizeResult {
        request_id: request_id.to_owned(),
        outcome: AuthorizeOutcome::Authorized as i32,
        transaction_id,
        held_amount,
        payer_account,
        ..Default::default()
    }
}

/// The refusal an item earns on its own, whatever the ledger holds: a signature
/// that does not match, an expired proof, a hold above the authorized amount.
pub(crate) fn own_refusal(item: &CheckedAuthorize, now: u64) -> Option<AuthorizeResult> {
    let no = |o: AuthorizeOutcome, m: &str| Some(refused(&item.request_id, o, m));
    if !item.signature_valid {
        no(
            AuthorizeOutcome::InvalidSignature,
            "signature does not match the payment",
        )
    } else if item.valid_before <= now {
        no(AuthorizeOutcome::Expired, "payment proof has expired")
    } else if item.hold_amount > item.amount_authorized {
        no(
            AuthorizeOutcome::InvalidRequest,
            "hold amount exceeds the authorized amount",
        )
    } else {
        None
    }
}

/// Syntax checks of each item, then the signatures of those that pass, checked
/// together ([`crate::signatures`]).
pub fn check_authorizes(items: &[AuthorizeItem]) -> Vec<Result<CheckedAuthorize, AuthorizeResult>> {
    let checked: Vec<_> = items.iter().map(check_syntax).collect();
    let signed: Vec<Signed<'_>> = checked
        .iter()
        .flatten()
        .filter_map(|(c, message)| {
            Some(Signed {
                public_key_hex: &c.payload.payload.payer,
                signature_hex: &c.payload.payload.signature,
                message: message.as_deref()?,
            })
        })
        .collect();
    let mut valid = crate::signatures::verify_all(&signed).into_iter();
    let mut out = Vec::with_capacity(checked.len());
    for item in checked {
        out.push(item.map(|(mut c, message)| {
            c.signature_valid = message.is_some() && valid.next().unwrap_or(false);
            c
        }));
    }
    out
}

/// An item's checks but its signature's (`signature_valid` false), with the bytes
/// its signature signs (none when its fields cannot be signed).
fn check_syntax(
    item: &AuthorizeItem,
) -> Result<(CheckedAuthorize, Option<Vec<u8>>), AuthorizeResult> {
    let invalid = |m: String| refused(&item.request_id, AuthorizeOutcome::InvalidRequest, m);
    if item.request_id.is_empty()
        || item.request_id.len() > MAX_ID_LEN
        || item.request_id.chars().any(char::is_control)
    {
        return Err(invalid(format!(
            "request_id must be 1-{MAX_ID_LEN} characters without control characters"
        )));
    }
    if item.route.len() > MAX_ID_LEN || item.route.chars().any(char::is_control) {
        return Err(invalid(format!(
            "route must be at most {MAX_ID_LEN} characters without control characters"
        )));
    }
    let Some(proof) = item.proof.as_ref() else {
        return Err(invalid("proof is missing".into()));
    };
    let payload = PaymentPayload {
        x402_version: x402_proto::X402_VERSION,
        accepted: PaymentRequirements {
            scheme: proof.scheme.clone(),
            network: proof.network.clone(),
            amount: proof.amount.clone(),
            asset: proof.asset.clone(),
            pay_to: proof.pay_to.clone(),
            max_timeout_seconds: 0,
            extra: serde_json::Map::new(),
        },
        payload: PaymentAuthorization {
            payer: proof.payer.clone(),
            nonce: proof.nonce.clone(),
            valid_before: proof.valid_before.clone(),
            resource: proof.resource.clone(),
            signature: proof.signature.clone(),
        },
    };
    let checked = check_payment(payload).map_err(|e| invalid(e.to_string()))?;
    let hold_ttl_seconds = match item.hold_ttl_seconds {
        0 => DEFAULT_HOLD_TTL_SECONDS,
        t if t > MAX_HOLD_TTL_SECONDS => {
            return Err(invalid(format!(
                "hold_ttl_seconds must be at most {MAX_HOLD_TTL_SECONDS}"
            )))
        }
        t => t,
    };
    if item.hold_amount > x402_proto::amount::MAX_ATOMIC {
        return Err(invalid("hold_amount is too large".into()));
    }
    let global_limit = match &item.global_limit {
        None => None,
        Some(g) => {
            if g.max_requests == 0
                || g.window_seconds == 0
                || g.window_seconds > MAX_LIMIT_WINDOW_SECONDS
            {
                return Err(invalid(format!(
                    "global_limit needs max_requests > 0 and window_seconds between 1 and {MAX_LIMIT_WINDOW_SECONDS}"
                )));
            }
            if g.client_address.len() > MAX_ID_LEN || g.client_address.chars().any(char::is_control)
            {
                return Err(invalid(format!(
                    "global_limit.client_address must be at most {MAX_ID_LEN} characters without control characters"
                )));
            }
            Some(crate::limits::GlobalLimit {
                max_requests: g.max_requests,
                window_seconds: g.window_seconds,
                client_address: (!g.client_address.is_empty()).then(|| g.client_address.clone()),
            })
        }
    };
    let message = checked.signed_fields().canonical_bytes().ok();
    let request_hash = request_hash(
        message.as_deref(),
        &checked.payload.payload,
        item.hold_amount,
        &item.route,
    );
    let capture = item.capture && checked.payload.accepted.scheme == "exact";
    Ok((
        CheckedAuthorize {
            request_id: item.request_id.clone(),
            amount_authorized: checked.amount,
            valid_before: checked.valid_before,
            payload: checked.payload,
            hold_amount: item.hold_amount,
            route: item.route.clone(),
            hold_ttl_seconds,
            volume_tiers: item
                .volume_tiers
                .iter()
                .map(|t| (t.from_requests, t.price.min(item.hold_amount)))
                .collect(),
            global_limit,
            capture,
            signature_valid: false,
            request_hash,
        },
        message,
    ))
}

fn request_hash(
    signed: Option<&[u8]>,
    auth: &PaymentAuthorization,
    hold_amount: u64,
    route: &str,
) -> String {
    let mut h = Sha256::new();
    // The canonical bytes are injective over the signed fields; the rest is appended
    // as more `name=value\n` lines, none of which can contain a line break.
    if let Some(bytes) = signed {
        h.update(bytes);
    }
    for (name, value) in [
        ("payer", auth.payer.as_str()),
        ("signature", auth.signature.as_str()),
        ("holdAmount", hold_amount.to_string().as_str()),
        ("route", route),
    ] {
        h.update(name.as_bytes());
        h.update(b"=");
        h.update(value.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Current unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An item checked alone, as a call of one item is.
    fn check_authorize(item: &AuthorizeItem) -> Result<CheckedAuthorize, AuthorizeResult> {
        check_authorizes(std::slice::from_ref(item)).pop().unwrap()
    }

    fn item_from_vector(v: &x402_proto::vectors::Vector) -> AuthorizeItem {
        let p = &v.payload;
        AuthorizeItem {
            request_id: format!("req-{}", v.name),
            proof: Some(p.clone().into()),
            hold_amount: 1,
            route: "r".into(),
            hold_ttl_seconds: 0,
            volume_tiers: Vec::new(),
            global_limit: None,
            capture: false,
        }
    }

    #[test]
    fn every_published_vector_verifies_and_a_changed_byte_does_not() {
        let vectors = x402_proto::vectors::vectors().unwrap();
        assert!(vectors.len() >= 5);
        for v in &vectors {
            let item = item_from_vector(v);
            let checked = check_authorize(&item).unwrap();
            assert!(checked.signature_valid, "{}", v.name);
            assert_eq!(checked.hold_ttl_seconds, DEFAULT_HOLD_TTL_SECONDS);

            let mut tampered = item.clone();
            let proof = tampered.proof.as_mut().unwrap();
            // Flip one hex digit of the signature, then one character of the resource.
            let first = if proof.signature.starts_with('0') {
                "1"
            } else {
                "0"
            };
            proof.signature.replace_range(0..1, first);
            assert!(
                !check_authorize(&tampered).unwrap().signature_valid,
                "{}",
                v.name
            );

            let mut tampered = item.clone();
            tampered.proof.as_mut().unwrap().resource.push('x');
            assert!(
                !check_authorize(&tampered).unwrap().signature_valid,
                "{}",
                v.name
            );
        }
    }

    #[test]
    fn request_hash_covers_what_was_asked() {
        let v = &x402_proto::vectors::vectors().unwrap()[0];
        let base = check_authorize(&item_from_vector(v)).unwrap().request_hash;
        let mut other = item_from_vector(v);
        other.hold_amount = 2;
        assert_ne!(check_authorize(&other).unwrap().request_hash, base);
        let mut other = item_from_vector(v);
        other.route = "s".into();
        assert_ne!(check_authorize(&other).unwrap().request_hash, base);
        assert_eq!(
            check_authorize(&item_from_vector(v)).unwrap().request_hash,
            base
        );
    }

    #[test]
    fn malformed_items_are_invalid_requests() {
        let v = &x402_proto::vectors::vectors().unwrap()[0];
        let mut missing = item_from_vector(v);
        missing.proof = None;
        let mut no_id = item_from_vector(v);
        no_id.request_id.clear();
        let mut bad_amount = item_from_vector(v);
        bad_amount.proof.as_mut().unwrap().amount = "1.5".into();
        let mut short_nonce = item_from_vector(v);
        short_nonce.proof.as_mut().unwrap().nonce = "00ff".into();
        let mut long_ttl = item_from_vector(v);
        long_ttl.hold_ttl_seconds = MAX_HOLD_TTL_SECONDS + 1;
        for item in [missing, no_id, bad_amount, short_nonce, long_ttl] {
            let err = check_authorize(&item).unwrap_err();
            assert_eq!(
                err.outcome,
                AuthorizeOutcome::InvalidRequest as i32,
                "{item:?}"
            );
            assert!(!err.message.is_empty());
        }
    }
}
