//! Compute kernels on `C × H × W` planar buffers.
//!
//! Every operation has a plain reference kernel (`*_ref`: one output element at a time,
//! written to be obviously right) and, where it matters for speed, a faster kernel
//! (`*_fast`: loop reordering so the innermost loop runs along a contiguous output row,
//! and four output channels share each input load). The fast kernels add the terms of
//! each output element in exactly the same order as the reference kernels, so they give
//! bit-identical results, in `f32` as well as in int8; the tests check this on random
//! shapes.
//!
//! Stride-1 f32 convolutions and up-convolutions run the register-blocked panel kernels
//! of the `panel` submodule (also compiled for AVX2 on x86_64 and picked at run time);
//! they are bit-identical to the reference too. That submodule holds the crate's only
//! `unsafe` code (CPU feature probing and the calls into the AVX2 instances). Kernels check their
//! slice lengths against the geometry first and return [`ShapeError`] instead of
//! panicking.

mod panel;

use ccnet_shared::quant::{quantize_multiplier, requantize, saturate_i8, Requant};

/// A kernel was called with buffers that do not match its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeError;

/// Float parameters (weights or biases) stored little endian as `f32` or `f16`, read in
/// place at any alignment.
#[derive(Clone, Copy, Debug)]
pub enum Params<'a> {
    /// `f32` little endian.
    F32(&'a [u8]),
    /// IEEE binary16 little endian.
    F16(&'a [u8]),
}

impl Params<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Params::F32(b) => b.len() / 4,
            Params::F16(b) => b.len() / 2,
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` as `f32` (0 when out of range; callers check lengths first).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Params::F32(b) => match b.get(4 * i..4 * i + 4) {
                Some(c) => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                None => 0.0,
            },
            Params::F16(b) => match b.get(2 * i..2 * i + 2) {
                Some(c) => f16_to_f32(u16::from_le_bytes([c[0], c[1]])),
                None => 0.0,
            },
        }
    }
}

/// Converts IEEE binary16 bits to `f32` exactly.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    if exp == 0 {
        // Zero or subnormal: man · 2^-24, exact in f32.
        let v = man as f32 * (1.0 / 16_777_216.0);
        return if sign != 0 { -v } else { v };
    }
    let bits = if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Reads little-endian `i32` value `i` (0 when out of range).
#[inline]
pub fn i32_at(bytes: &[u8], i: usize) -> i32 {
    match bytes.get(4 * i..4 * i + 4) {
        Some(c) => i32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        None => 0,
    }
}

/// Reads little-endian `f32` value `i` (0 when out of range).
#[inline]
pub fn f32_at(bytes: &[u8], i: usize) -> f32 {
    Params::F32(bytes).get(i)
}

/// Rounds half away from zero and converts to `i32`, saturating (NaN gives 0).
/// The one float-to-integer rounding the int8 path uses (no `std` needed).
pub fn round_to_i32(v: f32) -> i32 {
    if v.is_nan() {
        return 0;
    }
    if v >= 2_147_483_647.0 {
        return i32::MAX;
    }
    if v <= -2_147_483_648.0 {
        return i32::MIN;
    }
    let t = v as i32; // truncation toward zero
    let frac = v - t as f32; // exact for |v| < 2^24; 0 above (v is then an integer)
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// ReLU in f32: `max(x, 0)`, NaN becomes 0.
#[inline]
pub fn relu_f32(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Per-tensor int8 activation quantization: `real = scale · (q − zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    /// Scale (positive, finite).
    pub scale: f32,
    /// Zero point in `[-128, 127]`.
    pub zero_point: i32,
}

impl QParams {
    /// Quantizes a real value: `saturate(round_half_away(x / scale) + zero_point)`.
    pub fn quantize(&self, x: f32) -> i8 {
        saturate_i8(round_to_i32(x / self.scale).saturating_add(self.zero_point))
    }

    /// Dequantizes: `scale · (q − zero_point)`.
    pub fn dequantize(&self, q: i8) -> f32 {
        self.scale * (i32::from(q) - self.zero_point) as f32
    }
}

/// The fixed-point multiplier `a / b` (computed in f64), if representable.
pub fn ratio(a: f32, b: f32) -> Option<Requant> {
    quantize_multiplier(f64::from(a) / f64::from(b))
}

/// Output requantization of an int8 convolution: per output channel `oc` the real
/// multiplier `s_in · s_w[oc] / s_out`, computed in f64 in that order.
#[derive(Clone, Copy, Debug)]
pub struct OutputScale<'a> {
    /// Per-output-channel weight scales (`f32` little endian).
    pub weight_scales: &'a [u8],
    /// Input activation quantization.
    pub input: QParams,
    /// Output activation quantization.
    pub output: QParams,
    /// Whether a ReLU is fused (clamps below at the output zero point).
    pub relu: bool,
}

