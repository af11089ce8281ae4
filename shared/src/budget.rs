//! The one parser for byte budgets, used by every command.
//!
//! Accepted: a non-negative number (integer or decimal) followed by an optional unit,
//! with optional spaces between: `750000`, `750000B`, `256KB`, `1MB`, `1.5MB`, `1GB`
//! (powers of 1000) and `256KiB`, `1MiB`, `1GiB` (powers of 1024). Units are
//! case-sensitive as written here, except that `kB` is also accepted. The result must be
//! a whole, positive number of bytes.

use core::fmt;

/// Why a budget string was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BudgetError {
    /// Empty string.
    Empty,
    /// No number in front of the unit, or a malformed number.
    BadNumber,
    /// The unit is not one of B, KB, MB, GB, KiB, MiB, GiB.
    UnknownUnit,
    /// The value is zero.
    Zero,
    /// The value is not a whole number of bytes (e.g. `1.0000005MB`).
    FractionalBytes,
    /// The value does not fit in 64 bits.
    TooLarge,
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            BudgetError::Empty => "the budget is empty",
            BudgetError::BadNumber => "the budget does not start with a number",
            BudgetError::UnknownUnit => "unknown unit",
            BudgetError::Zero => "the budget must be greater than zero",
            BudgetError::FractionalBytes => "the budget is not a whole number of bytes",
            BudgetError::TooLarge => "the budget is too large",
        };
        write!(
            f,
            "{what} (expected e.g. 750000, 256KB, 1MB = 10^6 bytes, 256KiB, 1MiB = 2^20 bytes)"
        )
    }
}

/// Parses a byte budget such as `1MB` (10^6 bytes) or `256KiB` (262144 bytes).
pub fn parse_bytes(s: &str) -> Result<u64, BudgetError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(BudgetError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(BudgetError::BadNumber);
    }
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(BudgetError::UnknownUnit),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty())
        || frac.contains('.')
        || frac.len() > 12
        || !int.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(BudgetError::BadNumber);
    }
    let int_v: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| BudgetError::TooLarge)?
    };
    let mut bytes = int_v.checked_mul(multiplier).ok_or(BudgetError::TooLarge)?;
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        let frac_v: u128 = frac.parse().map_err(|_| BudgetError::BadNumber)?;
        let scaled = frac_v * u128::from(multiplier);
        if !scaled.is_multiple_of(scale) {
            return Err(BudgetError::FractionalBytes);
        }
        bytes = bytes
            .checked_add((scaled / scale) as u64)
            .ok_or(BudgetError::TooLarge)?;
    }
    if bytes == 0 {
        return Err(BudgetError::Zero);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_decimal_and_binary_units() {
        assert_eq!(parse_bytes("1MB"), Ok(1_000_000));
        assert_eq!(parse_bytes("1MiB"), Ok(1_048_576));
        assert_eq!(parse_bytes("256KB"), Ok(256_000));
        assert_eq!(parse_bytes("256kB"), Ok(256_000));
        assert_eq!(parse_bytes("256KiB"), Ok(262_144));
        assert_eq!(parse_bytes("750000"), Ok(750_000));
        assert_eq!(parse_bytes("750000B"), Ok(750_000));
        assert_eq!(parse_bytes(" 1.5 MB "), Ok(1_500_000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("0.5KiB"), Ok(512));
    }

    #[test]
    fn rejects_everything_else_clearly() {
        assert_eq!(parse_bytes(""), Err(BudgetError::Empty));
        assert_eq!(parse_bytes("MB"), Err(BudgetError::BadNumber));
        assert_eq!(parse_bytes("1.2.3MB"), Err(BudgetError::BadNumber));
        assert_eq!(parse_bytes("1mb"), Err(BudgetError::UnknownUnit));
        assert_eq!(parse_bytes("1 TB"), Err(BudgetError::UnknownUnit));
        assert_eq!(parse_bytes("-1MB"), Err(BudgetError::BadNumber));
        assert_eq!(parse_bytes("1e6"), Err(BudgetError::UnknownUnit));
        assert_eq!(parse_bytes("0KB"), Err(BudgetError::Zero));
        assert_eq!(parse_bytes("0.1B"), Err(BudgetError::FractionalBytes));
        assert_eq!(
            parse_bytes("99999999999999999999"),
            Err(BudgetError::TooLarge)
        );
        assert_eq!(parse_bytes("99999999999GiB"), Err(BudgetError::TooLarge));
    }
}
