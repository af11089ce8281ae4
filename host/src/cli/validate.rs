//! `ccnet validate`: leave-one-dataset-out validation of a calibration file and the
//! paper's check of case 1 (the chosen width meets the target, one step smaller misses).

use std::path::PathBuf;

use anyhow::{bail, Result};
use ccnet_models::Arch;
use clap::Args;

use super::select::default_calibration;
use super::values;
use crate::calib::file::Calibration;
use crate::calib::validate::{case1_checks, leave_one_out, overall_error, Case1Check, LooRow};

/// Arguments of `ccnet validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Architecture whose shipped calibration is validated.
    #[arg(long, value_parser = values::arch, default_value = "unet")]
    pub arch: Arch,
    /// Calibration file [default: models/calibration/<arch>.json].
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Relative-F1 targets of the case-1 check.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.95")]
    pub targets: Vec<f64>,
    /// Print JSON instead of Markdown tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ccnet validate`.
pub fn run(a: &ValidateArgs) -> Result<()> {
    if let Some(t) = a.targets.iter().find(|t| !(**t > 0.0 && **t <= 1.0)) {
        bail!("--targets: {t} is not a relative accuracy in (0, 1]");
    }
    let path = a
        .calibration
        .clone()
        .unwrap_or_else(|| default_calibration(a.arch));
    let cal = Calibration::load(&path)?;
    let rows = leave_one_out(&cal)?;
    let checks = case1_checks(&rows, &cal, &a.targets);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "calibration": path.display().to_string(),
                "leave_one_out": rows,
                "case1": checks,
            }))?
        );
    } else {
        print!("{}", markdown(&rows, &checks));
    }
    Ok(())
}

/// The two tables in Markdown.
pub fn markdown(rows: &[LooRow], checks: &[Case1Check]) -> String {
    let mut s = String::from(
        "| held-out dataset | J | m_F1 fitted | m_F1 predicted (constant) | α: achieved / predicted (constant) relative F1 | mean abs. error (constant) |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let pts = r
            .points
            .iter()
            .map(|p| {
                format!(
                    "{}: {:.3} / {:.3} ({:.3})",
                    p.alpha, p.achieved, p.predicted, p.predicted_constant
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        s += &format!(
            "| {} | {:.4} | {:.3} | {:.3} ({:.3}) | {} | {:.3} ({:.3}) |\n",
            r.dataset,
            r.j,
            r.m_fitted,
            r.m_predicted,
            r.m_constant,
            pts,
            r.mean_abs_error,
            r.mean_abs_error_constant
        );
    }
    if let Some(e) = overall_error(rows) {
        s += &format!(
            "\nMean absolute error of predicted relative F1 over all held-out points: {:.3} ({} points); \
             a constant slope (the other datasets' mean, complexity ignored) gives {:.3}.\n",
            e.complexity, e.points, e.constant
        );
    }
    s += "\n| held-out dataset | target | chosen α | achieved there | one step smaller | achieved there | meets | smaller misses |\n|---|---|---|---|---|---|---|---|\n";
    for c in checks {
        s += &format!(
            "| {} | {:.2} | {} | {:.3} | {} | {} | {} | {} |\n",
            c.dataset,
            c.target,
            c.chosen,
            c.achieved_at_chosen,
            c.smaller.as_deref().unwrap_or("–"),
            c.achieved_at_smaller
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "–".into()),
            if c.meets { "yes" } else { "no" },
            if c.smaller_misses { "yes" } else { "no" },
        );
    }
    let both = checks
        .iter()
        .filter(|c| c.meets && c.smaller_misses)
        .count();
    s += &format!(
        "\nCase 1 holds (meets the target, one step smaller misses it) in {both} of {} checks.\n",
        checks.len()
    );
    s
}
