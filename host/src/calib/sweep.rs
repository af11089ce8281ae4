//! The calibration sweep: one training run per (dataset, α, seed), each an independent
//! job with a stable key, kept in a run folder and skipped once finished; and the fit
//! of the calibration file from whatever runs have finished (a pure function of them).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use ccnet_models::Arch;
use ccnet_shared::alpha::Alpha;
use serde::{Deserialize, Serialize};

use super::file::{Calibration, DatasetFit, SweepSettings, WidthPoint};
use super::fit::{fit_degradation, fit_lambda, fit_line};
use crate::train::recipe::Recipe;
use crate::train::run::{self, read_json, LoopOptions, RunConfig, RunMetrics, TrainSpec};

/// One training run of the sweep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunKey {
    /// Architecture.
    pub arch: String,
    /// Dataset name (folder name).
    pub dataset: String,
    /// Width multiplier denominator form (`1/8`).
    pub alpha: String,
    /// Seed.
    pub seed: u64,
}

impl RunKey {
    /// The stable key: `unet.kvasir_seg.a1_8.s0` (also the run's folder name).
    pub fn id(&self) -> String {
        format!(
            "{}.{}.a{}.s{}",
            self.arch,
            self.dataset,
            self.alpha.replace('/', "_"),
            self.seed
        )
    }

    /// Parses [`RunKey::id`].
    pub fn parse(id: &str) -> Result<RunKey> {
        let parts: Vec<&str> = id.split('.').collect();
        let bad = || {
            anyhow!(
                "`{id}`: not a run key (expected ARCH.DATASET.aN_D.sSEED, e.g. unet.busi.a1_8.s0)"
            )
        };
        if parts.len() < 4 {
            return Err(bad());
        }
        let n = parts.len();
        let alpha = parts[n - 2]
            .strip_prefix('a')
            .ok_or_else(bad)?
            .replace('_', "/");
        Alpha::parse(&alpha).map_err(|_| bad())?;
        let seed = parts[n - 1]
            .strip_prefix('s')
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        Ok(RunKey {
            arch: parts[0].to_string(),
            dataset: parts[1..n - 2].join("."),
            alpha,
            seed,
        })
    }
}

/// The downscale factor of each dataset: a default plus per-dataset overrides, written
/// `4`, `busi=4,kvasir_seg=4` (default 1) or `2,busi=4`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downscale {
    /// Factor of datasets without an override (at least 1).
    pub default: u32,
    /// Factor per dataset name.
    pub per_dataset: BTreeMap<String, u32>,
}

impl Downscale {
    /// The same factor for every dataset.
    pub fn uniform(f: u32) -> Downscale {
        Downscale {
            default: f,
            per_dataset: BTreeMap::new(),
        }
    }

    /// The factor of dataset `name`.
    pub fn of(&self, name: &str) -> u32 {
        self.per_dataset.get(name).copied().unwrap_or(self.default)
    }
}

impl FromStr for Downscale {
    type Err = String;

    fn from_str(s: &str) -> Result<Downscale, String> {
        let factor = |t: &str| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| format!("`{t}`: a downscale factor is an integer of at least 1"))
        };
        let mut out = Downscale::uniform(1);
        let mut have_default = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((name, f)) => {
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(format!("`{part}`: expected DATASET=FACTOR"));
                    }
                    if out
                        .per_dataset
                        .insert(name.to_string(), factor(f)?)
                        .is_some()
                    {
                        return Err(format!("`{name}` is given twice"));
                    }
                }
                None if have_default => return Err(format!("`{s}`: more than one default factor")),
                None => {
                    out.default = factor(part)?;
                    have_default = true;
                }
            }
        }
        if !have_default && out.per_dataset.is_empty() {
            return Err(
                "expected a factor (`4`) or DATASET=FACTOR pairs (`busi=4,drive=1`)".into(),
            );
        }
        Ok(out)
    }
}

impl fmt::Display for Downscale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.default)?;
        for (name, k) in &self.per_dataset {
            write!(f, ",{name}={k}")?;
        }
        Ok(())
    }
}

/// A sweep: datasets × α × seeds for one architecture, with one recipe.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// Architecture.
    pub arch: Arch,
    /// Dataset folders.
    pub datasets: Vec<PathBuf>,
    /// Width multipliers.
    pub alphas: Vec<Alpha>,
    /// Seeds per point.
    pub seeds: u64,
    /// Training recipe of every run; its `downscale` is `downscale.default`, replaced per
    /// dataset by [`Sweep::recipe_for`].
    pub recipe: Recipe,
    /// Downscale factor per dataset.
    pub downscale: Downscale,
    /// Folder holding one sub-folder per run key.
    pub runs_dir: PathBuf,
}

