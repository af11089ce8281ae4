//! Hand-written image filtering on `f32` planes: separable convolution with a mirrored
//! border, Gaussian derivative kernels, 3×3 gradient operators and a Gaussian pyramid.
//!
//! Conventions follow SciPy's `ndimage` so that the blob detector can be compared with
//! scikit-image: the border is mirrored about the edge pixel's outer side
//! (`d c b a | a b c d`, SciPy's `reflect`), a Gaussian kernel of standard deviation σ
//! has radius `⌊4σ + 0.5⌋`, and derivative kernels are the analytic derivatives of the
//! sampled, sum-normalised Gaussian.

/// A single-channel `f32` image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width` values.
    pub data: Vec<f32>,
}

impl Plane {
    /// A plane filled with `value`.
    pub fn filled(width: usize, height: usize, value: f32) -> Plane {
        Plane {
            width,
            height,
            data: vec![value; width * height],
        }
    }

    /// 8-bit values mapped to [0, 1].
    pub fn from_u8(width: usize, height: usize, data: &[u8]) -> Plane {
        debug_assert_eq!(data.len(), width * height);
        Plane {
            width,
            height,
            data: data.iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    /// Value at (x, y).
    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.width + x]
    }

    /// Mean of all values (0 for an empty plane).
    pub fn mean(&self) -> f64 {
        if self.data.is_empty() {
            return 0.0;
        }
        self.data.iter().map(|&v| f64::from(v)).sum::<f64>() / self.data.len() as f64
    }
}

/// Index `i` (possibly outside `0..n`) mirrored into `0..n` (`d c b a | a b c d`).
pub fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let period = 2 * n;
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - 1 - m }) as usize
}

/// Symmetry of a kernel about its centre, used to halve the multiplications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Symmetry {
    /// `w[r + k] == w[r - k]`.
    Even,
    /// `w[r + k] == -w[r - k]` (and `w[r] == 0`).
    Odd,
}

/// A 1-D convolution kernel of odd length `2r + 1`, stored as the half from the centre
/// outwards: `half[k] = w[r + k]`, with the other half given by its symmetry.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// `w[r], w[r + 1], …, w[2r]`.
    pub half: Vec<f32>,
    /// How the left half relates to the right half.
    pub symmetry: Symmetry,
}

impl Kernel {
    /// Radius `r` (the kernel has `2r + 1` taps).
    pub fn radius(&self) -> usize {
        self.half.len() - 1
    }

    /// The full kernel, `w[0..=2r]`.
    pub fn full(&self) -> Vec<f32> {
        let r = self.radius();
        (0..=2 * r)
            .map(|i| {
                if i >= r {
                    self.half[i - r]
                } else {
                    match self.symmetry {
                        Symmetry::Even => self.half[r - i],
                        Symmetry::Odd => -self.half[r - i],
                    }
                }
            })
            .collect()
    }
}

/// The sampled Gaussian of standard deviation `sigma` (order 0), or its first or second
/// derivative (order 1, 2), with radius `⌊truncate·σ + 0.5⌋`, as SciPy builds it.
/// Used for convolution (not correlation), so the first derivative kernel is
/// `w[r + k] = -k/σ² · g(k)`.
pub fn gaussian_kernel(sigma: f64, order: u8, truncate: f64) -> Kernel {
    assert!(sigma > 0.0 && order <= 2, "bad Gaussian kernel request");
    let radius = (truncate * sigma + 0.5) as usize;
    let s2 = sigma * sigma;
    let g: Vec<f64> = (0..=radius)
        .map(|k| (-0.5 * (k * k) as f64 / s2).exp())
        .collect();
    let sum = g[0] + 2.0 * g[1..].iter().sum::<f64>();
    let half = g
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let x = k as f64;
            let p = v / sum;
            (match order {
                0 => p,
                1 => -x / s2 * p,
                _ => (x * x / (s2 * s2) - 1.0 / s2) * p,
            }) as f32
        })
        .collect();
    Kernel {
        half,
        symmetry: if order == 1 {
            Symmetry::Odd
        } else {
            Symmetry::Even
        },
    }
}

/// Convolves every row with `k` (mirrored border).
pub fn convolve_rows(src: &Plane, k: &Kernel) -> Plane {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { convolve_rows_avx2(src, k) };
    }
    convolve_rows_impl(src, k)
}

