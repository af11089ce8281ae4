//! Validation of the predictor, from a calibration file alone: leave one dataset out,
//! refit equation (2) on the others, predict the held-out dataset's slope from its
//! complexity and so its relative F1 at every width, and compare with what its runs
//! achieved. Then the paper's check of case 1: for an accuracy target, the width chosen
//! from the prediction meets it and one grid step smaller misses it.

use anyhow::{bail, Result};
use serde::Serialize;

use super::file::{Calibration, DatasetFit};
use super::fit::{fit_line, relative_accuracy};

/// One width of a held-out dataset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LooPoint {
    /// Width multiplier.
    pub alpha: String,
    /// log10 of the parameters.
    pub log10_params: f64,
    /// Relative F1 the runs achieved (F1 / base F1).
    pub achieved: f64,
    /// Relative F1 predicted with the slope fitted on the other datasets, in [0, 1].
    pub predicted: f64,
    /// Relative F1 predicted by the baseline that ignores complexity: the mean slope of
    /// the other datasets, in [0, 1].
    pub predicted_constant: f64,
}

/// One held-out dataset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LooRow {
    /// Dataset name.
    pub dataset: String,
    /// Its JPEG complexity J.
    pub j: f64,
    /// Its own fitted slope m_F1 (equation 1 on its points).
    pub m_fitted: f64,
    /// The slope predicted from J by equation (2) fitted on the other datasets.
    pub m_predicted: f64,
    /// The baseline's slope: the mean m_F1 of the other datasets (complexity ignored).
    pub m_constant: f64,
    /// Every width but the base (whose relative F1 is 1 by definition).
    pub points: Vec<LooPoint>,
    /// Mean absolute error of the predicted relative F1 over `points`.
    pub mean_abs_error: f64,
    /// The same for the constant-slope baseline.
    pub mean_abs_error_constant: f64,
}

/// The paper's check of case 1 for one held-out dataset and one target.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Case1Check {
    /// Dataset name.
    pub dataset: String,
    /// Target relative F1.
    pub target: f64,
    /// The smallest width whose predicted relative F1 reaches the target (the base
    /// when none smaller does).
    pub chosen: String,
    /// Relative F1 achieved at `chosen`.
    pub achieved_at_chosen: f64,
    /// One grid step smaller, if the grid has one.
    pub smaller: Option<String>,
    /// Relative F1 achieved there.
    pub achieved_at_smaller: Option<f64>,
    /// `achieved_at_chosen ≥ target`.
    pub meets: bool,
    /// `achieved_at_smaller < target` (true when there is no smaller width).
    pub smaller_misses: bool,
}

/// The leave-one-out rows of every dataset of `cal` that has an F1 fit; needs at least
/// three such datasets (two to refit the line on).
pub fn leave_one_out(cal: &Calibration) -> Result<Vec<LooRow>> {
    let fitted: Vec<&DatasetFit> = cal.datasets.iter().filter(|d| d.f1.is_some()).collect();
    if fitted.len() < 3 {
        bail!(
            "leave-one-out needs at least 3 calibrated datasets (2 to refit on), the file has {}",
            fitted.len()
        );
    }
    let mut rows = Vec::new();
    for (i, d) in fitted.iter().enumerate() {
        let others: Vec<(f64, f64)> = fitted
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != i)
            .filter_map(|(_, o)| o.f1.map(|f| (o.j, f.m)))
            .collect();
        let line = fit_line(&others)
            .map_err(|e| anyhow::anyhow!("without {}: slope against J: {e}", d.name))?;
        let m_predicted = line.eval(d.j);
        let m_constant = others.iter().map(|o| o.1).sum::<f64>() / others.len() as f64;
        let f1 = d.f1.expect("filtered on f1");
        let base = f1.base_accuracy;
        let points: Vec<LooPoint> = d
            .points
            .iter()
            .filter(|p| p.log10_params < f1.base_log10_params)
            .map(|p| LooPoint {
                alpha: p.alpha.clone(),
                log10_params: p.log10_params,
                achieved: p.f1_mean / base,
                predicted: relative_accuracy(m_predicted, f1.base_log10_params, p.log10_params)
                    .clamp(0.0, 1.0),
                predicted_constant: relative_accuracy(
                    m_constant,
                    f1.base_log10_params,
                    p.log10_params,
                )
                .clamp(0.0, 1.0),
            })
            .collect();
        let mae = |f: fn(&LooPoint) -> f64| {
            if points.is_empty() {
                0.0
            } else {
                points
                    .iter()
                    .map(|p| (f(p) - p.achieved).abs())
                    .sum::<f64>()
                    / points.len() as f64
            }
        };
        let mean_abs_error = mae(|p| p.predicted);
        let mean_abs_error_constant = mae(|p| p.predicted_constant);
        rows.push(LooRow {
            dataset: d.name.clone(),
            j: d.j,
            m_fitted: f1.m,
            m_predicted,
            m_constant,
            points,
            mean_abs_error,
            mean_abs_error_constant,
        });
    }
    Ok(rows)
}

