//! Visual clutter as sub-band entropy (after Rosenholtz, Li & Nakano, J. Vision 2007):
//! the image is split into luminance and two opponent chroma channels, each channel is
//! decomposed by a Haar wavelet into `levels` levels of horizontal, vertical and
//! diagonal detail bands, and the Shannon entropy (bits) of each band's coefficients,
//! binned with a fixed width, is averaged over the bands. Clutter is
//! `0.84·H(lum) + 0.08·H(R−G) + 0.08·H((R+G)/2 − B)` (their weights); gray images have
//! no chroma, so their chroma terms are 0.
//!
//! Channels, all from 8-bit values scaled to [0, 1]: luminance is BT.601 luma, the
//! opponent channels are `R − G` and `(R + G)/2 − B`. Haar coefficients are averages
//! and differences over 2×2 blocks divided by 4, so detail coefficients lie in
//! [−0.5, 0.5] for luminance.

use std::collections::HashMap;

use super::filters::Plane;
use crate::dataset::Image8;

/// Weights of the luminance and the two chroma entropies.
pub const CHANNEL_WEIGHTS: [f64; 3] = [0.84, 0.08, 0.08];

/// Shannon entropy in bits of values binned into bins of width `bin` (bin `k` holds
/// the values that round to `k·bin`, halves away from zero).
pub fn binned_entropy(values: &[f32], bin: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    // `x + ½·sign(x)` truncated is `x.round()` whenever the sum is exact, which it is
    // for f32 values over a power-of-two bin such as the default 1/256 (and off by one
    // bin at most for values within an ulp of a half otherwise); it avoids a libm call
    // per value and lets the loop vectorise.
    let idx: Vec<i64> = values
        .iter()
        .map(|&v| {
            let x = f64::from(v) / bin;
            (x + 0.5f64.copysign(x)) as i64
        })
        .collect();
    let (lo, hi) = idx
        .iter()
        .fold((i64::MAX, i64::MIN), |(lo, hi), &i| (lo.min(i), hi.max(i)));
    let n = values.len() as f64;
    let entropy = |counts: &mut dyn Iterator<Item = u32>| -> f64 {
        counts
            .filter(|&c| c > 0)
            .map(|c| {
                let p = f64::from(c) / n;
                -p * p.log2()
            })
            .sum()
    };
    let span = hi.abs_diff(lo);
    if span < 1 << 20 {
        let mut counts = vec![0u32; span as usize + 1];
        for &i in &idx {
            counts[(i - lo) as usize] += 1;
        }
        entropy(&mut counts.into_iter())
    } else {
        let mut counts: HashMap<i64, u32> = HashMap::new();
        for &i in &idx {
            *counts.entry(i).or_default() += 1;
        }
        entropy(&mut counts.into_values())
    }
}

/// Mean entropy of the Haar detail bands of one channel over `levels` levels (a level
/// is skipped when a side is below 2 pixels).
pub fn subband_entropy(p: &Plane, levels: u32, bin: f64) -> f64 {
    let mut low: Option<Plane> = None;
    let (mut total, mut bands) = (0.0, 0u32);
    for _ in 0..levels.max(1) {
        let src = low.as_ref().unwrap_or(p);
        let (w, h) = (src.width / 2, src.height / 2);
        if w == 0 || h == 0 {
            break;
        }
        let mut next = vec![0.0f32; w * h];
        let mut details: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; w * h]);
        let [d0, d1, d2] = &mut details;
        for y in 0..h {
            let top = &src.data[2 * y * src.width..][..2 * w];
            let bottom = &src.data[(2 * y + 1) * src.width..][..2 * w];
            let out = y * w..(y + 1) * w;
            let it = next[out.clone()]
                .iter_mut()
                .zip(&mut d0[out.clone()])
                .zip(&mut d1[out.clone()])
                .zip(&mut d2[out])
                .zip(top.chunks_exact(2).zip(bottom.chunks_exact(2)));
            for ((((lo, e0), e1), e2), (t, b)) in it {
                let (a, b_, c, d) = (t[0], t[1], b[0], b[1]);
                *lo = (a + b_ + c + d) / 4.0;
                *e0 = (a - b_ + c - d) / 4.0;
                *e1 = (a + b_ - c - d) / 4.0;
                *e2 = (a - b_ - c + d) / 4.0;
            }
        }
        for band in &details {
            total += binned_entropy(band, bin);
            bands += 1;
        }
        low = Some(Plane {
            width: w,
            height: h,
            data: next,
        });
    }
    if bands == 0 {
        0.0
    } else {
        total / f64::from(bands)
    }
}

