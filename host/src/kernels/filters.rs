//! Hand-written image filtering on `f32` planes: separable convolution with a mirrored
//! border, Gaussian derivative kernels, 3×3 gradient operators and a Gaussian pyramid.
//!
//! Conventions follow SciPy's `ndimage` so that the blob detector can be compared with
//! scikit-image: the border is mirrored about the edge pixel's outer side
//! (`d c b a | a b c d`, SciPy's `reflect`), a Gaussian kernel of standard deviation σ
//! has radius `⌊4σ + 0.5⌋`, and derivative kernels are the analytic derivatives of the
//! sampled, sum-normalised Gaussian.

#[cfg(target_arch = "x86_64")]
use super::has_avx2_fma;

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

    /// Row `y`.
    pub fn row_slice(&self, y: usize) -> &[f32] {
        &self.data[y * self.width..(y + 1) * self.width]
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
    let (w, h) = (src.width, src.height);
    let mut out = Plane::filled(w, h, 0.0);
    let mut padded = PaddedRows::new(0, 0, 0);
    padded.copy_from(src, k.radius());
    for y in 0..h {
        convolve_row(&padded, y, k, &mut out.data[y * w..(y + 1) * w]);
    }
    out
}

/// A plane whose rows carry `pad` values of margin on each side (plus 8 values of slack
/// on the right, so vector code may read a whole block past the last column): a row
/// convolution reads its mirrored border from the margins instead of copying each row
/// into a padded buffer first.
#[derive(Clone, Debug)]
pub struct PaddedRows {
    width: usize,
    height: usize,
    pad: usize,
    data: Vec<f32>,
}

impl PaddedRows {
    /// A zeroed `width × height` plane with margins of `pad`.
    pub fn new(width: usize, height: usize, pad: usize) -> PaddedRows {
        PaddedRows {
            width,
            height,
            pad,
            data: vec![0.0; height * (width + 2 * pad + 8)],
        }
    }

    fn stride(&self) -> usize {
        self.width + 2 * self.pad + 8
    }

    /// Resizes (keeping the buffer when it is large enough); values are unspecified.
    fn reshape(&mut self, width: usize, height: usize, pad: usize) {
        self.width = width;
        self.height = height;
        self.pad = pad;
        let n = height * self.stride();
        self.data.resize(n, 0.0);
    }

    /// Becomes a copy of `src` with margins of `pad`, mirrored.
    pub fn copy_from(&mut self, src: &Plane, pad: usize) {
        self.reshape(src.width, src.height, pad);
        let (w, stride) = (src.width, self.stride());
        for y in 0..src.height {
            self.data[y * stride + pad..y * stride + pad + w]
                .copy_from_slice(&src.data[y * w..(y + 1) * w]);
        }
        self.mirror_margins(pad);
    }

    /// Fills the `r` values left and right of every row by mirroring the row.
    fn mirror_margins(&mut self, r: usize) {
        let (w, pad, stride) = (self.width, self.pad, self.stride());
        if w == 0 {
            return;
        }
        for row in self.data.chunks_exact_mut(stride) {
            if r <= w {
                // d c b a | a b c d | d c b a, without index arithmetic per value.
                let (left, rest) = row[pad - r..].split_at_mut(r);
                for (l, &v) in left.iter_mut().zip(rest[..r].iter().rev()) {
                    *l = v;
                }
                let (body, right) = rest.split_at_mut(w);
                for (rt, &v) in right[..r].iter_mut().zip(body[w - r..].iter().rev()) {
                    *rt = v;
                }
            } else {
                for i in 0..r {
                    row[pad - r + i] = row[pad + reflect(i as isize - r as isize, w)];
                    row[pad + w + i] = row[pad + reflect((w + i) as isize, w)];
                }
            }
        }
    }

    /// Row `y` without its margins.
    pub fn row(&self, y: usize) -> &[f32] {
        let o = y * self.stride() + self.pad;
        &self.data[o..o + self.width]
    }

    /// Row `y` with `r` values of margin on each side and the slack after it.
    fn padded_row(&self, y: usize, r: usize) -> &[f32] {
        assert!(r <= self.pad, "radius {r} exceeds the margins {}", self.pad);
        let o = y * self.stride() + self.pad - r;
        &self.data[o..o + self.width + 2 * r + 8]
    }

