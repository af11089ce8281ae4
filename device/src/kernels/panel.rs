//! Stride-1 f32 convolution as a register-blocked "panel" kernel.
//!
//! A tile of `MR` output channels × `NR` output pixels of one row accumulates in a
//! fixed-size array (which LLVM keeps in vector registers) over a tap list: for every
//! input channel of a chunk, kernel row and kernel column (the reference order) the
//! offset of the `NR` input values the tap reads and the `MR` weights it multiplies.
//! Interior tiles read the input in place; tiles touching the border read a small
//! zero-padded copy of the rows they need (the panel), so every tile runs the same
//! inner loop. Each output still adds its terms in the reference order with separate
//! multiplies and adds (no fused multiply-add), so the result is bit-identical to
//! [`super::conv2d_f32_ref`]; a padded tap adds `w · 0 = ±0`, which leaves every sum
//! unchanged (the reference skips it; the only possible difference is the sign of an
//! exactly zero sum that started as a `−0` bias, and non-finite weights).
//!
//! On x86_64 the same kernel is also compiled for AVX2 (`NR = 16`, two 8-lane registers
//! per channel) and chosen at run time from `cpuid`, without `std`; elsewhere it runs
//! with `NR = 8` as the target's vector unit allows. The only `unsafe` code of the crate
//! lives here, in the `x86` submodule: the `cpuid`/`xgetbv` reads and the calls into
//! the AVX2 instances.

use super::{relu_f32, ConvGeom, Params, ShapeError};

/// Output channels per tile.
const MR: usize = 4;
/// Decoded weights held on the stack (8 KiB).
const W_BUF: usize = 2048;
/// Taps per chunk (`W_BUF / MR`).
const T_BUF: usize = W_BUF / MR;
/// Zero-padded input rows held on the stack (4.5 KiB).
const P_BUF: usize = 1152;

/// Whether the panel kernel handles this geometry with `NR`-pixel tiles.
fn applicable<const NR: usize>(g: &ConvGeom) -> bool {
    // Saturating: any geometry may be asked about (on 32-bit targets too).
    let pw = (g.k.saturating_sub(1))
        .saturating_mul(g.dil)
        .saturating_add(NR);
    g.stride == 1 && g.k.saturating_mul(g.k) <= T_BUF && g.k.saturating_mul(pw) <= P_BUF
}

/// Whether [`conv2d`] takes this geometry (otherwise the caller uses another kernel).
pub(super) fn handles(g: &ConvGeom) -> bool {
    applicable::<16>(g) && applicable::<8>(g)
}

