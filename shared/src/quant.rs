//! Fixed-point requantization, defined once so host and device compute the same integers.
//!
//! An int8 layer accumulates `Σ x_q · w_q` in `i32`; the real result is that sum times
//! `s_x · s_w / s_y`. That real multiplier is stored as a 31-bit fixed-point `multiplier`
//! and a power-of-two `shift` (`real ≈ multiplier · 2^(shift − 31)`), and applied with
//! round-half-up integer arithmetic.

/// A real multiplier in fixed point: `multiplier · 2^(shift − 31)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requant {
    /// Mantissa in `[2^30, 2^31)`.
    pub multiplier: i32,
    /// Power-of-two exponent.
    pub shift: i32,
}

/// Converts a positive, finite real multiplier to fixed point; `None` for zero,
/// negative, non-finite or absurdly large/small values (|exponent| > 62).
pub fn quantize_multiplier(real: f64) -> Option<Requant> {
    if !(real.is_finite() && real > 0.0) {
        return None;
    }
    let mut q = real;
    let mut shift = 0i32;
    while q >= 1.0 {
        q /= 2.0;
        shift += 1;
        if shift > 62 {
            return None;
        }
    }
    while q < 0.5 {
        q *= 2.0;
        shift -= 1;
        if shift < -62 {
            return None;
        }
    }
    // q in [0.5, 1): round to 31 bits; rounding can reach 2^31 exactly.
    let mut m = (q * (1u64 << 31) as f64 + 0.5) as i64;
    if m == 1i64 << 31 {
        m /= 2;
        shift += 1;
    }
    Some(Requant {
        multiplier: m as i32,
        shift,
    })
}

/// `round_half_up(acc · real)` for the fixed-point `r`, saturated to `i32`.
pub fn requantize(acc: i32, r: Requant) -> i32 {
    let prod = i128::from(acc) * i128::from(r.multiplier);
    let right = 31 - r.shift;
    let v = if right > 0 {
        let right = right.min(126) as u32;
        (prod + (1i128 << (right - 1))) >> right
    } else {
        prod << ((-right).min(64) as u32)
    };
    v.clamp(i128::from(i32::MIN), i128::from(i32::MAX)) as i32
}

/// Clamps to the int8 range.
pub fn saturate_i8(x: i32) -> i8 {
    x.clamp(i32::from(i8::MIN), i32::from(i8::MAX)) as i8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_non_positive_multipliers() {
        assert_eq!(quantize_multiplier(0.0), None);
        assert_eq!(quantize_multiplier(-1.0), None);
        assert_eq!(quantize_multiplier(f64::NAN), None);
        let r = quantize_multiplier(0.5).unwrap();
        assert_eq!(
            r,
            Requant {
                multiplier: 1 << 30,
                shift: 0
            }
        );
    }

    proptest! {
        #[test]
        fn matches_real_arithmetic(acc in -1_000_000i32..1_000_000, real in 1e-6f64..4.0) {
            let r = quantize_multiplier(real).unwrap();
            let exact = f64::from(acc) * real;
            let got = requantize(acc, r);
            // 31-bit mantissa: error well below one unit, except right at .5 ties.
            prop_assert!((f64::from(got) - exact).abs() <= 0.5 + exact.abs() * 1e-8 + 1e-9,
                "acc {acc} real {real} exact {exact} got {got}");
        }
    }
}
