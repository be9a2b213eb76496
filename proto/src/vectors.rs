//! The published test vectors of `PROTOCOL.md` (`testdata/vectors.json`): a key seed,
//! a payment payload, its canonical bytes, its header and its signature. The client,
//! filter and settlement test suites all check against these.

use serde::Deserialize;

use crate::wire::PaymentPayload;

pub const VECTORS_JSON: &str = include_str!("../testdata/vectors.json");

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Vector {
    pub name: String,
    /// Hex of the 32-byte ed25519 secret seed.
    pub seed: String,
    /// Hex of the public key (equals `payload.payload.payer`).
    pub public_key: String,
    pub payload: PaymentPayload,
    /// The canonical signing bytes as text.
    pub canonical: String,
    /// The `PAYMENT-SIGNATURE` header value.
    pub header: String,
}

pub fn vectors() -> Result<Vec<Vector>, serde_json::Error> {
    serde_json::from_str(VECTORS_JSON)
}

#[cfg(all(test, feature = "ed25519"))]
mod tests {
    use super::*;
    use crate::signing::{public_key_hex, sign_hex, verify_hex, SigningKey};
    use crate::wire::{decode_payment, encode_header};

    #[test]
    fn every_vector_holds() {
        let vs = vectors().unwrap();
        assert!(vs.len() >= 5);
        for v in vs {
            let mut seed = [0u8; 32];
            hex::decode_to_slice(&v.seed, &mut seed).unwrap();
            let key = SigningKey::from_bytes(&seed);
            assert_eq!(public_key_hex(&key), v.public_key, "{}", v.name);
            assert_eq!(v.payload.payload.payer, v.public_key, "{}", v.name);
            let fields = v.payload.signed_fields();
            assert_eq!(
                String::from_utf8(fields.canonical_bytes().unwrap()).unwrap(),
                v.canonical,
                "{}",
                v.name
            );
            assert_eq!(
                sign_hex(&key, &fields).unwrap(),
                v.payload.payload.signature,
                "{}",
                v.name
            );
            verify_hex(&v.public_key, &v.payload.payload.signature, &fields).unwrap();
            assert_eq!(encode_header(&v.payload), v.header, "{}", v.name);
            assert_eq!(
                decode_payment(&v.header).unwrap().payload,
                v.payload,
                "{}",
                v.name
            );
        }
    }

    type Mutation = Box<dyn Fn(&mut PaymentPayload)>;

    #[test]
    fn changing_any_signed_field_breaks_the_signature() {
        for v in vectors().unwrap() {
            let p = &v.payload;
            let sig = &p.payload.signature;
            let mutations: Vec<Mutation> = vec![
                Box::new(|p| p.accepted.scheme.push('x')),
                Box::new(|p| p.accepted.network.push('x')),
                Box::new(|p| p.accepted.asset.push('x')),
                Box::new(|p| p.accepted.amount.push('1')),
                Box::new(|p| p.accepted.pay_to.push('x')),
                Box::new(|p| p.payload.resource.push('x')),
                Box::new(|p| p.payload.nonce.replace_range(0..2, "ff")),
                Box::new(|p| p.payload.valid_before.push('1')),
            ];
            for m in mutations {
                let mut changed = p.clone();
                m(&mut changed);
                if changed == *p {
                    continue;
                }
                assert!(
                    verify_hex(&v.public_key, sig, &changed.signed_fields()).is_err(),
                    "{}",
                    v.name
                );
            }
        }
    }
}
