//! The training recipe: every setting that shapes a run, its defaults, and the
//! learning-rate schedule. `docs/training.md` explains why each part is there.

use serde::{Deserialize, Serialize};

use super::data::Augment;
use super::loss::LossKind;

/// Every setting of a training run (recorded in `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Peak learning rate of Adam (at the width [`Recipe::lr_alpha`] when that is set).
    pub lr: f64,
    /// The width multiplier at which `lr` applies; at another width α the peak rate is
    /// `lr · lr_alpha / α` (Adam's good step size shrinks as layers widen). `None`: the
    /// same `lr` at every width (runs made before this existed).
    #[serde(default)]
    pub lr_alpha: Option<f64>,
    /// Crops per step.
    pub batch: usize,
    /// Training crop height and width.
    pub size: [u32; 2],
    /// Steps per epoch (one validation and one checkpoint per epoch).
    pub steps_per_epoch: usize,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation F1 (0: never).
    pub patience: usize,
    /// Linear warm-up steps from `lr / 10` to `lr`.
    pub warmup_steps: usize,
    /// Cosine decay from `lr` down to `lr · final_lr_fraction` at the last step;
    /// `None` keeps the learning rate constant after warm-up.
    pub final_lr_fraction: Option<f64>,
    /// Loss.
    pub loss: LossKind,
    /// Batch normalisation after every hidden convolution (folded away at pack time).
    pub batch_norm: bool,
    /// Probability that a crop is centred near a foreground pixel.
    pub foreground_crop: f64,
    /// Random flips and 90° rotations.
    pub geometric_augment: bool,
    /// Mild intensity jitter (relative gain and shift bound).
    pub intensity_jitter: f32,
    /// Share of the images held out for validation.
    pub val_fraction: f64,
    /// Side of the tiles of full-image validation and evaluation.
    pub tile: u32,
    /// Integer factor by which images are box-downscaled before the network sees them
    /// (training, validation and evaluation alike; predictions are mapped back to full
    /// resolution for the metrics). 1 keeps full resolution.
    #[serde(default = "one")]
    pub downscale: u32,
}

fn one() -> u32 {
    1
}

/// The width at which the default learning rate (1e-3) is tuned: α = 1/8.
pub const LR_REFERENCE_ALPHA: f64 = 0.125;

impl Recipe {
    /// The default, robust recipe at crop size `size`.
    pub fn robust(size: [u32; 2]) -> Recipe {
        Recipe {
            lr: 1e-3,
            lr_alpha: Some(LR_REFERENCE_ALPHA),
            batch: 4,
            size,
            steps_per_epoch: 50,
            epochs: 16,
            patience: 6,
            warmup_steps: 50,
            final_lr_fraction: Some(0.05),
            loss: LossKind::CrossEntropyDice,
            batch_norm: true,
            foreground_crop: 0.5,
            geometric_augment: true,
            intensity_jitter: 0.1,
            val_fraction: 0.2,
            tile: 256,
            downscale: 1,
        }
    }

    /// The plain recipe that collapses on imbalanced masks (no batch norm, cross-entropy
    /// only, constant learning rate, uniform crops): kept to reproduce the failure.
    pub fn plain(size: [u32; 2]) -> Recipe {
        Recipe {
            lr_alpha: None,
            warmup_steps: 0,
            final_lr_fraction: None,
            loss: LossKind::CrossEntropy,
            batch_norm: false,
            foreground_crop: 0.0,
            ..Recipe::robust(size)
        }
    }

    /// Total steps of a full run.
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch * self.epochs
    }

    /// Peak learning rate for a network of width `alpha`.
    pub fn peak_lr(&self, alpha: f64) -> f64 {
        match self.lr_alpha {
            Some(a) if alpha > 0.0 => self.lr * a / alpha,
            _ => self.lr,
        }
    }

    /// Learning rate at step `step` (0-based) of a network of width `alpha`.
    pub fn lr_for(&self, alpha: f64, step: usize) -> f64 {
        self.lr_at(step) * self.peak_lr(alpha) / self.lr
    }

    /// Learning rate at step `step` (0-based), at the reference width.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            let t = (step + 1) as f64 / self.warmup_steps as f64;
            return self.lr * (0.1 + 0.9 * t);
        }
        match self.final_lr_fraction {
            None => self.lr,
            Some(f) => {
                let span = self.total_steps().saturating_sub(self.warmup_steps).max(1);
                let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                self.lr * (f + (1.0 - f) * cos)
            }
        }
    }

    /// The augmentation part of the recipe.
    pub fn augment(&self) -> Augment {
        Augment {
            foreground_crop: self.foreground_crop,
            geometric: self.geometric_augment,
            intensity: self.intensity_jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_and_decays() {
        let r = Recipe::robust([64, 64]);
        assert!((r.lr_at(0) - r.lr * 0.118).abs() < 1e-9);
        assert!((r.lr_at(r.warmup_steps - 1) - r.lr).abs() < 1e-12);
        assert!((r.lr_at(r.warmup_steps) - r.lr).abs() < 1e-12);
        let end = r.lr_at(r.total_steps());
        assert!((end - r.lr * 0.05).abs() < 1e-12);
        let mid = r.lr_at((r.total_steps() + r.warmup_steps) / 2);
        assert!(mid < r.lr && mid > end);
        // Narrower networks take larger steps: 4× at α = 1/32, ½× at α = 1/4.
        assert!((r.peak_lr(1.0 / 32.0) - 4e-3).abs() < 1e-12);
        assert!((r.peak_lr(0.25) - 5e-4).abs() < 1e-12);
        assert!((r.lr_for(1.0 / 32.0, 0) - 4.0 * r.lr_at(0)).abs() < 1e-12);
        let fixed = Recipe {
            lr_alpha: None,
            ..r.clone()
        };
        assert_eq!(fixed.peak_lr(1.0 / 32.0), fixed.lr);
        let p = Recipe::plain([64, 64]);
        assert_eq!(p.lr_at(0), p.lr);
        assert_eq!(p.lr_at(500), p.lr);
    }
}