/// The panel convolution with the widest tiles this CPU runs; `false` selects the
/// portable instance even where AVX2 is available (for tests).
pub(super) fn conv2d(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
    simd: bool,
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    if !handles(g) {
        return Err(ShapeError);
    }
    #[cfg(target_arch = "x86_64")]
    if simd && x86::has_avx2() {
        return x86::conv2d_avx2(g, x, w, bias, relu, y);
    }
    let _ = simd;
    conv2d_body::<8>(g, x, w, bias, relu, y)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use core::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv, CpuidResult};
    use core::sync::atomic::{AtomicU8, Ordering};

    use super::{
        conv2d_body, conv_transpose2d_body, conv_transpose2d_s2, ConvGeom, Params, ShapeError,
    };

    /// Zero-padded input planes of the AVX2 instance (64 KiB of stack; hosts only).
    const PAD_BUF: usize = 16 * 1024;

    /// 0: not probed yet, 1: no AVX2, 2: AVX2 usable.
    static AVX2: AtomicU8 = AtomicU8::new(0);

    /// Whether the CPU has AVX2 and the OS saves the YMM registers (`cpuid` leaves 1
    /// and 7, `xgetbv` of XCR0), probed once.
    pub(super) fn has_avx2() -> bool {
        match AVX2.load(Ordering::Relaxed) {
            0 => {
                let ok = probe();
                AVX2.store(if ok { 2 } else { 1 }, Ordering::Relaxed);
                ok
            }
            v => v == 2,
        }
    }

    #[allow(unused_unsafe)]
    fn probe() -> bool {
        // SAFETY: `cpuid` exists on every x86_64 CPU; leaf 0 gives the highest leaf.
        let max: CpuidResult = unsafe { __cpuid(0) };
        if max.eax < 7 {
            return false;
        }
        // SAFETY: leaf 1 is at most the highest leaf reported above.
        let l1 = unsafe { __cpuid(1) };
        let osxsave = l1.ecx & (1 << 27) != 0;
        let avx = l1.ecx & (1 << 28) != 0;
        if !(osxsave && avx) {
            return false;
        }
        // SAFETY: OSXSAVE is set, so XGETBV is enabled and XCR0 (index 0) is readable.
        let xcr0 = unsafe { xcr0() };
        if xcr0 & 0b110 != 0b110 {
            return false; // the OS does not save XMM and YMM state
        }
        // SAFETY: leaf 7 is at most the highest leaf (checked above).
        let l7 = unsafe { __cpuid_count(7, 0) };
        l7.ebx & (1 << 5) != 0
    }

    /// XCR0. Safety: the CPU must have XSAVE enabled by the OS (`cpuid` 1: OSXSAVE).
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        _xgetbv(0)
    }

    /// The convolution kernels compiled for AVX2 with 16-pixel tiles (padded planes when
    /// they fit [`PAD_BUF`], the panel path otherwise); an error without AVX2.
    pub(super) fn conv2d_avx2(
        g: &ConvGeom,
        x: &[f32],
        w: Params<'_>,
        bias: Option<Params<'_>>,
        relu: bool,
        y: &mut [f32],
    ) -> Result<(), ShapeError> {
        #[target_feature(enable = "avx2")]
        fn body(
            g: &ConvGeom,
            x: &[f32],
            w: Params<'_>,
            bias: Option<Params<'_>>,
            relu: bool,
            y: &mut [f32],
        ) -> Result<(), ShapeError> {
            if super::padded_fits::<16, PAD_BUF>(g) {
                super::conv2d_padded::<16, PAD_BUF>(g, x, w, bias, relu, y)
            } else {
                conv2d_body::<16>(g, x, w, bias, relu, y)
            }
        }
        if !has_avx2() {
            return Err(ShapeError);
        }
        // SAFETY: `has_avx2()` just found AVX2 on this CPU, with OS support for YMM state.
        unsafe { body(g, x, w, bias, relu, y) }
    }

    /// The transposed-convolution kernels compiled for AVX2 (stride 2: 8 input pixels ×
    /// 2 phases a tile; other strides: 16-pixel tiles).
    pub(super) fn conv_transpose2d_avx2(
        g: &ConvGeom,
        x: &[f32],
        w: Params<'_>,
        bias: Option<Params<'_>>,
        relu: bool,
        y: &mut [f32],
    ) -> Result<(), ShapeError> {
        #[target_feature(enable = "avx2")]
        fn body(
            g: &ConvGeom,
            x: &[f32],
            w: Params<'_>,
            bias: Option<Params<'_>>,
            relu: bool,
            y: &mut [f32],
        ) -> Result<(), ShapeError> {
            if g.stride == 2 {
                conv_transpose2d_s2::<8>(g, x, w, bias, relu, y)
            } else {
                conv_transpose2d_body::<16>(g, x, w, bias, relu, y)
            }
        }
        if !has_avx2() {
            return Err(ShapeError);
        }
        // SAFETY: `has_avx2()` just found AVX2 on this CPU, with OS support for YMM state.
        unsafe { body(g, x, w, bias, relu, y) }
    }
}