impl OutputScale<'_> {
    /// The fixed-point multiplier of channel `oc`.
    pub fn multiplier(&self, oc: usize) -> Option<Requant> {
        let sw = f32_at(self.weight_scales, oc);
        quantize_multiplier(
            f64::from(self.input.scale) * f64::from(sw) / f64::from(self.output.scale),
        )
    }

    /// Turns an accumulator into the output value:
    /// `saturate_i8(requantize(acc, M) + zp_out)`, then `max(·, zp_out)` with a fused ReLU.
    #[inline]
    pub fn finish(&self, acc: i32, m: Requant) -> i8 {
        let q = saturate_i8(requantize(acc, m).saturating_add(self.output.zero_point));
        if self.relu {
            q.max(saturate_i8(self.output.zero_point))
        } else {
            q
        }
    }
}

/// Geometry of a (transposed) convolution, all sizes in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input height.
    pub ih: usize,
    /// Input width.
    pub iw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    /// Dilation (1 for transposed convolutions).
    pub dil: usize,
}

impl ConvGeom {
    /// A convolution's geometry; `None` if the output would be empty or a size is zero.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        cin: usize,
        cout: usize,
        ih: usize,
        iw: usize,
        k: usize,
        stride: usize,
        pad: usize,
        dil: usize,
    ) -> Option<Self> {
        if cin == 0 || cout == 0 || k == 0 || stride == 0 || dil == 0 {
            return None;
        }
        let eff = (k - 1).checked_mul(dil)? + 1;
        let span = |x: usize| -> Option<usize> {
            let padded = x.checked_add(2 * pad)?;
            (padded >= eff).then(|| (padded - eff) / stride + 1)
        };
        let (oh, ow) = (span(ih)?, span(iw)?);
        (ih > 0 && iw > 0).then_some(ConvGeom {
            cin,
            cout,
            ih,
            iw,
            oh,
            ow,
            k,
            stride,
            pad,
            dil,
        })
    }

    /// A transposed convolution's geometry (`out = (in − 1)·stride − 2·pad + k`).
    pub fn transposed(
        cin: usize,
        cout: usize,
        ih: usize,
        iw: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if cin == 0 || cout == 0 || k == 0 || stride == 0 || ih == 0 || iw == 0 {
            return None;
        }
        let span = |x: usize| -> Option<usize> {
            ((x - 1).checked_mul(stride)? + k)
                .checked_sub(2 * pad)
                .filter(|&v| v > 0)
        };
        Some(ConvGeom {
            cin,
            cout,
            ih,
            iw,
            oh: span(ih)?,
            ow: span(iw)?,
            k,
            stride,
            pad,
            dil: 1,
        })
    }

    fn check(&self, x: usize, y: usize, w: usize, b: Option<usize>) -> Result<(), ShapeError> {
        let ok = Some(x) == self.cin.checked_mul(self.ih * self.iw)
            && Some(y) == self.cout.checked_mul(self.oh * self.ow)
            && Some(w) == (self.cin * self.cout).checked_mul(self.k * self.k)
            && b.is_none_or(|b| b == self.cout);
        if ok {
            Ok(())
        } else {
            Err(ShapeError)
        }
    }
}

/// The range of `i` in `[0, count)` for which `j = i·s + off − pad` lies in `[0, len)`.
#[inline]
fn valid_range(count: usize, len: usize, s: usize, off: usize, pad: usize) -> (usize, usize) {
    let lo = if pad > off {
        (pad - off).div_ceil(s)
    } else {
        0
    };
    let lim = len + pad; // j < len  ⇔  i·s + off < len + pad
    if lim <= off {
        return (0, 0);
    }
    let hi = ((lim - off - 1) / s + 1).min(count);
    let lo = lo.min(hi);
    (lo, hi)
}

/// `j = i·s + off − pad` if it lies in `[0, len)`.
#[inline]
fn tap(i: usize, s: usize, off: usize, pad: usize, len: usize) -> Option<usize> {
    (i * s + off).checked_sub(pad).filter(|&j| j < len)
}

/// For a transposed convolution: the input index `i` with `i·s + kk − pad = o`, if any.
#[inline]
fn tap_t(o: usize, s: usize, kk: usize, pad: usize, len: usize) -> Option<usize> {
    let t = (o + pad).checked_sub(kk)?;
    (t % s == 0).then_some(t / s).filter(|&i| i < len)
}

// ---------------------------------------------------------------------------------------
// f32 convolution
// ---------------------------------------------------------------------------------------

/// Reference f32 convolution. Weights `[cout, cin, k, k]`, zero padding; each output is
/// `bias + Σ_{ic, ky, kx} w·x` summed in that order over the taps inside the input.
pub fn conv2d_f32_ref(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    for oc in 0..g.cout {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = bias.map_or(0.0, |b| b.get(oc));
                for ic in 0..g.cin {
                    for ky in 0..g.k {
                        let Some(iy) = tap(oy, g.stride, ky * g.dil, g.pad, g.ih) else {
                            continue;
                        };
                        for kx in 0..g.k {
                            let Some(ix) = tap(ox, g.stride, kx * g.dil, g.pad, g.iw) else {
                                continue;
                            };
                            let wv = w.get(((oc * g.cin + ic) * g.k + ky) * g.k + kx);
                            acc += wv * x[(ic * g.ih + iy) * g.iw + ix];
                        }
                    }
                }
                y[(oc * g.oh + oy) * g.ow + ox] = if relu { relu_f32(acc) } else { acc };
            }
        }
    }
    Ok(())
}

