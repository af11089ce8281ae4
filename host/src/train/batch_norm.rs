//! Fused CPU batch normalisation (optionally followed by ReLU) for training and inference.
//!
//! [`BatchNormOp`] is a candle `CustomOp3` on `(x, gamma, beta)` with `x` an NCHW `f32`
//! tensor and `gamma`, `beta` of shape `[C]`. In training mode its forward pass computes
//! the per-channel batch mean and biased variance over `(N, H, W)` in one pass (sums of
//! `x − K` and `(x − K)²` accumulated in `f64`, `K` the channel's first value, so a large
//! mean does not cancel the variance), then writes
//! `y = (x − mean) · (γ / √(var + ε)) + β` (and `max(y, 0)` with `relu`) in a second pass.
//! Its backward pass is the closed form with `x̂ = (x − mean) / √(var + ε)` and
//! `g = dy` (masked by `y ≥ 0` with `relu`, recomputed from `x`, as candle's ReLU
//! gradient does):
//!
//! * `dβ = Σ g`, `dγ = Σ g · x̂` (sums over `N, H, W`);
//! * `dx = γ / √(var + ε) · (g − dβ / M − x̂ · dγ / M)`, `M = N·H·W`.
//!
//! With fixed statistics (inference, `train == false`) the mean and variance are
//! constants, so `dx = γ / √(var + ε) · g`.
//!
//! Every pass runs over whole contiguous `H × W` planes in parallel with rayon; the
//! per-plane partial sums are reduced per channel in a fixed order, so results do not
//! depend on the thread count. The batch statistics of a training-mode call are handed
//! back to the caller (for the running averages) and kept for the backward pass.
//!
//! [`composed_train`] / [`composed_eval`] are the same computations written with candle
//! tensor ops (the executor's previous batch norm, differentiated by candle's autograd);
//! `CCNET_BN=candle` (or [`set_mode`]`(Some(Mode::Candle))`) makes the executor use them
//! (and candle's broadcast add for biases instead of [`super::conv::BiasAdd`]: the mode
//! covers all of the executor's fused element-wise ops).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_data::{contiguous_f32, min_items, with_f32};
use super::op_switch::OpSwitch;

/// Which batch norm the executor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// [`BatchNormOp`], with the following ReLU fused in when it is the only reader, and
    /// [`super::conv::BiasAdd`] for biases.
    Fused,
    /// candle tensor ops ([`composed_train`], [`composed_eval`]), candle's ReLU and
    /// broadcast bias add.
    Candle,
}

/// The batch-norm switch: `CCNET_BN` (`fused`, `candle`).
static SWITCH: OpSwitch = OpSwitch::new("CCNET_BN", "fused");

/// The batch-norm mode: set by [`set_mode`], else from `CCNET_BN` (`fused`, `candle`),
/// else fused exactly when the convolutions are the fast ones (`CCNET_CONV` unset or
/// `fast`; `CCNET_CONV=candle` and `im2col` keep candle's batch norm, so those modes
/// measure what they did before).
pub fn mode() -> Mode {
    if SWITCH.own() {
        Mode::Fused
    } else {
        Mode::Candle
    }
}

/// Selects the batch norm for the whole process (benchmarks and tests compare them);
/// `None` goes back to the environment / convolution-mode default.
pub fn set_mode(m: Option<Mode>) {
    SWITCH.set(m.map(|m| m == Mode::Fused));
}

/// Whether the executor should use [`BatchNormOp`] for `x` (fused mode, CPU, `f32`).
pub fn use_fused(x: &Tensor) -> bool {
    SWITCH.applies(x)
}

/// Per-channel statistics of one call: the mean, the biased variance (training: of the
/// batch; inference: the running statistics) and `1 / √(var + ε)`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub inv_std: Vec<f32>,
}

