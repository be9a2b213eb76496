//! Building payment proofs and reading challenges and receipts.

use rand::rngs::OsRng;
use rand::RngCore;
use reqwest::header::{HeaderMap, HOST};
use reqwest::{StatusCode, Url};
use x402_proto::signing::{resource_string, sign_hex};
use x402_proto::wire::{
    decode_header, PaymentAuthorization, PaymentPayload, PaymentRequired, PaymentRequirements,
    SettleResponse, HEADER_PAYMENT_REQUIRED, HEADER_PAYMENT_RESPONSE,
};
use x402_proto::{amount, X402_VERSION};

use crate::client::Budget;
use crate::error::ClientError;
use crate::key::PayerKey;

/// Schemes this client can pay: a fixed price, or a metered maximum it signs in full.
pub const SUPPORTED_SCHEMES: [&str; 2] = ["exact", "upto"];

/// Nonce length in bytes; the protocol asks for at least 16.
const NONCE_BYTES: usize = 32;

/// 32 random bytes as lowercase hex.
pub fn random_nonce_hex() -> String {
    let mut nonce = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    hex::encode(nonce)
}

/// The `host[:port]` reqwest sends as the `Host` header: the port appears only when
/// the URL names a port that is not the scheme's default (`Url::port` already drops
/// an explicit default port such as `:80` on `http`).
pub fn authority_for(url: &Url) -> Result<String, ClientError> {
    let host = url
        .host_str()
        .ok_or_else(|| ClientError::InvalidUrl(format!("{url} has no host")))?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// The path and query exactly as sent in the request line (no fragment).
pub fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{}", url.path(), query),
        None => url.path().to_owned(),
    }
}

/// The resource string a proof for `method url` binds, with the authority exactly as
/// the `Host` header reqwest will send.
pub fn resource_for(method: &str, url: &Url) -> Result<String, ClientError> {
    Ok(resource_string(
        method,
        &authority_for(url)?,
        &path_and_query(url),
    ))
}

/// Like [`resource_for`], but an explicit `Host` header the caller sets (as for a
/// virtual host behind a gateway) wins over the URL's authority, as it does on the wire.
pub fn resource_for_request(
    method: &str,
    url: &Url,
    headers: &HeaderMap,
) -> Result<String, ClientError> {
    let authority = match headers.get(HOST) {
        Some(value) => value
            .to_str()
            .map_err(|_| ClientError::InvalidHeader("Host header is not visible ASCII".into()))?
            .trim()
            .to_owned(),
        None => authority_for(url)?,
    };
    Ok(resource_string(method, &authority, &path_and_query(url)))
}

/// Signs `requirements` for `resource`: the lower-level building block, also used to
/// craft exact proofs in tests.
pub fn sign_payment(
    key: &PayerKey,
    requirements: &PaymentRequirements,
    resource: &str,
    nonce_hex: &str,
    valid_before: u64,
) -> Result<PaymentPayload, ClientError> {
    let mut payload = PaymentPayload {
        x402_version: X402_VERSION,
        accepted: requirements.clone(),
        payload: PaymentAuthorization {
            payer: key.public_key_hex(),
            nonce: nonce_hex.to_owned(),
            valid_before: valid_before.to_string(),
            resource: resource.to_owned(),
            signature: String::new(),
        },
    };
    payload.payload.signature = sign_hex(key.signing_key(), &payload.signed_fields())?;
    Ok(payload)
}