/// Output channels computed together by [`conv2d_f32_blocked`].
const OC_BLOCK: usize = 4;
/// Output pixels (along a row) computed together by [`conv2d_f32_blocked`].
const PX_BLOCK: usize = 8;
/// Decoded weights held on the stack by [`conv2d_f32_blocked`] (8 KiB).
const W_BUF: usize = 2048;

/// Fast f32 convolution, bit-identical to [`conv2d_f32_ref`]: the panel kernel
/// (4 output channels × 16 pixels with AVX2, × 8 pixels otherwise) for stride 1,
/// [`conv2d_f32_blocked`] for other strides.
pub fn conv2d_f32_fast(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if panel::handles(g) {
        panel::conv2d(g, x, w, bias, relu, y, true)
    } else {
        conv2d_f32_blocked(g, x, w, bias, relu, y)
    }
}

/// [`conv2d_f32_fast`] without the AVX2 instance (the code every other target runs),
/// bit-identical to [`conv2d_f32_ref`].
pub fn conv2d_f32_fast_portable(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if panel::handles(g) {
        panel::conv2d(g, x, w, bias, relu, y, false)
    } else {
        conv2d_f32_blocked(g, x, w, bias, relu, y)
    }
}

/// Register-blocked f32 convolution for any stride, bit-identical to
/// [`conv2d_f32_ref`]: a tile of 4 output channels × 8 output pixels accumulates over a
/// chunk of input channels and the kernel taps, with the chunk's weights decoded once
/// into a stack buffer; each output's terms are still added in the reference order
/// (partial sums go back to the output between chunks, which is exact).
pub fn conv2d_f32_blocked(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    let kk = g.k * g.k;
    if kk * OC_BLOCK > W_BUF {
        return conv2d_f32_rows(g, x, w, bias, relu, y);
    }
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let (s, d, k) = (g.stride, g.dil, g.k);
    let ic_chunk = (W_BUF / (kk * OC_BLOCK)).clamp(1, g.cin);
    let mut wbuf = [0f32; W_BUF];
    // Valid output columns of every kernel column (k ≤ 22 here).
    let mut cols = [(0usize, 0usize); 24];
    for (kx, c) in cols.iter_mut().enumerate().take(k) {
        *c = valid_range(g.ow, g.iw, s, kx * d, g.pad);
    }
    for (blk, ys) in y.chunks_mut(OC_BLOCK * plane).enumerate() {
        let oc0 = OC_BLOCK * blk;
        let nb = ys.len() / plane;
        for (j, p) in ys.chunks_mut(plane).enumerate() {
            p.fill(bias.map_or(0.0, |b| b.get(oc0 + j)));
        }
        let mut ic0 = 0;
        while ic0 < g.cin {
            let nic = ic_chunk.min(g.cin - ic0);
            for ici in 0..nic {
                for t in 0..kk {
                    for j in 0..OC_BLOCK {
                        wbuf[(ici * kk + t) * OC_BLOCK + j] = if j < nb {
                            w.get(((oc0 + j) * g.cin + ic0 + ici) * kk + t)
                        } else {
                            0.0
                        };
                    }
                }
            }
            for oy in 0..g.oh {
                let mut bx = 0;
                while bx < g.ow {
                    let bn = PX_BLOCK.min(g.ow - bx);
                    let mut acc = [[0f32; PX_BLOCK]; OC_BLOCK];
                    for (j, a) in acc.iter_mut().enumerate().take(nb) {
                        a[..bn].copy_from_slice(&ys[j * plane + oy * g.ow + bx..][..bn]);
                    }
                    let interior = s == 1
                        && bn == PX_BLOCK
                        && cols[..k]
                            .iter()
                            .all(|&(c0, c1)| c0 <= bx && c1 >= bx + PX_BLOCK);
                    if interior {
                        // Every tap of the block is inside the row: accumulators in
                        // registers, no per-tap range checks.
                        let xs = &x[ic0 * in_plane..(ic0 + nic) * in_plane];
                        conv_block_interior(g, &mut acc, xs, nic, oy, bx, &wbuf);
                    }
                    for ici in 0..if interior { 0 } else { nic } {
                        let xin = &x[(ic0 + ici) * in_plane..(ic0 + ici + 1) * in_plane];
                        for ky in 0..k {
                            let Some(iy) = tap(oy, s, ky * d, g.pad, g.ih) else {
                                continue;
                            };
                            let xrow = &xin[iy * g.iw..(iy + 1) * g.iw];
                            for (kx, &(c0, c1)) in cols.iter().enumerate().take(k) {
                                let (lo, hi) = (c0.max(bx), c1.min(bx + bn));
                                if lo >= hi {
                                    continue;
                                }
                                let wi = (ici * kk + ky * k + kx) * OC_BLOCK;
                                let wv = [wbuf[wi], wbuf[wi + 1], wbuf[wi + 2], wbuf[wi + 3]];
                                let ix0 = lo * s + kx * d - g.pad;
                                if s == 1 && lo == bx && hi == bx + PX_BLOCK {
                                    let mut xs = [0f32; PX_BLOCK];
                                    xs.copy_from_slice(&xrow[ix0..ix0 + PX_BLOCK]);
                                    for (a, &wj) in acc.iter_mut().zip(&wv) {
                                        for (av, &xv) in a.iter_mut().zip(&xs) {
                                            *av += wj * xv;
                                        }
                                    }
                                } else {
                                    for t in 0..hi - lo {
                                        let xv = xrow[ix0 + t * s];
                                        for (a, &wj) in acc.iter_mut().zip(&wv) {
                                            a[lo - bx + t] += wj * xv;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    for (j, a) in acc.iter().enumerate().take(nb) {
                        ys[j * plane + oy * g.ow + bx..][..bn].copy_from_slice(&a[..bn]);
                    }
                    bx += bn;
                }
            }
            ic0 += nic;
        }
        if relu {
            for v in ys.iter_mut() {
                *v = relu_f32(*v);
            }
        }
    }
    Ok(())
}

/// One 4-channel × 8-pixel tile of [`conv2d_f32_blocked`] whose taps all fall inside the
/// input rows (stride 1): the same additions in the same order, on local accumulators.
#[inline(always)]
fn conv_block_interior(
    g: &ConvGeom,
    acc: &mut [[f32; PX_BLOCK]; OC_BLOCK],
    xs: &[f32],
    nic: usize,
    oy: usize,
    bx: usize,
    wbuf: &[f32; W_BUF],
) {
    let (k, d) = (g.k, g.dil);
    let in_plane = g.ih * g.iw;
    let kk = k * k;
    let mut a = *acc;
    for ici in 0..nic {
        let xin = &xs[ici * in_plane..(ici + 1) * in_plane];
        for ky in 0..k {
            let Some(iy) = tap(oy, 1, ky * d, g.pad, g.ih) else {
                continue;
            };
            let xrow = &xin[iy * g.iw..(iy + 1) * g.iw];
            for kx in 0..k {
                let wi = (ici * kk + ky * k + kx) * OC_BLOCK;
                let Some(wv) = wbuf.get(wi..wi + OC_BLOCK) else {
                    return;
                };
                let ix0 = bx + kx * d - g.pad;
                let Some(xv) = xrow.get(ix0..ix0 + PX_BLOCK) else {
                    return;
                };
                let mut xb = [0f32; PX_BLOCK];
                xb.copy_from_slice(xv);
                for j in 0..OC_BLOCK {
                    let wj = wv[j];
                    for t in 0..PX_BLOCK {
                        a[j][t] += wj * xb[t];
                    }
                }
            }
        }
    }
    *acc = a;
}

/// Row-wise f32 convolution (four output channels share each input row), bit-identical
/// to [`conv2d_f32_ref`]; used by [`conv2d_f32_blocked`] for kernels too large for its
/// weight buffer.
pub fn conv2d_f32_rows(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let s = g.stride;
    for (blk, ys) in y.chunks_mut(4 * plane).enumerate() {
        let oc0 = 4 * blk;
        let nb = ys.len() / plane;
        for (j, p) in ys.chunks_mut(plane).enumerate() {
            p.fill(bias.map_or(0.0, |b| b.get(oc0 + j)));
        }
        for ic in 0..g.cin {
            let xin = &x[ic * in_plane..(ic + 1) * in_plane];
            for ky in 0..g.k {
                let (oy0, oy1) = valid_range(g.oh, g.ih, s, ky * g.dil, g.pad);
                for kx in 0..g.k {
                    let (ox0, ox1) = valid_range(g.ow, g.iw, s, kx * g.dil, g.pad);
                    if ox0 >= ox1 || oy0 >= oy1 {
                        continue;
                    }
                    let n = ox1 - ox0;
                    let mut wv = [0.0f32; 4];
                    for (j, v) in wv.iter_mut().enumerate().take(nb) {
                        *v = w.get((((oc0 + j) * g.cin + ic) * g.k + ky) * g.k + kx);
                    }
                    for oy in oy0..oy1 {
                        let iy = oy * s + ky * g.dil - g.pad;
                        let ix0 = ox0 * s + kx * g.dil - g.pad;
                        let xrow = &xin[iy * g.iw + ix0..(iy + 1) * g.iw];
                        let o = oy * g.ow + ox0;
                        if nb == 4 {
                            let (p0, rest) = ys.split_at_mut(plane);
                            let (p1, rest) = rest.split_at_mut(plane);
                            let (p2, p3) = rest.split_at_mut(plane);
                            axpy4(
                                [
                                    &mut p0[o..o + n],
                                    &mut p1[o..o + n],
                                    &mut p2[o..o + n],
                                    &mut p3[o..o + n],
                                ],
                                xrow,
                                s,
                                wv,
                            );
                        } else {
                            for (j, p) in ys.chunks_mut(plane).enumerate() {
                                axpy(&mut p[o..o + n], xrow, s, wv[j]);
                            }
                        }
                    }
                }
            }
        }
        if relu {
            for v in ys.iter_mut() {
                *v = relu_f32(*v);
            }
        }
    }
    Ok(())
}

/// `o[t] += w · x[t·s]`.
#[inline]
fn axpy(o: &mut [f32], x: &[f32], s: usize, w: f32) {
    if s == 1 {
        for (a, &b) in o.iter_mut().zip(x) {
            *a += w * b;
        }
    } else {
        for (a, &b) in o.iter_mut().zip(x.iter().step_by(s)) {
            *a += w * b;
        }
    }
}

/// Four output rows sharing the input row: `o_j[t] += w_j · x[t·s]`.
#[inline]
fn axpy4(o: [&mut [f32]; 4], x: &[f32], s: usize, w: [f32; 4]) {
    let [o0, o1, o2, o3] = o;
    let n = o0.len().min(o1.len()).min(o2.len()).min(o3.len());
    let (o0, o1, o2, o3) = (&mut o0[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n]);
    if s == 1 {
        let x = &x[..n.min(x.len())];
        for (t, &b) in x.iter().enumerate() {
            o0[t] += w[0] * b;
            o1[t] += w[1] * b;
            o2[t] += w[2] * b;
            o3[t] += w[3] * b;
        }
    } else {
        for (t, &b) in x.iter().step_by(s).take(n).enumerate() {
            o0[t] += w[0] * b;
            o1[t] += w[1] * b;
            o2[t] += w[2] * b;
            o3[t] += w[3] * b;
        }
    }
}

/// Reference f32 transposed convolution. Weights `[cin, cout, k, k]`; output element
/// `(oc, oy, ox)` is `bias + Σ_{ic, ky, kx} x[ic, iy, ix]·w[ic, oc, ky, kx]` (in that
/// order) over the taps with `iy·s + ky − pad = oy` and `ix·s + kx − pad = ox`.
pub fn conv_transpose2d_f32_ref(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    for oc in 0..g.cout {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = bias.map_or(0.0, |b| b.get(oc));
                for ic in 0..g.cin {
                    for ky in 0..g.k {
                        let Some(iy) = tap_t(oy, g.stride, ky, g.pad, g.ih) else {
                            continue;
                        };
                        for kx in 0..g.k {
                            let Some(ix) = tap_t(ox, g.stride, kx, g.pad, g.iw) else {
                                continue;
                            };
                            let wv = w.get(((ic * g.cout + oc) * g.k + ky) * g.k + kx);
                            acc += wv * x[(ic * g.ih + iy) * g.iw + ix];
                        }
                    }
                }
                y[(oc * g.oh + oy) * g.ow + ox] = if relu { relu_f32(acc) } else { acc };
            }
        }
    }
    Ok(())
}

/// Fast f32 transposed convolution, bit-identical to [`conv_transpose2d_f32_ref`]: the
/// panel kernel when the kernel side equals the stride without padding (U-Net's
/// up-convolutions), [`conv_transpose2d_f32_rows`] otherwise.
pub fn conv_transpose2d_f32_fast(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if panel::handles_transposed(g) {
        panel::conv_transpose2d(g, x, w, bias, relu, y, true)
    } else {
        conv_transpose2d_f32_rows(g, x, w, bias, relu, y)
    }
}

/// [`conv_transpose2d_f32_fast`] without the AVX2 instance, bit-identical to
/// [`conv_transpose2d_f32_ref`].
pub fn conv_transpose2d_f32_fast_portable(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if panel::handles_transposed(g) {
        panel::conv_transpose2d(g, x, w, bias, relu, y, false)
    } else {
        conv_transpose2d_f32_rows(g, x, w, bias, relu, y)
    }
}

/// f32 transposed convolution for any geometry (scatter along input rows),
/// bit-identical to [`conv_transpose2d_f32_ref`].
pub fn conv_transpose2d_f32_rows(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let s = g.stride;
    for (oc, p) in y.chunks_mut(plane).enumerate() {
        p.fill(bias.map_or(0.0, |b| b.get(oc)));
        for ic in 0..g.cin {
            let xin = &x[ic * in_plane..(ic + 1) * in_plane];
            for ky in 0..g.k {
                let (iy0, iy1) = valid_range(g.ih, g.oh, s, ky, g.pad);
                for kx in 0..g.k {
                    let (ix0, ix1) = valid_range(g.iw, g.ow, s, kx, g.pad);
                    if ix0 >= ix1 {
                        continue;
                    }
                    let wv = w.get(((ic * g.cout + oc) * g.k + ky) * g.k + kx);
                    for iy in iy0..iy1 {
                        let oy = iy * s + ky - g.pad;
                        let ox0 = ix0 * s + kx - g.pad;
                        let xrow = &xin[iy * g.iw + ix0..iy * g.iw + ix1];
                        let orow = &mut p[oy * g.ow + ox0..(oy + 1) * g.ow];
                        for (a, &b) in orow.iter_mut().step_by(s).zip(xrow) {
                            *a += wv * b;
                        }
                    }
                }
            }
        }
        if relu {
            for v in p.iter_mut() {
                *v = relu_f32(*v);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// int8 convolution
// ---------------------------------------------------------------------------------------

/// Reference int8 convolution: `acc = bias[oc] + Σ_{ic,ky,kx} (x − zp_in)·w` in wrapping
/// `i32` over the taps inside the input (padding is the real value 0, i.e. `zp_in`), then
/// [`OutputScale::finish`].
pub fn conv2d_i8_ref(
    g: &ConvGeom,
    x: &[i8],
    w: &[i8],
    bias: Option<&[u8]>,
    q: &OutputScale<'_>,
    y: &mut [i8],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len() / 4))?;
    let zp = q.input.zero_point;
    for oc in 0..g.cout {
        let m = q.multiplier(oc).ok_or(ShapeError)?;
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = bias.map_or(0, |b| i32_at(b, oc));
                for ic in 0..g.cin {
                    for ky in 0..g.k {
                        let Some(iy) = tap(oy, g.stride, ky * g.dil, g.pad, g.ih) else {
                            continue;
                        };
                        for kx in 0..g.k {
                            let Some(ix) = tap(ox, g.stride, kx * g.dil, g.pad, g.iw) else {
                                continue;
                            };
                            let wv = i32::from(w[((oc * g.cin + ic) * g.k + ky) * g.k + kx]);
                            let xv = i32::from(x[(ic * g.ih + iy) * g.iw + ix]) - zp;
                            acc = acc.wrapping_add(xv * wv);
                        }
                    }
                }
                y[(oc * g.oh + oy) * g.ow + ox] = q.finish(acc, m);
            }
        }
    }
    Ok(())
}

/// Accumulator block of the fast int8 kernels (on the stack).
const ACC_BLOCK: usize = 64;

/// `a[t] += (x[t·s] − zp)·w` in wrapping `i32`. When `zp` and `w` are in the int8 range
/// the product fits in `i16` (|x − zp| ≤ 255, |w| ≤ 128), which vectorizes far better;
/// the result is the same integer.
#[inline(always)]
fn mac_row(a: &mut [i32], x: &[i8], s: usize, zp: i32, w: i32) {
    let small = (-128..=127).contains(&zp) && (-128..=127).contains(&w);
    if small && s == 1 {
        let (zp, w) = (zp as i16, w as i16);
        for (a, &xv) in a.iter_mut().zip(x) {
            *a = a.wrapping_add(i32::from((i16::from(xv) - zp) * w));
        }
    } else {
        for (a, &xv) in a.iter_mut().zip(x.iter().step_by(s)) {
            *a = a.wrapping_add((i32::from(xv) - zp) * w);
        }
    }
}

/// Fast int8 convolution, equal to [`conv2d_i8_ref`]: accumulates a block of an output
/// row at a time in registers/stack, innermost loop along the row.
pub fn conv2d_i8_fast(
    g: &ConvGeom,
    x: &[i8],
    w: &[i8],
    bias: Option<&[u8]>,
    q: &OutputScale<'_>,
    y: &mut [i8],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len() / 4))?;
    let zp = q.input.zero_point;
    let in_plane = g.ih * g.iw;
    let s = g.stride;
    let mut acc = [0i32; ACC_BLOCK];
    for oc in 0..g.cout {
        let m = q.multiplier(oc).ok_or(ShapeError)?;
        let b = bias.map_or(0, |b| i32_at(b, oc));
        for oy in 0..g.oh {
            let mut bx = 0;
            while bx < g.ow {
                let bn = ACC_BLOCK.min(g.ow - bx);
                let acc = &mut acc[..bn];
                acc.fill(b);
                for ic in 0..g.cin {
                    let xin = &x[ic * in_plane..(ic + 1) * in_plane];
                    for ky in 0..g.k {
                        let Some(iy) = tap(oy, s, ky * g.dil, g.pad, g.ih) else {
                            continue;
                        };
                        let xrow = &xin[iy * g.iw..(iy + 1) * g.iw];
                        for kx in 0..g.k {
                            let (ox0, ox1) = valid_range(g.ow, g.iw, s, kx * g.dil, g.pad);
                            let (lo, hi) = (ox0.max(bx), ox1.min(bx + bn));
                            if lo >= hi {
                                continue;
                            }
                            let wv = i32::from(w[((oc * g.cin + ic) * g.k + ky) * g.k + kx]);
                            let ix0 = lo * s + kx * g.dil - g.pad;
                            let a = &mut acc[lo - bx..hi - bx];
                            mac_row(a, &xrow[ix0..], s, zp, wv);
                        }
                    }
                }
                let out = &mut y[(oc * g.oh + oy) * g.ow + bx..][..bn];
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    *o = q.finish(a, m);
                }
                bx += bn;
            }
        }
    }
    Ok(())
}

/// Reference int8 transposed convolution: like [`conv_transpose2d_f32_ref`] with
/// `(x − zp_in)·w` accumulated in wrapping `i32` on top of the `i32` bias, then
/// [`OutputScale::finish`].
pub fn conv_transpose2d_i8_ref(
    g: &ConvGeom,
    x: &[i8],
    w: &[i8],
    bias: Option<&[u8]>,
    q: &OutputScale<'_>,
    y: &mut [i8],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len() / 4))?;
    let zp = q.input.zero_point;
    for oc in 0..g.cout {
        let m = q.multiplier(oc).ok_or(ShapeError)?;
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = bias.map_or(0, |b| i32_at(b, oc));
                for ic in 0..g.cin {
                    for ky in 0..g.k {
                        let Some(iy) = tap_t(oy, g.stride, ky, g.pad, g.ih) else {
                            continue;
                        };
                        for kx in 0..g.k {
                            let Some(ix) = tap_t(ox, g.stride, kx, g.pad, g.iw) else {
                                continue;
                            };
                            let wv = i32::from(w[((ic * g.cout + oc) * g.k + ky) * g.k + kx]);
                            let xv = i32::from(x[(ic * g.ih + iy) * g.iw + ix]) - zp;
                            acc = acc.wrapping_add(xv * wv);
                        }
                    }
                }
                y[(oc * g.oh + oy) * g.ow + ox] = q.finish(acc, m);
            }
        }
    }
    Ok(())
}

