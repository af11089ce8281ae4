//! Training losses: pixel-wise cross-entropy and a batch soft Dice on the foreground
//! classes.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu_data::{contiguous_f32, with_f32, MIN_TASK};
use serde::{Deserialize, Serialize};

/// Which loss the recipe minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Mean pixel-wise cross-entropy (the paper's loss).
    CrossEntropy,
    /// Cross-entropy + (1 − soft Dice of the foreground classes).
    CrossEntropyDice,
}

/// Loss of `logits` `(N, C, H, W)` against one-hot targets of the same shape.
/// Returns `(total, cross_entropy)`; only `total` carries gradients. On the CPU with
/// `f32` tensors this is one op with its own backward pass ([`FusedLoss`]), elsewhere
/// [`composed_loss`].
pub fn loss(kind: LossKind, logits: &Tensor, onehot: &Tensor) -> Result<(Tensor, Tensor)> {
    if logits.device().is_cpu()
        && logits.dtype() == DType::F32
        && onehot.dtype() == DType::F32
        && logits.rank() == 4
        && logits.dims() == onehot.dims()
    {
        return fused_loss(kind, logits, onehot);
    }
    composed_loss(kind, logits, onehot)
}

/// [`loss`] through candle's tensor ops (log-softmax, products, sums), differentiated by
/// candle's autograd: any device, and the reference of [`FusedLoss`].
pub fn composed_loss(kind: LossKind, logits: &Tensor, onehot: &Tensor) -> Result<(Tensor, Tensor)> {
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let ce = (logp.mul(onehot)?.sum(1)?.mean_all()?.neg())?;
    match kind {
        LossKind::CrossEntropy => Ok((ce.clone(), ce)),
        LossKind::CrossEntropyDice => {
            let d = soft_dice_loss(&logp.exp()?, onehot)?;
            Ok(((&ce + d)?, ce))
        }
    }
}

/// `1 − mean over foreground classes of 2·Σ p·y / (Σ p + Σ y)`, sums over the whole
/// batch (stable when a crop holds no foreground). `probs` and `onehot` are
/// `(N, C, H, W)`; class 0 is background.
pub fn soft_dice_loss(probs: &Tensor, onehot: &Tensor) -> Result<Tensor> {
    let c = probs.dim(1)?;
    let p = probs.narrow(1, 1, c - 1)?;
    let y = onehot.narrow(1, 1, c - 1)?;
    // (N, C-1, H, W) -> per-class sums over N, H, W.
    let per_class =
        |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(0, 1)?.flatten_from(1)?.sum(D::Minus1)?) };
    let inter = per_class(&p.mul(&y)?)?;
    let denom = (per_class(&p)? + per_class(&y)?)?;
    let smooth = 1.0;
    let dice = inter
        .affine(2.0, smooth)?
        .div(&denom.affine(1.0, smooth)?)?;
    Ok(dice.mean_all()?.affine(-1.0, 1.0)?)
}

/// Per-pixel sums of one chunk of pixels: the cross-entropy sum and, per class, the
/// soft-Dice sums `Σ p·y`, `Σ p`, `Σ y` (class 0 included, unused).
#[derive(Clone, Debug, Default)]
struct Sums {
    ce: f64,
    inter: Vec<f64>,
    prob: Vec<f64>,
    target: Vec<f64>,
}

impl Sums {
    /// Zero sums for `c` classes.
    fn zeros(c: usize) -> Sums {
        Sums {
            ce: 0.0,
            inter: vec![0.0; c],
            prob: vec![0.0; c],
            target: vec![0.0; c],
        }
    }

    /// Adds `other`'s sums (same classes) to these.
    fn add(&mut self, other: &Sums) {
        self.ce += other.ce;
        for (mine, theirs) in [
            (&mut self.inter, &other.inter),
            (&mut self.prob, &other.prob),
            (&mut self.target, &other.target),
        ] {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
    }
}

/// The softmax over the `c` classes of pixel `i` of an image (`z`, `(C, plane)`), into
/// `p` (in `f32`, as candle's softmax); returns `log Σ exp(z − max)` and the max (for
/// the log-probabilities).
#[inline]
fn softmax_at(z: &[f32], plane: usize, i: usize, p: &mut [f32]) -> (f32, f32) {
    let m = (0..p.len()).fold(f32::NEG_INFINITY, |m, k| m.max(z[k * plane + i]));
    let mut total = 0f32;
    for (k, pk) in p.iter_mut().enumerate() {
        *pk = (z[k * plane + i] - m).exp();
        total += *pk;
    }
    let inv = 1.0 / total;
    for pk in p.iter_mut() {
        *pk *= inv;
    }
    (total.ln(), m)
}

/// Cross-entropy (+ soft Dice) as one op on `(logits, onehot)` with its own backward
/// pass: the forward pass sums per pixel chunk in `f64` (chunks in parallel, reduced in
/// a fixed order), the backward pass recomputes the softmax and writes the logits'
/// gradient in one pass. Same loss as [`composed_loss`].
#[derive(Debug)]
pub struct FusedLoss {
    dice: bool,
    /// The forward pass's sums over the batch, for the backward pass and the
    /// cross-entropy readout.
    sums: Arc<Mutex<Sums>>,
}

/// `(images, classes, plane)` of a logits layout.
fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let &[n, c, h, w] = l.dims() else {
        candle_core::bail!("loss: logits must be (N, C, H, W), got {:?}", l.dims());
    };
    Ok((n, c, h * w))
}

