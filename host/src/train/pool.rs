//! Exact CPU max-pooling for training: [`MaxPoolOp`], a candle `CustomOp1` with its own
//! backward pass.
//!
//! candle 0.11's `max_pool2d` backward computes `mask = (x == upsample(y))` and returns
//! `upsample(dy · avg_pool(mask)) · mask`: it *multiplies* the output gradient by the
//! share of maxima in the window, so with one maximum in a 2×2 window the maximum
//! receives `dy / 4` instead of `dy` (and it fails for kernel ≠ stride). [`MaxPoolOp`]
//! routes every output gradient, whole, to the **first** maximal element of its window
//! in row-major order (PyTorch's convention for ties); overlapping windows (kernel >
//! stride) add their gradients where they pick the same element. A NaN in a window is
//! its maximum (the first NaN, as PyTorch propagates NaN), otherwise the forward values
//! equal candle's `max_pool2d_with_stride` exactly.
//!
//! Geometry: kernel `k`, stride `s`, no padding, `Ho = (H − k) / s + 1` (floor, so the
//! last rows / columns that do not fill a window are dropped, as in candle and PyTorch).
//! Inputs are NCHW `f32` on the CPU; both passes run over whole `H × W` planes in
//! parallel with rayon. The backward pass recomputes each window's arg-max from the saved
//! input (no index tensor is kept).
//!
//! [`mode`] decides whether the executor uses it: `CCNET_POOL=exact` / `candle`, else
//! exact exactly when the convolutions are the fast ones (`CCNET_CONV` unset or `fast`),
//! so `CCNET_CONV=candle` and `im2col` keep candle's pool and reproduce earlier runs.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv;
use super::cpu_data::{contiguous_f32, min_items, with_f32};
use super::op_switch::OpSwitch;

/// Which max-pool the executor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// [`MaxPoolOp`]: the whole gradient goes to the first maximum of each window.
    Exact,
    /// candle's `max_pool2d_with_stride` (its gradient is scaled by the share of maxima).
    Candle,
}

/// The max-pool switch: `CCNET_POOL` (`exact`, `candle`).
static SWITCH: OpSwitch = OpSwitch::new("CCNET_POOL", "exact");

/// The max-pool mode: set by [`set_mode`], else from `CCNET_POOL` (`exact`, `candle`),
/// else exact exactly when the convolutions are the fast ones ([`conv::Mode::Fast`]).
pub fn mode() -> Mode {
    if SWITCH.own() {
        Mode::Exact
    } else {
        Mode::Candle
    }
}

/// Selects the max-pool for the whole process (tests and benchmarks compare them);
/// `None` goes back to the environment / convolution-mode default.
pub fn set_mode(m: Option<Mode>) {
    SWITCH.set(m.map(|m| m == Mode::Exact));
}

/// Whether the executor should use [`MaxPoolOp`] for `x` (exact mode, CPU, `f32`).
pub fn use_exact(x: &Tensor) -> bool {
    SWITCH.applies(x)
}

/// Max-pool with kernel `kernel`, stride `stride`, no padding; see the module
/// documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPoolOp {
    pub kernel: usize,
    pub stride: usize,
}

/// Plane geometry of one pool: input rows of `w`, output `ho × wo`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    k: usize,
    s: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl MaxPoolOp {
    fn geom(&self, h: usize, w: usize) -> candle_core::Result<Geom> {
        let (k, s) = (self.kernel, self.stride);
        if k == 0 || s == 0 {
            candle_core::bail!("max pool: kernel and stride must be positive");
        }
        if h < k || w < k {
            candle_core::bail!("max pool: a {k}×{k} kernel does not fit a {h}×{w} input");
        }
        Ok(Geom {
            k,
            s,
            w,
            ho: (h - k) / s + 1,
            wo: (w - k) / s + 1,
        })
    }
}