    /// The plane without margins.
    pub fn to_plane(&self) -> Plane {
        let mut data = Vec::with_capacity(self.width * self.height);
        for y in 0..self.height {
            data.extend_from_slice(self.row(y));
        }
        Plane {
            width: self.width,
            height: self.height,
            data,
        }
    }
}

/// Convolves row `y` of `src` with `k` (mirrored border, from the margins, which must
/// have been filled for at least `k`'s radius) into `dst` (the row's width).
///
/// Every output value is formed in the same order — the centre tap times the centre
/// value, then `acc = w[r+j]·(in[x−j] ± in[x+j]) + acc` as one fused multiply-add for
/// j = 1 … r — so the AVX2 path and the portable path (`f32::mul_add`) give
/// bit-identical results.
pub fn convolve_row(src: &PaddedRows, y: usize, k: &Kernel, dst: &mut [f32]) {
    assert_eq!(dst.len(), src.width, "convolve_row: width mismatch");
    let padded = src.padded_row(y, k.radius());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), and `padded`
        // holds `w + 2r + 8` values for the `w` outputs, as `row_avx2` requires.
        unsafe { row_avx2(padded, k, dst) };
        return;
    }
    row_portable(padded, k, dst);
}

/// One padded row (`padded.len() >= dst.len() + 2r`), one output at a time.
fn row_portable(padded: &[f32], k: &Kernel, dst: &mut [f32]) {
    let r = k.radius();
    for (x, d) in dst.iter_mut().enumerate() {
        let mut acc = k.half[0] * padded[r + x];
        for j in 1..=r {
            let (a, b) = (padded[r + x - j], padded[r + x + j]);
            // Convolution: out[x] = Σ w[r+j]·in[x−j] + w[r−j]·in[x+j].
            let s = match k.symmetry {
                Symmetry::Even => a + b,
                Symmetry::Odd => a - b,
            };
            acc = k.half[j].mul_add(s, acc);
        }
        *d = acc;
    }
}

/// Vectors of 8 outputs per block of the AVX2 row convolution: as many accumulators as
/// fit in the 16 registers next to the weight and the loaded values.
#[cfg(target_arch = "x86_64")]
const ROW_BLOCK: usize = 6;

/// [`convolve_row`]'s inner loop on AVX2: blocks of `8·ROW_BLOCK` outputs kept in
/// registers over all taps, then blocks of 8; the last partial block is computed into
/// a small buffer and copied.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `padded.len() >= dst.len() + 2r + 8` where
/// `r = k.radius()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(padded: &[f32], k: &Kernel, dst: &mut [f32]) {
    let w = dst.len();
    let r = k.radius();
    assert!(
        padded.len() >= w + 2 * r + 8,
        "row_avx2: padded row too short"
    );
    let odd = k.symmetry == Symmetry::Odd;
    let p = padded.as_ptr();
    let mut x = 0;
    while x + 8 * ROW_BLOCK <= w {
        // SAFETY: x + 8·ROW_BLOCK <= w, so every load reads within
        // padded[x .. x + 8·ROW_BLOCK + 2r] (in bounds by the assertion above) and every
        // store writes dst[x .. x + 8·ROW_BLOCK].
        unsafe {
            let d = dst.as_mut_ptr().add(x);
            if odd {
                row_block_avx2::<ROW_BLOCK, true>(p, x, r, &k.half, d);
            } else {
                row_block_avx2::<ROW_BLOCK, false>(p, x, r, &k.half, d);
            }
        }
        x += 8 * ROW_BLOCK;
    }
    while x < w {
        let mut tmp = [0.0f32; 8];
        let n = (w - x).min(8);
        // SAFETY: x < w, so the loads read within padded[x .. x + 8 + 2r], in bounds
        // thanks to the 8 values of slack; the stores write 8 values, into `dst` when
        // they all exist, else into `tmp`.
        unsafe {
            let d = if n == 8 {
                dst.as_mut_ptr().add(x)
            } else {
                tmp.as_mut_ptr()
            };
            if odd {
                row_block_avx2::<1, true>(p, x, r, &k.half, d);
            } else {
                row_block_avx2::<1, false>(p, x, r, &k.half, d);
            }
        }
        if n < 8 {
            dst[x..x + n].copy_from_slice(&tmp[..n]);
        }
        x += n;
    }
}