/// Pixel chunks `(image, start, end)` of at most [`MIN_TASK`] pixels.
fn chunks(n: usize, plane: usize) -> Vec<(usize, usize, usize)> {
    let step = MIN_TASK.min(plane.max(1));
    (0..n)
        .flat_map(|img| {
            (0..plane)
                .step_by(step)
                .map(move |s| (img, s, (s + step).min(plane)))
        })
        .collect()
}

impl FusedLoss {
    /// The loss from the batch sums over `m` pixels.
    fn value(&self, s: &Sums, m: f64) -> f64 {
        let ce = s.ce / m;
        if !self.dice || s.inter.len() < 2 {
            return ce;
        }
        let k = s.inter.len();
        let dice: f64 = (1..k)
            .map(|c| (2.0 * s.inter[c] + 1.0) / (s.prob[c] + s.target[c] + 1.0))
            .sum::<f64>()
            / (k - 1) as f64;
        ce + 1.0 - dice
    }
}

impl CustomOp2 for FusedLoss {
    fn name(&self) -> &'static str {
        "ccnet-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = contiguous_f32(s1, l1, "loss: the logits")?;
        let y = contiguous_f32(s2, l2, "loss: the targets")?;
        let (n, c, plane) = dims(l1)?;
        if l2.dims() != l1.dims() || n * plane == 0 || c == 0 {
            candle_core::bail!("loss: logits {:?} and targets {:?}", l1.dims(), l2.dims());
        }
        let parts: Vec<Sums> = chunks(n, plane)
            .into_par_iter()
            .map(|(img, a, b)| {
                let (zi, yi) = (&z[img * c * plane..], &y[img * c * plane..]);
                let mut s = Sums::zeros(c);
                let mut p = vec![0f32; c];
                for i in a..b {
                    let (lse, m) = softmax_at(zi, plane, i, &mut p);
                    for k in 0..c {
                        let yk = f64::from(yi[k * plane + i]);
                        let logp = f64::from(zi[k * plane + i] - m - lse);
                        let pk = f64::from(p[k]);
                        s.ce -= yk * logp;
                        s.inter[k] += pk * yk;
                        s.prob[k] += pk;
                        s.target[k] += yk;
                    }
                }
                s
            })
            .collect();
        let mut total = Sums::zeros(c);
        for s in &parts {
            total.add(s);
        }
        let value = self.value(&total, (n * plane) as f64);
        *self
            .sums
            .lock()
            .map_err(|_| candle_core::Error::Msg("loss: poisoned".into()))? = total;
        Ok((CpuStorage::F32(vec![value as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        onehot: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = f64::from(grad.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let (n, c, h, w) = logits.dims4()?;
        let plane = h * w;
        let m = (n * plane) as f64;
        let s = self
            .sums
            .lock()
            .map_err(|_| candle_core::Error::Msg("loss: poisoned".into()))?
            .clone();
        // d(1 − mean Dice)/dp_k per pixel = −(2·y_k·D_k − N_k) / D_k² / (C − 1) for the
        // foreground classes, with N_k = 2·Σp·y + 1 and D_k = Σp + Σy + 1.
        let dice = self.dice && c >= 2;
        let (num, den): (Vec<f64>, Vec<f64>) = (0..c)
            .map(|k| (2.0 * s.inter[k] + 1.0, s.prob[k] + s.target[k] + 1.0))
            .unzip();
        let fg = (c.max(2) - 1) as f64;
        let logits = logits.contiguous()?;
        let onehot = onehot.contiguous()?;
        let mut dz = vec![0f32; n * c * plane];
        with_f32(&logits, |z| {
            with_f32(&onehot, |y| {
                dz.par_chunks_mut(c * plane)
                    .enumerate()
                    .for_each(|(img, d)| {
                        let (zi, yi) = (&z[img * c * plane..], &y[img * c * plane..]);
                        let (mut p32, mut p, mut gp) =
                            (vec![0f32; c], vec![0f64; c], vec![0f64; c]);
                        for i in 0..plane {
                            softmax_at(zi, plane, i, &mut p32);
                            for (d, &v) in p.iter_mut().zip(&p32) {
                                *d = f64::from(v);
                            }
                            let sy: f64 = (0..c).map(|k| f64::from(yi[k * plane + i])).sum();
                            let mut pg = 0.0;
                            for k in 0..c {
                                gp[k] = if dice && k > 0 {
                                    let yk = f64::from(yi[k * plane + i]);
                                    -(2.0 * yk * den[k] - num[k]) / (den[k] * den[k]) / fg
                                } else {
                                    0.0
                                };
                                pg += p[k] * gp[k];
                            }
                            for k in 0..c {
                                let yk = f64::from(yi[k * plane + i]);
                                let ce = (p[k] * sy - yk) / m;
                                d[k * plane + i] = (g * (ce + p[k] * (gp[k] - pg))) as f32;
                            }
                        }
                    })
            })
        })??;
        Ok((
            Some(Tensor::from_vec(dz, (n, c, h, w), &Device::Cpu)?),
            None,
        ))
    }
}

/// [`loss`] as one [`FusedLoss`] op (CPU, `f32`).
fn fused_loss(kind: LossKind, logits: &Tensor, onehot: &Tensor) -> Result<(Tensor, Tensor)> {
    let sums = Arc::new(Mutex::new(Sums::default()));
    let op = FusedLoss {
        dice: kind == LossKind::CrossEntropyDice,
        sums: sums.clone(),
    };
    let total = logits
        .contiguous()?
        .apply_op2(&onehot.detach().contiguous()?, op)?;
    let (n, _, h, w) = logits.dims4()?;
    let s = sums.lock().map_err(|_| anyhow!("loss: poisoned"))?.clone();
    let ce = s.ce / (n * h * w) as f64;
    Ok((total, Tensor::new(ce as f32, &Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused op against the composed loss: value, cross-entropy and the gradient of
    /// the logits, with and without Dice, two and three classes, a crop with no
    /// foreground, large logits.
    #[test]
    fn fused_loss_matches_the_composed_loss() {
        use crate::train::rng::Rng;
        let mut rng = Rng::new(5, 1);
        let cases = [
            (2, 2, 9, 11, 1.0),
            (3, 3, 8, 8, 3.0),
            (1, 2, 40, 33, 20.0),
            (2, 2, 5, 5, 1.0),
        ];
        for (case, &(n, c, h, w, scale)) in cases.iter().enumerate() {
            let z: Vec<f32> = (0..n * c * h * w)
                .map(|_| (rng.normal() * scale) as f32)
                .collect();
            let mut y = vec![0f32; n * c * h * w];
            for img in 0..n {
                for i in 0..h * w {
                    // The last case has no foreground at all.
                    let k = if case == 3 {
                        0
                    } else {
                        (rng.normal().abs() * 1.5) as usize % c
                    };
                    y[(img * c + k) * h * w + i] = 1.0;
                }
            }
            let dev = Device::Cpu;
            let zv = candle_core::Var::from_vec(z, (n, c, h, w), &dev).unwrap();
            let yt = Tensor::from_vec(y, (n, c, h, w), &dev).unwrap();
            for kind in [LossKind::CrossEntropy, LossKind::CrossEntropyDice] {
                let (lf, cf) = fused_loss(kind, zv.as_tensor(), &yt).unwrap();
                let (lc, cc) = composed_loss(kind, zv.as_tensor(), &yt).unwrap();
                let v = |t: &Tensor| t.to_scalar::<f32>().unwrap();
                let what = format!("case {case} {kind:?}");
                assert!(
                    (v(&lf) - v(&lc)).abs() < 1e-5 * v(&lc).abs().max(1.0),
                    "{what}: loss"
                );
                assert!(
                    (v(&cf) - v(&cc)).abs() < 1e-5 * v(&cc).abs().max(1.0),
                    "{what}: ce"
                );
                let gf = lf.backward().unwrap();
                let gc = lc.backward().unwrap();
                let flat = |g: &candle_core::backprop::GradStore| {
                    g.get(zv.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let (a, b) = (flat(&gf), flat(&gc));
                let big = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, e) in a.iter().zip(&b) {
                    assert!(
                        (x - e).abs() <= 1e-4 * big.max(1e-6),
                        "{what}: dz {x} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn perfect_prediction_has_small_loss_and_wrong_has_large() {
        let dev = Device::Cpu;
        // 1 image, 2 classes, 1x2 pixels: pixel 0 background, pixel 1 foreground.
        let onehot = Tensor::from_vec(vec![1f32, 0., 0., 1.], (1, 2, 1, 2), &dev).unwrap();
        let good = Tensor::from_vec(vec![10f32, -10., -10., 10.], (1, 2, 1, 2), &dev).unwrap();
        let bad = good.neg().unwrap();
        let (lg, ceg) = loss(LossKind::CrossEntropyDice, &good, &onehot).unwrap();
        let (lb, _) = loss(LossKind::CrossEntropyDice, &bad, &onehot).unwrap();
        let lg = lg.to_scalar::<f32>().unwrap();
        let lb = lb.to_scalar::<f32>().unwrap();
        let ceg = ceg.to_scalar::<f32>().unwrap();
        assert!(lg < 0.01, "{lg}");
        assert!(ceg < 1e-3, "{ceg}");
        assert!(lb > 15.0, "{lb}");
        // Dice of all-background prediction on a mask with foreground is ~1.
        let probs = Tensor::from_vec(vec![1f32, 1., 0., 0.], (1, 2, 1, 2), &dev).unwrap();
        let d = soft_dice_loss(&probs, &onehot)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((d - 0.5).abs() < 1e-6, "{d}"); // smooth 1: 1 - 1/2
    }
}