/// The index (into its `h × w` plane) and value of the first maximum of window
/// `(oh, ow)`; a NaN counts as the maximum (the first one).
#[inline]
fn window_argmax(g: &Geom, plane: &[f32], oh: usize, ow: usize) -> (usize, f32) {
    let (r0, c0) = (oh * g.s, ow * g.s);
    let mut best = r0 * g.w + c0;
    let mut m = plane[best];
    if m.is_nan() {
        return (best, m);
    }
    for r in r0..r0 + g.k {
        let line = &plane[r * g.w + c0..r * g.w + c0 + g.k];
        for (j, &v) in line.iter().enumerate() {
            if v > m || v.is_nan() {
                best = r * g.w + c0 + j;
                m = v;
                if v.is_nan() {
                    return (best, m);
                }
            }
        }
    }
    (best, m)
}

/// Forward pass of one plane.
fn pool_plane(g: &Geom, x: &[f32], y: &mut [f32]) {
    if g.k == 2 && g.s == 2 {
        // U-Net's pool: two input rows per output row.
        for (oh, out) in y.chunks_exact_mut(g.wo).enumerate() {
            let a = &x[2 * oh * g.w..2 * oh * g.w + 2 * g.wo];
            let b = &x[(2 * oh + 1) * g.w..(2 * oh + 1) * g.w + 2 * g.wo];
            for ((o, pa), pb) in out.iter_mut().zip(a.chunks_exact(2)).zip(b.chunks_exact(2)) {
                let v = [pa[0], pa[1], pb[0], pb[1]];
                if v.iter().any(|t| t.is_nan()) {
                    *o = f32::NAN;
                } else {
                    *o = v[0].max(v[1]).max(v[2]).max(v[3]);
                }
            }
        }
        return;
    }
    for (oh, out) in y.chunks_exact_mut(g.wo).enumerate() {
        for (ow, o) in out.iter_mut().enumerate() {
            *o = window_argmax(g, x, oh, ow).1;
        }
    }
}

/// Backward pass of one plane: `dx` (zeroed) receives each `dy` at its window's arg-max.
fn unpool_plane(g: &Geom, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for (oh, row) in dy.chunks_exact(g.wo).enumerate() {
        for (ow, &d) in row.iter().enumerate() {
            dx[window_argmax(g, x, oh, ow).0] += d;
        }
    }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "ccnet-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "max pool: the input")?;
        let &[n, c, h, w] = l.dims() else {
            candle_core::bail!("max pool: input must be (N, C, H, W), got {:?}", l.dims());
        };
        let g = self.geom(h, w)?;
        let (pin, pout) = (h * w, g.ho * g.wo);
        let mut y = vec![0f32; n * c * pout];
        if pout > 0 {
            y.par_chunks_mut(pout)
                .zip(x.par_chunks(pin))
                .with_min_len(min_items(pin))
                .for_each(|(yp, xp)| pool_plane(&g, xp, yp));
        }
        Ok((CpuStorage::F32(y), Shape::from((n, c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let g = self.geom(h, w)?;
        let (pin, pout) = (h * w, g.ho * g.wo);
        let arg = arg.contiguous()?;
        let grad = grad.contiguous()?;
        if grad.dims() != [arg.dim(0)?, arg.dim(1)?, g.ho, g.wo] {
            candle_core::bail!(
                "max pool: gradient {:?} does not match input {:?}",
                grad.dims(),
                arg.dims()
            );
        }
        let mut dx = vec![0f32; arg.elem_count()];
        with_f32(&arg, |x| {
            with_f32(&grad, |dy| {
                if pout == 0 {
                    return;
                }
                dx.par_chunks_mut(pin)
                    .zip(x.par_chunks(pin))
                    .zip(dy.par_chunks(pout))
                    .with_min_len(min_items(pin))
                    .for_each(|((dxp, xp), dyp)| unpool_plane(&g, xp, dyp, dxp));
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// Max-pool of `x` `(N, C, H, W)` with kernel `kernel` and stride `stride`, no padding,
/// as [`MaxPoolOp`] (differentiable; CPU `f32`).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    if !conv::supports(x) {
        bail!("max pool op: CPU f32 tensors only");
    }
    Ok(x.contiguous()?.apply_op1(MaxPoolOp { kernel, stride })?)
}
