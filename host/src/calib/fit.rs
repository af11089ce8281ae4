//! The fits of CC-Net's accuracy model (METHOD.md sections 2–3).
//!
//! Per dataset, relative accuracy is linear in log10 P:
//! `A(P) / A_base = 1 − m · (log10 P_base − log10 P)` (1). Across datasets the slope is
//! linear in complexity: `m_F1 = a · J + b`, `m_IU = a · JB + b` with
//! `JB = λ · J + (1 − λ) · B` (2).

use serde::{Deserialize, Serialize};

/// A least-squares line `y = slope · x + intercept` and its coefficient of determination.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LineFit {
    /// Slope.
    pub slope: f64,
    /// Intercept.
    pub intercept: f64,
    /// R² (1 for a perfect fit; 0 when the line explains nothing; `NaN`-free: a
    /// constant `y` that the line hits exactly gives 1).
    pub r2: f64,
    /// Number of points.
    pub n: usize,
}

impl LineFit {
    /// `slope · x + intercept`.
    pub fn eval(&self, x: f64) -> f64 {
        self.slope * x + self.intercept
    }
}

/// Why a fit is impossible.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FitError {
    /// Fewer than two points.
    #[error("a line needs at least 2 points, got {0}")]
    TooFewPoints(usize),
    /// All x are equal.
    #[error("all points have the same x ({0}); the slope is undefined")]
    DegenerateX(f64),
    /// A value is not finite.
    #[error("a point is not a finite number")]
    NotFinite,
}

/// Ordinary least squares of `y` on `x`.
pub fn fit_line(points: &[(f64, f64)]) -> Result<LineFit, FitError> {
    let n = points.len();
    if n < 2 {
        return Err(FitError::TooFewPoints(n));
    }
    if points.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
        return Err(FitError::NotFinite);
    }
    let nf = n as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let my = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx <= f64::EPSILON * nf * mx.abs().max(1.0) {
        return Err(FitError::DegenerateX(mx));
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let sse: f64 = points
        .iter()
        .map(|p| (p.1 - (slope * p.0 + intercept)).powi(2))
        .sum();
    let r2 = if syy > 0.0 { 1.0 - sse / syy } else { 1.0 };
    Ok(LineFit {
        slope,
        intercept,
        r2,
        n,
    })
}

/// Equation (1) for one dataset: the fit of relative accuracy against log10 P.
/// `m` is the fitted slope (relative accuracy lost per decade of parameters).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Degradation {
    /// The fitted line `relative accuracy = slope · log10 P + intercept`.
    pub line: LineFit,
    /// `m` of equation (1) (= `line.slope`).
    pub m: f64,
    /// log10 of the base network's parameters.
    pub base_log10_params: f64,
    /// The base network's accuracy that relative accuracies are divided by.
    pub base_accuracy: f64,
}

/// Fits equation (1) to `(log10 P, accuracy)` points, relative to the point with the
/// largest P (the base network).
pub fn fit_degradation(points: &[(f64, f64)]) -> Result<Degradation, FitError> {
    let base = points
        .iter()
        .copied()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .ok_or(FitError::TooFewPoints(0))?;
    if base.1.is_nan() || base.1 <= 0.0 {
        return Err(FitError::NotFinite);
    }
    let rel: Vec<(f64, f64)> = points.iter().map(|&(l, a)| (l, a / base.1)).collect();
    let line = fit_line(&rel)?;
    Ok(Degradation {
        line,
        m: line.slope,
        base_log10_params: base.0,
        base_accuracy: base.1,
    })
}

/// Relative accuracy of equation (1) at `log10_params` for slope `m`.
pub fn relative_accuracy(m: f64, base_log10_params: f64, log10_params: f64) -> f64 {
    1.0 - m * (base_log10_params - log10_params)
}

/// Equation (2) for IU: the best `λ` on a grid of `steps + 1` values in [0, 1] for the
/// regression of slopes on `JB = λ·J + (1 − λ)·B`, by R² (ties: the smaller λ).
/// Input: `(J, B, m)` per dataset.
pub fn fit_lambda(points: &[(f64, f64, f64)], steps: u32) -> Result<(f64, LineFit), FitError> {
    let steps = steps.max(1);
    let mut best: Option<(f64, LineFit)> = None;
    let mut last_err = FitError::TooFewPoints(points.len());
    for i in 0..=steps {
        let lambda = f64::from(i) / f64::from(steps);
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|&(j, b, m)| (lambda * j + (1.0 - lambda) * b, m))
            .collect();
        match fit_line(&xy) {
            Ok(fit) => {
                if best.as_ref().is_none_or(|(_, f)| fit.r2 > f.r2 + 1e-12) {
                    best = Some((lambda, fit));
                }
            }
            Err(e) => last_err = e,
        }
    }
    best.ok_or(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_lines_are_recovered() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 2.0 * i as f64 - 1.0)).collect();
        let f = fit_line(&pts).unwrap();
        assert!((f.slope - 2.0).abs() < 1e-12 && (f.intercept + 1.0).abs() < 1e-12);
        assert!((f.r2 - 1.0).abs() < 1e-12);
        assert_eq!(f.n, 5);
        assert!((f.eval(10.0) - 19.0).abs() < 1e-9);
    }

    #[test]
    fn noisy_lines_have_lower_r2() {
        let pts = [(0.0, 0.0), (1.0, 1.5), (2.0, 1.0), (3.0, 3.5)];
        let f = fit_line(&pts).unwrap();
        assert!(f.r2 > 0.5 && f.r2 < 0.95, "{}", f.r2);
    }

    #[test]
    fn degenerate_inputs_are_errors() {
        assert_eq!(fit_line(&[(1.0, 2.0)]), Err(FitError::TooFewPoints(1)));
        assert!(matches!(
            fit_line(&[(1.0, 2.0), (1.0, 3.0)]),
            Err(FitError::DegenerateX(_))
        ));
        assert_eq!(
            fit_line(&[(1.0, f64::NAN), (2.0, 3.0)]),
            Err(FitError::NotFinite)
        );
    }

    #[test]
    fn degradation_recovers_m_from_equation_one() {
        // A_base = 0.9 at log10 P = 7.5, m = 0.04 per decade.
        let m = 0.04;
        let pts: Vec<(f64, f64)> = [7.5, 6.9, 6.3, 5.7]
            .iter()
            .map(|&l| (l, 0.9 * relative_accuracy(m, 7.5, l)))
            .collect();
        let d = fit_degradation(&pts).unwrap();
        assert!((d.m - m).abs() < 1e-12, "{}", d.m);
        assert!((d.line.intercept - (1.0 - m * 7.5)).abs() < 1e-9);
        assert_eq!(d.base_accuracy, 0.9);
        assert_eq!(d.base_log10_params, 7.5);
    }

    #[test]
    fn lambda_is_found_when_one_mix_explains_the_slopes() {
        // m = 0.1 · (0.3 J + 0.7 B) + 0.01 exactly.
        let data = [
            (0.24, 0.57),
            (0.24, 0.07),
            (0.15, 0.31),
            (0.14, 0.46),
            (0.09, 0.13),
        ];
        let pts: Vec<(f64, f64, f64)> = data
            .iter()
            .map(|&(j, b)| (j, b, 0.1 * (0.3 * j + 0.7 * b) + 0.01))
            .collect();
        let (lambda, fit) = fit_lambda(&pts, 100).unwrap();
        assert!((lambda - 0.3).abs() < 1e-9, "{lambda}");
        assert!((fit.slope - 0.1).abs() < 1e-9 && (fit.r2 - 1.0).abs() < 1e-9);
    }
}
