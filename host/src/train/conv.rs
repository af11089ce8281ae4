//! Fast CPU convolutions for training: im2col / col2im custom ops plus candle's matmul.
//!
//! A convolution `y = conv2d(x, W)` is computed as `cols = im2col(x)` (shape
//! `(N, C·kh·kw, Ho·Wo)`, one row per input channel and kernel tap) followed by one
//! matrix product per image, `Y_n = W_(Cout × C·kh·kw) · cols_n`, with the output already
//! in NCHW order. Only the two data movers are custom ([`Im2Col`] and [`Col2Im`], written
//! in safe Rust over slices and parallel with rayon); the products are candle's matmul
//! (the multithreaded `gemm` crate), so candle's autograd supplies the rest of the
//! backward pass:
//!
//! * weight gradient `dW = Σ_n dY_n · cols_nᵀ` (matmul backward, summed over the batch by
//!   the broadcast's backward);
//! * input gradient `dX = col2im(Wᵀ · dY)` (matmul backward, then [`Im2Col`]'s backward,
//!   which is [`Col2Im`], a scatter-add).
//!
//! A transposed convolution is the same pair read the other way round:
//! `y = col2im(Wᵀ · x)`, whose input gradient is `W · im2col(dY)`.
//!
//! candle's own CPU path computes the input gradient of `conv2d` with a direct
//! `conv_transpose2d` loop and the weight gradient as a convolution with an image-sized
//! kernel; both are what made training slow (see `docs/training.md`, "Fast CPU
//! convolutions").
//!
//! The ops apply to `f32` tensors on the CPU; [`enabled`] tells whether the executor
//! uses them (it falls back to candle's convolutions on other devices and dtypes, and
//! when `CCNET_CONV=candle` is set or [`set_enabled`]`(false)` was called).

use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// 0: not decided yet (read `CCNET_CONV`), 1: fast ops, 2: candle's convolutions.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether the executor's convolutions use these ops (default: yes; the environment
/// variable `CCNET_CONV=candle` selects candle's own convolutions instead).
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let fast = std::env::var("CCNET_CONV").map_or(true, |v| v != "candle");
            MODE.store(if fast { 1 } else { 2 }, Ordering::Relaxed);
            fast
        }
    }
}

