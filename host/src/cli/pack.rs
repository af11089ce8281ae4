//! `ccnet pack`: quantize a trained run and pack it into a container that fits a budget.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ccnet_shared::format::{InputGeometry, Metadata};
use clap::Args;
use serde::Serialize;

use super::train::dataset_dir;
use super::values;
use crate::dataset::{load_image, Dataset};
use crate::pack::evaluate::{evaluate_packed, planar_padded, PackedEval};
use crate::pack::reference::normalise_geometry;
use crate::pack::{fold_batch_norm, fuse_relu, pack_calibrated, FloatModel, PackInfo, Quant};
use crate::train::data::INPUT_NORM;
use crate::train::run::{config_path, weights_path, RunConfig};
use crate::weights::load_safetensors;

/// Arguments of `ccnet pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Trained run folder (from `ccnet train`).
    #[arg(long)]
    pub run: PathBuf,
    /// Weight storage: f32, f16 or int8.
    #[arg(long, default_value = "int8")]
    pub quant: Quant,
    /// Refuse to write a file larger than this (e.g. 1MB = 10^6 bytes, 256KiB).
    #[arg(long, value_parser = values::budget)]
    pub budget: Option<u64>,
    /// Images for int8 activation ranges: a dataset name or folder [default: the run's
    /// training images].
    #[arg(long)]
    pub calibration_images: Option<String>,
    /// How many calibration images to use.
    #[arg(long, default_value_t = 8)]
    pub calibration_count: usize,
    /// Tile the device plans for (HxW); larger images are run tile by tile with a halo
    /// [default: four halos, so half of every tile is new output].
    #[arg(long, value_parser = values::size)]
    pub tile: Option<(u32, u32)>,
    /// Refuse when one tile's arena (the RAM of a run) exceeds this (e.g. 256KiB).
    #[arg(long, value_parser = values::budget)]
    pub ram: Option<u64>,
    /// Evaluate the packed file on the run's validation images with the device engine.
    #[arg(long)]
    pub verify: bool,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `ccnet pack` reports.
#[derive(Debug, Serialize)]
pub struct PackReport {
    /// Output file.
    pub out: PathBuf,
    /// Storage type.
    pub quant: String,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// Budget, if any.
    pub budget: Option<u64>,
    /// Parameters of the deployed network.
    pub params: u64,
    /// Arena bytes for one tile.
    pub tile_arena_bytes: usize,
    /// Calibration images used (int8).
    pub calibration_images: usize,
    /// Device-engine evaluation on the validation images (with --verify).
    pub verify: Option<PackedEval>,
    /// The run's own validation F1 (float, candle), for comparison.
    pub run_val_f1: Option<f64>,
}

fn read_config(run: &Path) -> Result<RunConfig> {
    let p = config_path(run);
    let s = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: cannot read (is {} a run folder?)",
            p.display(),
            run.display()
        )
    })?;
    let cfg: RunConfig = serde_json::from_str(&s)
        .with_context(|| format!("{}: invalid run configuration", p.display()))?;
    if cfg.format != crate::train::run::RUN_FORMAT {
        bail!(
            "{}: run format {} is not supported (expected {})",
            p.display(),
            cfg.format,
            crate::train::run::RUN_FORMAT
        );
    }
    Ok(cfg)
}

/// The deployed float model of a run: batch norm folded, ReLUs fused.
pub fn deployed_model(run: &Path) -> Result<(RunConfig, FloatModel)> {
    let cfg = read_config(run)?;
    let graph = cfg.graph()?;
    let weights = load_safetensors(&weights_path(run))?;
    let folded = fold_batch_norm(&FloatModel { graph, weights })
        .with_context(|| format!("{}", weights_path(run).display()))?;
    let deployed = fuse_relu(&folded);
    // The device runs at most MAX_NODES nodes (a training graph may have more).
    ccnet_shared::graph::Graph::new(&deployed.graph).map_err(|e| {
        anyhow!(
            "{}: the deployed network cannot be packed: {e}",
            config_path(run).display()
        )
    })?;
    Ok((cfg, deployed))
}

/// The input geometry a run was trained with, for a `tile`.
pub fn input_geometry(cfg: &RunConfig, tile: (u32, u32)) -> Result<InputGeometry> {
    if cfg.recipe.downscale != 1 {
        bail!(
            "the run was trained on images downscaled {}x (--downscale); the container format has no input downscaling, so such runs cannot be packed yet: train with --downscale 1",
            cfg.recipe.downscale
        );
    }
    if cfg.input_norm != INPUT_NORM {
        bail!(
            "run input normalisation `{}` is not supported (expected `{INPUT_NORM}`)",
            cfg.input_norm
        );
    }
    Ok(InputGeometry {
        channels: cfg.in_channels,
        height: tile.0,
        width: tile.1,
        scale: 1.0,
        offset: 0.0,
        standardize: true,
    })
}

