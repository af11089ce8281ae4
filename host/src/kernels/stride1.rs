//! What the stride-1 convolution kernels ([`super::direct_conv`], [`super::weight_grad`])
//! share: the convolution's shape and their test harness.

/// The shape of a stride-1, undilated `k × k` convolution `cin → cout` over `h × w`
/// planes with zero padding `pad` on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stride1Conv {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub pad: usize,
}

impl Stride1Conv {
    /// Output rows and columns, `None` when the output is empty (the kernel does not fit
    /// the padded input).
    pub fn out(&self) -> Option<(usize, usize)> {
        let ho = (self.h + 2 * self.pad + 1).checked_sub(self.k)?;
        let wo = (self.w + 2 * self.pad + 1).checked_sub(self.k)?;
        (ho > 0 && wo > 0).then_some((ho, wo))
    }
}

/// Test helpers of the stride-1 kernels: inputs, the convolution's terms by definition,
/// and a loop over test shapes.
#[cfg(test)]
pub(super) mod testing {
    use super::super::has_avx2_fma;
    use super::Stride1Conv;

    /// Deterministic test values in [−1, 1] (xorshift).
    pub fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every term of the convolution's sums by definition: for each image, output
    /// channel, input channel, tap `(ky, kx)` and output pixel `(oy, ox)` whose input
    /// pixel lies inside the image (the padding adds nothing), `f(index, x)` with
    /// `index = [img, co, ci, ky, kx, oy, ox]`.
    pub fn for_each_term(g: &Stride1Conv, n: usize, x: &[f32], mut f: impl FnMut([usize; 7], f64)) {
        let (ho, wo) = g.out().expect("test shape with an output");
        for img in 0..n {
            for co in 0..g.cout {
                for ci in 0..g.cin {
                    for ky in 0..g.k {
                        for kx in 0..g.k {
                            for oy in 0..ho {
                                for ox in 0..wo {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < g.pad
                                        || ix < g.pad
                                        || iy - g.pad >= g.h
                                        || ix - g.pad >= g.w
                                    {
                                        continue;
                                    }
                                    let xv = x[((img * g.cin + ci) * g.h + iy - g.pad) * g.w + ix
                                        - g.pad];
                                    f([img, co, ci, ky, kx, oy, ox], f64::from(xv));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs `check(i, g, n)` for each test shape `(cin, cout, h, w, k, pad, n)`; skips
    /// them all (saying so) on a CPU without AVX2/FMA.
    pub fn each_shape(
        shapes: &[(usize, usize, usize, usize, usize, usize, usize)],
        mut check: impl FnMut(u32, Stride1Conv, usize),
    ) {
        if !has_avx2_fma() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        for (i, &(cin, cout, h, w, k, pad, n)) in shapes.iter().enumerate() {
            let g = Stride1Conv {
                cin,
                cout,
                h,
                w,
                k,
                pad,
            };
            check(i as u32, g, n);
        }
    }

    /// `got` equals `want` to f32 rounding.
    pub fn assert_close(got: &[f32], want: &[f64], g: &Stride1Conv) {
        assert_eq!(got.len(), want.len());
        for (&a, &b) in got.iter().zip(want) {
            assert!(
                (f64::from(a) - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{g:?}: {a} vs {b}"
            );
        }
    }
}