/// Whether [`conv_transpose2d`] takes this geometry: kernel side = stride, no padding,
/// so every output pixel has exactly one tap per input channel (`s²` 1×1 convolutions,
/// one per output phase).
pub(super) fn handles_transposed(g: &ConvGeom) -> bool {
    g.k == g.stride
        && g.pad == 0
        && g.oh == g.ih.saturating_mul(g.k)
        && g.ow == g.iw.saturating_mul(g.k)
}

/// The transposed convolution of [`handles_transposed`] geometries, bit-identical to
/// [`super::conv_transpose2d_f32_ref`] (each output adds its one term per input channel
/// in channel order); `simd` as in [`conv2d`].
pub(super) fn conv_transpose2d(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
    simd: bool,
) -> Result<(), ShapeError> {
    g.check(x.len(), y.len(), w.len(), bias.map(|b| b.len()))?;
    if !handles_transposed(g) {
        return Err(ShapeError);
    }
    #[cfg(target_arch = "x86_64")]
    if simd && x86::has_avx2() {
        return x86::conv_transpose2d_avx2(g, x, w, bias, relu, y);
    }
    let _ = simd;
    if g.stride == 2 {
        conv_transpose2d_s2::<4>(g, x, w, bias, relu, y)
    } else {
        conv_transpose2d_body::<8>(g, x, w, bias, relu, y)
    }
}

/// [`conv_transpose2d_body`] for stride 2 (U-Net's up-convolutions): both output
/// phases of a row (`rx = 0, 1`) accumulate in one tile of `MR` channels × `NR` input
/// pixels and are stored interleaved, `2·NR` contiguous outputs per channel. Same terms
/// in the same order.
#[inline(always)]
fn conv_transpose2d_s2<const NR: usize>(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if !(handles_transposed(g) && g.stride == 2) {
        return Err(ShapeError);
    }
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let ic_chunk = (W_BUF / (2 * MR))
        .min(P_BUF / NR)
        .min(T_BUF)
        .clamp(1, g.cin);
    let mut wbuf = [0f32; W_BUF];
    let mut poff = [0usize; T_BUF];
    let mut doff = [0usize; T_BUF];
    let mut panel = [0f32; P_BUF];
    for (t, (p, d)) in poff.iter_mut().zip(doff.iter_mut()).enumerate() {
        *p = t * NR;
        *d = t * in_plane;
    }
    for (blk, ys) in y.chunks_mut(MR * plane).enumerate() {
        let oc0 = MR * blk;
        let nb = ys.len() / plane;
        let mut bv = [0f32; MR];
        for (j, b) in bv.iter_mut().enumerate().take(nb) {
            *b = bias.map_or(0.0, |p| p.get(oc0 + j));
        }
        let mut ic0 = 0;
        while ic0 < g.cin {
            let nic = ic_chunk.min(g.cin - ic0);
            let (first, last) = (ic0 == 0, ic0 + nic == g.cin);
            let xs = &x[ic0 * in_plane..(ic0 + nic) * in_plane];
            for ry in 0..2 {
                for ici in 0..nic {
                    for rx in 0..2 {
                        for j in 0..MR {
                            wbuf[(ici * 2 + rx) * MR + j] = if j < nb {
                                w.get(((ic0 + ici) * g.cout + oc0 + j) * 4 + ry * 2 + rx)
                            } else {
                                0.0
                            };
                        }
                    }
                }
                let wts = &wbuf[..nic * 2 * MR];
                for iy in 0..g.ih {
                    let orow = (2 * iy + ry) * g.ow;
                    let mut bx = 0;
                    while bx < g.iw {
                        let bn = NR.min(g.iw - bx);
                        let mut acc = [[[0f32; NR]; MR]; 2];
                        for j in 0..nb {
                            if first {
                                acc[0][j] = [bv[j]; NR];
                                acc[1][j] = [bv[j]; NR];
                            } else {
                                let src = &ys[j * plane + orow + 2 * bx..];
                                for (i, p) in src.chunks_exact(2).take(bn).enumerate() {
                                    acc[0][j][i] = p[0];
                                    acc[1][j][i] = p[1];
                                }
                            }
                        }
                        let base = iy * g.iw + bx;
                        let (src, base, off): (&[f32], usize, &[usize]) = if bn == NR {
                            (xs, base, &doff[..nic])
                        } else {
                            for ici in 0..nic {
                                let dst = &mut panel[ici * NR..(ici + 1) * NR];
                                dst[..bn].copy_from_slice(&xs[ici * in_plane + base..][..bn]);
                                dst[bn..].fill(0.0);
                            }
                            (&panel[..], 0, &poff[..nic])
                        };
                        micro_s2(&mut acc, src, base, off, wts);
                        let r = relu && last;
                        for j in 0..nb {
                            let dst = &mut ys[j * plane + orow + 2 * bx..];
                            let f = |v: f32| if r { relu_f32(v) } else { v };
                            match dst.get_mut(..2 * NR) {
                                Some(d) if bn == NR => {
                                    for (i, p) in d.chunks_exact_mut(2).enumerate() {
                                        p[0] = f(acc[0][j][i]);
                                        p[1] = f(acc[1][j][i]);
                                    }
                                }
                                _ => {
                                    for (i, p) in dst.chunks_exact_mut(2).take(bn).enumerate() {
                                        p[0] = f(acc[0][j][i]);
                                        p[1] = f(acc[1][j][i]);
                                    }
                                }
                            }
                        }
                        bx += bn;
                    }
                }
            }
            ic0 += nic;
        }
    }
    Ok(())
}