/// The same code compiled for AVX2 (8-wide vectors). No FMA contraction, so results
/// are bit-identical to the baseline build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn convolve_rows_avx2(src: &Plane, k: &Kernel) -> Plane {
    convolve_rows_impl(src, k)
}

#[inline(always)]
fn convolve_rows_impl(src: &Plane, k: &Kernel) -> Plane {
    let (w, h) = (src.width, src.height);
    let r = k.radius();
    let mut out = Plane::filled(w, h, 0.0);
    let mut padded = vec![0.0f32; w + 2 * r];
    for y in 0..h {
        let row = &src.data[y * w..(y + 1) * w];
        for (i, p) in padded.iter_mut().enumerate() {
            *p = row[reflect(i as isize - r as isize, w)];
        }
        let dst = &mut out.data[y * w..(y + 1) * w];
        let c = &padded[r..r + w];
        for (d, &v) in dst.iter_mut().zip(c) {
            *d = k.half[0] * v;
        }
        for j in 1..=r {
            let wj = k.half[j];
            // Convolution: out[x] = Σ w[r+j]·in[x−j] + w[r−j]·in[x+j].
            let left = &padded[r - j..r - j + w];
            let right = &padded[r + j..r + j + w];
            match k.symmetry {
                Symmetry::Even => {
                    for ((d, &a), &b) in dst.iter_mut().zip(left).zip(right) {
                        *d += wj * (a + b);
                    }
                }
                Symmetry::Odd => {
                    for ((d, &a), &b) in dst.iter_mut().zip(left).zip(right) {
                        *d += wj * (a - b);
                    }
                }
            }
        }
    }
    out
}

/// Convolves every column with `k` (mirrored border), working on whole rows at a time.
pub fn convolve_cols(src: &Plane, k: &Kernel) -> Plane {
    let (w, h) = (src.width, src.height);
    let r = k.radius() as isize;
    let mut out = Plane::filled(w, h, 0.0);
    for y in 0..h {
        let dst = &mut out.data[y * w..(y + 1) * w];
        let row = |dy: isize| {
            let yy = reflect(y as isize + dy, h);
            &src.data[yy * w..(yy + 1) * w]
        };
        for (d, &v) in dst.iter_mut().zip(row(0)) {
            *d = k.half[0] * v;
        }
        for j in 1..=r {
            let wj = k.half[j as usize];
            let (above, below) = (row(-j), row(j));
            match k.symmetry {
                Symmetry::Even => {
                    for ((d, &a), &b) in dst.iter_mut().zip(above).zip(below) {
                        *d += wj * (a + b);
                    }
                }
                Symmetry::Odd => {
                    for ((d, &a), &b) in dst.iter_mut().zip(above).zip(below) {
                        *d += wj * (a - b);
                    }
                }
            }
        }
    }
    out
}

/// Convolves every column with a Gaussian triple — an even, an odd and an even kernel of
/// the same radius (orders 0, 1, 2) — in one pass over the rows instead of three; the
/// results equal three calls of [`convolve_cols`].
pub fn convolve_cols3(src: &Plane, k: [&Kernel; 3]) -> [Plane; 3] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { convolve_cols3_avx2(src, k) };
    }
    convolve_cols3_impl(src, k)
}

/// [`convolve_cols3`] compiled for AVX2 (bit-identical results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn convolve_cols3_avx2(src: &Plane, k: [&Kernel; 3]) -> [Plane; 3] {
    convolve_cols3_impl(src, k)
}