/// Fast int8 transposed convolution, equal to [`conv_transpose2d_i8_ref`]: a block of an
/// output row at a time, visiting only the output columns each kernel column reaches.
pub fn conv_transpose2d_i8_fast(
    g: &ConvGeom,
    x: &[i8],
    w: &[i8],
    bias: Option<&[u8]>,
    q: &OutputScale<'_>,
    y: &mut [i8],
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len() / 4))?;
    let zp = q.input.zero_point;
    let in_plane = g.ih * g.iw;
    let s = g.stride;
    let mut acc = [0i32; ACC_BLOCK];
    for oc in 0..g.cout {
        let m = q.multiplier(oc).ok_or(ShapeError)?;
        let b = bias.map_or(0, |b| i32_at(b, oc));
        for oy in 0..g.oh {
            let mut bx = 0;
            while bx < g.ow {
                let bn = ACC_BLOCK.min(g.ow - bx);
                let acc = &mut acc[..bn];
                acc.fill(b);
                for ic in 0..g.cin {
                    let xin = &x[ic * in_plane..(ic + 1) * in_plane];
                    for ky in 0..g.k {
                        let Some(iy) = tap_t(oy, s, ky, g.pad, g.ih) else {
                            continue;
                        };
                        let xrow = &xin[iy * g.iw..(iy + 1) * g.iw];
                        for kx in 0..g.k {
                            // ix in [ix0, ix1) reach ox = ix·s + kx − pad in the output.
                            let (ix0, ix1) = valid_range(g.iw, g.ow, s, kx, g.pad);
                            // Restrict to this block: ox in [bx, bx + bn).
                            let lo_ix = (bx + g.pad).saturating_sub(kx).div_ceil(s).max(ix0);
                            let hi_ix = ((bx + bn + g.pad).saturating_sub(kx).div_ceil(s)).min(ix1);
                            if lo_ix >= hi_ix {
                                continue;
                            }
                            let wv = i32::from(w[((ic * g.cout + oc) * g.k + ky) * g.k + kx]);
                            let ox0 = lo_ix * s + kx - g.pad;
                            let a = &mut acc[ox0 - bx..];
                            for (a, &xv) in a.iter_mut().step_by(s).zip(&xrow[lo_ix..hi_ix]) {
                                *a = a.wrapping_add((i32::from(xv) - zp) * wv);
                            }
                        }
                    }
                }
                let out = &mut y[(oc * g.oh + oy) * g.ow + bx..][..bn];
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    *o = q.finish(a, m);
                }
                bx += bn;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parameter-free operations
// ---------------------------------------------------------------------------------------

/// Max-pooling without padding over `c` planes of `ih × iw` into `oh × ow`
/// (window `k`, stride `s`); works for `f32` and `i8`.
#[allow(clippy::too_many_arguments)]
pub fn max_pool<T: Copy + PartialOrd>(
    c: usize,
    ih: usize,
    iw: usize,
    k: usize,
    s: usize,
    x: &[T],
    oh: usize,
    ow: usize,
    y: &mut [T],
) -> Result<(), ShapeError> {
    if x.len() != c * ih * iw
        || y.len() != c * oh * ow
        || k == 0
        || (oh > 0 && (oh - 1) * s + k > ih)
        || (ow > 0 && (ow - 1) * s + k > iw)
    {
        return Err(ShapeError);
    }
    if k == 2 && s == 2 {
        // The common 2×2 window: the same comparisons in the same order, row pairs at
        // a time.
        for ch in 0..c {
            for oy in 0..oh {
                let r0 = &x[(ch * ih + 2 * oy) * iw..][..2 * ow];
                let r1 = &x[(ch * ih + 2 * oy + 1) * iw..][..2 * ow];
                let out = &mut y[(ch * oh + oy) * ow..][..ow];
                for ((o, a), b) in out
                    .iter_mut()
                    .zip(r0.chunks_exact(2))
                    .zip(r1.chunks_exact(2))
                {
                    let mut m = a[0];
                    for v in [a[1], b[0], b[1]] {
                        if v > m {
                            m = v;
                        }
                    }
                    *o = m;
                }
            }
        }
        return Ok(());
    }
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let base = (ch * ih + oy * s) * iw + ox * s;
                let mut m = x[base];
                for ky in 0..k {
                    for kx in 0..k {
                        let v = x[base + ky * iw + kx];
                        if v > m {
                            m = v;
                        }
                    }
                }
                y[(ch * oh + oy) * ow + ox] = m;
            }
        }
    }
    Ok(())
}

