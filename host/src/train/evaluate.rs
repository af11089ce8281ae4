//! `ccnet eval`: per-image foreground F1 and IU of a trained run on a dataset, their
//! means, inference latency per image, and PNG overlays (image | ground truth |
//! prediction).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::data::{self, Sample};
use super::infer::predict_full;
use super::metrics::{summarize, Confusion, Summary};
use super::run::{load_run, RunConfig};
use crate::dataset::Dataset;
use crate::fsutil::write_atomic;

/// Which images of the dataset to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Images {
    /// Every image.
    All,
    /// The run's validation images (the dataset must be the one trained on).
    Val,
    /// The run's training images.
    Train,
}

/// One image's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageResult {
    /// Item id.
    pub id: String,
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// Foreground F1 (Dice).
    pub f1: f64,
    /// Foreground IU (Jaccard).
    pub iu: f64,
    /// Foreground share of the ground truth.
    pub true_fraction: f64,
    /// Foreground share of the prediction.
    pub pred_fraction: f64,
    /// Whether the prediction holds no foreground.
    pub empty_prediction: bool,
    /// Inference time (tiled forward pass + arg-max), milliseconds.
    pub latency_ms: f64,
}

/// The whole evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// Run folder.
    pub run: PathBuf,
    /// Architecture and width of the run.
    pub arch: String,
    /// Width multiplier.
    pub alpha: String,
    /// Dataset evaluated.
    pub dataset: String,
    /// Which images.
    pub images: Images,
    /// Tile side.
    pub tile: u32,
    /// Means over images.
    pub mean: Summary,
    /// Mean latency per image, milliseconds.
    pub mean_latency_ms: f64,
    /// Per image.
    pub per_image: Vec<ImageResult>,
    /// Overlay files written.
    pub overlays: Vec<PathBuf>,
}

/// Evaluation settings.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Which images.
    pub images: Images,
    /// Tile side (`None`: the run's).
    pub tile: Option<u32>,
    /// Overlays to write (first images in id order).
    pub overlays: usize,
    /// Folder for the report and overlays (`None`: `<run>/eval-<dataset>`).
    pub out: Option<PathBuf>,
    /// Device.
    pub device: Device,
}

/// Evaluates the run in `run` on the dataset in `dataset_dir`.
pub fn evaluate(run: &Path, dataset_dir: &Path, opts: &EvalOptions) -> Result<EvalReport> {
    let (cfg, net) = load_run(run, &opts.device)?;
    let ds = Dataset::open(dataset_dir, true)?;
    let channels = ds.channels()?;
    if channels != cfg.in_channels && !(channels == 1 && cfg.in_channels == 3) {
        return Err(anyhow!(
            "{}: images have {channels} channels but the run was trained on {}",
            dataset_dir.display(),
            cfg.in_channels
        ));
    }
    let ids = select(&cfg, &ds, opts.images)?;
    let samples = data::load_samples(&ds, &ids, cfg.in_channels, cfg.recipe.downscale)?;
    let tile = opts.tile.unwrap_or(cfg.recipe.tile);
    let multiple = cfg.arch_config()?.arch.input_multiple() as usize;
    let out_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| run.join(format!("eval-{}", ds.name)));
    let mut per_image = Vec::new();
    let mut confusions = Vec::new();
    let mut overlays = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let t = Instant::now();
        let pred = predict_full(&net, s, tile as usize, multiple)?;
        let latency_ms = t.elapsed().as_secs_f64() * 1e3;
        let c = Confusion::of(&pred, &s.full_mask);
        let n = c.total as f64;
        per_image.push(ImageResult {
            id: s.id.clone(),
            width: s.raw.width as usize,
            height: s.raw.height as usize,
            f1: c.f1(),
            iu: c.iu(),
            true_fraction: (c.tp + c.fn_) as f64 / n,
            pred_fraction: (c.tp + c.fp) as f64 / n,
            empty_prediction: c.empty_prediction(),
            latency_ms,
        });
        confusions.push(c);
        if i < opts.overlays {
            let path = out_dir.join(format!("{}.png", s.id));
            write_overlay(&path, s, &pred)?;
            overlays.push(path);
        }
    }
    let mean = summarize(&confusions);
    let mean_latency_ms =
        per_image.iter().map(|r| r.latency_ms).sum::<f64>() / per_image.len().max(1) as f64;
    let report = EvalReport {
        run: run.to_path_buf(),
        arch: cfg.arch.clone(),
        alpha: cfg.alpha.clone(),
        dataset: ds.name.clone(),
        images: opts.images,
        tile,
        mean,
        mean_latency_ms,
        per_image,
        overlays,
    };
    let mut json = serde_json::to_string_pretty(&report)?;
    json.push('\n');
    let path = out_dir.join("metrics.json");
    write_atomic(&path, json.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(report)
}

fn select(cfg: &RunConfig, ds: &Dataset, images: Images) -> Result<Vec<String>> {
    let all: Vec<String> = ds.items.iter().map(|i| i.id.clone()).collect();
    let wanted = match images {
        Images::All => return Ok(all),
        Images::Val => &cfg.split.val,
        Images::Train => &cfg.split.train,
    };
    let missing: Vec<&String> = wanted.iter().filter(|id| !all.contains(id)).collect();
    if !missing.is_empty() {
        return Err(anyhow!(
            "{}: lacks {} image(s) of the run's split (e.g. `{}`); is this the dataset the run was trained on? Use --images all",
            ds.dir.display(),
            missing.len(),
            missing[0]
        ));
    }
    Ok(wanted.clone())
}

/// Writes `image | ground truth | prediction` side by side; the masks are drawn over a
/// darkened image (ground truth green, prediction red).
pub fn write_overlay(path: &Path, s: &Sample, pred: &[u8]) -> Result<()> {
    let (w, h) = (s.raw.width, s.raw.height);
    let mut img = image::RgbImage::new(3 * w, h);
    let rgb = s.raw.to_rgb();
    for y in 0..h {
        for x in 0..w {
            let p = (y * w + x) as usize;
            let px = [rgb.data[3 * p], rgb.data[3 * p + 1], rgb.data[3 * p + 2]];
            img.put_pixel(x, y, image::Rgb(px));
            let dim = px.map(|v| v / 2);
            let tint = |on: bool, colour: [u8; 3]| {
                if on {
                    image::Rgb([
                        dim[0] / 2 + colour[0] / 2,
                        dim[1] / 2 + colour[1] / 2,
                        dim[2] / 2 + colour[2] / 2,
                    ])
                } else {
                    image::Rgb(dim)
                }
            };
            img.put_pixel(w + x, y, tint(s.full_mask[p] != 0, [0, 255, 0]));
            img.put_pixel(2 * w + x, y, tint(pred[p] != 0, [255, 0, 0]));
        }
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .with_context(|| format!("{}: cannot encode PNG", path.display()))?;
    write_atomic(path, &bytes).with_context(|| format!("{}: cannot write", path.display()))
}