/// Sub-band entropy clutter of an 8-bit gray or RGB image.
pub fn clutter(img: &Image8, levels: u32, bin: f64) -> f64 {
    let (w, h) = (img.width as usize, img.height as usize);
    let gray = img.to_gray();
    clutter_with_luma(img, &Plane::from_u8(w, h, &gray.data), levels, bin)
}

/// [`clutter`] given the image's luma plane (BT.601, in [0, 1]) already computed.
pub fn clutter_with_luma(img: &Image8, luma: &Plane, levels: u32, bin: f64) -> f64 {
    let (w, h) = (img.width as usize, img.height as usize);
    let lum = subband_entropy(luma, levels, bin);
    if img.channels != 3 {
        return CHANNEL_WEIGHTS[0] * lum;
    }
    let px = || img.data.chunks_exact(3);
    let f = |v: u8| f32::from(v) / 255.0;
    let rg = Plane {
        width: w,
        height: h,
        data: px().map(|p| f(p[0]) - f(p[1])).collect(),
    };
    let yb = Plane {
        width: w,
        height: h,
        data: px().map(|p| (f(p[0]) + f(p[1])) / 2.0 - f(p[2])).collect(),
    };
    CHANNEL_WEIGHTS[0] * lum
        + CHANNEL_WEIGHTS[1] * subband_entropy(&rg, levels, bin)
        + CHANNEL_WEIGHTS[2] * subband_entropy(&yb, levels, bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_round_halves_away_from_zero() {
        // Bins of 1: 0.5 → 1, −0.5 → −1, 1.5 → 2, 2.5 → 3, 0.49 → 0: five values in
        // four bins {1, −1, 2, 3} plus {0}, each once, except none shared.
        let h = binned_entropy(&[0.5, -0.5, 1.5, 2.5, 0.49], 1.0);
        assert!((h - 5f64.log2()).abs() < 1e-12, "{h}");
        // 0.5 and 0.9 share bin 1; −0.5 and −1.4 share bin −1.
        let h = binned_entropy(&[0.5, 0.9, -0.5, -1.4], 1.0);
        assert!((h - 1.0).abs() < 1e-12, "{h}");
        // The default bin of 1/256 on f32 values agrees with f64::round.
        let vals: Vec<f32> = (-600..600).map(|i| i as f32 / 512.0).collect();
        let mut counts = std::collections::BTreeMap::new();
        for &v in &vals {
            *counts
                .entry((f64::from(v) / (1.0 / 256.0)).round() as i64)
                .or_insert(0u32) += 1;
        }
        let n = vals.len() as f64;
        let want: f64 = counts
            .values()
            .map(|&c| {
                let p = f64::from(c) / n;
                -p * p.log2()
            })
            .sum();
        assert!((binned_entropy(&vals, 1.0 / 256.0) - want).abs() < 1e-12);
    }

    #[test]
    fn entropy_of_known_histograms() {
        assert_eq!(binned_entropy(&[0.5; 10], 0.01), 0.0);
        let two = [0.0, 0.0, 1.0, 1.0];
        assert!((binned_entropy(&two, 0.01) - 1.0).abs() < 1e-12);
        let four = [0.0, 0.1, 0.2, 0.3];
        assert!((binned_entropy(&four, 0.01) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn flat_is_uncluttered_noise_is_cluttered_and_colour_adds() {
        let flat = Image8 {
            width: 32,
            height: 32,
            channels: 1,
            data: vec![90; 1024],
        };
        assert_eq!(clutter(&flat, 3, 1.0 / 256.0), 0.0);
        let mut s = 7u32;
        let mut next = || {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (s >> 23) as u8
        };
        let noise = Image8 {
            width: 64,
            height: 64,
            channels: 1,
            data: (0..4096).map(|_| next()).collect(),
        };
        let c = clutter(&noise, 3, 1.0 / 256.0);
        assert!(c > 3.0, "{c}");
        let colour = Image8 {
            width: 64,
            height: 64,
            channels: 3,
            data: (0..3 * 4096).map(|_| next()).collect(),
        };
        assert!(clutter(&colour, 3, 1.0 / 256.0) > c * 0.9);
        // Gray stored as RGB has no chroma: same clutter as the gray image.
        let as_rgb = noise.to_rgb();
        assert!((clutter(&as_rgb, 3, 1.0 / 256.0) - c).abs() < 1e-12);
    }
}