/// Nearest-neighbour upsampling by `f`: `y[c, y, x] = x[c, y / f, x / f]`.
pub fn upsample<T: Copy>(
    c: usize,
    ih: usize,
    iw: usize,
    f: usize,
    x: &[T],
    y: &mut [T],
) -> Result<(), ShapeError> {
    let (oh, ow) = (ih * f, iw * f);
    if x.len() != c * ih * iw || y.len() != c * oh * ow || f == 0 {
        return Err(ShapeError);
    }
    for ch in 0..c {
        for oy in 0..oh {
            let src = &x[(ch * ih + oy / f) * iw..][..iw];
            let dst = &mut y[(ch * oh + oy) * ow..][..ow];
            for (ox, d) in dst.iter_mut().enumerate() {
                *d = src[ox / f];
            }
        }
    }
    Ok(())
}

/// Softmax over `c` channels of `n` pixels in f32: `e_c = exp(x_c − max)`, summed in
/// channel order, `y_c = e_c / Σ` (`exp` is `libm::expf`).
pub fn softmax_f32(c: usize, n: usize, x: &[f32], y: &mut [f32]) -> Result<(), ShapeError> {
    if x.len() != c * n || y.len() != c * n || c == 0 {
        return Err(ShapeError);
    }
    for p in 0..n {
        let mut m = x[p];
        for ch in 1..c {
            if x[ch * n + p] > m {
                m = x[ch * n + p];
            }
        }
        let mut sum = 0.0f32;
        for ch in 0..c {
            let e = libm::expf(x[ch * n + p] - m);
            y[ch * n + p] = e;
            sum += e;
        }
        for ch in 0..c {
            y[ch * n + p] /= sum;
        }
    }
    Ok(())
}

