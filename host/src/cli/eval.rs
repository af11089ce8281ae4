//! `ccnet eval`: foreground F1 / IU, latency and overlays of a trained run, or of a
//! packed model run by the device engine (`--model`: exactly what will be flashed).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use super::train::dataset_dir;
use crate::train::evaluate::{evaluate, EvalOptions, Images};
use crate::train::run;

/// Which images to evaluate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ImagesArg {
    /// Every image of the dataset.
    All,
    /// The run's validation images.
    Val,
    /// The run's training images.
    Train,
}

/// Arguments of `ccnet eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run folder written by `ccnet train`.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub run: Option<PathBuf>,
    /// A packed model (`ccnet pack`), evaluated with the device engine on every image.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset: a name under the datasets folder or a folder with images/ and masks/.
    #[arg(long)]
    pub dataset: String,
    /// Which images (default: `val` when the dataset is the run's, else `all`).
    #[arg(long, value_enum)]
    pub images: Option<ImagesArg>,
    /// Tile side for inference (default: the run's).
    #[arg(long)]
    pub tile: Option<u32>,
    /// PNG overlays (image | ground truth | prediction) to write.
    #[arg(long, default_value_t = 4)]
    pub overlays: usize,
    /// Folder for metrics.json and overlays (default: RUN/eval-<dataset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ccnet eval`.
pub fn run(a: &EvalArgs) -> Result<()> {
    let dir = dataset_dir(&a.dataset)?;
    let Some(run_dir) = a.run.as_ref() else {
        let path = a.model.as_ref().expect("clap requires --run or --model");
        return eval_model(path, &dir, a.json);
    };
    let device = run::device(&a.device)?;
    let images = match a.images {
        Some(ImagesArg::All) => Images::All,
        Some(ImagesArg::Val) => Images::Val,
        Some(ImagesArg::Train) => Images::Train,
        None => {
            let cfg_path = run::config_path(run_dir);
            let same = std::fs::read_to_string(&cfg_path)
                .ok()
                .and_then(|s| serde_json::from_str::<run::RunConfig>(&s).ok())
                .and_then(|c| {
                    let a = c.dataset_dir.canonicalize().ok()?;
                    let b = dir.canonicalize().ok()?;
                    Some(a == b)
                })
                .unwrap_or(false);
            if same {
                Images::Val
            } else {
                Images::All
            }
        }
    };
    let opts = EvalOptions {
        images,
        tile: a.tile,
        overlays: a.overlays,
        out: a.out.clone(),
        device,
    };
    let r = evaluate(run_dir, &dir, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} α={} on {} ({:?} images, tile {}):",
        r.arch, r.alpha, r.dataset, r.images, r.tile
    );
    println!(
        "{:<28} {:>9} {:>7} {:>7} {:>8} {:>8} {:>10}",
        "image", "size", "F1", "IU", "true fg", "pred fg", "ms"
    );
    for i in &r.per_image {
        println!(
            "{:<28} {:>9} {:>7.4} {:>7.4} {:>8.3} {:>8.3} {:>10.1}{}",
            i.id,
            format!("{}x{}", i.width, i.height),
            i.f1,
            i.iu,
            i.true_fraction,
            i.pred_fraction,
            i.latency_ms,
            if i.empty_prediction {
                "  empty prediction"
            } else {
                ""
            }
        );
    }
    println!(
        "mean over {} images: F1 {:.4}, IU {:.4}, {:.1} ms/image; {} empty predictions{}",
        r.mean.images,
        r.mean.f1,
        r.mean.iu,
        r.mean_latency_ms,
        r.mean.empty_predictions,
        if r.mean.collapsed {
            " — COLLAPSED"
        } else {
            ""
        }
    );
    if !r.overlays.is_empty() {
        println!(
            "overlays: {}",
            r.overlays[0]
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `ccnet eval --model`: the device engine on every image of the dataset.
fn eval_model(path: &std::path::Path, dir: &std::path::Path, json: bool) -> Result<()> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let r = crate::pack::evaluate::evaluate_packed(&bytes, dir, &[])
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    for i in &r.per_image {
        println!(
            "{:<28} F1 {:>7.4}  IU {:>7.4}  {:>9.1} ms",
            i.id, i.f1, i.iu, i.latency_ms
        );
    }
    println!(
        "{} on {}: mean over {} images F1 {:.4}, IU {:.4}, {:.1} ms/image (device engine), arena {} bytes",
        path.display(),
        dir.display(),
        r.mean.images,
        r.mean.f1,
        r.mean.iu,
        r.mean_latency_ms,
        r.arena_bytes
    );
    Ok(())
}