/// File in the run folder naming the settings that own it.
pub const OWNER_FILE: &str = "sweep.json";

/// The settings every run of a folder must share: runs of one folder are averaged and
/// fitted together, so they must come from the same architecture and recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Owner {
    arch: String,
    recipe: serde_json::Value,
    /// Per-dataset downscale overrides (absent in folders made before they existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    downscale_per_dataset: BTreeMap<String, u32>,
}

/// State of one run of the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Not started.
    Pending,
    /// Started, checkpoint present, not finished.
    Partial,
    /// Finished (early stop or all epochs).
    Done,
}

/// The name of a dataset folder (its last component, after resolving links).
pub fn dataset_name(dir: &Path) -> String {
    dir.canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into())
}

impl Sweep {
    /// Every run key, datasets outermost, then α (largest first), then seed.
    pub fn keys(&self) -> Vec<(RunKey, PathBuf)> {
        let mut alphas = self.alphas.clone();
        alphas.sort_by(|a, b| b.value().total_cmp(&a.value()));
        let mut out = Vec::new();
        for d in &self.datasets {
            for a in &alphas {
                for seed in 0..self.seeds {
                    out.push((
                        RunKey {
                            arch: self.arch.name().to_string(),
                            dataset: dataset_name(d),
                            alpha: a.to_string(),
                            seed,
                        },
                        d.clone(),
                    ));
                }
            }
        }
        out
    }

    /// Checks that the run folder belongs to this sweep's architecture and recipe
    /// (`sweep.json`), and with `claim` writes that file when the folder has none.
    /// Another calibration's folder is a clear error naming what differs.
    pub fn check_owner(&self, claim: bool) -> Result<()> {
        let path = self.runs_dir.join(OWNER_FILE);
        let mine = Owner {
            arch: self.arch.name().to_string(),
            recipe: serde_json::to_value(&self.recipe)?,
            downscale_per_dataset: self.downscale.per_dataset.clone(),
        };
        if path.exists() {
            let theirs: Owner = read_json(&path)?;
            if theirs != mine {
                bail!(
                    "{}: this run folder belongs to a calibration with other settings ({}); \
                     use another --runs folder or the same settings",
                    self.runs_dir.display(),
                    owner_diff(&theirs, &mine).join(", ")
                );
            }
        } else if claim {
            crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(&mine)?.as_bytes())
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        Ok(())
    }

    /// The recipe of the runs on dataset `name` (with its downscale factor).
    pub fn recipe_for(&self, name: &str) -> Recipe {
        let mut r = self.recipe.clone();
        r.downscale = self.downscale.of(name);
        r
    }

    /// The folder of a run.
    pub fn run_dir(&self, key: &RunKey) -> PathBuf {
        self.runs_dir.join(key.id())
    }

    /// Whether a run is pending, partial or done.
    pub fn state(&self, key: &RunKey) -> RunState {
        let dir = self.run_dir(key);
        if run::finished(&dir).is_some() {
            RunState::Done
        } else if run::config_path(&dir).exists() {
            RunState::Partial
        } else {
            RunState::Pending
        }
    }

    /// Runs (or resumes) one key; a finished run is left as it is.
    pub fn run_one(&self, key: &RunKey, dataset_dir: &Path, opts: &LoopOptions) -> Result<()> {
        let spec = TrainSpec {
            dataset_dir: dataset_dir.to_path_buf(),
            arch: self.arch,
            alpha: Alpha::parse(&key.alpha).map_err(|e| anyhow!("{e}"))?,
            seed: key.seed,
            recipe: self.recipe_for(&key.dataset),
        };
        run::train_to_end(&spec, &run::Variant::default(), &self.run_dir(key), opts).map(|_| ())
    }
}