/// Arg-max over `c` channels of `n` pixels: the first channel holding the largest value
/// (strict `>` comparison, so ties go to the lower index).
pub fn argmax<T: Copy + PartialOrd>(
    c: usize,
    n: usize,
    x: &[T],
    mut out: impl FnMut(usize, usize),
) -> Result<(), ShapeError> {
    if x.len() != c * n || c == 0 {
        return Err(ShapeError);
    }
    for p in 0..n {
        let mut best = 0;
        let mut m = x[p];
        for ch in 1..c {
            let v = x[ch * n + p];
            if v > m {
                m = v;
                best = ch;
            }
        }
        out(p, best);
    }
    Ok(())
}

/// Re-expresses int8 values in other quantization parameters:
/// `saturate_i8(requantize(q − zp_from, s_from / s_to) + zp_to)`, or a plain copy when
/// the parameters are identical.
pub fn rescale_i8(x: &[i8], from: QParams, to: QParams, y: &mut [i8]) -> Result<(), ShapeError> {
    if x.len() != y.len() {
        return Err(ShapeError);
    }
    if from == to {
        y.copy_from_slice(x);
        return Ok(());
    }
    let r = ratio(from.scale, to.scale).ok_or(ShapeError)?;
    for (o, &v) in y.iter_mut().zip(x) {
        *o = saturate_i8(
            requantize(i32::from(v) - from.zero_point, r).saturating_add(to.zero_point),
        );
    }
    Ok(())
}