/// `8·N` outputs for padded positions `x ..`, accumulated in `N` vector registers and
/// stored at `d[0 .. 8N]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `p[x .. x + 8N + 2r]` must be readable, `half`
/// must hold `r + 1` values and `d[0 .. 8N]` must be writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn row_block_avx2<const N: usize, const ODD: bool>(
    p: *const f32,
    x: usize,
    r: usize,
    half: &[f32],
    d: *mut f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the bounds; loads and stores are unaligned.
    unsafe {
        let c = _mm256_set1_ps(half[0]);
        let mut acc = [_mm256_setzero_ps(); N];
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_mul_ps(c, _mm256_loadu_ps(p.add(r + x + 8 * v)));
        }
        for j in 1..=r {
            let wj = _mm256_set1_ps(*half.get_unchecked(j));
            let left = p.add(r + x - j);
            let right = p.add(r + x + j);
            for (v, a) in acc.iter_mut().enumerate() {
                let l = _mm256_loadu_ps(left.add(8 * v));
                let rr = _mm256_loadu_ps(right.add(8 * v));
                let s = if ODD {
                    _mm256_sub_ps(l, rr)
                } else {
                    _mm256_add_ps(l, rr)
                };
                *a = _mm256_fmadd_ps(wj, s, *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(d.add(8 * v), *a);
        }
    }
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
/// results equal three calls of [`convolve_cols`] up to rounding (this pass uses fused
/// multiply-adds).
pub fn convolve_cols3(src: &Plane, k: [&Kernel; 3]) -> [Plane; 3] {
    let mut out: [PaddedRows; 3] = std::array::from_fn(|_| PaddedRows::new(0, 0, 0));
    convolve_cols3_strips(&ColumnStrips::new(src, k[0].radius()), k, 0, &mut out);
    out.map(|p| p.to_plane())
}

/// Width of a column strip: two AVX2 vectors, one 64-byte cache line.
const STRIP: usize = 16;

/// One row of a column strip, aligned to a cache line.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
struct Line([f32; STRIP]);

/// A plane rearranged for column filtering: cut into strips of 16 columns, each strip
/// stored contiguously row after row, with `pad` mirrored rows above and below (and
/// zeros right of the last column). A column pass then reads consecutive cache lines
/// instead of lines one image row apart — which, for widths of 256, 512 or 1024 pixels,
/// all fall into the same few L1 cache sets. Built once per image and shared by every
/// scale whose kernel radius is at most `pad`.
#[derive(Clone, Debug)]
pub struct ColumnStrips {
    width: usize,
    height: usize,
    pad: usize,
    lines: Vec<Line>,
}

impl ColumnStrips {
    /// Rearranges `src`, with room for kernels of radius up to `pad`.
    pub fn new(src: &Plane, pad: usize) -> ColumnStrips {
        let (w, h) = (src.width, src.height);
        let strips = w.div_ceil(STRIP);
        let tall = h + 2 * pad;
        let mut lines = vec![Line([0.0; STRIP]); strips * tall];
        if h > 0 {
            for i in 0..tall {
                let y = reflect(i as isize - pad as isize, h);
                let row = &src.data[y * w..(y + 1) * w];
                for (s, chunk) in row.chunks(STRIP).enumerate() {
                    lines[s * tall + i].0[..chunk.len()].copy_from_slice(chunk);
                }
            }
        }
        ColumnStrips {
            width: w,
            height: h,
            pad,
            lines,
        }
    }

    /// The largest kernel radius these strips serve.
    pub fn pad(&self) -> usize {
        self.pad
    }
}

/// The fused column pass of [`convolve_cols3`] on prepared strips, into planes with row
/// margins of `margin` (reshaped to the image's size, buffers reused), whose margins
/// are then filled for a following row pass of radius up to `margin`.
///
/// Every output value is formed in the same order — the centre tap times the centre
/// value, then one fused multiply-add per tap pair `w[r+j]·(in[y−j] ± in[y+j])` for
/// j = 1 … r — on the AVX2 path and on the portable path alike (bit-identical).
pub fn convolve_cols3_strips(
    src: &ColumnStrips,
    k: [&Kernel; 3],
    margin: usize,
    out: &mut [PaddedRows; 3],
) {
    let (w, h) = (src.width, src.height);
    let r = k[0].radius();
    assert!(
        k.iter().all(|k| k.radius() == r)
            && k[0].symmetry == Symmetry::Even
            && k[1].symmetry == Symmetry::Odd
            && k[2].symmetry == Symmetry::Even,
        "convolve_cols3 needs even, odd, even kernels of equal radius"
    );
    assert!(
        r <= src.pad,
        "kernel radius {r} exceeds the strips' padding {}",
        src.pad
    );
    for o in out.iter_mut() {
        o.reshape(w, h, margin);
    }
    let tall = h + 2 * src.pad;
    let halves = [&k[0].half[..], &k[1].half[..], &k[2].half[..]];
    if h == 0 || w == 0 {
        return;
    }
    let stride = out[0].stride();
    let [o0, o1, o2] = out;
    let dst = [&mut o0.data[..], &mut o1.data[..], &mut o2.data[..]];
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above); the strips hold
        // h + 2·pad lines each with r <= pad (asserted above), each half holds r + 1
        // values, and each output holds h rows of `stride` values, with the w columns
        // starting at `margin` in each row.
        unsafe {
            cols3_avx2(
                &src.lines,
                tall,
                src.pad,
                (w, h, stride, margin),
                halves,
                dst,
            )
        };
    } else {
        cols3_portable(
            &src.lines,
            tall,
            src.pad,
            (w, h, stride, margin),
            halves,
            dst,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    cols3_portable(
        &src.lines,
        tall,
        src.pad,
        (w, h, stride, margin),
        halves,
        dst,
    );
    for o in out.iter_mut() {
        o.mirror_margins(margin);
    }
}

/// The fused column pass one value at a time. `geom` is (width, height, output row
/// stride, output column offset).
fn cols3_portable(
    lines: &[Line],
    tall: usize,
    pad: usize,
    (w, h, stride, margin): (usize, usize, usize, usize),
    k: [&[f32]; 3],
    dst: [&mut [f32]; 3],
) {
    let r = k[0].len() - 1;
    let [d0, d1, d2] = dst;
    for (s, strip) in lines.chunks_exact(tall).enumerate() {
        let x = s * STRIP;
        let n = (w - x).min(STRIP);
        for y in 0..h {
            // Lines pad + y − j ..= pad + y + j hold rows y − j ..= y + j (mirrored).
            let centre = pad + y;
            for lane in 0..n {
                let v = strip[centre].0[lane];
                let mut acc = [k[0][0] * v, k[1][0] * v, k[2][0] * v];
                for j in 1..=r {
                    let (a, b) = (strip[centre - j].0[lane], strip[centre + j].0[lane]);
                    let sum = a + b;
                    acc[0] = k[0][j].mul_add(sum, acc[0]);
                    acc[1] = k[1][j].mul_add(a - b, acc[1]);
                    acc[2] = k[2][j].mul_add(sum, acc[2]);
                }
                let o = y * stride + margin + x + lane;
                d0[o] = acc[0];
                d1[o] = acc[1];
                d2[o] = acc[2];
            }
        }
    }
}

/// [`cols3_portable`] on AVX2: per strip and row, 2 vectors × 3 outputs in registers
/// over all taps, aligned loads of consecutive lines, stores straight into the outputs
/// (through a small buffer for the last, partial strip).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `lines` holds whole strips of `tall = h + 2·pad`
/// lines, `r + 1 <= pad + 1` values in each of `k`, and each of `dst` holds `h` rows of
/// `stride >= margin + w` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cols3_avx2(
    lines: &[Line],
    tall: usize,
    pad: usize,
    (w, h, stride, margin): (usize, usize, usize, usize),
    k: [&[f32]; 3],
    dst: [&mut [f32]; 3],
) {
    use std::arch::x86_64::*;
    let r = k[0].len() - 1;
    assert!(
        r <= pad
            && tall == h + 2 * pad
            && lines.len() == w.div_ceil(STRIP) * tall
            && k.iter().all(|h| h.len() == r + 1)
            && margin + w <= stride
            && dst.iter().all(|d| d.len() >= h * stride),
        "cols3_avx2: bad sizes"
    );
    let out = [
        dst[0].as_mut_ptr(),
        dst[1].as_mut_ptr(),
        dst[2].as_mut_ptr(),
    ];
    let mut tmp = [[0.0f32; STRIP]; 3];
    for (s, strip) in lines.chunks_exact(tall).enumerate() {
        let x = s * STRIP;
        let n = (w - x).min(STRIP);
        let base = strip.as_ptr().cast::<f32>();
        for y in 0..h {
            let centre = pad + y;
            // SAFETY: lines centre − r ..= centre + r lie within the strip (r <= pad,
            // y < h); lines are 64-byte aligned, so loads at offsets 0 and 8 floats are
            // 32-byte aligned. Stores go to row y, columns margin + x .. + 16 of each
            // output when the strip is full (n == 16, within the stride), else to `tmp`.
            unsafe {
                let line = |i: usize| base.add(i * STRIP);
                let c = line(centre);
                let (p0, p1) = (_mm256_load_ps(c), _mm256_load_ps(c.add(8)));
                let (c0, c1, c2) = (
                    _mm256_set1_ps(k[0][0]),
                    _mm256_set1_ps(k[1][0]),
                    _mm256_set1_ps(k[2][0]),
                );
                let (mut a00, mut a01) = (_mm256_mul_ps(c0, p0), _mm256_mul_ps(c0, p1));
                let (mut a10, mut a11) = (_mm256_mul_ps(c1, p0), _mm256_mul_ps(c1, p1));
                let (mut a20, mut a21) = (_mm256_mul_ps(c2, p0), _mm256_mul_ps(c2, p1));
                for j in 1..=r {
                    let (up, down) = (line(centre - j), line(centre + j));
                    let (w0, w1, w2) = (
                        _mm256_set1_ps(*k[0].get_unchecked(j)),
                        _mm256_set1_ps(*k[1].get_unchecked(j)),
                        _mm256_set1_ps(*k[2].get_unchecked(j)),
                    );
                    let (u0, u1) = (_mm256_load_ps(up), _mm256_load_ps(up.add(8)));
                    let (d0, d1) = (_mm256_load_ps(down), _mm256_load_ps(down.add(8)));
                    let (s0, s1) = (_mm256_add_ps(u0, d0), _mm256_add_ps(u1, d1));
                    let (e0, e1) = (_mm256_sub_ps(u0, d0), _mm256_sub_ps(u1, d1));
                    a00 = _mm256_fmadd_ps(w0, s0, a00);
                    a01 = _mm256_fmadd_ps(w0, s1, a01);
                    a10 = _mm256_fmadd_ps(w1, e0, a10);
                    a11 = _mm256_fmadd_ps(w1, e1, a11);
                    a20 = _mm256_fmadd_ps(w2, s0, a20);
                    a21 = _mm256_fmadd_ps(w2, s1, a21);
                }
                let o = y * stride + margin + x;
                let accs = [(a00, a01), (a10, a11), (a20, a21)];
                for ((d, t), (lo, hi)) in out.iter().zip(tmp.iter_mut()).zip(accs) {
                    let p = if n == STRIP { d.add(o) } else { t.as_mut_ptr() };
                    _mm256_storeu_ps(p, lo);
                    _mm256_storeu_ps(p.add(8), hi);
                }
                if n < STRIP {
                    for (d, t) in out.iter().zip(&tmp) {
                        std::ptr::copy_nonoverlapping(t.as_ptr(), d.add(o), n);
                    }
                }
            }
        }
    }
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
    mean_gradient_magnitudes(p, [op, op])[0]
}