/// Fused batch norm (+ ReLU) on `(x, gamma, beta)`; see the module documentation.
#[derive(Clone, Debug)]
pub struct BatchNormOp {
    /// Batch statistics (`true`) or the fixed ones in `stats` (`false`).
    pub train: bool,
    /// Apply `max(·, 0)` to the output (and mask the gradient).
    pub relu: bool,
    pub eps: f32,
    /// Training: filled by the forward pass. Inference: the running statistics.
    pub stats: Arc<Mutex<Stats>>,
}

/// `Σ (x − k)` and `Σ (x − k)²` over one plane, in `f64`.
fn plane_sums(p: &[f32], k: f32) -> (f64, f64) {
    const L: usize = 8;
    let (mut s1, mut s2) = ([0f64; L], [0f64; L]);
    let chunks = p.chunks_exact(L);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..L {
            let d = f64::from(ch[i] - k);
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        let d = f64::from(v - k);
        s1[i] += d;
        s2[i] += d * d;
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// `Σ g` and `Σ g · x̂` over one plane (`g` = `dy`, zero where the pre-ReLU value is
/// negative when `relu`), in `f64`.
#[inline]
fn bwd_plane_sums(
    xp: &[f32],
    gp: &[f32],
    mu: f32,
    is: f32,
    sc: f32,
    b: f32,
    relu: bool,
) -> (f64, f64) {
    const L: usize = 8;
    let (mut s1, mut s2) = ([0f64; L], [0f64; L]);
    let mut one = |k: usize, xv: f32, gv: f32| {
        let g = if relu && affine(xv, mu, sc, b) < 0.0 {
            0.0
        } else {
            gv
        };
        s1[k] += f64::from(g);
        s2[k] += f64::from(g * ((xv - mu) * is));
    };
    let xc = xp.chunks_exact(L);
    let gc = gp.chunks_exact(L);
    let (xr, gr) = (xc.remainder(), gc.remainder());
    for (xs, gs) in xc.zip(gc) {
        for k in 0..L {
            one(k, xs[k], gs[k]);
        }
    }
    for (k, (&xv, &gv)) in xr.iter().zip(gr).enumerate() {
        one(k, xv, gv);
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// The normalised value before ReLU, written once so forward and backward agree bit for
/// bit (the backward pass recomputes it for the ReLU mask).
#[inline(always)]
fn affine(x: f32, mean: f32, scale: f32, beta: f32) -> f32 {
    (x - mean) * scale + beta
}

/// Sums per channel of per-plane partial results (plane `i` = image `i / c`, channel
/// `i % c`), in image order.
fn reduce_channels(parts: &[(f64, f64)], c: usize) -> Vec<(f64, f64)> {
    let mut out = vec![(0f64, 0f64); c];
    for (i, &(a, b)) in parts.iter().enumerate() {
        out[i % c].0 += a;
        out[i % c].1 += b;
    }
    out
}

/// `x`, `gamma`, `beta` as slices and the dimensions of `x`.
type Checked<'a> = (&'a [f32], &'a [f32], &'a [f32], [usize; 4]);

impl BatchNormOp {
    fn check<'a>(
        &self,
        s1: &'a CpuStorage,
        l1: &Layout,
        s2: &'a CpuStorage,
        l2: &Layout,
        s3: &'a CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<Checked<'a>> {
        let x = contiguous_f32(s1, l1, "batch norm: x")?;
        let gamma = contiguous_f32(s2, l2, "batch norm: gamma")?;
        let beta = contiguous_f32(s3, l3, "batch norm: beta")?;
        let &[n, c, h, w] = l1.dims() else {
            candle_core::bail!("batch norm: x must be (N, C, H, W), got {:?}", l1.dims());
        };
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "batch norm: {c} channels but gamma {:?}, beta {:?}",
                l2.dims(),
                l3.dims()
            );
        }
        if n * h * w == 0 {
            candle_core::bail!("batch norm: empty input {:?}", l1.dims());
        }
        Ok((x, gamma, beta, [n, c, h, w]))
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "ccnet-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gamma, beta, [n, c, h, w]) = self.check(s1, l1, s2, l2, s3, l3)?;
        let plane = h * w;
        let mut stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch norm: poisoned statistics".into()))?;
        if self.train {
            let shift: Vec<f32> = (0..c).map(|ch| x[ch * plane]).collect();
            let parts: Vec<(f64, f64)> = x
                .par_chunks(plane)
                .with_min_len(min_items(plane))
                .enumerate()
                .map(|(i, p)| plane_sums(p, shift[i % c]))
                .collect();
            let m = (n * plane) as f64;
            let sums = reduce_channels(&parts, c);
            stats.mean = Vec::with_capacity(c);
            stats.var = Vec::with_capacity(c);
            stats.inv_std = Vec::with_capacity(c);
            for (ch, &(s1, s2)) in sums.iter().enumerate() {
                let d = s1 / m;
                let var = (s2 / m - d * d).max(0.0);
                stats.mean.push((f64::from(shift[ch]) + d) as f32);
                stats.var.push(var as f32);
                stats
                    .inv_std
                    .push((1.0 / (var + f64::from(self.eps)).sqrt()) as f32);
            }
        } else if stats.mean.len() != c || stats.inv_std.len() != c {
            candle_core::bail!("batch norm: running statistics do not have {c} channels");
        }
        let scale: Vec<f32> = (0..c).map(|ch| stats.inv_std[ch] * gamma[ch]).collect();
        let mean = &stats.mean;
        let mut y = vec![0f32; x.len()];
        let relu = self.relu;
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .with_min_len(min_items(plane))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let ch = i % c;
                let (mu, sc, b) = (mean[ch], scale[ch], beta[ch]);
                if relu {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        *o = affine(v, mu, sc, b).max(0.0);
                    }
                } else {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        *o = affine(v, mu, sc, b);
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, c, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, gamma, beta, grad, x.track_op())
    }
}

