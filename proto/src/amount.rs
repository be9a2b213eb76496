//! Money is an integer number of atomic units (`u64`, at most `i64::MAX` so it fits a
//! Postgres `BIGINT`). Decimal strings are parsed exactly; no floating point anywhere.

use thiserror::Error;

/// The largest amount any party accepts: what fits in a signed 64-bit column.
pub const MAX_ATOMIC: u64 = i64::MAX as u64;

/// The most decimals an asset may have (10^18 still fits in a u64 with room to spare).
pub const MAX_DECIMALS: u8 = 18;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount must contain only digits and at most one '.'")]
    InvalidCharacter,
    #[error("amount has more than {0} decimal places")]
    TooPrecise(u8),
    #[error("amount is too large")]
    Overflow,
    #[error("atomic amount must not have leading zeros")]
    LeadingZero,
    #[error("asset decimals must be at most {MAX_DECIMALS}")]
    TooManyDecimals,
}

/// Parses an atomic-unit amount as it appears on the wire: ASCII digits only, no sign,
/// no leading zeros (so every amount has exactly one spelling), at most [`MAX_ATOMIC`].
pub fn parse_atomic(s: &str) -> Result<u64, AmountError> {
    if s.is_empty() {
        return Err(AmountError::Empty);
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::InvalidCharacter);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(AmountError::LeadingZero);
    }
    let mut value: u64 = 0;
    for b in s.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(AmountError::Overflow)?;
    }
    if value > MAX_ATOMIC {
        return Err(AmountError::Overflow);
    }
    Ok(value)
}

/// Parses a human decimal price such as `"0.01"` into atomic units of an asset with
/// `decimals` places. More fractional digits than the asset has is an error, never a
/// silent rounding.
pub fn parse_decimal(s: &str, decimals: u8) -> Result<u64, AmountError> {
    if decimals > MAX_DECIMALS {
        return Err(AmountError::TooManyDecimals);
    }
    if s.is_empty() {
        return Err(AmountError::Empty);
    }
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(AmountError::Empty);
    }
    if s.ends_with('.') || s.starts_with('.') {
        return Err(AmountError::InvalidCharacter);
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::InvalidCharacter);
    }
    if frac.len() > usize::from(decimals) {
        return Err(AmountError::TooPrecise(decimals));
    }
    let scale = 10u64
        .checked_pow(u32::from(decimals))
        .ok_or(AmountError::Overflow)?;
    let mut whole_value: u64 = 0;
    for b in whole.bytes() {
        whole_value = whole_value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(AmountError::Overflow)?;
    }
    let mut frac_value: u64 = 0;
    for i in 0..usize::from(decimals) {
        let digit = frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        frac_value = frac_value * 10 + digit;
    }
    let value = whole_value
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_value))
        .ok_or(AmountError::Overflow)?;
    if value > MAX_ATOMIC {
        return Err(AmountError::Overflow);
    }
    Ok(value)
}

/// Formats atomic units as a decimal string with trailing fractional zeros removed:
/// `format_decimal(10_000, 6) == "0.01"`, `format_decimal(2_000_000, 6) == "2"`.
pub fn format_decimal(value: u64, decimals: u8) -> String {
    if decimals == 0 {
        return value.to_string();
    }
    let scale = 10u64.pow(u32::from(decimals.min(MAX_DECIMALS)));
    let whole = value / scale;
    let frac = value % scale;
    if frac == 0 {
        return whole.to_string();
    }
    let mut frac_str = format!("{frac:0width$}", width = usize::from(decimals));
    while frac_str.ends_with('0') {
        frac_str.pop();
    }
    format!("{whole}.{frac_str}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prices_exactly() {
        assert_eq!(parse_decimal("0.01", 6), Ok(10_000));
        assert_eq!(parse_decimal("1", 6), Ok(1_000_000));
        assert_eq!(parse_decimal("1.5", 2), Ok(150));
        assert_eq!(parse_decimal("0.000001", 6), Ok(1));
        assert_eq!(parse_decimal("0", 6), Ok(0));
        assert_eq!(parse_decimal("12", 0), Ok(12));
    }

    #[test]
    fn refuses_inexact_or_odd_prices() {
        assert_eq!(
            parse_decimal("0.0000001", 6),
            Err(AmountError::TooPrecise(6))
        );
        assert_eq!(parse_decimal("-1", 6), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_decimal("1e3", 6), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_decimal(" 1", 6), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_decimal("1.", 6), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_decimal(".5", 6), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_decimal("", 6), Err(AmountError::Empty));
        assert_eq!(
            parse_decimal("1.2.3", 6),
            Err(AmountError::InvalidCharacter)
        );
        assert_eq!(
            parse_decimal("99999999999999999999", 6),
            Err(AmountError::Overflow)
        );
        assert_eq!(parse_decimal("1", 19), Err(AmountError::TooManyDecimals));
    }

    #[test]
    fn atomic_amounts_have_one_spelling() {
        assert_eq!(parse_atomic("10000"), Ok(10_000));
        assert_eq!(parse_atomic("0"), Ok(0));
        assert_eq!(parse_atomic("010"), Err(AmountError::LeadingZero));
        assert_eq!(parse_atomic("-1"), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_atomic("1.5"), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_atomic("+1"), Err(AmountError::InvalidCharacter));
        assert_eq!(parse_atomic(""), Err(AmountError::Empty));
        assert_eq!(parse_atomic("9223372036854775807"), Ok(MAX_ATOMIC));
        assert_eq!(
            parse_atomic("9223372036854775808"),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            parse_atomic("99999999999999999999999"),
            Err(AmountError::Overflow)
        );
    }

    #[test]
    fn formats_round_trip() {
        for (v, d, s) in [
            (10_000, 6, "0.01"),
            (2_000_000, 6, "2"),
            (1, 6, "0.000001"),
            (150, 2, "1.5"),
            (7, 0, "7"),
        ] {
            assert_eq!(format_decimal(v, d), s);
            assert_eq!(parse_decimal(s, d), Ok(v));
        }
    }
}