#[inline(always)]
fn convolve_cols3_impl(src: &Plane, k: [&Kernel; 3]) -> [Plane; 3] {
    let (w, h) = (src.width, src.height);
    let r = k[0].radius();
    assert!(
        k.iter().all(|k| k.radius() == r)
            && k[0].symmetry == Symmetry::Even
            && k[1].symmetry == Symmetry::Odd
            && k[2].symmetry == Symmetry::Even,
        "convolve_cols3 needs even, odd, even kernels of equal radius"
    );
    let mut out: [Plane; 3] = std::array::from_fn(|_| Plane::filled(w, h, 0.0));
    let [o0, o1, o2] = &mut out;
    for y in 0..h {
        let span = y * w..(y + 1) * w;
        let d0 = &mut o0.data[span.clone()];
        let d1 = &mut o1.data[span.clone()];
        let d2 = &mut o2.data[span];
        let row = |dy: isize| {
            let yy = reflect(y as isize + dy, h);
            &src.data[yy * w..yy * w + w]
        };
        let c = row(0);
        let (c0, c1, c2) = (k[0].half[0], k[1].half[0], k[2].half[0]);
        for (((a, b), e), &v) in d0.iter_mut().zip(d1.iter_mut()).zip(d2.iter_mut()).zip(c) {
            *a = c0 * v;
            *b = c1 * v;
            *e = c2 * v;
        }
        for j in 1..=r {
            let (above, below) = (row(-(j as isize)), row(j as isize));
            let (w0, w1, w2) = (k[0].half[j], k[1].half[j], k[2].half[j]);
            let it = d0
                .iter_mut()
                .zip(d1.iter_mut())
                .zip(d2.iter_mut())
                .zip(above.iter().zip(below));
            for (((p0, p1), p2), (&a, &b)) in it {
                let sum = a + b;
                *p0 += w0 * sum;
                *p1 += w1 * (a - b);
                *p2 += w2 * sum;
            }
        }
    }
    out
}

/// Separable convolution: `kx` along rows (x), `ky` along columns (y).
pub fn separable(src: &Plane, kx: &Kernel, ky: &Kernel) -> Plane {
    convolve_rows(&convolve_cols(src, ky), kx)
}

/// Gaussian blur with standard deviation `sigma`.
pub fn gaussian_blur(src: &Plane, sigma: f64) -> Plane {
    let k = gaussian_kernel(sigma, 0, 4.0);
    separable(src, &k, &k)
}

/// One pyramid step: blur with the binomial kernel `[1 4 6 4 1]/16` and keep every
/// second pixel in x and y (sizes round up, so a 1-pixel side stays 1).
pub fn pyramid_down(src: &Plane) -> Plane {
    let k = Kernel {
        half: vec![6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0],
        symmetry: Symmetry::Even,
    };
    let blurred = separable(src, &k, &k);
    let (w, h) = (src.width.div_ceil(2), src.height.div_ceil(2));
    let mut data = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            data.push(blurred.at(2 * x, 2 * y));
        }
    }
    Plane {
        width: w,
        height: h,
        data,
    }
}

/// A 3×3 gradient operator given by its smoothing weights `[a, b, a]`: the x derivative
/// is `[-1 0 1] ⊗ [a b a]ᵀ / (2(2a + b))`, so both operators estimate the derivative
/// in intensity per pixel (a unit ramp gives 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gradient3 {
    /// Outer smoothing weight.
    pub a: f32,
    /// Centre smoothing weight.
    pub b: f32,
}

/// Sobel: smoothing `[1 2 1]`.
pub const SOBEL: Gradient3 = Gradient3 { a: 1.0, b: 2.0 };
/// Scharr: smoothing `[3 10 3]`.
pub const SCHARR: Gradient3 = Gradient3 { a: 3.0, b: 10.0 };