impl BatchNormOp {
    /// The backward pass: the gradients of `x` (when `want_dx`), `gamma` and `beta` for
    /// the output gradient `grad`, with the statistics of the forward pass.
    pub(super) fn grads(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        grad: &Tensor,
        want_dx: bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let plane = h * w;
        let x = x.contiguous()?;
        let grad = grad.contiguous()?;
        let gamma_v = gamma.flatten_all()?.to_vec1::<f32>()?;
        let beta_v = beta.flatten_all()?.to_vec1::<f32>()?;
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch norm: poisoned statistics".into()))?
            .clone();
        if stats.mean.len() != c {
            candle_core::bail!("batch norm: backward pass without forward statistics");
        }
        let scale: Vec<f32> = (0..c).map(|ch| stats.inv_std[ch] * gamma_v[ch]).collect();
        let relu = self.relu;
        let (mean, inv_std) = (&stats.mean, &stats.inv_std);
        // Pass 1: Σ g and Σ g·x̂ per plane.
        let parts: Vec<(f64, f64)> = with_f32(&x, |xs| {
            with_f32(&grad, |gs| {
                xs.par_chunks(plane)
                    .zip(gs.par_chunks(plane))
                    .with_min_len(min_items(plane))
                    .enumerate()
                    .map(|(i, (xp, gp))| {
                        let ch = i % c;
                        bwd_plane_sums(xp, gp, mean[ch], inv_std[ch], scale[ch], beta_v[ch], relu)
                    })
                    .collect()
            })
        })??;
        let sums = reduce_channels(&parts, c);
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let m = (n * plane) as f64;
        let (m1, m2): (Vec<f32>, Vec<f32>) = if self.train {
            sums.iter()
                .map(|&(a, b)| ((a / m) as f32, (b / m) as f32))
                .unzip()
        } else {
            (vec![0.0; c], vec![0.0; c])
        };
        // Pass 2: dx.
        let dx = if want_dx {
            let mut dx = vec![0f32; x.elem_count()];
            with_f32(&x, |xs| {
                with_f32(&grad, |gs| {
                    dx.par_chunks_mut(plane)
                        .zip(xs.par_chunks(plane).zip(gs.par_chunks(plane)))
                        .with_min_len(min_items(plane))
                        .enumerate()
                        .for_each(|(i, (dp, (xp, gp)))| {
                            let ch = i % c;
                            let (mu, is, sc, b) = (mean[ch], inv_std[ch], scale[ch], beta_v[ch]);
                            let (a1, a2) = (m1[ch], m2[ch]);
                            for ((o, &xv), &gv) in dp.iter_mut().zip(xp).zip(gp) {
                                let g = if relu && affine(xv, mu, sc, b) < 0.0 {
                                    0.0
                                } else {
                                    gv
                                };
                                *o = sc * (g - a1 - (xv - mu) * is * a2);
                            }
                        })
                })
            })??;
            Some(Tensor::from_vec(dx, (n, c, h, w), &Device::Cpu)?)
        } else {
            None
        };
        let dgamma = Tensor::from_vec(dgamma, gamma.shape(), &Device::Cpu)?;
        let dbeta = Tensor::from_vec(dbeta, beta.shape(), &Device::Cpu)?;
        Ok((dx, Some(dgamma), Some(dbeta)))
    }
}

