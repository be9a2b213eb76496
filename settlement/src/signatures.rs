//! The ed25519 signatures of one Authorize call, checked together.
//!
//! A signature `(R, s)` by key `A` over message `M` is valid when `s` is a canonical
//! scalar, `R` is the canonical encoding of a point, neither `R` nor `A` has small
//! order, and `[8]([s]B - R - [k]A)` is the identity, `k = SHA-512(R || A || M)`.
//! These are `verify_strict`'s rules but for the last: `verify_strict` asks
//! `[s]B - R - [k]A` itself to be the identity. The two differ only on signatures
//! whose `R` carries a small-order component, which only the key's holder can make
//! (and which no ed25519 signer produces); either way the payer's key signed the
//! payment. The multiple of 8 is what lets many signatures be checked in one
//! multi-scalar multiplication with the same outcome as one at a time:
//! `[8]Σ z_i([s_i]B - R_i - [k_i]A_i)` with 128-bit `z_i` drawn from a hash of
//! every input is the identity only if each term is (but with negligible
//! probability), whatever small-order parts the points carry. A batch of `n`
//! costs about half of `n` single checks; when one fails, each signature of the
//! batch is checked on its own to find which.

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use sha2::{Digest, Sha512};
use std::collections::HashMap;
use std::sync::Mutex;

/// One signature to check: hex public key and signature as the proof carries them,
/// and the signed bytes.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub public_key_hex: &'a str,
    pub signature_hex: &'a str,
    pub message: &'a [u8],
}

/// A signature whose encodings passed every check but the equation.
struct Parsed {
    r_bytes: [u8; 32],
    a_bytes: [u8; 32],
    r: EdwardsPoint,
    a: EdwardsPoint,
    s: Scalar,
    k: Scalar,
}

/// 2^255 - 19, little-endian: an encoding whose `y` (the low 255 bits) is not
/// below it is not canonical.
const P_BYTES: [u8; 32] = {
    let mut p = [0xff; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    p
};

/// Whether the low 255 bits of `bytes` (the `y` of a point encoding) are below p.
fn y_is_canonical(bytes: &[u8; 32]) -> bool {
    let mut y = *bytes;
    y[31] &= 0x7f;
    for i in (0..32).rev() {
        if y[i] != P_BYTES[i] {
            return y[i] < P_BYTES[i];
        }
    }
    false
}

fn parse(item: &Signed<'_>) -> Option<Parsed> {
    let mut a_bytes = [0u8; 32];
    hex::decode_to_slice(item.public_key_hex, &mut a_bytes).ok()?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(item.signature_hex, &mut sig).ok()?;
    let mut r_bytes = [0u8; 32];
    r_bytes.copy_from_slice(&sig[..32]);
    let mut s_bytes = [0u8; 32];
    s_bytes.copy_from_slice(&sig[32..]);
    let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))?;
    // A non-canonical `y` decodes to the point of its value mod p; `verify_strict`
    // compares encodings, so it never matches one. (The other non-canonical
    // encodings, x = 0 with the sign bit set, are of small-order points.)
    if !y_is_canonical(&r_bytes) {
        return None;
    }
    let r = CompressedEdwardsY(r_bytes).decompress()?;
    if r.is_small_order() {
        return None;
    }
    let a = payer_key(a_bytes)?;
    let mut h = Sha512::new();
    h.update(r_bytes);
    h.update(a_bytes);
    h.update(item.message);
    let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
    Some(Parsed {
        r_bytes,
        a_bytes,
        r,
        a,
        s,
        k,
    })
}

/// Most decoded keys kept; past that the cache starts over.
const MAX_KEYS: usize = 100_000;

