//! Initial parameter values of a fresh network.
//!
//! * Convolution weights: He-normal (`std = √(2 / fan_in)`), drawn from the run's seeded
//!   generator.
//! * Transposed convolutions that up-sample class scores (as many outputs as inputs and
//!   a kernel of twice the stride: FCN-8s's and CUMedVision's score paths): bilinear
//!   interpolation, channel to same channel, as FCN does (Long et al. 2015). Random
//!   up-sampling kernels of up to 16 × 16 make those networks start from noise at full
//!   resolution and, at CPU-scale step counts, predict a constant.
//! * Biases and batch-norm shifts 0, batch-norm scales and running variances 1.

use ccnet_shared::graph::{Op, ParamRole};

use super::rng::Rng;

/// The `k × k` bilinear up-sampling kernel (row-major).
pub fn bilinear_kernel(k: usize) -> Vec<f32> {
    let factor = k.div_ceil(2) as f64;
    let center = if k % 2 == 1 {
        factor - 1.0
    } else {
        factor - 0.5
    };
    let w = |i: usize| 1.0 - (i as f64 - center).abs() / factor;
    (0..k * k).map(|p| (w(p / k) * w(p % k)) as f32).collect()
}

/// Whether a transposed convolution up-samples class scores (bilinear start).
pub fn is_score_upsampling(op: &Op) -> bool {
    matches!(op, Op::ConvTranspose2d(c)
        if c.in_channels == c.out_channels && c.stride >= 2 && c.kernel == 2 * c.stride)
}

/// The `n` initial values of parameter `role` of node `op`.
pub fn initial_values(op: &Op, role: ParamRole, n: usize, rng: &mut Rng) -> Vec<f32> {
    match role {
        ParamRole::Weight => {
            if let Op::ConvTranspose2d(c) = *op {
                if is_score_upsampling(op) {
                    // Weights [in, out, k, k]: the kernel on the diagonal in == out.
                    let k = usize::from(c.kernel);
                    let ch = c.in_channels as usize;
                    let kernel = bilinear_kernel(k);
                    let mut v = vec![0.0; n];
                    for i in 0..ch {
                        let at = (i * ch + i) * k * k;
                        v[at..at + k * k].copy_from_slice(&kernel);
                    }
                    return v;
                }
            }
            let fan_in = match *op {
                Op::Conv2d(c) => c.in_channels * u32::from(c.kernel).pow(2),
                Op::ConvTranspose2d(c) => {
                    let k2 = u32::from(c.kernel).pow(2);
                    let s2 = u32::from(c.stride).pow(2).max(1);
                    (c.in_channels * k2 / s2).max(1)
                }
                _ => 1,
            };
            let std = (2.0 / f64::from(fan_in)).sqrt();
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        }
        ParamRole::Gamma | ParamRole::RunningVar => vec![1.0; n],
        _ => vec![0.0; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccnet_shared::graph::ConvTranspose2d;

    #[test]
    fn bilinear_kernels_interpolate() {
        // FCN's 4 × 4 kernel for ×2: [0.25, 0.75, 0.75, 0.25] per axis.
        let k = bilinear_kernel(4);
        let row = [0.25f32, 0.75, 0.75, 0.25];
        for y in 0..4 {
            for x in 0..4 {
                assert!((k[y * 4 + x] - row[y] * row[x]).abs() < 1e-7);
            }
        }
        // The kernel is an outer product; along each axis, the taps that reach one
        // output phase of a ×s up-sampling sum to 1 (interpolation, no gain).
        for s in [2usize, 4, 8] {
            let side = 2 * s;
            let k = bilinear_kernel(side);
            let w: Vec<f64> = (0..side)
                .map(|i| f64::from(k[i * side + i]).sqrt())
                .collect();
            for phase in 0..s {
                let t: f64 = (0..side).filter(|i| i % s == phase).map(|i| w[i]).sum();
                assert!((t - 1.0).abs() < 1e-6, "s={s} phase {phase}: {t}");
            }
        }
    }

    #[test]
    fn score_upsampling_starts_bilinear_and_others_random() {
        let up = |i, o, k, s| {
            Op::ConvTranspose2d(ConvTranspose2d {
                input: 0,
                in_channels: i,
                out_channels: o,
                kernel: k,
                stride: s,
                padding: s / 2,
                bias: true,
                relu: false,
            })
        };
        let mut rng = Rng::new(1, 1);
        let fcn = up(2, 2, 16, 8);
        assert!(is_score_upsampling(&fcn));
        let v = initial_values(&fcn, ParamRole::Weight, 2 * 2 * 256, &mut rng);
        let k = bilinear_kernel(16);
        assert_eq!(&v[..256], &k[..]);
        assert!(v[256..512].iter().all(|&x| x == 0.0), "0 → 1 is zero");
        assert_eq!(&v[3 * 256..], &k[..]);
        // U-Net's 2 × 2 up-convolution halving the channels stays He-normal.
        let unet = up(8, 4, 2, 2);
        assert!(!is_score_upsampling(&unet));
        let v = initial_values(&unet, ParamRole::Weight, 8 * 4 * 4, &mut rng);
        assert!(v.iter().any(|&x| x != 0.0) && v.iter().any(|&x| x < 0.0));
    }
}