/// Reads the challenge of a 402 answer: the `PAYMENT-REQUIRED` header (base64 JSON),
/// falling back to the JSON body when the header is missing or unreadable.
pub fn parse_challenge(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<PaymentRequired, ClientError> {
    if status != StatusCode::PAYMENT_REQUIRED {
        return Err(ClientError::BadChallenge(format!(
            "status is {status}, not 402"
        )));
    }
    let from_header = headers
        .get(HEADER_PAYMENT_REQUIRED)
        .map(|value| {
            value
                .to_str()
                .map_err(|_| "PAYMENT-REQUIRED header is not ASCII".to_owned())
                .and_then(|text| {
                    decode_header::<PaymentRequired>(text)
                        .map_err(|e| format!("PAYMENT-REQUIRED header: {e}"))
                })
        })
        .unwrap_or_else(|| Err("no PAYMENT-REQUIRED header".to_owned()));
    let challenge = match from_header {
        Ok(challenge) => challenge,
        Err(header_problem) => serde_json::from_slice::<PaymentRequired>(body)
            .map_err(|e| ClientError::BadChallenge(format!("{header_problem}; body: {e}")))?,
    };
    if challenge.x402_version != X402_VERSION {
        return Err(ClientError::UnsupportedVersion(challenge.x402_version));
    }
    Ok(challenge)
}

/// The receipt of a paid request, from its `PAYMENT-RESPONSE` header.
pub fn parse_receipt(headers: &HeaderMap) -> Option<SettleResponse> {
    let value = headers.get(HEADER_PAYMENT_RESPONSE)?.to_str().ok()?;
    decode_header(value).ok()
}

/// The first offer this client can pay within `budget`, with its amount parsed.
/// When every payable offer is too expensive the error is [`ClientError::OverBudget`]
/// for the first of them, so the caller learns the price it refused.
pub fn choose_requirement<'a>(
    accepts: &'a [PaymentRequirements],
    budget: &Budget,
) -> Result<(&'a PaymentRequirements, u64), ClientError> {
    let mut over_budget = None;
    let mut not_allowed = None;
    for requirement in accepts {
        if !SUPPORTED_SCHEMES.contains(&requirement.scheme.as_str())
            || !budget.accepts_network(&requirement.network)
            || !budget.accepts_asset(&requirement.asset)
        {
            continue;
        }
        if !budget.accepts_pay_to(&requirement.pay_to) {
            not_allowed.get_or_insert(ClientError::PayToNotAllowed {
                pay_to: requirement.pay_to.clone(),
            });
            continue;
        }
        let Ok(amount) = amount::parse_atomic(&requirement.amount) else {
            continue;
        };
        match budget.max_per_request {
            Some(max) if amount > max => {
                over_budget.get_or_insert(ClientError::OverBudget {
                    amount,
                    asset: requirement.asset.clone(),
                    max,
                });
            }
            _ => return Ok((requirement, amount)),
        }
    }
    Err(over_budget
        .or(not_allowed)
        .unwrap_or_else(|| ClientError::NoAcceptableRequirement {
            offered: if accepts.is_empty() {
                "nothing".to_owned()
            } else {
                accepts
                    .iter()
                    .map(|r| format!("{} {} {} on {}", r.scheme, r.amount, r.asset, r.network))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use x402_proto::signing::verify_hex;
    use x402_proto::wire::{encode_header, ResourceInfo};

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn requirement(scheme: &str, amount: &str) -> PaymentRequirements {
        PaymentRequirements {
            scheme: scheme.into(),
            network: "402x:local".into(),
            amount: amount.into(),
            asset: "USD".into(),
            pay_to: "merchant-demo".into(),
            max_timeout_seconds: 60,
            extra: serde_json::Map::new(),
        }
    }

    fn challenge() -> PaymentRequired {
        PaymentRequired {
            x402_version: 2,
            error: Some("payment_required".into()),
            resource: ResourceInfo {
                url: "http://127.0.0.1:10000/paid/quote".into(),
                description: "a quote".into(),
                mime_type: String::new(),
            },
            accepts: vec![requirement("exact", "10000")],
            price: Some("0.01".into()),
            payment_address: Some("merchant-demo".into()),
            free_remaining: None,
        }
    }

    #[test]
    fn signing_the_published_vectors_gives_their_signatures() {
        let vectors = x402_proto::vectors::vectors().unwrap();
        assert!(vectors.len() >= 5);
        for v in vectors {
            let key = PayerKey::from_hex_seed(&v.seed).unwrap();
            assert_eq!(key.public_key_hex(), v.public_key, "{}", v.name);
            let p = &v.payload.payload;
            let valid_before: u64 = p.valid_before.parse().unwrap();
            let signed = sign_payment(
                &key,
                &v.payload.accepted,
                &p.resource,
                &p.nonce,
                valid_before,
            )
            .unwrap();
            assert_eq!(signed, v.payload, "{}", v.name);
            assert_eq!(encode_header(&signed), v.header, "{}", v.name);
        }
    }

    #[test]
    fn signed_payments_verify_and_pass_the_syntax_checks() {
        let key = PayerKey::generate();
        let nonce = random_nonce_hex();
        let p = sign_payment(
            &key,
            &requirement("upto", "500000"),
            "POST h/x",
            &nonce,
            1_900_000_000,
        )
        .unwrap();
        verify_hex(
            &key.public_key_hex(),
            &p.payload.signature,
            &p.signed_fields(),
        )
        .unwrap();
        let checked = x402_proto::wire::decode_payment(&encode_header(&p)).unwrap();
        assert_eq!(checked.amount, 500_000);
        assert_eq!(checked.valid_before, 1_900_000_000);
    }

    #[test]
    fn a_resource_with_a_control_character_is_not_signed() {
        let err = sign_payment(
            &PayerKey::generate(),
            &requirement("exact", "1"),
            "GET h/\n",
            &random_nonce_hex(),
            1,
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::Sign(_)), "{err}");
    }

    #[test]
    fn nonces_are_32_random_bytes_of_lowercase_hex() {
        let a = random_nonce_hex();
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(a, random_nonce_hex());
    }

    #[test]
    fn resource_matches_the_host_header_reqwest_sends() {
        let cases = [
            (
                "GET",
                "http://127.0.0.1:10000/paid/quote?sym=ABC",
                "GET 127.0.0.1:10000/paid/quote?sym=ABC",
            ),
            (
                "get",
                "http://API.Example.com/v1/quote",
                "GET api.example.com/v1/quote",
            ),
            (
                "GET",
                "http://example.com:80/a?b=1",
                "GET example.com/a?b=1",
            ),
            ("GET", "https://example.com:443/a", "GET example.com/a"),
            (
                "GET",
                "https://example.com:8443/items/42",
                "GET example.com:8443/items/42",
            ),
            ("GET", "http://example.com:443/a", "GET example.com:443/a"),
            ("POST", "http://localhost:8080", "POST localhost:8080/"),
            ("GET", "http://h/p?", "GET h/p?"),
            ("GET", "http://h/p?x=1#frag", "GET h/p?x=1"),
            (
                "PUT",
                "http://127.0.0.1:8080/a/b?x=1&y=%20z",
                "PUT 127.0.0.1:8080/a/b?x=1&y=%20z",
            ),
            ("GET", "http://[::1]:9000/v", "GET [::1]:9000/v"),
            (
                "GET",
                "http://example.org/café",
                "GET example.org/caf%C3%A9",
            ),
        ];
        for (method, u, want) in cases {
            assert_eq!(resource_for(method, &url(u)).unwrap(), want, "{u}");
        }
    }

    #[test]
    fn an_explicit_host_header_wins_over_the_url() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("API.example.com"));
        let r =
            resource_for_request("GET", &url("http://127.0.0.1:10000/paid?x=1"), &headers).unwrap();
        assert_eq!(r, "GET api.example.com/paid?x=1");
        let r = resource_for_request(
            "GET",
            &url("http://127.0.0.1:10000/paid"),
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(r, "GET 127.0.0.1:10000/paid");
    }

    #[test]
    fn challenge_round_trips_through_header_and_body() {
        let c = challenge();
        let mut headers = HeaderMap::new();
        headers.insert(
            HEADER_PAYMENT_REQUIRED,
            HeaderValue::from_str(&encode_header(&c)).unwrap(),
        );
        assert_eq!(
            parse_challenge(StatusCode::PAYMENT_REQUIRED, &headers, b"").unwrap(),
            c
        );

        // No header, or a broken one: the JSON body is the fallback.
        let body = serde_json::to_vec(&c).unwrap();
        assert_eq!(
            parse_challenge(StatusCode::PAYMENT_REQUIRED, &HeaderMap::new(), &body).unwrap(),
            c
        );
        let mut broken = HeaderMap::new();
        broken.insert(HEADER_PAYMENT_REQUIRED, HeaderValue::from_static("%%%"));
        assert_eq!(
            parse_challenge(StatusCode::PAYMENT_REQUIRED, &broken, &body).unwrap(),
            c
        );

        // The header wins when both are present.
        let mut other = c.clone();
        other.accepts[0].amount = "1".into();
        assert_eq!(
            parse_challenge(
                StatusCode::PAYMENT_REQUIRED,
                &headers,
                &serde_json::to_vec(&other).unwrap()
            )
            .unwrap(),
            c
        );
    }

    #[test]
    fn unreadable_challenges_are_errors() {
        let err = parse_challenge(StatusCode::PAYMENT_REQUIRED, &HeaderMap::new(), b"<html>")
            .unwrap_err();
        assert!(matches!(err, ClientError::BadChallenge(_)), "{err}");
        let err = parse_challenge(
            StatusCode::OK,
            &HeaderMap::new(),
            &serde_json::to_vec(&challenge()).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::BadChallenge(_)), "{err}");
        let mut v1 = challenge();
        v1.x402_version = 1;
        let err = parse_challenge(
            StatusCode::PAYMENT_REQUIRED,
            &HeaderMap::new(),
            &serde_json::to_vec(&v1).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::UnsupportedVersion(1)), "{err}");
    }

    #[test]
    fn receipt_is_read_from_its_header() {
        let receipt = SettleResponse {
            success: true,
            transaction: "tx-1".into(),
            network: "402x:local".into(),
            payer: "ab".repeat(32),
            amount: "10000".into(),
            error_reason: None,
        };
        let mut headers = HeaderMap::new();
        assert_eq!(parse_receipt(&headers), None);
        headers.insert(
            HEADER_PAYMENT_RESPONSE,
            HeaderValue::from_str(&encode_header(&receipt)).unwrap(),
        );
        assert_eq!(parse_receipt(&headers), Some(receipt));
        headers.insert(
            HEADER_PAYMENT_RESPONSE,
            HeaderValue::from_static("not base64!"),
        );
        assert_eq!(parse_receipt(&headers), None);
    }

    #[test]
    fn the_first_payable_offer_within_budget_is_chosen() {
        let accepts = vec![
            requirement("permit2", "1"),
            PaymentRequirements {
                network: "base".into(),
                ..requirement("exact", "2")
            },
            requirement("exact", "bogus"),
            requirement("exact", "30000"),
            requirement("upto", "20000"),
            requirement("exact", "10000"),
        ];
        let (chosen, amount) = choose_requirement(
            &accepts,
            &Budget::max_per_request(25_000).with_networks(["402x:local"]),
        )
        .unwrap();
        assert_eq!((chosen.scheme.as_str(), amount), ("upto", 20_000));
        let (chosen, amount) =
            choose_requirement(&accepts, &Budget::unlimited().with_networks(["402x:local"]))
                .unwrap();
        assert_eq!((chosen.scheme.as_str(), amount), ("exact", 30_000));
        let (chosen, _) = choose_requirement(&accepts, &Budget::unlimited()).unwrap();
        assert_eq!(chosen.network, "base");
    }

    #[test]
    fn offers_over_budget_are_refused_with_the_price() {
        let accepts = vec![requirement("exact", "10000"), requirement("upto", "50000")];
        match choose_requirement(&accepts, &Budget::max_per_request(9_999)) {
            Err(ClientError::OverBudget { amount, asset, max }) => {
                assert_eq!((amount, asset.as_str(), max), (10_000, "USD", 9_999))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            choose_requirement(&accepts, &Budget::max_per_request(10_000))
                .unwrap()
                .1,
            10_000
        );
    }

    #[test]
    fn nothing_payable_is_its_own_error() {
        let err =
            choose_requirement(&[requirement("permit2", "1")], &Budget::unlimited()).unwrap_err();
        assert!(
            matches!(err, ClientError::NoAcceptableRequirement { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("permit2 1 USD"), "{err}");
        let err = choose_requirement(
            &[requirement("exact", "1")],
            &Budget::unlimited().with_assets(["EUR"]),
        )
        .unwrap_err();
        assert!(
            matches!(err, ClientError::NoAcceptableRequirement { .. }),
            "{err}"
        );
        let err = choose_requirement(&[], &Budget::unlimited()).unwrap_err();
        assert!(err.to_string().contains("nothing"), "{err}");
    }
}