/// A payer key as a point, or `None` when it is not a point or has small order;
/// decoding costs about a fifth of a batched check, and payers sign many proofs.
fn payer_key(bytes: [u8; 32]) -> Option<EdwardsPoint> {
    static KEYS: std::sync::OnceLock<Mutex<HashMap<[u8; 32], EdwardsPoint>>> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(Mutex::default);
    let lock = || {
        keys.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some(a) = lock().get(&bytes) {
        return Some(*a);
    }
    let a = CompressedEdwardsY(bytes)
        .decompress()
        .filter(|a| !a.is_small_order())?;
    let mut keys = lock();
    if keys.len() >= MAX_KEYS {
        keys.clear();
    }
    keys.insert(bytes, a);
    Some(a)
}

/// The equation for one signature.
fn holds(p: &Parsed) -> bool {
    let expected_r = EdwardsPoint::vartime_double_scalar_mul_basepoint(&p.k, &(-p.a), &p.s);
    (expected_r - p.r).mul_by_cofactor().is_identity()
}

/// The equation for all of `batch` at once (see the module's documentation).
fn all_hold(batch: &[&Parsed]) -> bool {
    let mut seed = Sha512::new();
    seed.update(b"402x ed25519 batch");
    for p in batch {
        seed.update(p.r_bytes);
        seed.update(p.a_bytes);
        seed.update(p.s.as_bytes());
        seed.update(p.k.as_bytes());
    }
    let seed = seed.finalize();
    let zs: Vec<Scalar> = (0..batch.len())
        .map(|i| {
            let mut h = Sha512::new();
            h.update(seed);
            h.update((i as u64).to_le_bytes());
            let digest = h.finalize();
            let mut z = [0u8; 16];
            z.copy_from_slice(&digest[..16]);
            Scalar::from(u128::from_le_bytes(z))
        })
        .collect();
    let b_coefficient: Scalar = batch.iter().zip(&zs).map(|(p, z)| z * p.s).sum();
    let scalars = std::iter::once(-b_coefficient)
        .chain(zs.iter().copied())
        .chain(batch.iter().zip(&zs).map(|(p, z)| z * p.k));
    let points = std::iter::once(ED25519_BASEPOINT_POINT)
        .chain(batch.iter().map(|p| p.r))
        .chain(batch.iter().map(|p| p.a));
    EdwardsPoint::vartime_multiscalar_mul(scalars, points)
        .mul_by_cofactor()
        .is_identity()
}

/// Whether each signature is valid, in order.
pub fn verify_all(items: &[Signed<'_>]) -> Vec<bool> {
    items.chunks(MAX_BATCH).flat_map(verify_batch).collect()
}

/// Most signatures checked in one multiplication: a forged one costs its batch a
/// check of each signature on its own, so batches stay small enough for that to be
/// cheap; past a few dozen points a larger batch saves little more.
const MAX_BATCH: usize = 32;

fn verify_batch(items: &[Signed<'_>]) -> Vec<bool> {
    let parsed: Vec<Option<Parsed>> = items.iter().map(parse).collect();
    let batch: Vec<&Parsed> = parsed.iter().flatten().collect();
    let together = batch.len() > 1 && all_hold(&batch);
    parsed
        .iter()
        .map(|p| p.as_ref().is_some_and(|p| together || holds(p)))
        .collect()
}

/// Whether one signature is valid.
pub fn verify(item: &Signed<'_>) -> bool {
    parse(item).as_ref().is_some_and(holds)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use sha2::Digest;

    /// The group order l, little-endian.
    const L_BYTES: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// A signature of `message` by `key`, in hex, with its key.
    fn signed(key: &SigningKey, message: &[u8]) -> (String, String) {
        (
            hex::encode(key.verifying_key().to_bytes()),
            hex::encode(key.sign(message).to_bytes()),
        )
    }

    fn strict(key_hex: &str, sig_hex: &str, message: &[u8]) -> bool {
        let mut k = [0u8; 32];
        let mut s = [0u8; 64];
        if hex::decode_to_slice(key_hex, &mut k).is_err()
            || hex::decode_to_slice(sig_hex, &mut s).is_err()
        {
            return false;
        }
        ed25519_dalek::VerifyingKey::from_bytes(&k).is_ok_and(|k| {
            k.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&s))
                .is_ok()
        })
    }

    /// The eight points of small order, as encodings.
    fn small_order_encodings() -> Vec<[u8; 32]> {
        use curve25519_dalek::constants::EIGHT_TORSION;
        EIGHT_TORSION
            .iter()
            .map(|p| p.compress().to_bytes())
            .collect()
    }

    /// `key`'s signature of `message` made by hand: `R` is `big_r`, whose discrete
    /// log the caller knows to be `r` up to a small-order part, and `s = r + k a`.
    fn holder_signature(key: &SigningKey, message: &[u8], big_r: [u8; 32], r: Scalar) -> String {
        let a = key.verifying_key().to_bytes();
        let expanded = Sha512::digest(key.to_bytes());
        let mut lower = [0u8; 32];
        lower.copy_from_slice(&expanded[..32]);
        let secret = Scalar::from_bytes_mod_order(curve25519_dalek::scalar::clamp_integer(lower));
        let k = Scalar::from_bytes_mod_order_wide(
            &Sha512::new()
                .chain_update(big_r)
                .chain_update(a)
                .chain_update(message)
                .finalize()
                .into(),
        );
        let s = r + k * secret;
        let mut sig = big_r.to_vec();
        sig.extend_from_slice(s.as_bytes());
        hex::encode(sig)
    }

    /// A signature `(R + T, s)`: valid in the cofactored equation, refused by
    /// `verify_strict` unless `T` is the identity.
    fn with_torsion(key: &SigningKey, message: &[u8], t: &EdwardsPoint) -> String {
        let r = Scalar::from(7_777_777u64);
        let big_r = (EdwardsPoint::mul_base(&r) + t).compress().to_bytes();
        holder_signature(key, message, big_r, r)
    }

    #[test]
    fn valid_signatures_pass_alone_and_together() {
        let messages: Vec<Vec<u8>> = (0..9u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let sigs: Vec<(String, String)> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| signed(&key(u8::try_from(i).unwrap() + 1), m))
            .collect();
        let items: Vec<Signed<'_>> = sigs
            .iter()
            .zip(&messages)
            .map(|((k, s), m)| Signed {
                public_key_hex: k,
                signature_hex: s,
                message: m,
            })
            .collect();
        for n in 1..=items.len() {
            assert_eq!(verify_all(&items[..n]), vec![true; n]);
        }
        assert!(items.iter().all(verify));
    }

    /// Checks `n` signatures by a few keys, the one at `forged` made over other bytes
    /// than its item's: only that one fails.
    fn only_the_forged_one_fails(n: u8, forged: usize) {
        let messages: Vec<Vec<u8>> = (0..n).map(|i| vec![i; 16]).collect();
        let sigs: Vec<(String, String)> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| signed(&key(u8::try_from(i % 5).unwrap() + 100), m))
            .collect();
        let other = b"not what was signed".to_vec();
        let items: Vec<Signed<'_>> = sigs
            .iter()
            .zip(&messages)
            .enumerate()
            .map(|(i, ((k, s), m))| Signed {
                public_key_hex: k,
                signature_hex: s,
                message: if i == forged { &other } else { m },
            })
            .collect();
        let expected: Vec<bool> = (0..items.len()).map(|i| i != forged).collect();
        assert_eq!(verify_all(&items), expected, "forged item {forged} of {n}");
    }

    #[test]
    fn a_bad_signature_fails_only_itself_whatever_its_place_in_the_batch() {
        for forged in 0..6 {
            only_the_forged_one_fails(6, forged);
        }
    }

    #[test]
    fn calls_longer_than_a_batch_are_checked_in_several() {
        only_the_forged_one_fails(70, 40);
        only_the_forged_one_fails(70, 69);
    }

    #[test]
    fn encodings_verify_strict_refuses_are_refused() {
        let k = key(9);
        let message = b"pay 100 to merchant".to_vec();
        let (key_hex, sig_hex) = signed(&k, &message);
        let good = signed(&key(10), b"a valid neighbour");
        let mut cases: Vec<(String, String, &str)> = Vec::new();
        // s + l: the same scalar, not canonical (s < l < 2^253, so no carry out).
        let mut sig = hex::decode(&sig_hex).unwrap();
        let mut carry = 0u16;
        for (i, l) in L_BYTES.iter().enumerate() {
            let v = u16::from(sig[32 + i]) + u16::from(*l) + carry;
            sig[32 + i] = v.to_le_bytes()[0];
            carry = v >> 8;
        }
        assert_eq!(carry, 0);
        cases.push((key_hex.clone(), hex::encode(&sig), "s not canonical"));
        // Small-order keys and R values, in signatures the cofactored equation
        // alone would pass: under a small-order key, (R = [s]B, s) for any message
        // (a forgery anyone can make); R of small order with s = k a (the key's
        // holder's).
        let s_any = Scalar::from(123_456_789u64);
        let forged = {
            let mut sig = EdwardsPoint::mul_base(&s_any)
                .compress()
                .to_bytes()
                .to_vec();
            sig.extend_from_slice(s_any.as_bytes());
            hex::encode(sig)
        };
        for small in small_order_encodings() {
            cases.push((hex::encode(small), forged.clone(), "small-order key"));
            let sig = holder_signature(&k, &message, small, Scalar::ZERO);
            cases.push((key_hex.clone(), sig, "small-order R"));
        }
        // R encoded as y + p for a small y of a point that is not of small order.
        let mut sig = hex::decode(&sig_hex).unwrap();
        let r_above_p = (2u8..19)
            .map(|y| {
                let mut e = P_BYTES;
                e[0] += y; // 0xed + 18 < 0x100
                e
            })
            .find(|e| {
                CompressedEdwardsY(*e)
                    .decompress()
                    .is_some_and(|p| !p.is_small_order())
            })
            .unwrap();
        sig[..32].copy_from_slice(&r_above_p);
        cases.push((key_hex.clone(), hex::encode(&sig), "R not canonical"));
        cases.push((key_hex.clone(), sig_hex[2..].to_owned(), "short signature"));
        cases.push((key_hex[2..].to_owned(), sig_hex.clone(), "short key"));
        cases.push((key_hex.clone(), format!("zz{}", &sig_hex[2..]), "not hex"));
        for (k, s, why) in &cases {
            assert!(!strict(k, s, &message), "verify_strict accepts {why}");
            let items = [
                Signed {
                    public_key_hex: k,
                    signature_hex: s,
                    message: &message,
                },
                Signed {
                    public_key_hex: &good.0,
                    signature_hex: &good.1,
                    message: b"a valid neighbour",
                },
            ];
            assert_eq!(verify_all(&items), vec![false, true], "{why}");
            assert!(!verify(&items[0]), "{why}");
        }
        assert!(cases.len() >= 19);
    }

    #[test]
    fn y_encodings_at_and_above_p_are_not_canonical() {
        let mut below = P_BYTES;
        below[0] -= 1;
        assert!(y_is_canonical(&below));
        assert!(!y_is_canonical(&P_BYTES));
        let mut above = P_BYTES;
        above[0] = 0xff;
        assert!(!y_is_canonical(&above));
        // The sign bit is not part of y.
        below[31] |= 0x80;
        assert!(y_is_canonical(&below));
        assert!(y_is_canonical(&[0u8; 32]));
    }

    #[test]
    fn a_small_order_component_in_r_is_where_the_rules_part() {
        // The one documented difference from verify_strict, made by the key's
        // holder: accepted alone and in a batch, whatever the batch holds.
        let k = key(77);
        let message = b"signed with a twist".to_vec();
        let key_hex = hex::encode(k.verifying_key().to_bytes());
        let good = signed(&key(78), b"plain");
        let torsion = curve25519_dalek::constants::EIGHT_TORSION;
        for t in &torsion[1..] {
            let sig = with_torsion(&k, &message, t);
            assert!(!strict(&key_hex, &sig, &message));
            let item = Signed {
                public_key_hex: &key_hex,
                signature_hex: &sig,
                message: &message,
            };
            assert!(verify(&item));
            let other = Signed {
                public_key_hex: &good.0,
                signature_hex: &good.1,
                message: b"plain",
            };
            assert_eq!(verify_all(&[item, other]), vec![true, true]);
        }
        // With the identity as T it is an ordinary signature both ways.
        let sig = with_torsion(&k, &message, &torsion[0]);
        assert!(strict(&key_hex, &sig, &message));
    }
}
