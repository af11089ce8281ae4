//! `ccnet experiment`: the paper's comparison experiments (see `docs/compression.md`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use ccnet_models::Arch;
use clap::{Args, Subcommand};

use super::select::default_calibration;
use super::train::dataset_dir;
use super::values;
use crate::baselines::squeeze::DEFAULT_SQUEEZE_RATIO;
use crate::baselines::table2::{file_crc, markdown, run_experiment, Settings};
use crate::train::run::{self, LoopOptions};

/// Arguments of `ccnet experiment`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// Which experiment.
    #[command(subcommand)]
    pub which: Experiment,
}

/// The experiments.
#[derive(Debug, Subcommand)]
pub enum Experiment {
    /// Table 2 (F1, IU, log10 P of base, squeezed, pruned and CC-Net networks) and
    /// Table 3 (training time), trained, packed and evaluated on the device engine.
    /// Resumable: rerun the same command to continue.
    Table2(Table2Args),
}

/// Arguments of `ccnet experiment table2`.
#[derive(Debug, Args)]
pub struct Table2Args {
    /// Datasets: names under the datasets folder or folders with images/ and masks/.
    #[arg(long, num_args = 1.., required = true)]
    pub datasets: Vec<String>,
    /// Architectures (comma-separated): unet, fcn, cumed.
    #[arg(long, value_delimiter = ',', value_parser = values::arch, default_value = "unet")]
    pub archs: Vec<Arch>,
    /// Training crop side (a multiple of the architecture's down-sampling).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Training steps of every network trained from scratch.
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Fine-tuning steps after each pruning round.
    #[arg(long, default_value_t = 100)]
    pub finetune_steps: usize,
    /// Share of every prunable layer's filters removed per pruning round.
    #[arg(long, default_value_t = 0.2)]
    pub prune_fraction: f64,
    /// Most pruning rounds (pruning stops earlier when the F1 target is missed).
    #[arg(long, default_value_t = 4)]
    pub prune_rounds: usize,
    /// Fire-module squeeze ratio (squeeze channels over output channels).
    #[arg(long, default_value_t = DEFAULT_SQUEEZE_RATIO)]
    pub squeeze_ratio: f64,
    /// Case 1 (and the pruning stop): keep at least this fraction of the base F1.
    #[arg(long, default_value_t = 0.95)]
    pub keep: f64,
    /// Case 2: disk budget of the packed file.
    #[arg(long, value_parser = values::budget, default_value = "1MB")]
    pub disk: u64,
    /// Bits per stored weight: 32, 16 or 8.
    #[arg(long, default_value_t = 32)]
    pub bits: u32,
    /// Seed of every run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration file [default: models/calibration/<arch>.json].
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Experiment folder (one subfolder per architecture and dataset).
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bars or progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `ccnet experiment`.
pub fn run(a: &ExperimentArgs) -> Result<()> {
    match &a.which {
        Experiment::Table2(t) => table2(t),
    }
}

fn table2(a: &Table2Args) -> Result<()> {
    if ![32, 16, 8].contains(&a.bits) {
        bail!("--bits must be 32, 16 or 8, got {}", a.bits);
    }
    if !(a.keep > 0.0 && a.keep <= 1.0) {
        bail!("--keep must be in (0, 1], got {}", a.keep);
    }
    if !(0.0..1.0).contains(&a.prune_fraction) {
        bail!(
            "--prune-fraction must be in [0, 1), got {}",
            a.prune_fraction
        );
    }
    if !(a.squeeze_ratio > 0.0 && a.squeeze_ratio <= 1.0) {
        bail!("--squeeze-ratio must be in (0, 1], got {}", a.squeeze_ratio);
    }
    if a.steps == 0 || a.finetune_steps == 0 {
        bail!("--steps and --finetune-steps must be at least 1");
    }
    let dirs = a
        .datasets
        .iter()
        .map(|d| dataset_dir(d))
        .collect::<Result<Vec<_>>>()?;
    let opts = LoopOptions {
        device: run::device(&a.device)?,
        stop_after_epochs: None,
        quiet: a.quiet,
    };
    for &arch in &a.archs {
        if let Err(e) = arch.check_input(a.size, a.size) {
            bail!("--size {} for {arch}: {e}", a.size);
        }
        let calibration = a
            .calibration
            .clone()
            .unwrap_or_else(|| default_calibration(arch));
        let settings = Settings {
            arch: arch.name().to_string(),
            size: a.size,
            steps: a.steps,
            finetune_steps: a.finetune_steps,
            prune_fraction: a.prune_fraction,
            prune_rounds: a.prune_rounds,
            squeeze_ratio: a.squeeze_ratio,
            keep: a.keep,
            disk: a.disk,
            bits: a.bits,
            seed: a.seed,
            calibration_crc: file_crc(&calibration)?,
            calibration,
        };
        let out = a.out.join(arch.name());
        let report = run_experiment(&settings, &dirs, &out, &opts)?;
        println!("## {arch}\n\n{}", markdown(&report));
        println!(
            "written: {} and {}",
            out.join("tables.md").display(),
            out.join("tables.json").display()
        );
    }
    Ok(())
}