fn check_vec(t: &Tensor, c: usize, what: &str) -> Result<()> {
    if t.dims() != [c] {
        bail!(
            "batch norm: {what} has shape {:?}, expected [{c}]",
            t.dims()
        );
    }
    Ok(())
}

/// Training-mode fused batch norm of `x` `(N, C, H, W)` with `gamma`, `beta` `[C]`
/// (and ReLU when `relu`): the output and the batch statistics (mean, biased variance).
pub fn fused_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    relu: bool,
) -> Result<(Tensor, Stats)> {
    let c = x.dim(1)?;
    check_vec(gamma, c, "gamma")?;
    check_vec(beta, c, "beta")?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let op = BatchNormOp {
        train: true,
        relu,
        eps,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let s = stats
        .lock()
        .map_err(|_| anyhow::anyhow!("batch norm: poisoned statistics"))?
        .clone();
    Ok((y, s))
}

/// Inference-mode fused batch norm with fixed statistics `mean`, `var` `[C]`.
pub fn fused_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
    relu: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    for (t, what) in [
        (gamma, "gamma"),
        (beta, "beta"),
        (mean, "mean"),
        (var, "var"),
    ] {
        check_vec(t, c, what)?;
    }
    let mean = mean.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let var = var.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    // As the composed version: 1 / sqrt(var + eps) in f32.
    let inv_std = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let op = BatchNormOp {
        train: false,
        relu,
        eps,
        stats: Arc::new(Mutex::new(Stats { mean, var, inv_std })),
    };
    Ok(x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?)
}

/// The executor's previous batch norm in training mode, candle tensor ops under candle's
/// autograd: returns the output and the batch mean and biased variance, each `(1, C, 1,
/// 1)` (still attached to the graph).
pub fn composed_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
    let y = composed_apply(x, gamma, beta, &mean, &var, eps)?;
    Ok((y, mean, var))
}

/// The executor's previous batch norm with fixed statistics `mean`, `var` `[C]`.
pub fn composed_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    composed_apply(
        x,
        gamma,
        beta,
        &mean.reshape((1, c, 1, 1))?,
        &var.reshape((1, c, 1, 1))?,
        eps,
    )
}

fn composed_apply(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let gamma = gamma.reshape((1, c, 1, 1))?;
    let beta = beta.reshape((1, c, 1, 1))?;
    let inv = var.affine(1.0, f64::from(eps))?.sqrt()?.recip()?;
    Ok(x.broadcast_sub(mean)?
        .broadcast_mul(&inv.broadcast_mul(&gamma)?)?
        .broadcast_add(&beta)?)
}
