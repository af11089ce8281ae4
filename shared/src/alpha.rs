//! The width multiplier α and the channel rounding rule.
//!
//! α is kept as an exact fraction `num/den` in lowest terms. A layer with `n` channels at
//! α = 1 gets `round_half_up(n · num / den)` channels at α, computed in integers so the
//! host, the device and every report agree. A layer that would round to zero channels is
//! an error, never silently widened: see [`Alpha::scale`].

use core::fmt;

/// A width multiplier `0 < α ≤ 1`, as an exact fraction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Alpha {
    num: u32,
    den: u32,
}

/// Why a width multiplier was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AlphaError {
    /// Not of the form `1/8`, `0.125` or `1`.
    Malformed,
    /// α ≤ 0.
    NotPositive,
    /// α > 1.
    GreaterThanOne,
    /// A layer of `base` channels rounds to zero at this α.
    ZeroChannels {
        /// Channels of the layer at α = 1.
        base: u32,
    },
}

impl fmt::Display for AlphaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlphaError::Malformed => write!(
                f,
                "width multiplier must be a fraction like 1/8 or a decimal like 0.125"
            ),
            AlphaError::NotPositive => write!(f, "width multiplier must be greater than 0"),
            AlphaError::GreaterThanOne => write!(f, "width multiplier must be at most 1"),
            AlphaError::ZeroChannels { base } => write!(
                f,
                "width multiplier rounds a layer of {base} channels to zero channels"
            ),
        }
    }
}

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

impl Alpha {
    /// α = 1.
    pub const ONE: Alpha = Alpha { num: 1, den: 1 };

    /// `num / den`, reduced; must satisfy `0 < num/den ≤ 1`.
    pub fn new(num: u32, den: u32) -> Result<Alpha, AlphaError> {
        if den == 0 {
            return Err(AlphaError::Malformed);
        }
        if num == 0 {
            return Err(AlphaError::NotPositive);
        }
        if num > den {
            return Err(AlphaError::GreaterThanOne);
        }
        let g = gcd(u64::from(num), u64::from(den)) as u32;
        Ok(Alpha {
            num: num / g,
            den: den / g,
        })
    }

    /// Parses `1/8`, `0.125`, `1` (at most 9 decimal places; surrounding spaces allowed).
    pub fn parse(s: &str) -> Result<Alpha, AlphaError> {
        let s = s.trim();
        if s.starts_with('-') {
            return Err(AlphaError::NotPositive);
        }
        if let Some((n, d)) = s.split_once('/') {
            let n: u32 = n.trim().parse().map_err(|_| AlphaError::Malformed)?;
            let d: u32 = d.trim().parse().map_err(|_| AlphaError::Malformed)?;
            return Alpha::new(n, d);
        }
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if (int.is_empty() && frac.is_empty())
            || frac.len() > 9
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(AlphaError::Malformed);
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| AlphaError::GreaterThanOne)?
        };
        let den = 10u64.pow(frac.len() as u32);
        let frac_v: u64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| AlphaError::Malformed)?
        };
        let num = int
            .checked_mul(den)
            .and_then(|v| v.checked_add(frac_v))
            .ok_or(AlphaError::GreaterThanOne)?;
        if num == 0 {
            return Err(AlphaError::NotPositive);
        }
        if num > den {
            return Err(AlphaError::GreaterThanOne);
        }
        let g = gcd(num, den);
        Alpha::new((num / g) as u32, (den / g) as u32)
    }

    /// Numerator (lowest terms).
    pub fn num(&self) -> u32 {
        self.num
    }

    /// Denominator (lowest terms).
    pub fn den(&self) -> u32 {
        self.den
    }

    /// α as a float.
    pub fn value(&self) -> f64 {
        f64::from(self.num) / f64::from(self.den)
    }

    /// Channels of a layer with `base` channels at α = 1: `round_half_up(base · α)`;
    /// an error if that is zero.
    pub fn scale(&self, base: u32) -> Result<u32, AlphaError> {
        let n = u64::from(base) * u64::from(self.num);
        let d = u64::from(self.den);
        let c = (2 * n + d) / (2 * d);
        if c == 0 {
            Err(AlphaError::ZeroChannels { base })
        } else {
            Ok(c as u32)
        }
    }
}

impl fmt::Display for Alpha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fractions_and_decimals_exactly() {
        assert_eq!(Alpha::parse("1/8").unwrap(), Alpha::new(1, 8).unwrap());
        assert_eq!(Alpha::parse("0.125").unwrap(), Alpha::new(1, 8).unwrap());
        assert_eq!(Alpha::parse("2/16").unwrap(), Alpha::new(1, 8).unwrap());
        assert_eq!(Alpha::parse(" 1 ").unwrap(), Alpha::ONE);
        assert_eq!(Alpha::parse(".5").unwrap(), Alpha::new(1, 2).unwrap());
        assert_eq!(Alpha::parse("0").unwrap_err(), AlphaError::NotPositive);
        assert_eq!(Alpha::parse("-0.5").unwrap_err(), AlphaError::NotPositive);
        assert_eq!(Alpha::parse("0/4").unwrap_err(), AlphaError::NotPositive);
        assert_eq!(Alpha::parse("1.5").unwrap_err(), AlphaError::GreaterThanOne);
        assert_eq!(Alpha::parse("3/2").unwrap_err(), AlphaError::GreaterThanOne);
        for bad in ["", "abc", "1/0", "1/", "/2", "0.1.2", "1e-3", "nan"] {
            assert_eq!(
                Alpha::parse(bad).unwrap_err(),
                AlphaError::Malformed,
                "{bad}"
            );
        }
        assert_eq!(Alpha::new(1, 16).unwrap().to_string_buf(), *b"1/16");
    }

    impl Alpha {
        fn to_string_buf(self) -> [u8; 4] {
            let mut out = [0u8; 4];
            let s = [
                b'0' + self.num as u8,
                b'/',
                b'0' + (self.den / 10) as u8,
                b'0' + (self.den % 10) as u8,
            ];
            out.copy_from_slice(&s);
            out
        }
    }

    #[test]
    fn channel_rule_rounds_half_up_and_refuses_zero() {
        let a = Alpha::new(1, 16).unwrap();
        assert_eq!(a.scale(64).unwrap(), 4);
        assert_eq!(a.scale(8).unwrap(), 1); // 0.5 rounds up
        assert_eq!(
            a.scale(7).unwrap_err(),
            AlphaError::ZeroChannels { base: 7 }
        );
        let b = Alpha::new(3, 10).unwrap();
        assert_eq!(b.scale(64).unwrap(), 19); // 19.2
        assert_eq!(b.scale(5).unwrap(), 2); // 1.5 rounds up
        assert_eq!(Alpha::ONE.scale(1024).unwrap(), 1024);
    }
}
