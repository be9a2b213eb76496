//! Standard base64 (RFC 4648 alphabet) of the x402 headers, written out: it is all the
//! filter needs of a base64 library and a fraction of one's code in its wasm module.
//!
//! Encoding is padded. Decoding accepts exactly what a strict decoder accepts either
//! padded or unpadded: canonical padding or none, no other `=`, no whitespace, and the
//! unused low bits of the last symbol zero.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard padded base64 of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let symbol = |n: u32, shift: u32| ALPHABET[((n >> shift) & 63) as usize];
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[symbol(n, 18), symbol(n, 12), symbol(n, 6), symbol(n, 0)]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[symbol(n, 18), symbol(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[symbol(n, 18), symbol(n, 12), symbol(n, 6), b'=']);
        }
        _ => {}
    }
    // Every byte pushed is an ASCII symbol of the alphabet or `=`.
    String::from_utf8(out).unwrap_or_default()
}

fn value(symbol: u8) -> Option<u32> {
    Some(u32::from(match symbol {
        b'A'..=b'Z' => symbol - b'A',
        b'a'..=b'z' => symbol - b'a' + 26,
        b'0'..=b'9' => symbol - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    }))
}

/// Decodes standard base64, padded canonically or not padded at all; `None` when the
/// text is not that.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    let body = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"="));
    let body = match body {
        // Padding must complete the last group of four exactly.
        Some(_) if !text.len().is_multiple_of(4) => return None,
        Some(body) if body.len() % 4 < 2 => return None,
        Some(body) => body,
        None => text,
    };
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, &symbol) in chunk.iter().enumerate() {
            n |= value(symbol)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let len = chunk.len() - 1;
        // The bits of the last symbol past the last whole byte must be zero.
        if n & (0x00ff_ffff >> (8 * len)) != 0 {
            return None;
        }
        out.extend_from_slice(&bytes[..len]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    use base64::Engine;

    fn reference(text: &str) -> Option<Vec<u8>> {
        STANDARD
            .decode(text)
            .or_else(|_| STANDARD_NO_PAD.decode(text))
            .ok()
    }

    #[test]
    fn encodes_like_the_base64_crate() {
        let data: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..data.len() {
            assert_eq!(encode(&data[..len]), STANDARD.encode(&data[..len]));
        }
    }

    #[test]
    fn accepts_exactly_what_the_base64_crate_accepts() {
        // Every string of up to 6 symbols over an alphabet that has symbols with and
        // without low bits set, both extra symbols, padding and non-alphabet bytes.
        let symbols = b"AQBg/+=w-";
        let mut checked = 0;
        for len in 0..=6u32 {
            let total = symbols.len().pow(len);
            for mut k in 0..total {
                let mut s = String::new();
                for _ in 0..len {
                    s.push(char::from(symbols[k % symbols.len()]));
                    k /= symbols.len();
                }
                assert_eq!(decode(&s), reference(&s), "{s:?}");
                checked += 1;
            }
        }
        assert!(checked > 500_000);
        // Longer texts: encodings of every length, then with each tail cut or padded.
        let data: Vec<u8> = (0..200u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..data.len() {
            let good = STANDARD.encode(&data[..len]);
            assert_eq!(decode(&good).as_deref(), Some(&data[..len]));
            let bare = good.trim_end_matches('=').to_string();
            for s in [
                bare.clone(),
                format!("{bare}="),
                format!("{bare}=="),
                format!("{bare}==="),
                format!("{good}="),
                format!("{good}A"),
                format!("={good}"),
                good.chars().skip(1).collect(),
                good.replacen('A', "=", 1),
                good.replacen('A', "-", 1),
            ] {
                assert_eq!(decode(&s), reference(&s), "{s:?}");
            }
        }
    }
}
