//! The canonical bytes a payer signs. `PROTOCOL.md` documents them; the vectors in
//! `testdata/vectors.json` pin them down.
//!
//! The message is UTF-8 text: a domain line, then one `name=value` line per signed
//! field in a fixed order, each ending in `\n`. Values may not contain control
//! characters, so no value can forge a line break; the fixed order and names make
//! the encoding injective. The ed25519 signature is over these bytes as they are
//! (ed25519 hashes its input with SHA-512 itself).

use thiserror::Error;

/// First line of every signed message; a signature made for anything else cannot
/// be replayed as a 402x payment.
pub const DOMAIN: &str = "x402x-payment-v1";

/// The fields a signature binds, borrowed from a payment payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedFields<'a> {
    pub scheme: &'a str,
    pub network: &'a str,
    pub asset: &'a str,
    pub amount: &'a str,
    pub pay_to: &'a str,
    pub resource: &'a str,
    pub nonce: &'a str,
    pub valid_before: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("signed field `{0}` contains a control character")]
pub struct ControlCharacter(pub &'static str);

impl SignedFields<'_> {
    fn lines(&self) -> [(&'static str, &str); 8] {
        [
            ("scheme", self.scheme),
            ("network", self.network),
            ("asset", self.asset),
            ("amount", self.amount),
            ("payTo", self.pay_to),
            ("resource", self.resource),
            ("nonce", self.nonce),
            ("validBefore", self.valid_before),
        ]
    }

    /// The exact bytes to sign or verify.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, ControlCharacter> {
        let lines = self.lines();
        let mut out = Vec::with_capacity(
            DOMAIN.len()
                + 1
                + lines
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 2)
                    .sum::<usize>(),
        );
        out.extend_from_slice(DOMAIN.as_bytes());
        out.push(b'\n');
        for (name, value) in lines {
            if value.chars().any(char::is_control) {
                return Err(ControlCharacter(name));
            }
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
        Ok(out)
    }
}

/// The resource string a proof binds: `METHOD authority path?query`, with the method
/// upper-cased and the authority (host[:port]) lower-cased, path and query verbatim.
pub fn resource_string(method: &str, authority: &str, path_and_query: &str) -> String {
    format!(
        "{} {}{}",
        method.to_ascii_uppercase(),
        authority.to_ascii_lowercase(),
        path_and_query
    )
}

#[cfg(feature = "ed25519")]
mod ed25519 {
    use super::SignedFields;
    use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
    use thiserror::Error;

    #[derive(Debug, Clone, PartialEq, Eq, Error)]
    pub enum VerifyError {
        #[error("payer is not a valid ed25519 public key")]
        BadPublicKey,
        #[error("signature is not 64 bytes of hex")]
        BadSignatureEncoding,
        #[error("signed field `{0}` contains a control character")]
        BadField(&'static str),
        #[error("signature does not match")]
        Mismatch,
    }

    /// Signs the canonical bytes; returns the signature as lowercase hex.
    pub fn sign_hex(
        key: &SigningKey,
        fields: &SignedFields<'_>,
    ) -> Result<String, super::ControlCharacter> {
        let bytes = fields.canonical_bytes()?;
        Ok(hex::encode(key.sign(&bytes).to_bytes()))
    }

    /// Verifies a hex signature by a hex public key over the canonical bytes.
    pub fn verify_hex(
        payer_hex: &str,
        signature_hex: &str,
        fields: &SignedFields<'_>,
    ) -> Result<(), VerifyError> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(payer_hex, &mut key).map_err(|_| VerifyError::BadPublicKey)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| VerifyError::BadPublicKey)?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(signature_hex, &mut sig)
            .map_err(|_| VerifyError::BadSignatureEncoding)?;
        let sig = Signature::from_bytes(&sig);
        let bytes = fields
            .canonical_bytes()
            .map_err(|e| VerifyError::BadField(e.0))?;
        // verify_strict refuses small-order keys and malleable signatures.
        key.verify_strict(&bytes, &sig)
            .map_err(|_| VerifyError::Mismatch)?;
        Ok(())
    }

    /// Lowercase hex of a signing key's public half.
    pub fn public_key_hex(key: &SigningKey) -> String {
        hex::encode(key.verifying_key().to_bytes())
    }
}

#[cfg(feature = "ed25519")]
pub use ed25519::{public_key_hex, sign_hex, verify_hex, VerifyError};
#[cfg(feature = "ed25519")]
pub use ed25519_dalek::SigningKey;

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> SignedFields<'static> {
        SignedFields {
            scheme: "exact",
            network: "402x:local",
            asset: "USD",
            amount: "10000",
            pay_to: "merchant-demo",
            resource: "GET api.example.com/v1/quote?sym=ABC",
            nonce: "00112233445566778899aabbccddeeff",
            valid_before: "1900000000",
        }
    }

    #[test]
    fn canonical_bytes_are_the_documented_text() {
        let bytes = fields().canonical_bytes().unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "x402x-payment-v1\nscheme=exact\nnetwork=402x:local\nasset=USD\namount=10000\npayTo=merchant-demo\nresource=GET api.example.com/v1/quote?sym=ABC\nnonce=00112233445566778899aabbccddeeff\nvalidBefore=1900000000\n"
        );
    }

    #[test]
    fn a_newline_in_a_field_is_refused() {
        let mut f = fields();
        f.resource = "GET a/\nnonce=00";
        assert_eq!(f.canonical_bytes(), Err(ControlCharacter("resource")));
    }

    #[test]
    fn resource_string_normalises_case_of_method_and_host_only() {
        assert_eq!(
            resource_string("get", "API.Example.com:8080", "/A?b=C"),
            "GET api.example.com:8080/A?b=C"
        );
    }
}
