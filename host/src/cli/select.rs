//! `ccnet select`: choose the width multiplier for a dataset and a constraint from the
//! shipped calibration.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::{InputGeometry, Metadata};
use ccnet_shared::graph::Graph;
use clap::Args;
use serde::Serialize;

use super::train::dataset_dir;
use super::values;
use crate::calib::file::Calibration;
use crate::calib::select::{select, Candidate, Constraints, Metric, Selection};
use crate::calib::validate::{leave_one_out, overall_error, LooError};
use crate::complexity::{measure_dataset, Settings as ComplexitySettings};
use crate::dataset::Dataset;
use crate::pack::{fuse_relu, packed_len, FloatModel, PackInfo, Quant};

/// Arguments of `ccnet select`.
#[derive(Debug, Args)]
pub struct SelectArgs {
    /// Dataset: a name under the datasets folder or a folder with images/ (and masks/).
    #[arg(long)]
    pub dataset: String,
    /// Architecture: unet, fcn or cumed.
    #[arg(long, value_parser = values::arch, default_value = "unet")]
    pub arch: Arch,
    /// Calibration file [default: models/calibration/<arch>.json].
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Keep at least this fraction of the base network's accuracy (e.g. 0.95).
    #[arg(long, conflicts_with = "accuracy")]
    pub keep: Option<f64>,
    /// Lowest acceptable accuracy (with --base-accuracy).
    #[arg(long, requires = "base_accuracy")]
    pub accuracy: Option<f64>,
    /// The base network's accuracy on this dataset; also turns relative predictions
    /// into absolute ones.
    #[arg(long)]
    pub base_accuracy: Option<f64>,
    /// Which accuracy an accuracy floor applies to: f1 or iu.
    #[arg(long, default_value = "f1", value_parser = ["f1", "iu"])]
    pub metric: String,
    /// Disk budget for the packed file (e.g. 1MB, 256KiB).
    #[arg(long, value_parser = values::budget)]
    pub disk: Option<u64>,
    /// Bits per stored weight: 32 (f32), 16 (f16) or 8 (int8).
    #[arg(long, default_value_t = 8, value_parser = bits)]
    pub bits: u32,
    /// RAM budget for one inference run (e.g. 256KiB).
    #[arg(long, value_parser = values::budget)]
    pub ram: Option<u64>,
    /// Count the weights in RAM too (default: weights stay in flash, RAM holds the arena).
    #[arg(long)]
    pub weights_in_ram: bool,
    /// Tile the device runs (HxW); larger images are run tile by tile [default: the tile
    /// `ccnet pack` plans by default for each α: four halos].
    #[arg(long, value_parser = values::size)]
    pub input: Option<(u32, u32)>,
    /// The α grid.
    #[arg(long, value_delimiter = ',', value_parser = values::alpha, default_value = "1,1/2,1/4,1/8,1/16,1/32,1/64")]
    pub alphas: Vec<Alpha>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What `ccnet select` reports.
#[derive(Debug, Serialize)]
pub struct SelectReport {
    /// Dataset name.
    pub dataset: String,
    /// Architecture.
    pub arch: String,
    /// Calibration file used.
    pub calibration: String,
    /// JPEG complexity J.
    pub j: f64,
    /// Blob density B.
    pub b: f64,
    /// Predicted F1 slope.
    pub m_f1: f64,
    /// Predicted IU slope.
    pub m_iu: f64,
    /// Storage type assumed for disk bytes.
    pub quant: String,
    /// Constraints applied.
    pub constraints: Constraints,
    /// Predicted absolute F1 of the chosen α: relative F1 × the base accuracy given
    /// with --base-accuracy, else × the calibration's base-F1-against-J line.
    pub predicted_f1: Option<f64>,
    /// Predicted absolute IU of the chosen α (likewise; with --base-accuracy the same
    /// base number is used for IU, a rough figure).
    pub predicted_iu: Option<f64>,
    /// The calibration's own leave-one-dataset-out error (`ccnet validate`): how far
    /// its relative-F1 predictions were from what held-out datasets achieved; `None`
    /// with fewer than three calibrated datasets.
    pub predictor_error: Option<LooError>,
    /// The selection.
    pub selection: Selection,
}

/// The calibration file for `arch`: `models/calibration/<arch>.json` in the current
/// folder, else beside this crate's sources.
pub fn default_calibration(arch: Arch) -> PathBuf {
    let rel = Path::new("models")
        .join("calibration")
        .join(format!("{}.json", arch.name()));
    if rel.exists() {
        return rel;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn bits(s: &str) -> Result<u32, String> {
    match s {
        "32" | "16" | "8" => Ok(s.parse().unwrap_or(8)),
        _ => Err(format!("`{s}`: bits per weight must be 32, 16 or 8")),
    }
}

fn quant_of(bits: u32) -> Quant {
    match bits {
        32 => Quant::F32,
        16 => Quant::F16,
        _ => Quant::Int8,
    }
}

/// One grid candidate with exact costs for a dataset of `in_channels` channels.
pub fn candidate(
    arch: Arch,
    alpha: Alpha,
    in_channels: u32,
    quant: Quant,
    input: Option<(u32, u32)>,
    weights_in_ram: bool,
) -> Result<Candidate> {
    let cfg = ArchConfig {
        in_channels,
        ..ArchConfig::new(arch, alpha)
    };
    let plain = build(&cfg).map_err(|e| anyhow!("α = {alpha}: {e}"))?;
    let deployed = fuse_relu(&FloatModel {
        graph: plain,
        weights: Default::default(),
    })
    .graph;
    let params = Graph::new_unchecked(&deployed).trainable_params();
    let input = super::pack::tile_for(
        &FloatModel {
            graph: deployed.clone(),
            weights: Default::default(),
        },
        input,
    )?;
    let info = PackInfo {
        input: InputGeometry {
            channels: in_channels,
            height: input.0,
            width: input.1,
            scale: 1.0,
            offset: 0.0,
            standardize: true,
        },
        metadata: Metadata {
            arch: arch.name(),
            alpha_num: alpha.num(),
            alpha_den: alpha.den(),
            ..Metadata::default()
        },
    };
    let disk_bytes = packed_len(&deployed, quant, &info)?;
    let elem = if quant == Quant::Int8 { 1 } else { 4 };
    let graph = Graph::new_unchecked(&deployed);
    let plan = ccnet_device::plan::ArenaPlan::new(
        &graph,
        input.0,
        input.1,
        elem,
        (deployed.len() - 1) as u16,
    )
    .map_err(|e| {
        anyhow!(
            "α = {alpha}: cannot plan a {}x{} run: {e}",
            input.0,
            input.1
        )
    })?;
    let mut ram_bytes = plan.planned_bytes() as u64;
    if weights_in_ram {
        ram_bytes += disk_bytes;
    }
    Ok(Candidate {
        alpha,
        params,
        log10_params: (params as f64).log10(),
        disk_bytes,
        ram_bytes,
        tile: [input.0, input.1],
        rel_f1: 0.0,
        rel_iu: 0.0,
    })
}

/// Runs `ccnet select`.
pub fn run(a: &SelectArgs) -> Result<()> {
    let report = report(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The selection `ccnet select` reports for `a` (its `json` flag is ignored).
pub fn report(a: &SelectArgs) -> Result<SelectReport> {
    let cal_path = a
        .calibration
        .clone()
        .unwrap_or_else(|| default_calibration(a.arch));
    let cal = Calibration::load(&cal_path).with_context(|| {
        format!(
            "no calibration for {} (run `ccnet calibrate --arch {}` or pass --calibration)",
            a.arch, a.arch
        )
    })?;
    if cal.arch != a.arch.name() {
        bail!(
            "{}: calibration is for {}, not {}",
            cal_path.display(),
            cal.arch,
            a.arch
        );
    }
    for (name, v) in [
        ("--keep", a.keep),
        ("--accuracy", a.accuracy),
        ("--base-accuracy", a.base_accuracy),
    ] {
        if let Some(v) = v {
            if !(v > 0.0 && v <= 1.0) {
                bail!("{name} must be in (0, 1], got {v}");
            }
        }
    }
    let keep = match (a.keep, a.accuracy, a.base_accuracy) {
        (Some(k), _, _) => Some(k),
        (None, Some(acc), Some(base)) => {
            if acc > base {
                bail!("--accuracy {acc} is above --base-accuracy {base}: no compressed network is predicted to beat its base");
            }
            Some(acc / base)
        }
        _ => None,
    };
    let dir = dataset_dir(&a.dataset)?;
    let ds = Dataset::open(&dir, false)?;
    let in_channels = ds.channels()?;
    let settings = ComplexitySettings {
        check_masks: false,
        ..ComplexitySettings::default()
    };
    let c = measure_dataset(&ds, &settings, None)?;
    let (j, b) = (c.mean.j, c.mean.b);
    let (m_f1, m_iu) = (cal.m_f1(j), cal.m_iu(j, b));
    let quant = quant_of(a.bits);
    let base_alpha = Alpha::parse(&cal.base_alpha)
        .map_err(|e| anyhow!("{}: base α `{}`: {e}", cal_path.display(), cal.base_alpha))?;
    let base = candidate(
        a.arch,
        base_alpha,
        in_channels,
        quant,
        a.input,
        a.weights_in_ram,
    )?;
    let mut grid = Vec::new();
    for &alpha in &a.alphas {
        let mut cand = match candidate(a.arch, alpha, in_channels, quant, a.input, a.weights_in_ram)
        {
            Ok(c) => c,
            Err(_) if build(&ArchConfig::new(a.arch, alpha)).is_err() => continue,
            Err(e) => return Err(e),
        };
        cand.predict(m_f1, m_iu, base.log10_params);
        grid.push(cand);
    }
    let constraints = Constraints {
        keep,
        metric: Some(if a.metric == "iu" {
            Metric::Iu
        } else {
            Metric::F1
        }),
        disk: a.disk,
        ram: a.ram,
    };
    let selection = select(grid, &constraints).map_err(|e| anyhow!("{e}"))?;
    let report = SelectReport {
        dataset: ds.name.clone(),
        arch: a.arch.name().into(),
        calibration: cal_path.display().to_string(),
        j,
        b,
        m_f1,
        m_iu,
        quant: quant.name().into(),
        constraints,
        predicted_f1: a
            .base_accuracy
            .or_else(|| cal.base_f1(j))
            .map(|x| x * selection.chosen.rel_f1),
        predicted_iu: a
            .base_accuracy
            .or_else(|| cal.base_iu(j, b))
            .map(|x| x * selection.chosen.rel_iu),
        predictor_error: leave_one_out(&cal)
            .ok()
            .and_then(|rows| overall_error(&rows)),
        selection,
    };
    Ok(report)
}

/// The human-readable report.
pub fn table(r: &SelectReport) -> String {
    let mut s = format!(
        "{} on {}: J = {:.4}, B = {:.4} → m_F1 = {:.4}, m_IU = {:.4} per decade (calibration {})\n\n",
        r.arch, r.dataset, r.j, r.b, r.m_f1, r.m_iu, r.calibration
    );
    s += &format!(
        "  {:<6} {:>11} {:>7} {:>10} {:>11} {:>8} {:>8}\n",
        "alpha", "params", "log10P", "disk B", "RAM B", "rel F1", "rel IU"
    );
    for c in &r.selection.grid {
        let mark = if c.alpha == r.selection.chosen.alpha {
            "→"
        } else {
            " "
        };
        s += &format!(
            "{mark} {:<6} {:>11} {:>7.3} {:>10} {:>11} {:>7.1}% {:>7.1}%\n",
            c.alpha.to_string(),
            c.params,
            c.log10_params,
            c.disk_bytes,
            c.ram_bytes,
            100.0 * c.rel_f1,
            100.0 * c.rel_iu
        );
    }
    s += &format!(
        "\nchosen α = {} ({}); disk bytes at {}\n",
        r.selection.chosen.alpha, r.selection.reason, r.quant
    );
    if let (Some(f1), Some(iu)) = (r.predicted_f1, r.predicted_iu) {
        s += &format!("predicted F1 {f1:.3}, IU {iu:.3}\n");
    }
    if let Some(e) = r.predictor_error {
        s += &format!(
            "this calibration's leave-one-dataset-out error: {:.3} in relative F1 ({} points; a constant slope: {:.3}; see `ccnet validate`)\n",
            e.complexity, e.points, e.constant
        );
    }
    s
}