/// Mean gradient magnitude `√(gx² + gy²)` over the plane (mirrored border).
pub fn mean_gradient_magnitude(p: &Plane, op: Gradient3) -> f64 {
    let (w, h) = (p.width, p.height);
    if w == 0 || h == 0 {
        return 0.0;
    }
    let norm = 1.0 / (2.0 * (2.0 * op.a + op.b));
    let mut total = 0.0f64;
    for y in 0..h {
        let ym = reflect(y as isize - 1, h);
        let yp = reflect(y as isize + 1, h);
        let mut row_sum = 0.0f32;
        for x in 0..w {
            let xm = reflect(x as isize - 1, w);
            let xp = reflect(x as isize + 1, w);
            let v = |xx: usize, yy: usize| p.data[yy * w + xx];
            let gx = op.a * (v(xp, ym) - v(xm, ym))
                + op.b * (v(xp, y) - v(xm, y))
                + op.a * (v(xp, yp) - v(xm, yp));
            let gy = op.a * (v(xm, yp) - v(xm, ym))
                + op.b * (v(x, yp) - v(x, ym))
                + op.a * (v(xp, yp) - v(xp, ym));
            row_sum += (gx * gx + gy * gy).sqrt() * norm;
        }
        total += f64::from(row_sum);
    }
    total / (w * h) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_mirrors_about_the_outer_edge() {
        let got: Vec<usize> = (-3..7).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
        assert_eq!(reflect(-9, 2), 0);
        assert_eq!(reflect(5, 1), 0);
    }

    #[test]
    fn gaussian_kernels_have_the_right_moments() {
        let s = 2.5;
        let k0 = gaussian_kernel(s, 0, 4.0);
        assert_eq!(k0.radius(), 10);
        let f0 = k0.full();
        assert!((f0.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // Second moment of the Gaussian ≈ σ².
        let var: f32 = f0
            .iter()
            .enumerate()
            .map(|(i, &w)| w * (i as f32 - 10.0).powi(2))
            .sum();
        assert!((var - 6.25).abs() < 0.01, "{var}");
        // Convolving x² with the 2nd-derivative kernel gives 2; x with the 1st gives 1.
        let f2 = gaussian_kernel(s, 2, 4.0).full();
        let d2: f32 = f2
            .iter()
            .enumerate()
            .map(|(i, &w)| w * (10.0 - i as f32).powi(2))
            .sum();
        assert!((d2 - 2.0).abs() < 0.01, "{d2}");
        let f1 = gaussian_kernel(s, 1, 4.0).full();
        let d1: f32 = f1
            .iter()
            .enumerate()
            .map(|(i, &w)| w * (10.0 - i as f32))
            .sum();
        assert!((d1 - 1.0).abs() < 0.01, "{d1}");
    }

    #[test]
    fn convolution_matches_a_direct_sum() {
        let (w, h) = (7, 5);
        let p = Plane {
            width: w,
            height: h,
            data: (0..w * h).map(|i| ((i * 37) % 11) as f32).collect(),
        };
        for (order, sym) in [(0, Symmetry::Even), (1, Symmetry::Odd), (2, Symmetry::Even)] {
            let k = gaussian_kernel(1.3, order, 4.0);
            assert_eq!(k.symmetry, sym);
            let full = k.full();
            let r = k.radius() as isize;
            let rows = convolve_rows(&p, &k);
            let cols = convolve_cols(&p, &k);
            for y in 0..h {
                for x in 0..w {
                    let mut sx = 0.0f32;
                    let mut sy = 0.0f32;
                    for (i, &wt) in full.iter().enumerate() {
                        let off = i as isize - r;
                        sx += wt * p.at(reflect(x as isize - off, w), y);
                        sy += wt * p.at(x, reflect(y as isize - off, h));
                    }
                    assert!((rows.at(x, y) - sx).abs() < 1e-4);
                    assert!((cols.at(x, y) - sy).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn fused_column_pass_equals_three_passes() {
        let p = Plane {
            width: 9,
            height: 6,
            data: (0..54).map(|i| ((i * 29) % 13) as f32 * 0.1).collect(),
        };
        let ks = [0u8, 1, 2].map(|o| gaussian_kernel(2.0, o, 4.0));
        let fused = convolve_cols3(&p, [&ks[0], &ks[1], &ks[2]]);
        for (f, k) in fused.iter().zip(&ks) {
            let one = convolve_cols(&p, k);
            for (a, b) in f.data.iter().zip(&one.data) {
                assert!((a - b).abs() < 1e-5, "{a} {b}");
            }
        }
    }

    #[test]
    fn gradients_estimate_the_slope() {
        let ramp = Plane {
            width: 16,
            height: 16,
            data: (0..256).map(|i| (i % 16) as f32 * 0.01).collect(),
        };
        // The slope is 0.01 per pixel; the mirrored border columns see half of it.
        for op in [SOBEL, SCHARR] {
            let m = mean_gradient_magnitude(&ramp, op);
            assert!((m - 0.009375).abs() < 1e-5, "{m}");
        }
        assert_eq!(
            mean_gradient_magnitude(&Plane::filled(9, 9, 0.4), SOBEL),
            0.0
        );
    }

    #[test]
    fn pyramid_halves_and_keeps_flat_images_flat() {
        let p = Plane::filled(9, 4, 0.25);
        let d = pyramid_down(&p);
        assert_eq!((d.width, d.height), (5, 2));
        assert!(d.data.iter().all(|&v| (v - 0.25).abs() < 1e-6));
        let b = gaussian_blur(&p, 3.0);
        assert!(b.data.iter().all(|&v| (v - 0.25).abs() < 1e-5));
    }
}