/// Selects the fast ops (`true`) or candle's convolutions (`false`) for the whole
/// process (benchmarks and tests compare both).
pub fn set_enabled(fast: bool) {
    MODE.store(if fast { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fast ops can handle `x` (CPU, `f32`).
pub fn supports(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// Geometry of one im2col: a `kh × kw` window with `stride`, `padding` and `dilation`
/// over `c` planes of `h × w`, giving `ho × wo` output positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// The geometry of a convolution over `(c, h, w)` planes; fails when the window does
    /// not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c: usize,
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Result<Geom> {
        if stride == 0 || dilation == 0 || kh == 0 || kw == 0 {
            bail!("conv: kernel, stride and dilation must be positive");
        }
        let span_h = dilation * (kh - 1) + 1;
        let span_w = dilation * (kw - 1) + 1;
        if h + 2 * padding < span_h || w + 2 * padding < span_w {
            bail!("conv: a {kh}×{kw} kernel does not fit a {h}×{w} input with padding {padding}");
        }
        Ok(Geom {
            c,
            h,
            w,
            kh,
            kw,
            stride,
            padding,
            dilation,
            ho: (h + 2 * padding - span_h) / stride + 1,
            wo: (w + 2 * padding - span_w) / stride + 1,
        })
    }

    /// Rows of the column matrix of one image (`c · kh · kw`).
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions of one image (`ho · wo`).
    fn cols(&self) -> usize {
        self.ho * self.wo
    }

    /// For kernel column `j`: the first output column whose input column is inside the
    /// image, one past the last, and the input column of output column 0 (may be
    /// negative).
    fn col_range(&self, j: usize) -> (usize, usize, isize) {
        let off = (j * self.dilation) as isize - self.padding as isize;
        let s = self.stride as isize;
        // ow·s + off >= 0  and  ow·s + off < w
        let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s } as usize;
        let hi_excl = (self.w as isize - off + s - 1) / s;
        let hi = hi_excl.clamp(0, self.wo as isize) as usize;
        (lo.min(hi), hi, off)
    }

    fn row_offset(&self, i: usize) -> isize {
        (i * self.dilation) as isize - self.padding as isize
    }
}

/// Minimum elements per rayon task, so tiny layers do not drown in scheduling.
const MIN_TASK: usize = 1 << 14;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// Fills one row of the column matrix of image plane `src` (`h × w`) for kernel tap
/// `(i, j)`.
fn im2col_row(g: &Geom, src: &[f32], i: usize, j: usize, dst: &mut [f32]) {
    let (lo, hi, off_w) = g.col_range(j);
    let off_h = g.row_offset(i);
    for (oh, out) in dst.chunks_exact_mut(g.wo).enumerate() {
        let ih = (oh * g.stride) as isize + off_h;
        if ih < 0 || ih >= g.h as isize || lo >= hi {
            out.fill(0.0);
            continue;
        }
        let line = &src[ih as usize * g.w..(ih as usize + 1) * g.w];
        out[..lo].fill(0.0);
        out[hi..].fill(0.0);
        let iw0 = (lo as isize * g.stride as isize + off_w) as usize;
        if g.stride == 1 {
            out[lo..hi].copy_from_slice(&line[iw0..iw0 + (hi - lo)]);
        } else {
            for (o, v) in out[lo..hi]
                .iter_mut()
                .zip(line[iw0..].iter().step_by(g.stride))
            {
                *o = *v;
            }
        }
    }
}

/// Adds one row of the column matrix (kernel tap `(i, j)`) back into image plane `dst`.
fn col2im_row(g: &Geom, src: &[f32], i: usize, j: usize, dst: &mut [f32]) {
    let (lo, hi, off_w) = g.col_range(j);
    if lo >= hi {
        return;
    }
    let off_h = g.row_offset(i);
    let iw0 = (lo as isize * g.stride as isize + off_w) as usize;
    for (oh, row) in src.chunks_exact(g.wo).enumerate() {
        let ih = (oh * g.stride) as isize + off_h;
        if ih < 0 || ih >= g.h as isize {
            continue;
        }
        let line = &mut dst[ih as usize * g.w..(ih as usize + 1) * g.w];
        if g.stride == 1 {
            for (o, v) in line[iw0..iw0 + (hi - lo)].iter_mut().zip(&row[lo..hi]) {
                *o += *v;
            }
        } else {
            for (o, v) in line[iw0..].iter_mut().step_by(g.stride).zip(&row[lo..hi]) {
                *o += *v;
            }
        }
    }
}

/// `im2col` of NCHW images: `(N, C, H, W)` → `(N, C·kh·kw, Ho·Wo)`, row
/// `c·kh·kw + i·kw + j` holding input pixel `(c, oh·s + i·d − p, ow·s + j·d − p)` (zero
/// outside the image). Its backward pass is [`Col2Im`].
#[derive(Clone, Copy, Debug)]
pub struct Im2Col(pub Geom);

/// The adjoint of [`Im2Col`]: `(N, C·kh·kw, Ho·Wo)` → `(N, C, H, W)`, every column entry
/// added to the input pixel it was read from. Its backward pass is [`Im2Col`].
#[derive(Clone, Copy, Debug)]
pub struct Col2Im(pub Geom);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ccnet-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(s, l, "im2col")?;
        let plane = g.h * g.w;
        let n = x.len() / (g.c * plane).max(1);
        if l.dims() != [n, g.c, g.h, g.w] {
            candle_core::bail!("im2col: input shape {:?} does not match {g:?}", l.dims());
        }
        let (rows, p) = (g.rows(), g.cols());
        let mut out = vec![0f32; n * rows * p];
        let k2 = g.kh * g.kw;
        out.par_chunks_mut(p)
            .with_min_len((MIN_TASK / p.max(1)).max(1))
            .enumerate()
            .for_each(|(r, dst)| {
                let (img, kr) = (r / rows, r % rows);
                let (c, tap) = (kr / k2, kr % k2);
                let src = &x[(img * g.c + c) * plane..(img * g.c + c + 1) * plane];
                im2col_row(&g, src, tap / g.kw, tap % g.kw, dst);
            });
        Ok((CpuStorage::F32(out), Shape::from((n, rows, p))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "ccnet-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous_f32(s, l, "col2im")?;
        let (rows, p) = (g.rows(), g.cols());
        let n = cols.len() / (rows * p).max(1);
        if l.dims() != [n, rows, p] {
            candle_core::bail!("col2im: input shape {:?} does not match {g:?}", l.dims());
        }
        let plane = g.h * g.w;
        let k2 = g.kh * g.kw;
        let mut out = vec![0f32; n * g.c * plane];
        out.par_chunks_mut(plane)
            .with_min_len((MIN_TASK / (plane * k2).max(1)).max(1))
            .enumerate()
            .for_each(|(nc, dst)| {
                // Plane `nc` = image `nc / c`, channel `nc % c`: its rows are contiguous.
                let base = nc * k2 * p;
                for tap in 0..k2 {
                    let src = &cols[base + tap * p..base + (tap + 1) * p];
                    col2im_row(&g, src, tap / g.kw, tap % g.kw, dst);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, g.c, g.h, g.w))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// `im2col` of `x` `(N, C, H, W)` (differentiable).
pub fn im2col(x: &Tensor, g: Geom) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Im2Col(g))?)
}

/// `col2im` of `cols` `(N, C·kh·kw, Ho·Wo)` into `(N, C, H, W)` (differentiable).
pub fn col2im(cols: &Tensor, g: Geom) -> Result<Tensor> {
    Ok(cols.contiguous()?.apply_op1(Col2Im(g))?)
}

/// 2-D convolution without bias: `x` `(N, Cin, H, W)`, `w` `(Cout, Cin, kh, kw)`.
/// Matches `x.conv2d(w, padding, stride, dilation, 1)`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, wcin, kh, kw) = w.dims4()?;
    if wcin != cin {
        bail!("conv2d: input has {cin} channels, the kernel expects {wcin}");
    }
    let g = Geom::new(cin, h, wd, kh, kw, stride, padding, dilation)?;
    let cols = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        x.reshape((n, cin, h * wd))?
    } else {
        im2col(x, g)?
    };
    let wm = w.reshape((cout, g.rows()))?.broadcast_left(n)?;
    Ok(wm.matmul(&cols)?.reshape((n, cout, g.ho, g.wo))?)
}