/// Finished runs of `sweep` averaged per (dataset, α): `(dataset dir, α, points)`.
pub fn collect_points(sweep: &Sweep) -> Result<Vec<(PathBuf, Vec<WidthPoint>)>> {
    let mut out = Vec::new();
    for d in &sweep.datasets {
        let mut points = Vec::new();
        let mut alphas = sweep.alphas.clone();
        alphas.sort_by(|a, b| b.value().total_cmp(&a.value()));
        for a in &alphas {
            let mut f1 = Vec::new();
            let mut iu = Vec::new();
            let mut params = 0;
            for (key, _) in sweep
                .keys()
                .into_iter()
                .filter(|(k, dir)| dir == d && k.alpha == a.to_string())
            {
                if sweep.state(&key) != RunState::Done {
                    continue;
                }
                let dir = sweep.run_dir(&key);
                let m: RunMetrics = read_json(&dir.join("metrics.json"))?;
                let c: RunConfig = read_json(&run::config_path(&dir))?;
                params = c.deployed_params;
                f1.push(m.best_val_f1);
                iu.push(m.best_val_iu);
            }
            if f1.is_empty() {
                continue;
            }
            let (f1_mean, f1_std) = mean_std(&f1);
            let (iu_mean, iu_std) = mean_std(&iu);
            points.push(WidthPoint {
                alpha: a.to_string(),
                params,
                log10_params: (params as f64).log10(),
                seeds: f1.len(),
                f1_mean,
                f1_std,
                iu_mean,
                iu_std,
            });
        }
        out.push((d.clone(), points));
    }
    Ok(out)
}