/// Mean absolute errors of predicted relative F1 over every held-out point of a
/// leave-one-out validation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LooError {
    /// With the slope predicted from complexity (equation 2).
    pub complexity: f64,
    /// With the constant-slope baseline.
    pub constant: f64,
    /// Held-out points averaged.
    pub points: usize,
}

/// The overall errors of `rows`; `None` without any held-out point.
pub fn overall_error(rows: &[LooRow]) -> Option<LooError> {
    let pts: Vec<&LooPoint> = rows.iter().flat_map(|r| &r.points).collect();
    if pts.is_empty() {
        return None;
    }
    let mean = |f: fn(&LooPoint) -> f64| {
        pts.iter().map(|p| (f(p) - p.achieved).abs()).sum::<f64>() / pts.len() as f64
    };
    Some(LooError {
        complexity: mean(|p| p.predicted),
        constant: mean(|p| p.predicted_constant),
        points: pts.len(),
    })
}

/// Case 1 on the held-out predictions: for each row and target, the width chosen on the
/// row's grid (largest first) and whether achieved accuracy agrees with the choice.
pub fn case1_checks(rows: &[LooRow], cal: &Calibration, targets: &[f64]) -> Vec<Case1Check> {
    let mut out = Vec::new();
    for r in rows {
        let base_alpha = cal
            .datasets
            .iter()
            .find(|d| d.name == r.dataset)
            .and_then(|d| d.points.first())
            .map(|p| p.alpha.clone())
            .unwrap_or_else(|| cal.base_alpha.clone());
        // Grid largest first: the base (relative 1 by definition), then the others.
        let mut grid: Vec<(String, f64, f64)> = vec![(base_alpha, 1.0, 1.0)];
        let mut pts = r.points.clone();
        pts.sort_by(|a, b| b.log10_params.total_cmp(&a.log10_params));
        grid.extend(pts.into_iter().map(|p| (p.alpha, p.predicted, p.achieved)));
        for &t in targets {
            let idx = grid.iter().rposition(|g| g.1 >= t).unwrap_or(0);
            let (chosen, _, achieved) = grid[idx].clone();
            let smaller = grid.get(idx + 1).cloned();
            out.push(Case1Check {
                dataset: r.dataset.clone(),
                target: t,
                chosen,
                achieved_at_chosen: achieved,
                smaller: smaller.as_ref().map(|s| s.0.clone()),
                achieved_at_smaller: smaller.as_ref().map(|s| s.2),
                meets: achieved >= t,
                smaller_misses: smaller.is_none_or(|s| s.2 < t),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::file::{SweepSettings, WidthPoint};
    use crate::calib::sweep::fit_calibration;
    use ccnet_models::Arch;

    /// Datasets whose slopes follow m = 0.5·J + 0.02 exactly, at log10 P 6, 5.4, 4.8.
    fn calibration(js: &[f64], off: f64) -> Calibration {
        let pts = |j: f64, noise: f64| {
            let m = 0.5 * j + 0.02 + noise;
            [("1/8", 6.0), ("1/16", 5.4), ("1/32", 4.8)]
                .iter()
                .map(|&(a, l)| WidthPoint {
                    alpha: a.into(),
                    params: 10f64.powf(l) as u64,
                    log10_params: l,
                    seeds: 1,
                    f1_mean: 0.8 * (1.0 - m * (6.0 - l)),
                    f1_std: 0.0,
                    iu_mean: 0.7 * (1.0 - m * (6.0 - l)),
                    iu_std: 0.0,
                })
                .collect::<Vec<_>>()
        };
        let data = js
            .iter()
            .enumerate()
            .map(|(i, &j)| {
                let noise = if i == 0 { off } else { 0.0 };
                (format!("d{i}"), j, j / 2.0 + 0.01 * i as f64, pts(j, noise))
            })
            .collect();
        let settings = SweepSettings {
            alphas: vec!["1/8".into(), "1/16".into(), "1/32".into()],
            ..SweepSettings::default()
        };
        fit_calibration(Arch::Unet, settings, data).unwrap()
    }

    #[test]
    fn exact_slopes_are_predicted_exactly_when_left_out() {
        let cal = calibration(&[0.05, 0.1, 0.2, 0.3], 0.0);
        let rows = leave_one_out(&cal).unwrap();
        assert_eq!(rows.len(), 4);
        for r in &rows {
            assert!((r.m_predicted - (0.5 * r.j + 0.02)).abs() < 1e-9, "{r:?}");
            assert!((r.m_fitted - r.m_predicted).abs() < 1e-9, "{r:?}");
            assert_eq!(r.points.len(), 2);
            assert!(r.mean_abs_error < 1e-9, "{r:?}");
        }
        // The constant-slope baseline predicts the others' mean slope: for d0 (own
        // m 0.045) that is 0.5 · 0.2 + 0.02 = 0.12, off by 0.075 per decade, so by
        // 0.075 · 0.6 and 0.075 · 1.2 at the two smaller widths.
        let r = &rows[0];
        assert!((r.m_constant - 0.12).abs() < 1e-9, "{r:?}");
        assert!(
            (r.mean_abs_error_constant - 0.075 * 0.9).abs() < 1e-9,
            "{r:?}"
        );
        // A dataset off the line is mispredicted by how far it is off.
        let cal = calibration(&[0.05, 0.1, 0.2, 0.3], 0.1);
        let r = &leave_one_out(&cal).unwrap()[0];
        assert!((r.m_fitted - r.m_predicted - 0.1).abs() < 1e-9, "{r:?}");
        // At log10 P 5.4 and 4.8 the relative F1 differs by 0.1 · 0.6 and 0.1 · 1.2.
        assert!((r.mean_abs_error - 0.1 * 0.9).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn case1_picks_the_smallest_width_reaching_the_target() {
        let cal = calibration(&[0.05, 0.1, 0.2, 0.3], 0.0);
        let rows = leave_one_out(&cal).unwrap();
        // d0: m = 0.045 → relative 0.973 at 1/16, 0.946 at 1/32.
        let checks = case1_checks(&rows[..1], &cal, &[0.95, 0.96, 0.99]);
        assert_eq!(checks[0].chosen, "1/16");
        assert_eq!(checks[0].smaller.as_deref(), Some("1/32"));
        assert!(
            checks[0].meets && checks[0].smaller_misses,
            "{:?}",
            checks[0]
        );
        assert_eq!(checks[1].chosen, "1/16");
        // Nothing smaller reaches 0.99: the base is kept; it meets the target by
        // definition and the next width misses.
        assert_eq!(checks[2].chosen, "1/8");
        assert!(
            checks[2].meets && checks[2].smaller_misses,
            "{:?}",
            checks[2]
        );
        // A target every width reaches picks the smallest, which has no smaller step.
        let low = case1_checks(&rows[..1], &cal, &[0.5]);
        assert_eq!(low[0].chosen, "1/32");
        assert_eq!(low[0].smaller, None);
        assert!(low[0].smaller_misses);
    }

    #[test]
    fn too_few_datasets_is_an_error() {
        let cal = calibration(&[0.05, 0.1], 0.0);
        let e = leave_one_out(&cal).unwrap_err();
        assert!(e.to_string().contains("at least 3"), "{e}");
    }
}
