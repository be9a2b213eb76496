//! Exact decimal arithmetic for prices: a value is `mantissa / 10^scale` with an
//! `i128` mantissa. Addition, subtraction and multiplication are exact; division
//! keeps [`DIV_SCALE`] decimal places (or more, when an operand has more), rounded
//! half up. Every operation is checked: an overflow is an error, never a wrap or a
//! panic. Converting to atomic units rounds half up to the asset's smallest unit
//! (`0.0000005` USD at 6 decimals is 1 atomic unit, `0.00000049` is 0).

use std::cmp::Ordering;
use std::fmt;

/// Decimal places kept by a division.
pub const DIV_SCALE: u32 = 18;
/// Most decimal places a value carries; longer results are rounded half up.
pub const MAX_SCALE: u32 = 36;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("is not a decimal number")]
    Syntax,
    #[error("arithmetic overflow")]
    Overflow,
    #[error("division by zero")]
    DivisionByZero,
    #[error("is negative")]
    Negative,
}

#[derive(Debug, Clone, Copy)]
pub struct Decimal {
    mantissa: i128,
    scale: u32,
}

// Value equality (`0.10 == 0.1`) is an equivalence: the comparison is exact.
impl Eq for Decimal {}

impl PartialEq for Decimal {
    fn eq(&self, other: &Self) -> bool {
        self.cmp_value(other) == Ordering::Equal
    }
}

fn pow10(exp: u32) -> Result<i128, DecimalError> {
    10i128.checked_pow(exp).ok_or(DecimalError::Overflow)
}

/// `m × 10^shift` against `n`. A nonzero product that overflows an `i128` is
/// farther from zero than any `i128` (it cannot be exactly `i128::MIN`, which has
/// no factor of 5), so its sign decides.
fn cmp_scaled_up(m: i128, shift: u32, n: i128) -> Ordering {
    if m == 0 {
        return 0.cmp(&n);
    }
    match pow10(shift).ok().and_then(|p| m.checked_mul(p)) {
        Some(scaled) => scaled.cmp(&n),
        None => m.cmp(&0),
    }
}

/// `n / d` rounded half away from zero; `d` must be positive.
fn div_round(n: i128, d: i128) -> i128 {
    let q = n / d;
    let r = n % d;
    // |r| < d, so 2|r| cannot overflow when d <= i128::MAX / 2 (true for powers of ten
    // and the divisors this module builds); fall back to truncation otherwise.
    match r.unsigned_abs().checked_mul(2) {
        Some(twice) if twice >= d.unsigned_abs() => {
            if n < 0 {
                q - 1
            } else {
                q + 1
            }
        }
        _ => q,
    }
}

impl Decimal {
    pub const ZERO: Decimal = Decimal {
        mantissa: 0,
        scale: 0,
    };

    pub fn from_int(value: i128) -> Decimal {
        Decimal {
            mantissa: value,
            scale: 0,
        }
    }