/// The fields in which two owners differ, as `name: folder's value vs this value`.
fn owner_diff(theirs: &Owner, mine: &Owner) -> Vec<String> {
    let mut out = Vec::new();
    if theirs.arch != mine.arch {
        out.push(format!("arch: {} vs {}", theirs.arch, mine.arch));
    }
    match (theirs.recipe.as_object(), mine.recipe.as_object()) {
        (Some(t), Some(m)) => {
            let mut names: Vec<&String> = t.keys().chain(m.keys()).collect();
            names.sort();
            names.dedup();
            for n in names {
                let (a, b) = (t.get(n), m.get(n));
                if a != b {
                    let show = |v: Option<&serde_json::Value>| {
                        v.map_or("-".to_string(), |v| v.to_string())
                    };
                    out.push(format!("recipe.{n}: {} vs {}", show(a), show(b)));
                }
            }
        }
        _ if theirs.recipe != mine.recipe => out.push("recipe".into()),
        _ => {}
    }
    if theirs.downscale_per_dataset != mine.downscale_per_dataset {
        out.push(format!(
            "per-dataset downscale: {:?} vs {:?}",
            theirs.downscale_per_dataset, mine.downscale_per_dataset
        ));
    }
    out
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Fits the calibration from averaged points and each dataset's complexity `(J, B)`.
/// Datasets with fewer than two widths are listed but not fitted.
pub fn fit_calibration(
    arch: Arch,
    settings: SweepSettings,
    points: Vec<(String, f64, f64, Vec<WidthPoint>)>,
) -> Result<Calibration> {
    let mut datasets = Vec::new();
    for (name, j, b, pts) in points {
        let f1_pts: Vec<(f64, f64)> = pts.iter().map(|p| (p.log10_params, p.f1_mean)).collect();
        let iu_pts: Vec<(f64, f64)> = pts.iter().map(|p| (p.log10_params, p.iu_mean)).collect();
        let (f1, iu) = if pts.len() >= 2 {
            (fit_degradation(&f1_pts).ok(), fit_degradation(&iu_pts).ok())
        } else {
            (None, None)
        };
        datasets.push(DatasetFit {
            name,
            j,
            b,
            points: pts,
            f1,
            iu,
        });
    }
    let fitted: Vec<&DatasetFit> = datasets
        .iter()
        .filter(|d| d.f1.is_some() && d.iu.is_some())
        .collect();
    if fitted.len() < 2 {
        bail!(
            "calibration needs at least 2 datasets with at least 2 finished widths each; have {} ({})",
            fitted.len(),
            datasets
                .iter()
                .map(|d| format!("{}: {} widths", d.name, d.points.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let f1_vs_j = fit_line(
        &fitted
            .iter()
            .map(|d| (d.j, d.f1.map(|f| f.m).unwrap_or_default()))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| anyhow!("slope of F1 against J: {e}"))?;
    let (lambda, iu_vs_jb) = fit_lambda(
        &fitted
            .iter()
            .map(|d| (d.j, d.b, d.iu.map(|f| f.m).unwrap_or_default()))
            .collect::<Vec<_>>(),
        100,
    )
    .map_err(|e| anyhow!("slope of IU against JB: {e}"))?;
    let base_alpha = settings
        .alphas
        .iter()
        .filter_map(|a| Alpha::parse(a).ok())
        .max_by(|a, b| a.value().total_cmp(&b.value()))
        .map(|a| a.to_string())
        .unwrap_or_default();
    let base_f1_vs_j = fit_line(
        &fitted
            .iter()
            .map(|d| (d.j, d.points[0].f1_mean))
            .collect::<Vec<_>>(),
    )
    .ok();
    let base_iu_vs_jb = fit_line(
        &fitted
            .iter()
            .map(|d| (lambda * d.j + (1.0 - lambda) * d.b, d.points[0].iu_mean))
            .collect::<Vec<_>>(),
    )
    .ok();
    Ok(Calibration {
        format: super::file::CALIBRATION_FORMAT,
        base_f1_vs_j,
        base_iu_vs_jb,
        arch: arch.name().to_string(),
        base_alpha,
        settings,
        datasets,
        f1_vs_j,
        iu_vs_jb,
        lambda,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downscale_specs() {
        let d: Downscale = "busi=4, kvasir_seg=2".parse().unwrap();
        assert_eq!((d.of("busi"), d.of("kvasir_seg"), d.of("drive")), (4, 2, 1));
        let d: Downscale = "2,busi=4".parse().unwrap();
        assert_eq!((d.of("busi"), d.of("drive")), (4, 2));
        assert_eq!(d.to_string(), "2,busi=4");
        assert_eq!(d.to_string().parse::<Downscale>().unwrap(), d);
        assert_eq!("3".parse::<Downscale>().unwrap(), Downscale::uniform(3));
        for bad in ["", "0", "busi=0", "2,3", "busi=4,busi=2", "=4", "x"] {
            assert!(bad.parse::<Downscale>().is_err(), "{bad}");
        }
    }

    #[test]
    fn run_keys_round_trip() {
        let k = RunKey {
            arch: "unet".into(),
            dataset: "dsb2018.nuclei".into(),
            alpha: "1/16".into(),
            seed: 2,
        };
        assert_eq!(k.id(), "unet.dsb2018.nuclei.a1_16.s2");
        assert_eq!(RunKey::parse(&k.id()).unwrap(), k);
        for bad in [
            "unet",
            "unet.busi.a0_1.s0",
            "unet.busi.a1_8.sx",
            "unet.busi.1_8.s0",
        ] {
            assert!(RunKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fit_recovers_slopes_and_complexity_regressions() {
        // Three datasets whose slopes follow m_F1 = 0.2 J + 0.01 and
        // m_IU = 0.1 (0.4 J + 0.6 B) + 0.02, exactly.
        let mk = |j: f64, b: f64| {
            let mf1 = 0.2 * j + 0.01;
            let miu = 0.1 * (0.4 * j + 0.6 * b) + 0.02;
            let pts = [(1u32, 7.49), (4, 6.29), (16, 5.09)]
                .iter()
                .map(|&(den, l)| WidthPoint {
                    alpha: format!("1/{den}"),
                    params: 10f64.powf(l) as u64,
                    log10_params: l,
                    seeds: 1,
                    f1_mean: 0.9 * (1.0 - mf1 * (7.49 - l)),
                    f1_std: 0.0,
                    iu_mean: 0.8 * (1.0 - miu * (7.49 - l)),
                    iu_std: 0.0,
                })
                .collect();
            (format!("d{j}"), j, b, pts)
        };
        let settings = SweepSettings {
            alphas: vec!["1".into(), "1/4".into(), "1/16".into()],
            ..SweepSettings::default()
        };
        let cal = fit_calibration(
            Arch::Unet,
            settings,
            vec![mk(0.24, 0.57), mk(0.09, 0.13), mk(0.15, 0.31)],
        )
        .unwrap();
        assert!((cal.f1_vs_j.slope - 0.2).abs() < 1e-9);
        assert!((cal.f1_vs_j.intercept - 0.01).abs() < 1e-9);
        assert!((cal.lambda - 0.4).abs() < 1e-9);
        assert!((cal.iu_vs_jb.slope - 0.1).abs() < 1e-9);
        assert_eq!(cal.base_alpha, "1");
        // Predictions from the calibration reproduce a dataset's slope.
        assert!((cal.m_f1(0.15) - (0.2 * 0.15 + 0.01)).abs() < 1e-9);
        assert!((cal.m_iu(0.15, 0.31) - (0.1 * (0.4 * 0.15 + 0.6 * 0.31) + 0.02)).abs() < 1e-9);
        // One dataset is not enough.
        let e =
            fit_calibration(Arch::Unet, SweepSettings::default(), vec![mk(0.2, 0.3)]).unwrap_err();
        assert!(e.to_string().contains("at least 2 datasets"), "{e}");
    }
}
