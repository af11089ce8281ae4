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
//! when `CCNET_CONV=candle` is set or [`set_mode`]`(Mode::Candle)` was called).

use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use ccnet_device::kernels::{conv2d_f32_fast, ConvGeom, Params};

use super::cpu_data::{contiguous_f32, min_items, with_f32};
use crate::kernels::direct_conv::conv2d_direct;
use crate::kernels::gemm::{self, MatMut, MatRef};
use crate::kernels::stride1::Stride1Conv;
use crate::kernels::weight_grad::conv_weight_grad;

/// Which convolutions the executor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// [`Conv2dOp`] (banded im2col + matmul with its own backward) for convolutions,
    /// matmul + [`Col2Im`] for transposed convolutions: the default.
    Fast,
    /// [`Im2Col`] + candle's matmul differentiated by autograd (stores column matrices).
    Im2col,
    /// candle's own `conv2d` / `conv_transpose2d`.
    Candle,
}

/// 0: not decided yet (read `CCNET_CONV`), else `Mode as u8 + 1`.
static MODE: AtomicU8 = AtomicU8::new(0);

/// The convolution mode: set by [`set_mode`], else from the environment variable
/// `CCNET_CONV` (`candle`, `im2col`; anything else or unset: fast).
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Fast,
        2 => Mode::Im2col,
        3 => Mode::Candle,
        _ => {
            let m = match std::env::var("CCNET_CONV").as_deref() {
                Ok("candle") => Mode::Candle,
                Ok("im2col") => Mode::Im2col,
                _ => Mode::Fast,
            };
            set_mode(m);
            m
        }
    }
}

/// Selects the convolutions for the whole process (benchmarks compare them).
pub fn set_mode(m: Mode) {
    let v = match m {
        Mode::Fast => 1,
        Mode::Im2col => 2,
        Mode::Candle => 3,
    };
    MODE.store(v, Ordering::Relaxed);
}