    /// Parses `123`, `-1.5`, `0.000001`, `1e-7`, `2.5E3` exactly.
    pub fn parse(text: &str) -> Result<Decimal, DecimalError> {
        let text = text.trim();
        let (number, exponent) = match text.find(['e', 'E']) {
            Some(i) => {
                let exp: i32 = text[i + 1..].parse().map_err(|_| DecimalError::Syntax)?;
                (&text[..i], exp)
            }
            None => (text, 0),
        };
        let (negative, digits) = match number.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, number.strip_prefix('+').unwrap_or(number)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() {
            return Err(DecimalError::Syntax);
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(DecimalError::Syntax);
        }
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(i128::from(b - b'0')))
                .ok_or(DecimalError::Overflow)?;
        }
        if negative {
            mantissa = -mantissa;
        }
        let frac_len = i32::try_from(frac.len()).map_err(|_| DecimalError::Overflow)?;
        let scale = frac_len - exponent;
        let value = if scale >= 0 {
            Decimal {
                mantissa,
                scale: scale.unsigned_abs(),
            }
        } else {
            Decimal {
                mantissa: mantissa
                    .checked_mul(pow10(scale.unsigned_abs())?)
                    .ok_or(DecimalError::Overflow)?,
                scale: 0,
            }
        };
        value.limit_scale()
    }

    pub fn is_zero(&self) -> bool {
        self.mantissa == 0
    }

    pub fn is_negative(&self) -> bool {
        self.mantissa < 0
    }

    /// Drops trailing zeros and rounds past [`MAX_SCALE`], so scales stay small.
    fn limit_scale(mut self) -> Result<Decimal, DecimalError> {
        if self.scale > MAX_SCALE {
            let d = pow10(self.scale - MAX_SCALE)?;
            self.mantissa = div_round(self.mantissa, d);
            self.scale = MAX_SCALE;
        }
        while self.scale > 0 && self.mantissa % 10 == 0 {
            self.mantissa /= 10;
            self.scale -= 1;
        }
        Ok(self)
    }

    fn rescaled(&self, scale: u32) -> Result<i128, DecimalError> {
        debug_assert!(scale >= self.scale);
        self.mantissa
            .checked_mul(pow10(scale - self.scale)?)
            .ok_or(DecimalError::Overflow)
    }

    /// Orders by value, exactly at any scales: only the operand with fewer places is
    /// rescaled, and a rescale too large for an `i128` is beyond the other operand.
    fn cmp_value(&self, other: &Decimal) -> Ordering {
        match self.scale.cmp(&other.scale) {
            Ordering::Equal => self.mantissa.cmp(&other.mantissa),
            Ordering::Less => {
                cmp_scaled_up(self.mantissa, other.scale - self.scale, other.mantissa)
            }
            Ordering::Greater => {
                cmp_scaled_up(other.mantissa, self.scale - other.scale, self.mantissa).reverse()
            }
        }
    }

    pub fn checked_add(&self, other: &Decimal) -> Result<Decimal, DecimalError> {
        let scale = self.scale.max(other.scale);
        let m = self
            .rescaled(scale)?
            .checked_add(other.rescaled(scale)?)
            .ok_or(DecimalError::Overflow)?;
        Decimal { mantissa: m, scale }.limit_scale()
    }

    pub fn checked_sub(&self, other: &Decimal) -> Result<Decimal, DecimalError> {
        self.checked_add(&other.negated()?)
    }

    pub fn negated(&self) -> Result<Decimal, DecimalError> {
        Ok(Decimal {
            mantissa: self.mantissa.checked_neg().ok_or(DecimalError::Overflow)?,
            scale: self.scale,
        })
    }

    pub fn checked_mul(&self, other: &Decimal) -> Result<Decimal, DecimalError> {
        let m = self
            .mantissa
            .checked_mul(other.mantissa)
            .ok_or(DecimalError::Overflow)?;
        Decimal {
            mantissa: m,
            scale: self.scale + other.scale,
        }
        .limit_scale()
    }

    /// `self / other`, rounded half up at `max(DIV_SCALE, self.scale)` places.
    pub fn checked_div(&self, other: &Decimal) -> Result<Decimal, DecimalError> {
        if other.is_zero() {
            return Err(DecimalError::DivisionByZero);
        }
        let scale = DIV_SCALE.max(self.scale);
        // self.m / 10^s1 / (o.m / 10^s2) = self.m * 10^(scale + s2 - s1) / o.m / 10^scale
        let numerator = self
            .mantissa
            .checked_mul(pow10(scale + other.scale - self.scale)?)
            .ok_or(DecimalError::Overflow)?;
        let (n, d) = if other.mantissa < 0 {
            (
                numerator.checked_neg().ok_or(DecimalError::Overflow)?,
                other.mantissa.checked_neg().ok_or(DecimalError::Overflow)?,
            )
        } else {
            (numerator, other.mantissa)
        };
        Decimal {
            mantissa: div_round(n, d),
            scale,
        }
        .limit_scale()
    }

    pub fn floor(&self) -> Decimal {
        let d = 10i128.pow(self.scale.min(38));
        Decimal::from_int(self.mantissa.div_euclid(d))
    }

    pub fn ceil(&self) -> Decimal {
        let d = 10i128.pow(self.scale.min(38));
        let q = self.mantissa.div_euclid(d);
        if self.mantissa.rem_euclid(d) == 0 {
            Decimal::from_int(q)
        } else {
            Decimal::from_int(q + 1)
        }
    }

    pub fn min(self, other: Decimal) -> Decimal {
        if self.cmp_value(&other) == Ordering::Greater {
            other
        } else {
            self
        }
    }

    pub fn max(self, other: Decimal) -> Decimal {
        if self.cmp_value(&other) == Ordering::Less {
            other
        } else {
            self
        }
    }

    /// The value in atomic units of an asset with `decimals` places, rounded half up.
    pub fn to_atomic(&self, decimals: u8) -> Result<u64, DecimalError> {
        if self.is_negative() {
            return Err(DecimalError::Negative);
        }
        let decimals = u32::from(decimals);
        let atomic = if self.scale <= decimals {
            self.mantissa
                .checked_mul(pow10(decimals - self.scale)?)
                .ok_or(DecimalError::Overflow)?
        } else {
            div_round(self.mantissa, pow10(self.scale - decimals)?)
        };
        u64::try_from(atomic).map_err(|_| DecimalError::Overflow)
    }
}

/// The decimal digits of `n`. Written out rather than `n.to_string()`, which links
/// core's 128-bit integer formatter into the wasm module for this one caller.
fn digits(mut n: u128) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'0' + u8::try_from(n % 10).unwrap_or(0));
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = digits(self.mantissa.unsigned_abs());
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{int}.{frac}")
    }
}