/// [`rescale_i8`] in place.
pub fn rescale_i8_in_place(y: &mut [i8], from: QParams, to: QParams) -> Result<(), ShapeError> {
    if from == to {
        return Ok(());
    }
    let r = ratio(from.scale, to.scale).ok_or(ShapeError)?;
    for v in y.iter_mut() {
        *v = saturate_i8(
            requantize(i32::from(*v) - from.zero_point, r).saturating_add(to.zero_point),
        );
    }
    Ok(())
}

/// Clamps an `i32` to the int8 range.
pub fn saturate(x: i32) -> i8 {
    saturate_i8(x)
}

/// Fraction bits of the int8 `Add` intermediate.
pub const ADD_SHIFT: u32 = 16;

/// The multiplier that brings an `Add` input to the output scale with [`ADD_SHIFT`]
/// extra fraction bits: `s_in / s_out · 2^16`.
pub fn add_multiplier(input: QParams, output: QParams) -> Option<Requant> {
    quantize_multiplier(f64::from(input.scale) / f64::from(output.scale) * 65536.0)
}

/// int8 element-wise sum: `t_a = requantize(a − zp_a, M_a)`, `t_b` likewise (each with
/// 16 fraction bits, see [`add_multiplier`]), `y = saturate_i8(((t_a + t_b + 2^15) >> 16)
/// + zp_out)` computed in `i64`.
pub fn add_i8(
    a: &[i8],
    qa: QParams,
    b: &[i8],
    qb: QParams,
    qy: QParams,
    y: &mut [i8],
) -> Result<(), ShapeError> {
    if a.len() != y.len() || b.len() != y.len() {
        return Err(ShapeError);
    }
    let ma = add_multiplier(qa, qy).ok_or(ShapeError)?;
    let mb = add_multiplier(qb, qy).ok_or(ShapeError)?;
    for ((o, &va), &vb) in y.iter_mut().zip(a).zip(b) {
        let ta = i64::from(requantize(i32::from(va) - qa.zero_point, ma));
        let tb = i64::from(requantize(i32::from(vb) - qb.zero_point, mb));
        let v = ((ta + tb + (1 << (ADD_SHIFT - 1))) >> ADD_SHIFT) + i64::from(qy.zero_point);
        *o = v.clamp(-128, 127) as i8;
    }
    Ok(())
}