/// The inner loop of [`conv_transpose2d_s2`]: for every input channel `t`,
/// `acc[rx][j][i] += w[t][rx][j] · src[base + off[t] + i]`.
#[inline(always)]
fn micro_s2<const NR: usize>(
    acc: &mut [[[f32; NR]; MR]; 2],
    src: &[f32],
    base: usize,
    off: &[usize],
    wts: &[f32],
) {
    let mut a = *acc;
    for (&o, wv) in off.iter().zip(wts.chunks_exact(2 * MR)) {
        let Some(xv) = src.get(base + o..base + o + NR) else {
            break;
        };
        let mut xb = [0f32; NR];
        xb.copy_from_slice(xv);
        for rx in 0..2 {
            for j in 0..MR {
                let wj = wv[rx * MR + j];
                for i in 0..NR {
                    a[rx][j][i] += wj * xb[i];
                }
            }
        }
    }
    *acc = a;
}

/// The transposed-convolution kernel for `NR`-pixel tiles: for every output phase
/// `(ry, rx)`, tiles of `MR` output channels × `NR` input pixels of a row accumulate over
/// the input channels and are stored to every `s`-th output pixel.
#[inline(always)]
fn conv_transpose2d_body<const NR: usize>(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if !handles_transposed(g) {
        return Err(ShapeError);
    }
    let (s, k) = (g.stride, g.k);
    let kk = k * k;
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let ic_chunk = T_BUF.min(P_BUF / NR).clamp(1, g.cin);
    let mut wbuf = [0f32; W_BUF];
    let mut poff = [0usize; T_BUF];
    let mut doff = [0usize; T_BUF];
    let mut panel = [0f32; P_BUF];
    for (t, (p, d)) in poff.iter_mut().zip(doff.iter_mut()).enumerate() {
        *p = t * NR;
        *d = t * in_plane;
    }
    for (blk, ys) in y.chunks_mut(MR * plane).enumerate() {
        let oc0 = MR * blk;
        let nb = ys.len() / plane;
        let mut bv = [0f32; MR];
        for (j, b) in bv.iter_mut().enumerate().take(nb) {
            *b = bias.map_or(0.0, |p| p.get(oc0 + j));
        }
        let mut ic0 = 0;
        while ic0 < g.cin {
            let nic = ic_chunk.min(g.cin - ic0);
            let (first, last) = (ic0 == 0, ic0 + nic == g.cin);
            let xs = &x[ic0 * in_plane..(ic0 + nic) * in_plane];
            for ry in 0..s {
                for rx in 0..s {
                    for ici in 0..nic {
                        for j in 0..MR {
                            wbuf[ici * MR + j] = if j < nb {
                                w.get(((ic0 + ici) * g.cout + oc0 + j) * kk + ry * k + rx)
                            } else {
                                0.0
                            };
                        }
                    }
                    let wts = &wbuf[..nic * MR];
                    for iy in 0..g.ih {
                        let orow = (iy * s + ry) * g.ow + rx;
                        let mut bx = 0;
                        while bx < g.iw {
                            let bn = NR.min(g.iw - bx);
                            let mut acc = [[0f32; NR]; MR];
                            for (j, a) in acc.iter_mut().enumerate().take(nb) {
                                if first {
                                    *a = [bv[j]; NR];
                                } else {
                                    let src = &ys[j * plane + orow + bx * s..];
                                    for (o, &v) in a.iter_mut().zip(src.iter().step_by(s)).take(bn)
                                    {
                                        *o = v;
                                    }
                                }
                            }
                            let base = iy * g.iw + bx;
                            if bn == NR {
                                micro(&mut acc, xs, base, &doff[..nic], wts);
                            } else {
                                for ici in 0..nic {
                                    let dst = &mut panel[ici * NR..(ici + 1) * NR];
                                    let src = &xs[ici * in_plane + base..][..bn];
                                    dst[..bn].copy_from_slice(src);
                                    dst[bn..].fill(0.0);
                                }
                                micro(&mut acc, &panel, 0, &poff[..nic], wts);
                            }
                            for (j, a) in acc.iter().enumerate().take(nb) {
                                let dst = &mut ys[j * plane + orow + bx * s..];
                                for (o, &v) in dst.iter_mut().step_by(s).zip(a).take(bn) {
                                    *o = if relu && last { relu_f32(v) } else { v };
                                }
                            }
                            bx += bn;
                        }
                    }
                }
            }
            ic0 += nic;
        }
    }
    Ok(())
}