/// Mean gradient magnitudes of two operators in one pass over the plane (they share
/// the pixel differences). Each row's magnitudes are summed in 8 interleaved `f32`
/// partial sums (vectorisable), the rows in `f64`.
pub fn mean_gradient_magnitudes(p: &Plane, ops: [Gradient3; 2]) -> [f64; 2] {
    let (w, h) = (p.width, p.height);
    if w == 0 || h == 0 {
        return [0.0; 2];
    }
    let norms = ops.map(|op| 1.0 / (2.0 * (2.0 * op.a + op.b)));
    let mut mags = [vec![0.0f32; w], vec![0.0f32; w]];
    let mut total = [0.0f64; 2];
    for y in 0..h {
        let row = |yy: usize| &p.data[yy * w..(yy + 1) * w];
        let (up, mid, down) = (
            row(reflect(y as isize - 1, h)),
            row(y),
            row(reflect(y as isize + 1, h)),
        );
        // Differences across x (d·) and across y (e·), for columns x − 1, x, x + 1.
        let at = |x: usize, xm: usize, xp: usize| {
            let dx = [up[xp] - up[xm], mid[xp] - mid[xm], down[xp] - down[xm]];
            let dy = [down[xm] - up[xm], down[x] - up[x], down[xp] - up[xp]];
            (dx, dy)
        };
        for (m, (op, norm)) in mags.iter_mut().zip(ops.iter().zip(norms)) {
            let mag = |(dx, dy): ([f32; 3], [f32; 3])| {
                let gx = op.a * dx[0] + op.b * dx[1] + op.a * dx[2];
                let gy = op.a * dy[0] + op.b * dy[1] + op.a * dy[2];
                (gx * gx + gy * gy).sqrt() * norm
            };
            m[0] = mag(at(0, 0, 1.min(w - 1)));
            if w > 1 {
                m[w - 1] = mag(at(w - 1, w - 2, w - 1));
            }
            if w > 2 {
                let n = w - 2;
                let (u0, u2) = (&up[..n], &up[2..]);
                let (m0, m2) = (&mid[..n], &mid[2..]);
                let (d0, d2) = (&down[..n], &down[2..]);
                let (u1, d1) = (&up[1..n + 1], &down[1..n + 1]);
                let out = &mut m[1..n + 1];
                for i in 0..n {
                    let gx =
                        op.a * (u2[i] - u0[i]) + op.b * (m2[i] - m0[i]) + op.a * (d2[i] - d0[i]);
                    let gy =
                        op.a * (d0[i] - u0[i]) + op.b * (d1[i] - u1[i]) + op.a * (d2[i] - u2[i]);
                    out[i] = (gx * gx + gy * gy).sqrt() * norm;
                }
            }
        }
        for (t, m) in total.iter_mut().zip(&mags) {
            let mut lanes = [0.0f32; 8];
            let chunks = m.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().sum();
            for c in chunks {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l += v;
                }
            }
            *t += f64::from(lanes.iter().sum::<f32>() + tail);
        }
    }
    total.map(|t| t / (w * h) as f64)
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

    /// Deterministic pseudo-random values in [0, 1).
    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect()
    }

    #[test]
    fn vector_and_portable_row_passes_agree_bit_for_bit() {
        // Widths around the block sizes (8, 48) and below the radius.
        for w in [1, 2, 5, 7, 8, 9, 47, 48, 49, 55, 100, 131] {
            let p = Plane {
                width: w,
                height: 2,
                data: noise(2 * w, w as u32),
            };
            for sigma in [1.3, 2.0, 5.66, 16.0] {
                for order in 0..=2 {
                    let k = gaussian_kernel(sigma, order, 4.0);
                    let r = k.radius();
                    let mut padded = PaddedRows::new(0, 0, 0);
                    padded.copy_from(&p, r);
                    for y in 0..2 {
                        let mut fast = vec![0.0; w];
                        convolve_row(&padded, y, &k, &mut fast);
                        let mut slow = vec![0.0; w];
                        row_portable(padded.padded_row(y, r), &k, &mut slow);
                        assert_eq!(fast, slow, "w {w} sigma {sigma} order {order}");
                        // And both are the convolution with the mirrored border.
                        let full = k.full();
                        for (x, &got) in fast.iter().enumerate() {
                            let want: f32 = full
                                .iter()
                                .enumerate()
                                .map(|(i, &wt)| {
                                    wt * p.at(reflect(x as isize - (i as isize - r as isize), w), y)
                                })
                                .sum();
                            assert!((got - want).abs() < 1e-4, "{got} {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn column_strips_match_the_portable_pass_and_a_direct_sum() {
        for (w, h) in [(1, 1), (7, 5), (16, 3), (17, 40), (33, 70), (40, 9)] {
            let p = Plane {
                width: w,
                height: h,
                data: noise(w * h, (w * 1000 + h) as u32),
            };
            for sigma in [2.0, 16.0] {
                let ks = [0u8, 1, 2].map(|o| gaussian_kernel(sigma, o, 4.0));
                let k = [&ks[0], &ks[1], &ks[2]];
                let r = ks[0].radius();
                // Strips padded beyond the radius, as when one set serves every scale.
                let strips = ColumnStrips::new(&p, r + 3);
                let mut fast: [PaddedRows; 3] = std::array::from_fn(|_| PaddedRows::new(0, 0, 0));
                convolve_cols3_strips(&strips, k, 2, &mut fast);
                let mut slow: [PaddedRows; 3] = std::array::from_fn(|_| PaddedRows::new(0, 0, 0));
                for o in slow.iter_mut() {
                    o.reshape(w, h, 2);
                }
                let stride = slow[0].stride();
                let [s0, s1, s2] = &mut slow;
                let halves = [&ks[0].half[..], &ks[1].half[..], &ks[2].half[..]];
                cols3_portable(
                    &strips.lines,
                    h + 2 * strips.pad,
                    strips.pad,
                    (w, h, stride, 2),
                    halves,
                    [&mut s0.data[..], &mut s1.data[..], &mut s2.data[..]],
                );
                for (i, (f, sl)) in fast.iter().zip(&slow).enumerate() {
                    let direct = convolve_cols(&p, &ks[i]);
                    for y in 0..h {
                        assert_eq!(f.row(y), sl.row(y), "{w}x{h} sigma {sigma} output {i}");
                        for (a, b) in f.row(y).iter().zip(direct.row_slice(y)) {
                            assert!((a - b).abs() < 1e-4, "{a} {b}");
                        }
                    }
                }
                // The margins mirror each row for the row pass that follows.
                let row = fast[0].padded_row(h - 1, 2.min(w));
                let m = 2.min(w);
                for i in 0..m {
                    assert_eq!(row[i], row[m + reflect(i as isize - m as isize, w)]);
                }
            }
        }
    }

    #[test]
    fn both_gradient_operators_in_one_pass_match_the_definition() {
        for (w, h) in [(1, 1), (2, 3), (9, 4), (31, 17)] {
            let p = Plane {
                width: w,
                height: h,
                data: noise(w * h, 7 + w as u32),
            };
            let [sobel, scharr] = mean_gradient_magnitudes(&p, [SOBEL, SCHARR]);
            for (got, op) in [(sobel, SOBEL), (scharr, SCHARR)] {
                let v = |x: isize, y: isize| p.at(reflect(x, w), reflect(y, h));
                let mut want = 0.0f64;
                for y in 0..h as isize {
                    for x in 0..w as isize {
                        let gx = op.a * (v(x + 1, y - 1) - v(x - 1, y - 1))
                            + op.b * (v(x + 1, y) - v(x - 1, y))
                            + op.a * (v(x + 1, y + 1) - v(x - 1, y + 1));
                        let gy = op.a * (v(x - 1, y + 1) - v(x - 1, y - 1))
                            + op.b * (v(x, y + 1) - v(x, y - 1))
                            + op.a * (v(x + 1, y + 1) - v(x + 1, y - 1));
                        want += f64::from((gx * gx + gy * gy).sqrt() / (2.0 * (2.0 * op.a + op.b)));
                    }
                }
                want /= (w * h) as f64;
                assert!((got - want).abs() < 1e-6, "{w}x{h}: {got} {want}");
                assert!((mean_gradient_magnitude(&p, op) - got).abs() < 1e-12);
            }
        }
    }
}