/// A per-unit price: `units × price` in atomic units, rounded half up, computed in
/// `u128` so any `u64` count times any configured price is exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitPrice {
    /// Price of one unit as `numerator / denominator` atomic units.
    numerator: u128,
    denominator: u128,
    /// The price as configured, for challenges (`"0.00002"`).
    pub text: String,
}

impl UnitPrice {
    /// `text` is a non-negative decimal in asset units; it may be finer than one
    /// atomic unit (`0.0000015` USD per token).
    pub fn parse(text: &str, decimals: u8) -> Result<UnitPrice, DecimalError> {
        let value = Decimal::parse(text)?;
        if value.is_negative() {
            return Err(DecimalError::Negative);
        }
        let decimals = u32::from(decimals);
        let numerator = u128::try_from(value.mantissa).map_err(|_| DecimalError::Overflow)?;
        let (numerator, denominator) = if value.scale >= decimals {
            (
                numerator,
                10u128
                    .checked_pow(value.scale - decimals)
                    .ok_or(DecimalError::Overflow)?,
            )
        } else {
            (
                numerator
                    .checked_mul(
                        10u128
                            .checked_pow(decimals - value.scale)
                            .ok_or(DecimalError::Overflow)?,
                    )
                    .ok_or(DecimalError::Overflow)?,
                1,
            )
        };
        Ok(UnitPrice {
            numerator,
            denominator,
            text: value.to_string(),
        })
    }