/// The kernel for `NR`-pixel tiles (the caller checked the lengths and [`applicable`]).
#[inline(always)]
fn conv2d_body<const NR: usize>(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    let (k, d, pad) = (g.k, g.dil, g.pad);
    let kk = k * k;
    let pw = NR + (k - 1) * d;
    if g.stride != 1 || kk > T_BUF || k * pw > P_BUF {
        return Err(ShapeError);
    }
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let ic_chunk = (T_BUF / kk).min(P_BUF / (k * pw)).clamp(1, g.cin);
    let mut wbuf = [0f32; W_BUF];
    let mut poff = [0usize; T_BUF];
    let mut doff = [0usize; T_BUF];
    let mut panel = [0f32; P_BUF];
    // 3-wide kernel rows without dilation (most convolutions): three taps per offset.
    let rows3 = k == 3 && d == 1;
    let step = if rows3 { 3 } else { 1 };
    // Output rows whose taps all fall inside the input, likewise columns of a tile start.
    let span = (k - 1) * d;
    let oy_in = (pad, (g.ih + pad).saturating_sub(span));
    let bx_in = (pad, (g.iw + pad + 1).saturating_sub(pw));
    for (blk, ys) in y.chunks_mut(MR * plane).enumerate() {
        let oc0 = MR * blk;
        let nb = ys.len() / plane;
        let mut bv = [0f32; MR];
        for (j, b) in bv.iter_mut().enumerate().take(nb) {
            *b = bias.map_or(0.0, |p| p.get(oc0 + j));
        }
        let mut ic0 = 0;
        while ic0 < g.cin {
            let nic = ic_chunk.min(g.cin - ic0);
            let taps = nic * kk;
            let (first, last) = (ic0 == 0, ic0 + nic == g.cin);
            for ici in 0..nic {
                for ky in 0..k {
                    for kx in 0..k {
                        let t = ici * kk + ky * k + kx;
                        // With `rows3`, entry `r` is the offset of kernel row `r`.
                        let e = if rows3 { t / 3 } else { t };
                        if !rows3 || kx == 0 {
                            poff[e] = (ici * k + ky) * pw + kx * d;
                            doff[e] = ici * in_plane + ky * d * g.iw + kx * d;
                        }
                        for j in 0..MR {
                            wbuf[t * MR + j] = if j < nb {
                                w.get(((oc0 + j) * g.cin + ic0 + ici) * kk + ky * k + kx)
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
            let xs = &x[ic0 * in_plane..(ic0 + nic) * in_plane];
            let wts = &wbuf[..taps * MR];
            for oy in 0..g.oh {
                let row_in = oy >= oy_in.0 && oy < oy_in.1;
                let mut bx = 0;
                while bx < g.ow {
                    let bn = NR.min(g.ow - bx);
                    let mut acc = [[0f32; NR]; MR];
                    for (j, a) in acc.iter_mut().enumerate().take(nb) {
                        if first {
                            *a = [bv[j]; NR];
                        } else {
                            load(a, &ys[j * plane + oy * g.ow + bx..], bn);
                        }
                    }
                    let direct = row_in && bn == NR && bx >= bx_in.0 && bx < bx_in.1;
                    let (src, base, off): (&[f32], usize, &[usize]) = if direct {
                        (xs, (oy - pad) * g.iw + bx - pad, &doff[..taps / step])
                    } else {
                        let p = &mut panel[..nic * k * pw];
                        fill_panel(g, xs, nic, oy, bx, pw, p);
                        (p, 0, &poff[..taps / step])
                    };
                    if rows3 {
                        micro3(&mut acc, src, base, off, wts);
                    } else {
                        micro(&mut acc, src, base, off, wts);
                    }
                    for (j, a) in acc.iter().enumerate().take(nb) {
                        store(a, &mut ys[j * plane + oy * g.ow + bx..], bn, relu && last);
                    }
                    bx += bn;
                }
            }
            ic0 += nic;
        }
    }
    Ok(())
}

/// Whether [`conv2d_padded`] with a `PB`-float buffer takes this geometry: one
/// zero-padded input plane and a tile's overrun fit.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn padded_fits<const NR: usize, const PB: usize>(g: &ConvGeom) -> bool {
    let side = |v: usize| v.saturating_add(g.pad.saturating_mul(2));
    let ppl = side(g.ih).saturating_mul(side(g.iw));
    g.stride == 1 && g.k.saturating_mul(g.k) <= T_BUF && ppl.saturating_add(NR) <= PB
}

/// The stride-1 kernel for inputs whose zero-padded planes fit a `PB`-float stack
/// buffer (the small planes of a network's deeper levels, where most tiles touch the
/// border): a chunk of input channels is padded once and every output-channel block
/// and tile reads it in place. Same terms in the same order as [`conv2d_body`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn conv2d_padded<const NR: usize, const PB: usize>(
    g: &ConvGeom,
    x: &[f32],
    w: Params<'_>,
    bias: Option<Params<'_>>,
    relu: bool,
    y: &mut [f32],
) -> Result<(), ShapeError> {
    if !padded_fits::<NR, PB>(g) {
        return Err(ShapeError);
    }
    let (k, d, pad) = (g.k, g.dil, g.pad);
    let kk = k * k;
    let (ppw, pph) = (g.iw + 2 * pad, g.ih + 2 * pad);
    let ppl = ppw * pph;
    let plane = g.oh * g.ow;
    let in_plane = g.ih * g.iw;
    let ic_chunk = ((PB - NR) / ppl).min(T_BUF / kk).clamp(1, g.cin);
    let rows3 = k == 3 && d == 1;
    let step = if rows3 { 3 } else { 1 };
    let mut pbuf = [0f32; PB];
    let mut wbuf = [0f32; W_BUF];
    let mut off = [0usize; T_BUF];
    let mut ic0 = 0;
    while ic0 < g.cin {
        let nic = ic_chunk.min(g.cin - ic0);
        let taps = nic * kk;
        let (first, last) = (ic0 == 0, ic0 + nic == g.cin);
        // Pad the chunk's planes (the borders stay zero from the start).
        for ici in 0..nic {
            let src = &x[(ic0 + ici) * in_plane..(ic0 + ici + 1) * in_plane];
            let dst = &mut pbuf[ici * ppl..(ici + 1) * ppl];
            for (r, row) in dst.chunks_exact_mut(ppw).enumerate() {
                match r.checked_sub(pad).filter(|&iy| iy < g.ih) {
                    Some(iy) => {
                        row[..pad].fill(0.0);
                        row[pad..pad + g.iw].copy_from_slice(&src[iy * g.iw..(iy + 1) * g.iw]);
                        row[pad + g.iw..].fill(0.0);
                    }
                    None => row.fill(0.0),
                }
            }
        }
        for ici in 0..nic {
            for ky in 0..k {
                for kx in (0..k).step_by(step) {
                    let t = ici * kk + ky * k + kx;
                    off[t / step] = ici * ppl + ky * d * ppw + kx * d;
                }
            }
        }
        let src = &pbuf[..nic * ppl + NR];
        for (blk, ys) in y.chunks_mut(MR * plane).enumerate() {
            let oc0 = MR * blk;
            let nb = ys.len() / plane;
            let mut bv = [0f32; MR];
            for (j, b) in bv.iter_mut().enumerate().take(nb) {
                *b = bias.map_or(0.0, |p| p.get(oc0 + j));
            }
            for t in 0..taps {
                let (ici, tap) = (t / kk, t % kk);
                for j in 0..MR {
                    wbuf[t * MR + j] = if j < nb {
                        w.get(((oc0 + j) * g.cin + ic0 + ici) * kk + tap)
                    } else {
                        0.0
                    };
                }
            }
            let wts = &wbuf[..taps * MR];
            for oy in 0..g.oh {
                let mut bx = 0;
                while bx < g.ow {
                    let bn = NR.min(g.ow - bx);
                    let mut acc = [[0f32; NR]; MR];
                    for (j, a) in acc.iter_mut().enumerate().take(nb) {
                        if first {
                            *a = [bv[j]; NR];
                        } else {
                            load(a, &ys[j * plane + oy * g.ow + bx..], bn);
                        }
                    }
                    // A partial tile reads past its row into the next one (or the
                    // buffer's `NR` spare values); those lanes are not stored.
                    let base = oy * ppw + bx;
                    if rows3 {
                        micro3(&mut acc, src, base, &off[..taps / step], wts);
                    } else {
                        micro(&mut acc, src, base, &off[..taps / step], wts);
                    }
                    for (j, a) in acc.iter().enumerate().take(nb) {
                        store(a, &mut ys[j * plane + oy * g.ow + bx..], bn, relu && last);
                    }
                    bx += bn;
                }
            }
        }
        ic0 += nic;
    }
    Ok(())
}

/// Copies the input rows the tile at `(oy, bx)` reads, zero-padded, `pw` columns each,
/// in the order (input channel, kernel row).
#[inline(always)]
fn fill_panel(
    g: &ConvGeom,
    xs: &[f32],
    nic: usize,
    oy: usize,
    bx: usize,
    pw: usize,
    p: &mut [f32],
) {
    let (k, d, pad) = (g.k, g.dil, g.pad);
    let in_plane = g.ih * g.iw;
    // Panel column c reads input column bx + c − pad.
    let c_lo = pad.saturating_sub(bx).min(pw);
    let c_hi = (g.iw + pad).saturating_sub(bx).clamp(c_lo, pw);
    let mut rows = p.chunks_exact_mut(pw);
    for ici in 0..nic {
        for ky in 0..k {
            let Some(dst) = rows.next() else {
                return;
            };
            let iy = (oy + ky * d).checked_sub(pad).filter(|&v| v < g.ih);
            let src = iy.and_then(|iy| {
                let row = ici * in_plane + iy * g.iw;
                xs.get(row + bx + c_lo - pad..row + bx + c_hi - pad)
            });
            match src {
                Some(src) if c_lo < c_hi => {
                    dst[..c_lo].fill(0.0);
                    // Short rows: an element loop, not a call to `memcpy`.
                    for (o, &v) in dst[c_lo..c_hi].iter_mut().zip(src) {
                        *o = v;
                    }
                    dst[c_hi..].fill(0.0);
                }
                _ => dst.fill(0.0),
            }
        }
    }
}

/// `a[..n] = src[..n]` (the whole tile with a fixed-size copy).
#[inline(always)]
fn load<const NR: usize>(a: &mut [f32; NR], src: &[f32], n: usize) {
    match src.get(..NR) {
        Some(s) if n == NR => a.copy_from_slice(s),
        _ => {
            for (o, &v) in a.iter_mut().zip(src).take(n) {
                *o = v;
            }
        }
    }
}

/// `dst[..n] = a[..n]`, through ReLU if `relu`.
#[inline(always)]
fn store<const NR: usize>(a: &[f32; NR], dst: &mut [f32], n: usize, relu: bool) {
    match dst.get_mut(..NR) {
        Some(d) if n == NR => {
            if relu {
                for (o, &v) in d.iter_mut().zip(a) {
                    *o = relu_f32(v);
                }
            } else {
                d.copy_from_slice(a);
            }
        }
        _ => {
            for (o, &v) in dst.iter_mut().zip(a).take(n) {
                *o = if relu { relu_f32(v) } else { v };
            }
        }
    }
}

/// [`micro`] for 3-wide kernel rows without dilation: `off[r]` is the offset of kernel
/// row `r`, whose three taps read `src[base + off[r] + kx + i]` with weights
/// `w[3r + kx]` (the same terms in the same order, fewer offsets).
#[inline(always)]
fn micro3<const NR: usize>(
    acc: &mut [[f32; NR]; MR],
    src: &[f32],
    base: usize,
    off: &[usize],
    wts: &[f32],
) {
    let mut a = *acc;
    for (&o, wv) in off.iter().zip(wts.chunks_exact(3 * MR)) {
        let Some(xv) = src.get(base + o..base + o + NR + 2) else {
            break;
        };
        for kx in 0..3 {
            let mut xb = [0f32; NR];
            xb.copy_from_slice(&xv[kx..kx + NR]);
            for j in 0..MR {
                let wj = wv[kx * MR + j];
                for i in 0..NR {
                    a[j][i] += wj * xb[i];
                }
            }
        }
    }
    *acc = a;
}

/// The inner loop: for every tap `t`, `acc[j][i] += w[t][j] · src[base + off[t] + i]`
/// (a multiply, then an add: the reference's rounding).
#[inline(always)]
fn micro<const NR: usize>(
    acc: &mut [[f32; NR]; MR],
    src: &[f32],
    base: usize,
    off: &[usize],
    wts: &[f32],
) {
    let mut a = *acc;
    for (&o, wv) in off.iter().zip(wts.chunks_exact(MR)) {
        let Some(xv) = src.get(base + o..base + o + NR) else {
            break;
        };
        let mut xb = [0f32; NR];
        xb.copy_from_slice(xv);
        for j in 0..MR {
            let wj = wv[j];
            for i in 0..NR {
                a[j][i] += wj * xb[i];
            }
        }
    }
    *acc = a;
}
