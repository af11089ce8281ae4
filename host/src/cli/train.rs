//! `ccnet train`: train a width-scaled network on a dataset (see `docs/training.md`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ccnet_models::Arch;
use ccnet_shared::alpha::Alpha;
use clap::Args;

use super::values;
use crate::train::recipe::Recipe;
use crate::train::run::{self, LoopOptions, TrainSpec};

/// Arguments of `ccnet train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset: a name under the datasets folder (e.g. `busi`) or a folder with
    /// `images/` and `masks/`. With --resume, defaults to the run's dataset.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Architecture: unet, fcn or cumed.
    #[arg(long, value_parser = values::arch, default_value = "unet")]
    pub arch: Arch,
    /// Width multiplier (e.g. 1/8).
    #[arg(long, value_parser = values::alpha, default_value = "1/8")]
    pub alpha: Alpha,
    /// Training crop size (`128` or `HxW`), a multiple of the architecture's
    /// down-sampling (16 U-Net, 32 FCN, 8 CUMedVision).
    #[arg(long, value_parser = values::size, default_value = "128")]
    pub size: (u32, u32),
    /// Most epochs (default 16).
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<usize>,
    /// Total training steps instead of epochs (rounded up to whole epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Steps per epoch (one validation and checkpoint each).
    #[arg(long, default_value_t = 50)]
    pub epoch_steps: usize,
    /// Peak learning rate of Adam at α = 1/8; other widths use `lr · (1/8) / α`
    /// (4e-3 at α = 1/32, 5e-4 at α = 1/4) unless --fixed-lr is given.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Use --lr as it is at every width (`--fixed-lr --lr 5e-5` is the paper's setting).
    #[arg(long)]
    pub fixed_lr: bool,
    /// Crops per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Seed of initialisation, split and sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Early stopping: epochs without a better validation F1 (0 disables).
    #[arg(long, default_value_t = 6)]
    pub patience: usize,
    /// Share of images held out for validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Integer factor by which images are downscaled before training and inference
    /// (more context per crop on large images; metrics stay at full resolution).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub downscale: u32,
    /// Tile side for full-image validation.
    #[arg(long, default_value_t = 256)]
    pub tile: u32,
    /// Use the plain recipe (no batch norm, cross-entropy only, constant learning rate,
    /// uniform crops) that collapses on imbalanced masks; for comparison.
    #[arg(long)]
    pub plain: bool,
    /// cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run folder to create (or to continue with --resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (its settings are kept).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Resolves `--dataset`: an existing folder, else a name under the datasets folder.
pub fn dataset_dir(d: &str) -> Result<PathBuf> {
    let p = Path::new(d);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    crate::paths::dataset(d).map_err(anyhow::Error::msg)
}

/// Runs `ccnet train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    let device = run::device(&a.device)?;
    let opts = LoopOptions {
        device,
        stop_after_epochs: None,
        quiet: a.quiet,
    };
    let metrics = if a.resume {
        let dir = a.dataset.as_deref().map(dataset_dir).transpose()?;
        run::resume(&a.out, dir.as_deref(), &opts)?
    } else {
        let Some(d) = a.dataset.as_deref() else {
            bail!("--dataset is required (a dataset name or folder)");
        };
        let size = [a.size.0, a.size.1];
        let mut recipe = if a.plain {
            Recipe::plain(size)
        } else {
            Recipe::robust(size)
        };
        if !(a.lr > 0.0 && a.lr.is_finite()) {
            bail!("--lr must be positive");
        }
        if !(a.val_fraction > 0.0 && a.val_fraction < 1.0) {
            bail!("--val-fraction must be between 0 and 1");
        }
        recipe.lr = a.lr;
        if a.fixed_lr {
            recipe.lr_alpha = None;
        }
        recipe.batch = a.batch;
        recipe.steps_per_epoch = a.epoch_steps;
        recipe.patience = a.patience;
        recipe.val_fraction = a.val_fraction;
        recipe.tile = a.tile;
        recipe.downscale = a.downscale;
        if let Some(e) = a.epochs {
            recipe.epochs = e;
        }
        if let Some(s) = a.steps {
            recipe.epochs = s.div_ceil(a.epoch_steps.max(1));
        }
        recipe.warmup_steps = recipe.warmup_steps.min(recipe.total_steps() / 5);
        let spec = TrainSpec {
            dataset_dir: dataset_dir(d)?,
            arch: a.arch,
            alpha: a.alpha,
            seed: a.seed,
            recipe,
        };
        run::train(&spec, &a.out, &opts)?
    };
    let best = metrics.best_epoch.unwrap_or(0);
    println!(
        "{}: best epoch {best}: validation F1 {:.4}, IU {:.4}; {} steps in {:.0} s ({}){}",
        a.out.display(),
        metrics.best_val_f1,
        metrics.best_val_iu,
        metrics.steps_done,
        metrics.seconds,
        metrics.stopped,
        if metrics.collapsed {
            " — COLLAPSED: no foreground predicted on any validation image"
        } else {
            ""
        }
    );
    Ok(())
}
