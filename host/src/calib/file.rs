//! The calibration file `models/calibration/<arch>.json`: the settings of the sweep,
//! every averaged point, every per-dataset fit of equation (1) and the cross-dataset
//! regressions of equation (2).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::fit::{Degradation, LineFit};

/// Version of the calibration file format.
pub const CALIBRATION_FORMAT: u32 = 1;

/// The settings a sweep ran with (stated in the file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepSettings {
    /// Width multipliers of the grid.
    pub alphas: Vec<String>,
    /// Seeds per point.
    pub seeds: u64,
    /// Training crop size.
    pub size: [u32; 2],
    /// Training steps per run (at most; early stopping may end a run sooner).
    pub steps: usize,
    /// The training recipe, as JSON (its `downscale` is the default factor).
    pub recipe: serde_json::Value,
    /// Datasets trained at another downscale factor than the recipe's.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub downscale_per_dataset: std::collections::BTreeMap<String, u32>,
    /// The complexity settings, as JSON.
    pub complexity: serde_json::Value,
}

/// One width of one dataset, averaged over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WidthPoint {
    /// Width multiplier.
    pub alpha: String,
    /// Parameters of the deployed network.
    pub params: u64,
    /// log10 of `params`.
    pub log10_params: f64,
    /// Seeds averaged.
    pub seeds: usize,
    /// Mean validation F1.
    pub f1_mean: f64,
    /// Standard deviation of validation F1 over seeds.
    pub f1_std: f64,
    /// Mean validation IU.
    pub iu_mean: f64,
    /// Standard deviation of validation IU over seeds.
    pub iu_std: f64,
}

/// One dataset: its complexity, points and fits of equation (1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetFit {
    /// Dataset name.
    pub name: String,
    /// Mean JPEG complexity J.
    pub j: f64,
    /// Mean blob density B.
    pub b: f64,
    /// Averaged points, largest α first.
    pub points: Vec<WidthPoint>,
    /// Fit of relative F1 against log10 P.
    pub f1: Option<Degradation>,
    /// Fit of relative IU against log10 P.
    pub iu: Option<Degradation>,
}

/// The calibration of one architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// File format version.
    pub format: u32,
    /// Architecture.
    pub arch: String,
    /// The base network of "relative accuracy": the largest α of the sweep.
    pub base_alpha: String,
    /// Sweep settings.
    pub settings: SweepSettings,
    /// Per-dataset points and fits.
    pub datasets: Vec<DatasetFit>,
    /// `m_F1 = slope · J + intercept`.
    pub f1_vs_j: LineFit,
    /// `m_IU = slope · JB + intercept`, `JB = λ·J + (1 − λ)·B`.
    pub iu_vs_jb: LineFit,
    /// Fitted λ.
    pub lambda: f64,
    /// Base-network F1 against J across datasets, to predict absolute F1 for a new
    /// dataset (relative accuracy × predicted base accuracy).
    #[serde(default)]
    pub base_f1_vs_j: Option<LineFit>,
    /// Base-network IU against JB across datasets.
    #[serde(default)]
    pub base_iu_vs_jb: Option<LineFit>,
}

impl Calibration {
    /// Predicted F1 slope for a dataset of JPEG complexity `j`.
    pub fn m_f1(&self, j: f64) -> f64 {
        self.f1_vs_j.eval(j)
    }

    /// Predicted IU slope for a dataset of complexities `j`, `b`.
    pub fn m_iu(&self, j: f64, b: f64) -> f64 {
        self.iu_vs_jb
            .eval(self.lambda * j + (1.0 - self.lambda) * b)
    }

    /// Predicted base-network F1 for a dataset of JPEG complexity `j`, in [0, 1].
    pub fn base_f1(&self, j: f64) -> Option<f64> {
        self.base_f1_vs_j.map(|l| l.eval(j).clamp(0.0, 1.0))
    }

    /// Predicted base-network IU for a dataset of complexities `j`, `b`, in [0, 1].
    pub fn base_iu(&self, j: f64, b: f64) -> Option<f64> {
        self.base_iu_vs_jb.map(|l| {
            l.eval(self.lambda * j + (1.0 - self.lambda) * b)
                .clamp(0.0, 1.0)
        })
    }

    /// Reads and checks a calibration file.
    pub fn load(path: &Path) -> Result<Calibration> {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the calibration file", path.display()))?;
        let c: Calibration = serde_json::from_str(&s)
            .with_context(|| format!("{}: not a calibration file", path.display()))?;
        if c.format != CALIBRATION_FORMAT {
            bail!(
                "{}: calibration format {} is not supported (this build reads {})",
                path.display(),
                c.format,
                CALIBRATION_FORMAT
            );
        }
        Ok(c)
    }

    /// Writes the file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut s = serde_json::to_string_pretty(self)?;
        s.push('\n');
        crate::fsutil::write_atomic(path, s.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))
    }
}