    /// Atomic units for `count / per` units (e.g. bytes per kilobyte, microseconds
    /// per second), rounded half up; `None` when the result does not fit in `u64`.
    pub fn amount_for(&self, count: u64, per: u64) -> Option<u64> {
        let n = u128::from(count).checked_mul(self.numerator)?;
        let d = self.denominator.checked_mul(u128::from(per.max(1)))?;
        let q = n / d;
        let r = n % d;
        let rounded = if r.checked_mul(2).is_none_or(|twice| twice >= d) {
            q.checked_add(1)?
        } else {
            q
        };
        u64::try_from(rounded).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn parses_exactly_and_prints_normalised() {
        assert_eq!(d("0.10").to_string(), "0.1");
        assert_eq!(digits(0), "0");
        assert_eq!(digits(u128::MAX), u128::MAX.to_string());
        assert_eq!(d("1e-7").to_string(), "0.0000001");
        assert_eq!(d("2.5E3").to_string(), "2500");
        assert_eq!(d("-0.5").to_string(), "-0.5");
        for bad in ["", ".", "1.2.3", "abc", "1e", "--1", "1_000"] {
            assert!(Decimal::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Decimal::parse("1e40").unwrap_err(),
            DecimalError::Overflow,
            "10^40 does not fit"
        );
    }

    #[test]
    fn arithmetic_is_exact_where_it_can_be() {
        assert_eq!(d("0.1").checked_add(&d("0.2")).unwrap(), d("0.3"));
        assert_eq!(d("1024").checked_mul(&d("1024")).unwrap(), d("1048576"));
        assert_eq!(d("90").checked_div(&d("60")).unwrap(), d("1.5"));
        // 1/3 keeps 18 places, rounded half up.
        assert_eq!(
            d("2").checked_div(&d("3")).unwrap().to_string(),
            "0.666666666666666667"
        );
        assert_eq!(
            d("1").checked_div(&d("0")).unwrap_err(),
            DecimalError::DivisionByZero
        );
        let big = Decimal::from_int(i128::MAX);
        assert_eq!(
            big.checked_add(&d("1")).unwrap_err(),
            DecimalError::Overflow
        );
        assert_eq!(
            big.checked_mul(&d("2")).unwrap_err(),
            DecimalError::Overflow
        );
    }

    #[test]
    fn atomic_conversion_rounds_half_up() {
        assert_eq!(d("0.0000005").to_atomic(6).unwrap(), 1);
        assert_eq!(d("0.00000049").to_atomic(6).unwrap(), 0);
        assert_eq!(d("0.0000015").to_atomic(6).unwrap(), 2);
        assert_eq!(d("0.15").to_atomic(6).unwrap(), 150_000);
        assert_eq!(d("7").to_atomic(0).unwrap(), 7);
        assert_eq!(d("-1").to_atomic(6).unwrap_err(), DecimalError::Negative);
        assert_eq!(
            d("18446744073709.551616").to_atomic(6).unwrap_err(),
            DecimalError::Overflow
        );
        assert_eq!(d("18446744073709.551615").to_atomic(6).unwrap(), u64::MAX);
    }

    #[test]
    fn floor_ceil_min_max() {
        assert_eq!(d("1.2").ceil(), d("2"));
        assert_eq!(d("1.2").floor(), d("1"));
        assert_eq!(d("-1.2").floor(), d("-2"));
        assert_eq!(d("3").ceil(), d("3"));
        assert_eq!(d("1").min(d("2")), d("1"));
        assert_eq!(d("1").max(d("2")), d("2"));
    }

    #[test]
    fn min_and_max_are_exact_whatever_the_scales() {
        let tiny = d("0.000000000000000000000000000000000001");
        let floor = d("200");
        // 200 at 36 places does not fit an i128; the floor must still hold.
        assert_eq!(tiny.max(floor), floor);
        assert_eq!(floor.max(tiny), floor);
        assert_eq!(tiny.max(floor).to_string(), "200");
        assert_eq!(tiny.max(floor).to_atomic(6).unwrap(), 200_000_000);
        assert_eq!(tiny.min(floor), tiny);
        assert_eq!(floor.min(tiny), tiny);
        let just_over_half = d("0.5").checked_add(&tiny).unwrap();
        assert_eq!(just_over_half.max(floor), floor);
        assert_eq!(just_over_half.min(floor), just_over_half);
        assert_eq!(tiny.negated().unwrap().min(d("-200")), d("-200"));
        assert_eq!(
            tiny.negated().unwrap().max(d("-200")),
            tiny.negated().unwrap()
        );
        assert_ne!(tiny, floor);

        // Equal values at different scales compare equal, either way round.
        let unnormalised = Decimal {
            mantissa: 2000,
            scale: 1,
        };
        assert_eq!(unnormalised, floor);
        assert_eq!(floor, unnormalised);
        let zero_far_out = Decimal {
            mantissa: 0,
            scale: 60,
        };
        assert_eq!(zero_far_out, Decimal::ZERO);
        assert_eq!(zero_far_out.max(tiny), tiny);
        assert_eq!(tiny.min(zero_far_out), zero_far_out);

        // The extremes: the largest mantissas, and scales past 10^38.
        let big = Decimal::from_int(i128::MAX);
        let most_negative = Decimal::from_int(i128::MIN);
        assert_eq!(tiny.max(big), big);
        assert_eq!(tiny.min(most_negative), most_negative);
        assert_eq!(most_negative.max(tiny), tiny);
        let wide = Decimal {
            mantissa: i128::MAX,
            scale: 36,
        };
        assert_eq!(wide.max(floor), floor, "about 170.14 < 200");
        assert_eq!(wide.max(d("170")), wide);
        assert_eq!(wide.min(d("-170")), d("-170"));
        let below_one = Decimal {
            mantissa: 1,
            scale: 100,
        };
        assert_eq!(below_one.max(d("1")), d("1"));
        assert_eq!(below_one.min(tiny), below_one);
        assert_eq!(below_one.max(Decimal::ZERO), below_one);
        assert_eq!(
            below_one.negated().unwrap().min(Decimal::ZERO),
            below_one.negated().unwrap()
        );
    }

    #[test]
    fn unit_prices_meter_exactly() {
        let per_token = UnitPrice::parse("0.0000015", 6).unwrap();
        assert_eq!(per_token.amount_for(0, 1), Some(0));
        assert_eq!(per_token.amount_for(1, 1), Some(2), "1.5 rounds up");
        assert_eq!(per_token.amount_for(3, 1), Some(5), "4.5 rounds up");
        assert_eq!(per_token.amount_for(1000, 1), Some(1500));
        // Per kilobyte: 1500 bytes at 0.001 per KB = 1.5 atomic units... at 6 decimals
        // 0.001 USD is 1000 atomic per 1000 bytes, so 1500 bytes = 1500.
        let per_kb = UnitPrice::parse("0.001", 6).unwrap();
        assert_eq!(per_kb.amount_for(1500, 1000), Some(1500));
        assert_eq!(per_kb.amount_for(1, 1000), Some(1));
        // Per second metered in microseconds: 1.2345 s at 0.01 / s = 12345 atomic.
        let per_second = UnitPrice::parse("0.01", 6).unwrap();
        assert_eq!(per_second.amount_for(1_234_500, 1_000_000), Some(12_345));
        assert_eq!(per_second.amount_for(1_234_499, 1_000_000), Some(12_345));
        assert_eq!(per_second.amount_for(1_234_449, 1_000_000), Some(12_344));
        // Overflow is reported, never wrapped.
        let expensive = UnitPrice::parse("1000000", 6).unwrap();
        assert_eq!(expensive.amount_for(u64::MAX, 1), None);
        assert!(UnitPrice::parse("-1", 6).is_err());
        assert_eq!(
            UnitPrice::parse("0", 6).unwrap().amount_for(u64::MAX, 1),
            Some(0)
        );
    }
}