/// Up to `count` calibration inputs from a dataset (crops of at most the tile, sides
/// multiples of the architecture's down-sampling), normalised as the device will.
pub fn calibration_inputs(
    geometry: &InputGeometry,
    dir: &Path,
    ids: Option<&[String]>,
    count: usize,
    multiple: u32,
) -> Result<Vec<(Vec<f32>, u32, u32)>> {
    let ds = Dataset::open(dir, false)?;
    let mut out = Vec::new();
    for item in ds
        .items
        .iter()
        .filter(|i| ids.is_none_or(|ids| ids.contains(&i.id)))
        .take(count)
    {
        let img = load_image(&item.image)?;
        let (pixels, ph, pw) = planar_padded(&img, geometry.channels, multiple);
        // Centre crop to at most the tile.
        let (th, tw) = (
            ph.min(geometry.height / multiple * multiple),
            pw.min(geometry.width / multiple * multiple),
        );
        let (y0, x0) = (
            (ph - th) / 2 / multiple * multiple,
            (pw - tw) / 2 / multiple * multiple,
        );
        let c = geometry.channels as usize;
        let mut crop = Vec::with_capacity(c * (th * tw) as usize);
        for ch in 0..c {
            for y in y0..y0 + th {
                let row = (ch * ph as usize + y as usize) * pw as usize;
                crop.extend_from_slice(&pixels[row + x0 as usize..row + (x0 + tw) as usize]);
            }
        }
        out.push((normalise_geometry(geometry, &crop), th, tw));
    }
    if out.is_empty() {
        bail!("{}: no calibration images", dir.display());
    }
    Ok(out)
}

/// The tile to plan for: `requested` if it can tile images (its core, the tile less a
/// halo on each side, is positive), else an error naming the smallest; by default four
/// halos (half of each tile is new output; smaller tiles recompute more).
pub fn tile_for(model: &FloatModel, requested: Option<(u32, u32)>) -> Result<(u32, u32)> {
    let t = ccnet_device::tile::geometry(&ccnet_shared::graph::Graph::new_unchecked(&model.graph))
        .map_err(|e| anyhow!("the network cannot be tiled: {e}"))?;
    let min = 2 * t.halo + t.multiple;
    match requested {
        None => {
            let side = (4 * t.halo).max(min);
            Ok((side, side))
        }
        Some((h, w)) => {
            if h % t.multiple != 0 || w % t.multiple != 0 || h < min || w < min {
                bail!(
                    "--tile {h}x{w}: sides must be multiples of {} and at least {min} (twice the {}-pixel halo plus one step)",
                    t.multiple,
                    t.halo
                );
            }
            Ok((h, w))
        }
    }
}

/// Runs `ccnet pack`.
pub fn run(a: &PackArgs) -> Result<()> {
    let (cfg, model) = deployed_model(&a.run)?;
    let arch = cfg.arch_config()?.arch;
    let multiple = arch.input_multiple();
    let tile = tile_for(&model, a.tile)?;
    let geometry = input_geometry(&cfg, tile)?;
    let alpha = ccnet_shared::alpha::Alpha::parse(&cfg.alpha).map_err(|e| anyhow!("{e}"))?;
    let info = PackInfo {
        input: geometry,
        metadata: Metadata {
            arch: arch.name(),
            alpha_num: alpha.num(),
            alpha_den: alpha.den(),
            dataset: &cfg.dataset,
            ..Metadata::default()
        },
    };
    let calibration = if a.quant == Quant::Int8 {
        let (dir, ids) = match &a.calibration_images {
            Some(d) => (dataset_dir(d)?, None),
            None => (cfg.dataset_dir.clone(), Some(cfg.split.train.as_slice())),
        };
        calibration_inputs(&geometry, &dir, ids, a.calibration_count, multiple)?
    } else {
        Vec::new()
    };
    let tile_arena_bytes = ccnet_device::plan::ArenaPlan::new(
        &ccnet_shared::graph::Graph::new_unchecked(&model.graph),
        tile.0,
        tile.1,
        if a.quant == Quant::Int8 { 1 } else { 4 },
        (model.graph.len() - 1) as u16,
    )
    .map_err(|e| anyhow!("cannot plan the arena: {e}"))?
    .planned_bytes();
    if let Some(ram) = a.ram {
        if tile_arena_bytes as u64 > ram {
            bail!(
                "one {}x{} tile needs an arena of {tile_arena_bytes} bytes, over the RAM budget of {ram} bytes; pass a smaller --tile or choose a smaller α",
                tile.0,
                tile.1
            );
        }
    }
    let bytes = pack_calibrated(&model, a.quant, a.budget, &info, &calibration)?;
    crate::fsutil::write_atomic(&a.out, &bytes)
        .with_context(|| format!("{}: cannot write", a.out.display()))?;
    let params = ccnet_shared::graph::Graph::new_unchecked(&model.graph).trainable_params();
    let verify = if a.verify {
        Some(evaluate_packed(&bytes, &cfg.dataset_dir, &cfg.split.val)?)
    } else {
        None
    };
    let run_val_f1 = std::fs::read_to_string(a.run.join("metrics.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["best_val_f1"].as_f64());
    let report = PackReport {
        out: a.out.clone(),
        quant: a.quant.name().into(),
        file_bytes: bytes.len() as u64,
        budget: a.budget,
        params,
        tile_arena_bytes,
        calibration_images: calibration.len(),
        verify,
        run_val_f1,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {} ({} bytes{}): {} parameters as {}, arena {} bytes per {}x{} tile",
            report.out.display(),
            report.file_bytes,
            report
                .budget
                .map(|b| format!(", budget {b}"))
                .unwrap_or_default(),
            report.params,
            report.quant,
            report.tile_arena_bytes,
            tile.0,
            tile.1
        );
        if let Some(v) = &report.verify {
            println!(
                "device engine on {} validation images: F1 {:.4}, IU {:.4}, {:.1} ms per image (run's float validation F1: {})",
                v.per_image.len(),
                v.mean.f1,
                v.mean.iu,
                v.mean_latency_ms,
                report
                    .run_val_f1
                    .map(|f| format!("{f:.4}"))
                    .unwrap_or_else(|| "unknown".into())
            );
        }
    }
    Ok(())
}
