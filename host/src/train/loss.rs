//! Training losses: pixel-wise cross-entropy and a batch soft Dice on the foreground
//! classes.

use anyhow::Result;
use candle_core::{Tensor, D};
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
/// Returns `(total, cross_entropy)`.
pub fn loss(kind: LossKind, logits: &Tensor, onehot: &Tensor) -> Result<(Tensor, Tensor)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