/// 2-D transposed convolution without bias (no output padding): `x` `(N, Cin, H, W)`,
/// `w` `(Cin, Cout, kh, kw)`. Matches `x.conv_transpose2d(w, padding, 0, stride,
/// dilation)`.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (wcin, cout, kh, kw) = w.dims4()?;
    if wcin != cin {
        bail!("conv_transpose2d: input has {cin} channels, the kernel expects {wcin}");
    }
    if stride == 0 || dilation == 0 {
        bail!("conv_transpose2d: stride and dilation must be positive");
    }
    let full_h = (h - 1) * stride + dilation * (kh - 1) + 1;
    let full_w = (wd - 1) * stride + dilation * (kw - 1) + 1;
    if full_h <= 2 * padding || full_w <= 2 * padding {
        bail!("conv_transpose2d: padding {padding} leaves an empty output");
    }
    let (ho, wo) = (full_h - 2 * padding, full_w - 2 * padding);
    // The output is the input of a convolution whose output is `x`.
    let g = Geom::new(cout, ho, wo, kh, kw, stride, padding, dilation)?;
    debug_assert_eq!((g.ho, g.wo), (h, wd));
    let wt = w.reshape((cin, g.rows()))?.t()?.broadcast_left(n)?;
    let cols = wt.matmul(&x.reshape((n, cin, h * wd))?)?;
    col2im(&cols, g)
}