/// Whether the executor's convolutions use this module's ops.
pub fn enabled() -> bool {
    mode() != Mode::Candle
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

/// Fills one row of the column matrix of image plane `src` (`h × w`) for kernel tap
/// `(i, j)`: output rows `oh0 ..` (as many as `dst` holds).
fn im2col_row(g: &Geom, src: &[f32], i: usize, j: usize, oh0: usize, dst: &mut [f32]) {
    let (lo, hi, off_w) = g.col_range(j);
    let off_h = g.row_offset(i);
    for (r, out) in dst.chunks_exact_mut(g.wo).enumerate() {
        let ih = ((oh0 + r) * g.stride) as isize + off_h;
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

/// Adds one row of the column matrix (kernel tap `(i, j)`, output rows `oh0 ..`) back
/// into image plane `dst`.
fn col2im_row(g: &Geom, src: &[f32], i: usize, j: usize, oh0: usize, dst: &mut [f32]) {
    let (lo, hi, off_w) = g.col_range(j);
    if lo >= hi {
        return;
    }
    let off_h = g.row_offset(i);
    let iw0 = (lo as isize * g.stride as isize + off_w) as usize;
    for (r, row) in src.chunks_exact(g.wo).enumerate() {
        let ih = ((oh0 + r) * g.stride) as isize + off_h;
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
        let x = contiguous_f32(s, l, "im2col: the input")?;
        let plane = g.h * g.w;
        let n = x.len() / (g.c * plane).max(1);
        if l.dims() != [n, g.c, g.h, g.w] {
            candle_core::bail!("im2col: input shape {:?} does not match {g:?}", l.dims());
        }
        let (rows, p) = (g.rows(), g.cols());
        let mut out = vec![0f32; n * rows * p];
        let k2 = g.kh * g.kw;
        out.par_chunks_mut(p)
            .with_min_len(min_items(p))
            .enumerate()
            .for_each(|(r, dst)| {
                let (img, kr) = (r / rows, r % rows);
                let (c, tap) = (kr / k2, kr % k2);
                let src = &x[(img * g.c + c) * plane..(img * g.c + c + 1) * plane];
                im2col_row(&g, src, tap / g.kw, tap % g.kw, 0, dst);
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
        let cols = contiguous_f32(s, l, "col2im: the input")?;
        let (rows, p) = (g.rows(), g.cols());
        let n = cols.len() / (rows * p).max(1);
        if l.dims() != [n, rows, p] {
            candle_core::bail!("col2im: input shape {:?} does not match {g:?}", l.dims());
        }
        let plane = g.h * g.w;
        let k2 = g.kh * g.kw;
        let mut out = vec![0f32; n * g.c * plane];
        out.par_chunks_mut(plane)
            .with_min_len(min_items(plane * k2))
            .enumerate()
            .for_each(|(nc, dst)| {
                // Plane `nc` = image `nc / c`, channel `nc % c`: its rows are contiguous.
                let base = nc * k2 * p;
                for tap in 0..k2 {
                    let src = &cols[base + tap * p..base + (tap + 1) * p];
                    col2im_row(&g, src, tap / g.kw, tap % g.kw, 0, dst);
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
/// Matches `x.conv2d(w, padding, stride, dilation, 1)`. A 1×1 convolution with stride 1
/// and no padding is one matrix product per image; every other one is [`Conv2dOp`].
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if (kh == 1 && kw == 1 && stride == 1 && padding == 0) || mode() == Mode::Im2col {
        conv2d_im2col(x, w, padding, stride, dilation)
    } else {
        conv2d_banded(x, w, padding, stride, dilation)
    }
}

/// The geometry of `conv2d(x, w)` and its output channels; a channel mismatch between
/// the input and the kernel is an error.
fn conv_geom(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<(Geom, usize)> {
    let (_, cin, h, wd) = x.dims4()?;
    let (cout, wcin, kh, kw) = w.dims4()?;
    if wcin != cin {
        bail!("conv2d: input has {cin} channels, the kernel expects {wcin}");
    }
    Ok((
        Geom::new(cin, h, wd, kh, kw, stride, padding, dilation)?,
        cout,
    ))
}

/// 2-D convolution as [`Im2Col`] + candle's batched matmul, differentiated by candle's
/// autograd (stores the whole column matrix for the backward pass).
pub fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (g, cout) = conv_geom(x, w, padding, stride, dilation)?;
    let (n, cin, h, wd) = x.dims4()?;
    let (kh, kw) = (g.kh, g.kw);
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

/// Elements of one band of the column matrix (a few MiB: stays in the allocator's heap
/// and mostly in cache, instead of a fresh image-sized buffer per layer).
const BAND_ELEMS: usize = 1 << 20;

/// Elements of a band: [`BAND_ELEMS`], or `CCNET_CONV_BAND` (for tuning).
fn band_elems() -> usize {
    static BAND: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BAND.get_or_init(|| {
        std::env::var("CCNET_CONV_BAND")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(BAND_ELEMS)
    })
}

/// Output rows per band for a column matrix of `rows` rows.
fn band_rows(g: &Geom) -> usize {
    (band_elems() / (g.rows() * g.wo).max(1)).clamp(1, g.ho)
}

/// Fills `out` (at least `(C·kh·kw) × (nr·Wo)` elements, row-major; every element is
/// written) with the column matrix of output rows `oh0 .. oh0 + nr` of image `img` of
/// `x` (`(N, C, H, W)` contiguous).
fn im2col_band(g: &Geom, x: &[f32], img: usize, oh0: usize, nr: usize, out: &mut [f32]) {
    let plane = g.h * g.w;
    let t = nr * g.wo;
    let k2 = g.kh * g.kw;
    out[..g.rows() * t]
        .par_chunks_mut(t)
        .with_min_len(min_items(t))
        .enumerate()
        .for_each(|(kr, dst)| {
            let (c, tap) = (kr / k2, kr % k2);
            let src = &x[(img * g.c + c) * plane..(img * g.c + c + 1) * plane];
            im2col_row(g, src, tap / g.kw, tap % g.kw, oh0, dst);
        });
}

/// Adds the column matrix `cols` of output rows `oh0 .. oh0 + nr` back into image `dx`
/// (`(C, H, W)`).
fn col2im_band(g: &Geom, cols: &[f32], oh0: usize, nr: usize, dx: &mut [f32]) {
    let plane = g.h * g.w;
    let t = nr * g.wo;
    let k2 = g.kh * g.kw;
    dx.par_chunks_mut(plane)
        .with_min_len(min_items(t * k2))
        .enumerate()
        .for_each(|(c, dst)| {
            for tap in 0..k2 {
                let r = c * k2 + tap;
                col2im_row(
                    g,
                    &cols[r * t..(r + 1) * t],
                    tap / g.kw,
                    tap % g.kw,
                    oh0,
                    dst,
                );
            }
        });
}

/// Whether [`Conv2dOp`] computes the forward pass, the input gradient and the weight
/// gradient directly instead of through column matrices: square kernels, stride 1, no
/// dilation. The forward pass and the input gradient use
/// [`crate::kernels::direct_conv`] where the CPU has AVX2 and FMA (else the device
/// engine's panel kernels), the weight gradient [`crate::kernels::weight_grad`] (else
/// column matrices). Only for planes of at least [`DIRECT_MIN_PIXELS`] output pixels: on
/// smaller planes (8 × 8 and below) the column-matrix products are faster.
fn direct(g: &Geom) -> bool {
    g.stride == 1
        && g.dilation == 1
        && g.kh == g.kw
        && g.padding < g.kh
        && g.ho * g.wo >= direct_min_pixels()
}

/// Output pixels per plane from which [`Conv2dOp`] uses the direct kernels.
const DIRECT_MIN_PIXELS: usize = 32 * 32;

/// [`DIRECT_MIN_PIXELS`], or `CCNET_CONV_DIRECT_MIN` (for tuning; a huge value turns the
/// direct kernels off).
fn direct_min_pixels() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("CCNET_CONV_DIRECT_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DIRECT_MIN_PIXELS)
    })
}

/// The device engine's geometry of a stride-1 convolution `cin → cout` over `h × w`
/// planes with a `k × k` kernel and zero padding `pad`.
fn stride1_geom(
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    k: usize,
    pad: usize,
) -> candle_core::Result<ConvGeom> {
    ConvGeom::conv(cin, cout, h, w, k, 1, pad, 1).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "conv: no output for {cin}→{cout} {h}×{w} k{k} p{pad}"
        ))
    })
}

/// The direct convolution `y = conv(x, w)` of a batch (`x` `(n, cin, h, w)`, `w`
/// `[cout, cin, k, k]`, stride 1, zero padding `pad`): the host's fused-multiply-add
/// kernel where the CPU has AVX2 and FMA, else the device engine's panel kernel, one
/// image per rayon task.
#[allow(clippy::too_many_arguments)]
fn direct_conv(
    n: usize,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    k: usize,
    pad: usize,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
) -> candle_core::Result<()> {
    let hg = Stride1Conv {
        cin,
        cout,
        h,
        w,
        k,
        pad,
    };
    if conv2d_direct(&hg, n, x, wt, y) {
        return Ok(());
    }
    let dg = stride1_geom(cin, cout, (h, w), k, pad)?;
    let wb: &[u8] = bytemuck::cast_slice(wt);
    let (in_image, out_image) = (cin * h * w, y.len() / n.max(1));
    y.par_chunks_mut(out_image.max(1))
        .zip(x.par_chunks(in_image.max(1)))
        .try_for_each(|(yi, xi)| {
            conv2d_f32_fast(&dg, xi, Params::F32(wb), None, false, yi)
                .map_err(|_| candle_core::Error::Msg(format!("conv: buffers do not match {dg:?}")))
        })
}

/// The weights of the input-gradient convolution of a stride-1 convolution:
/// `w̃[ci][co][ky][kx] = w[co][ci][k−1−ky][k−1−kx]` (`[cin, cout, k, k]`).
fn flip_transpose(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let k2 = k * k;
    let mut out = vec![0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            let src = &w[(co * cin + ci) * k2..(co * cin + ci + 1) * k2];
            let dst = &mut out[(ci * cout + co) * k2..(ci * cout + co + 1) * k2];
            for (t, d) in dst.iter_mut().enumerate() {
                *d = src[k2 - 1 - t];
            }
        }
    }
    out
}

/// Whether [`Conv2dOp`] runs its images in parallel (one per rayon task, each product
/// single-threaded) rather than in turn with multithreaded products: when there are at
/// least as many images as threads.
fn images_in_parallel(n: usize) -> bool {
    n >= rayon::current_num_threads()
}

/// `dst (+)= lhs · rhs`, single-threaded when the caller already runs in parallel.
fn product(serial: bool, dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, acc: bool) {
    if serial {
        gemm::matmul_serial(dst, lhs, rhs, acc);
    } else {
        gemm::matmul(dst, lhs, rhs, acc);
    }
}

/// `conv2d` without bias as one op with its own backward pass: the column matrix is
/// built band by band (a few output rows of one image at a time) and never stored, so
/// autograd keeps only `x` and `W`; forward `Y_band = W · cols_band`, backward
/// `dW += dY_band · cols_bandᵀ` and `dX += col2im(Wᵀ · dY_band)`. The products are
/// [`gemm::matmul`] calls on views: `Y_band` is written in place, `dY_band` read in
/// place and `dW` accumulated in place, with one column buffer reused for every band.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOp {
    pub g: Geom,
    pub cout: usize,
}

impl Conv2dOp {
    fn bands(&self) -> impl Iterator<Item = (usize, usize)> {
        let (ho, br) = (self.g.ho, band_rows(&self.g));
        (0..ho).step_by(br).map(move |r0| (r0, br.min(ho - r0)))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ccnet-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, cout) = (self.g, self.cout);
        let x = contiguous_f32(s1, l1, "conv2d: the input")?;
        let w = contiguous_f32(s2, l2, "conv2d: the weights")?;
        let n = l1.dims()[0];
        if l1.dims() != [n, g.c, g.h, g.w] || w.len() != cout * g.rows() {
            candle_core::bail!(
                "conv2d: shapes {:?} {:?} do not match {g:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let p = g.cols();
        let k = g.rows();
        let mut y = vec![0f32; n * cout * p];
        if direct(&g) && p > 0 {
            direct_conv(n, g.c, cout, (g.h, g.w), g.kh, g.padding, x, w, &mut y)?;
            return Ok((CpuStorage::F32(y), Shape::from((n, cout, g.ho, g.wo))));
        }
        let wm = MatRef::row_major(w, cout, k);
        // One image per rayon task with single-threaded products when there are enough
        // images (as in the backward pass), else multithreaded products.
        let by_image = images_in_parallel(n);
        let image = |img: usize, yi: &mut [f32]| {
            let mut cols = vec![0f32; k * band_rows(&g) * g.wo];
            for (r0, nr) in self.bands() {
                let t = nr * g.wo;
                im2col_band(&g, x, img, r0, nr, &mut cols);
                // Y[:, band] = W · cols, written in place (row stride P).
                let dst = MatMut::new(&mut yi[r0 * g.wo..], cout, t, p, 1);
                let rhs = MatRef::row_major(&cols[..k * t], k, t);
                product(by_image, dst, wm, rhs, false);
            }
        };
        if by_image {
            y.par_chunks_mut(cout * p.max(1))
                .enumerate()
                .for_each(|(img, yi)| image(img, yi));
        } else {
            for (img, yi) in y.chunks_mut(cout * p.max(1)).enumerate() {
                image(img, yi);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, cout) = (self.g, self.cout);
        let n = x.dim(0)?;
        let p = g.cols();
        let k = g.rows();
        let x = x.contiguous()?;
        let grad = grad.contiguous()?;
        let w = w.contiguous()?;
        let want_dx = x.track_op();
        let mut dx = vec![0f32; if want_dx { x.elem_count() } else { 0 }];
        let band = band_rows(&g) * g.wo;
        let plane_in = g.c * g.h * g.w;
        // The input gradient of a stride-1 convolution is a convolution of dY with the
        // flipped, transposed kernel and padding k − 1 − p: computed directly, per image.
        let dx_direct = want_dx && direct(&g) && p > 0;
        if dx_direct {
            with_f32(&grad, |gr| {
                with_f32(&w, |ws| {
                    let wt = flip_transpose(ws, cout, g.c, g.kh);
                    let pad = g.kh - 1 - g.padding;
                    direct_conv(n, cout, g.c, (g.ho, g.wo), g.kh, pad, gr, &wt, &mut dx)
                })
            })???;
        }
        let want_cols_dx = want_dx && !dx_direct;
        // On the same planes the weight gradient is computed directly (no column
        // matrix) where the CPU and kernel width have an instance.
        let mut dw_direct = None;
        if direct(&g) && p > 0 {
            let wg = Stride1Conv {
                cin: g.c,
                cout,
                h: g.h,
                w: g.w,
                k: g.kh,
                pad: g.padding,
            };
            let mut dw = vec![0f32; cout * k];
            let done = with_f32(&x, |xs| {
                with_f32(&grad, |gr| conv_weight_grad(&wg, n, xs, gr, &mut dw))
            })??;
            dw_direct = done.then_some(dw);
        }
        let want_cols_dw = dw_direct.is_none();
        // The column-matrix route for what is left. One image per rayon task, with
        // single-threaded products: the weight-gradient product is long and thin (K =
        // pixels of a band, M × N = Cout × C·k²), which the GEMM cannot split across
        // threads. Each image's dW part is accumulated band by band in place and the
        // parts are summed in image order (the same result for any thread count). With
        // fewer images than threads the images run in turn and the products use the
        // threads.
        let by_image = images_in_parallel(n);
        let parts: Vec<Vec<f32>> = if want_cols_dx || want_cols_dw {
            with_f32(&x, |xs| {
                with_f32(&grad, |gr| {
                    with_f32(&w, |ws| {
                        let wm = MatRef::row_major(ws, cout, k);
                        let image = |img: usize, mut dxi: Option<&mut [f32]>| -> Vec<f32> {
                            let mut dw = vec![0f32; if want_cols_dw { cout * k } else { 0 }];
                            let mut cols = vec![0f32; if want_cols_dw { k * band } else { 0 }];
                            let mut dcols = vec![0f32; if dxi.is_some() { k * band } else { 0 }];
                            let gi = &gr[img * cout * p..(img + 1) * cout * p];
                            for (i, (r0, nr)) in self.bands().enumerate() {
                                let t = nr * g.wo;
                                // dY of this band, read in place: (Cout, t), row stride P.
                                let gy = MatRef::new(&gi[r0 * g.wo..], cout, t, p, 1);
                                if want_cols_dw {
                                    im2col_band(&g, xs, img, r0, nr, &mut cols);
                                    let cm = MatRef::row_major(&cols[..k * t], k, t);
                                    // dW += dY_band · cols_bandᵀ.
                                    let dst = MatMut::row_major(&mut dw, cout, k);
                                    product(by_image, dst, gy, cm.t(), i > 0);
                                }
                                if let Some(dxi) = dxi.as_deref_mut() {
                                    // dcols = Wᵀ · dY_band, then scattered back into dX.
                                    let dc = &mut dcols[..k * t];
                                    let dst = MatMut::row_major(dc, k, t);
                                    product(by_image, dst, wm.t(), gy, false);
                                    col2im_band(&g, dc, r0, nr, dxi);
                                }
                            }
                            dw
                        };
                        match (want_cols_dx, by_image) {
                            (true, true) => dx
                                .par_chunks_mut(plane_in)
                                .enumerate()
                                .map(|(img, dxi)| image(img, Some(dxi)))
                                .collect(),
                            (true, false) => dx
                                .chunks_mut(plane_in)
                                .enumerate()
                                .map(|(img, dxi)| image(img, Some(dxi)))
                                .collect(),
                            (false, true) => {
                                (0..n).into_par_iter().map(|img| image(img, None)).collect()
                            }
                            (false, false) => (0..n).map(|img| image(img, None)).collect(),
                        }
                    })
                })
            })???
        } else {
            Vec::new()
        };
        let dw = match dw_direct {
            Some(dw) => dw,
            None => {
                let mut dw = vec![0f32; cout * k];
                for part in &parts {
                    for (d, v) in dw.iter_mut().zip(part) {
                        *d += v;
                    }
                }
                dw
            }
        };
        let dx = if want_dx {
            Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?)
        } else {
            None
        };
        Ok((dx, Some(Tensor::from_vec(dw, w.shape(), &Device::Cpu)?)))
    }
}

/// [`conv2d`] computed by [`Conv2dOp`] (banded, column matrices never stored).
pub fn conv2d_banded(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let op = conv2d_op(x, w, padding, stride, dilation)?;
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// The [`Conv2dOp`] of `conv2d(x, w)` (no bias); a channel mismatch or a kernel that
/// does not fit is an error.
pub fn conv2d_op(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Conv2dOp> {
    let (g, cout) = conv_geom(x, w, padding, stride, dilation)?;
    Ok(Conv2dOp { g, cout })
}

/// Per-channel bias addition `y + b` on `(y, b)`, `y` `(N, C, H, W)`, `b` `[C]`, with its
/// own backward pass: `dy` passes through, `db` is the per-channel sum of `dy` over
/// `(N, H, W)`, computed plane by plane in parallel (candle's broadcast backward reduces
/// over the non-trailing dimensions with a single-threaded strided fold).
#[derive(Clone, Copy, Debug)]
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "ccnet-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "bias add: the input")?;
        let b = contiguous_f32(s2, l2, "bias add: the bias")?;
        let &[n, c, h, w] = l1.dims() else {
            candle_core::bail!("bias add: y must be (N, C, H, W), got {:?}", l1.dims());
        };
        if b.len() != c {
            candle_core::bail!("bias add: {c} channels but bias {:?}", l2.dims());
        }
        let plane = h * w;
        let mut out = vec![0f32; y.len()];
        if plane > 0 {
            out.par_chunks_mut(plane)
                .zip(y.par_chunks(plane))
                .with_min_len(min_items(plane))
                .enumerate()
                .for_each(|(i, (o, src))| {
                    let bv = b[i % c];
                    for (d, &v) in o.iter_mut().zip(src) {
                        *d = v + bv;
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, c, h, w) = grad.dims4()?;
        let plane = h * w;
        let grad = grad.contiguous()?;
        let parts: Vec<f64> = with_f32(&grad, |g| {
            if plane == 0 {
                return Vec::new();
            }
            g.par_chunks(plane)
                .with_min_len(min_items(plane))
                .map(|p| {
                    let mut acc = [0f64; 8];
                    let chunks = p.chunks_exact(8);
                    for (k, &v) in chunks.remainder().iter().enumerate() {
                        acc[k] += f64::from(v);
                    }
                    for ch in chunks {
                        for k in 0..8 {
                            acc[k] += f64::from(ch[k]);
                        }
                    }
                    acc.iter().sum()
                })
                .collect()
        })?;
        let mut db = vec![0f64; c];
        for (i, v) in parts.iter().enumerate() {
            db[i % c] += v;
        }
        let db: Vec<f32> = db.iter().map(|&v| v as f32).collect();
        let db = Tensor::from_vec(db, b.shape(), &Device::Cpu)?;
        Ok((Some(grad), Some(db)))
    }
}

/// `y + b` per channel (`y` `(N, C, H, W)`, `b` `[C]`) as [`BiasAdd`].
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?)
}

/// Transposed convolution with kernel = stride `s` and no padding (U-Net's 2×2/2
/// up-convolutions) on `(x, W)`, `x` `(N, Cin, H, W)`, `W` `(Cin, Cout, s, s)`: every
/// input pixel writes its own `s × s` output block,
/// `y[n, o, h·s+i, w·s+j] = Σ_c x[n, c, h, w] · W[c, o, i, j]`. Forward: one batched
/// matmul `Z_n = W_mᵀ · X_n` (`W_m` = `W` as `Cin × Cout·s²`, `X_n` = image `n` as
/// `Cin × H·W`) and a scatter of `Z_n`'s rows into the output planes; backward: the
/// inverse gather `G_n` of `dY`, then `dX_n = W_m · G_n` and `dW_m = Σ_n X_n · G_nᵀ`
/// (instead of candle's permutes and copies around one matmul and their backward).
#[derive(Clone, Copy, Debug)]
pub struct UpConvOp {
    pub stride: usize,
}

/// Rows `i·s + j` of `rows` (`s² × (H·W)`: one output channel of one image) scattered
/// into its `(H·s) × (W·s)` output plane.
pub(crate) fn shuffle_scatter(s: usize, h: usize, w: usize, rows: &[f32], plane: &mut [f32]) {
    let (wo, hw) = (w * s, h * w);
    for i in 0..s {
        for j in 0..s {
            let r = &rows[(i * s + j) * hw..(i * s + j + 1) * hw];
            for hh in 0..h {
                let line = &mut plane[(hh * s + i) * wo..(hh * s + i + 1) * wo];
                for (d, &v) in line[j..]
                    .iter_mut()
                    .step_by(s)
                    .zip(&r[hh * w..(hh + 1) * w])
                {
                    *d = v;
                }
            }
        }
    }
}

/// The adjoint (and inverse) of [`shuffle_scatter`]: an output plane gathered back into
/// `s²` rows of `H·W`.
pub(crate) fn shuffle_gather(s: usize, h: usize, w: usize, plane: &[f32], rows: &mut [f32]) {
    let (wo, hw) = (w * s, h * w);
    for i in 0..s {
        for j in 0..s {
            let r = &mut rows[(i * s + j) * hw..(i * s + j + 1) * hw];
            for hh in 0..h {
                let line = &plane[(hh * s + i) * wo..(hh * s + i + 1) * wo];
                for (d, &v) in r[hh * w..(hh + 1) * w]
                    .iter_mut()
                    .zip(line[j..].iter().step_by(s))
                {
                    *d = v;
                }
            }
        }
    }
}

impl CustomOp2 for UpConvOp {
    fn name(&self) -> &'static str {
        "ccnet-upconv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.stride;
        let x = contiguous_f32(s1, l1, "upconv: the input")?;
        let wv = contiguous_f32(s2, l2, "upconv: the weights")?;
        let (&[n, cin, h, w], &[wcin, cout, kh, kw]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!("upconv: shapes {:?} {:?}", l1.dims(), l2.dims());
        };
        if wcin != cin || kh != s || kw != s || s == 0 {
            candle_core::bail!("upconv: shapes {:?} {:?}, stride {s}", l1.dims(), l2.dims());
        }
        let hw = h * w;
        let z = upconv_rows(x, wv, (n, cin, hw), cout * s * s)?;
        let plane = hw * s * s;
        let mut y = vec![0f32; n * cout * plane];
        with_f32(&z, |z| {
            y.par_chunks_mut(plane)
                .with_min_len(min_items(plane))
                .enumerate()
                .for_each(|(idx, dst)| {
                    // Plane `idx` = image `idx / cout`, channel `idx % cout`: rows
                    // `idx·s² ..` of the batched `Z`.
                    shuffle_scatter(s, h, w, &z[idx * s * s * hw..(idx + 1) * s * s * hw], dst);
                })
        })?;
        Ok((CpuStorage::F32(y), Shape::from((n, cout, h * s, w * s))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let s = self.stride;
        let (n, _, h, w) = x.dims4()?;
        let cout = wt.dim(1)?;
        let (hw, k, plane) = (h * w, cout * s * s, h * w * s * s);
        let grad = grad.contiguous()?;
        let mut g = vec![0f32; n * k * hw];
        with_f32(&grad, |gr| {
            g.par_chunks_mut(s * s * hw)
                .with_min_len(min_items(plane))
                .enumerate()
                .for_each(|(idx, dst)| {
                    shuffle_gather(s, h, w, &gr[idx * plane..(idx + 1) * plane], dst);
                })
        })?;
        let (dx, dw) = upconv_grads(x, wt, g, s)?;
        Ok((dx, Some(dw)))
    }
}

/// The product of an up-convolution with kernel = stride `s`: `Z = Wᵀ · X` per image,
/// `x` `(n, cin, hw)`, `wv` `[cin, k]` with `k = cout·s²` (rows `co·s² + i·s + j`),
/// `Z` `(n, k, hw)`; [`shuffle_scatter`] turns each channel's `s²` rows into its plane.
pub(crate) fn upconv_rows(
    x: &[f32],
    wv: &[f32],
    (n, cin, hw): (usize, usize, usize),
    k: usize,
) -> candle_core::Result<Tensor> {
    let xm = Tensor::from_slice(x, (n, cin, hw), &Device::Cpu)?;
    let wm = Tensor::from_slice(wv, (cin, k), &Device::Cpu)?;
    wm.t()?.broadcast_left(n)?.matmul(&xm)
}

/// The gradients of an up-convolution with kernel = stride `s` (`x` `(n, cin, h, w)`,
/// `wt` `(cin, cout, s, s)`) from `g` `(n, cout·s², h·w)`, the output gradient gathered
/// by [`shuffle_gather`]: `dX = W · G` (when `x` needs it) and `dW = Σ X · Gᵀ`.
pub(crate) fn upconv_grads(
    x: &Tensor,
    wt: &Tensor,
    g: Vec<f32>,
    s: usize,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let (n, cin, h, w) = x.dims4()?;
    let cout = wt.dim(1)?;
    let (hw, k) = (h * w, cout * s * s);
    let g = Tensor::from_vec(g, (n, k, hw), &Device::Cpu)?;
    let wm = wt.reshape((cin, k))?;
    let xm = x.reshape((n, cin, hw))?;
    let dx = if x.track_op() {
        Some(wm.broadcast_left(n)?.matmul(&g)?.reshape((n, cin, h, w))?)
    } else {
        None
    };
    let dw = xm
        .matmul(&g.transpose(1, 2)?)?
        .sum(0)?
        .reshape((cin, cout, s, s))?;
    Ok((dx, dw))
}

/// [`UpConvOp`]: `conv_transpose2d` with kernel = stride, no padding, no bias.
pub fn upconv(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, UpConvOp { stride })?)
}
