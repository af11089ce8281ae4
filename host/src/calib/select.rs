//! Choosing α for a user constraint (METHOD.md section 4).
//!
//! Each grid α is a [`Candidate`] with its exact parameter count, bytes on disk and bytes
//! of RAM, and the relative F1 / IU that equation (1) predicts from the dataset's
//! slopes. Constraints cut the grid: an accuracy floor (case 1) keeps the α whose
//! predicted relative accuracy reaches it, budgets (case 2a disk, 2b RAM) keep the α
//! that fit. With an accuracy floor the smallest remaining α is chosen (least memory
//! that meets the floor: the paper's "ceiling on the grid"); with budgets only, the
//! largest (best accuracy that fits). An empty set is an error that shows, for every α,
//! which constraint it fails and by how much.

use std::fmt::Write as _;

use ccnet_shared::alpha::Alpha;
use serde::Serialize;

use super::fit::relative_accuracy;

/// Which predicted accuracy an accuracy floor applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Foreground F1 (Dice), predicted from J.
    F1,
    /// Foreground IU (Jaccard), predicted from JB.
    Iu,
}

/// One α of the grid with its costs and predictions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    /// Width multiplier.
    #[serde(serialize_with = "ser_alpha")]
    pub alpha: Alpha,
    /// Parameters of the deployed network.
    pub params: u64,
    /// log10 of `params`.
    pub log10_params: f64,
    /// Exact bytes of the packed file.
    pub disk_bytes: u64,
    /// Bytes of RAM a run needs (arena, plus weights when they are held in RAM).
    pub ram_bytes: u64,
    /// The tile (height, width) the RAM figure is planned for.
    pub tile: [u32; 2],
    /// Predicted F1 relative to the base network.
    pub rel_f1: f64,
    /// Predicted IU relative to the base network.
    pub rel_iu: f64,
}

fn ser_alpha<S: serde::Serializer>(a: &Alpha, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&a.to_string())
}

impl Candidate {
    /// Predictions for a candidate from the dataset's slopes and the base network size,
    /// clamped to [0, 1]: equation (1) is a line fitted below the base network, and a
    /// network wider than the base is not predicted to beat it.
    pub fn predict(&mut self, m_f1: f64, m_iu: f64, base_log10_params: f64) {
        self.rel_f1 = relative_accuracy(m_f1, base_log10_params, self.log10_params).clamp(0.0, 1.0);
        self.rel_iu = relative_accuracy(m_iu, base_log10_params, self.log10_params).clamp(0.0, 1.0);
    }

    fn rel(&self, metric: Metric) -> f64 {
        match metric {
            Metric::F1 => self.rel_f1,
            Metric::Iu => self.rel_iu,
        }
    }
}

/// The user's constraints; any combination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Constraints {
    /// Keep at least this fraction of the base accuracy (e.g. 0.95), on `metric`.
    pub keep: Option<f64>,
    /// Metric the floor applies to.
    pub metric: Option<Metric>,
    /// Disk budget in bytes (the packed file).
    pub disk: Option<u64>,
    /// RAM budget in bytes.
    pub ram: Option<u64>,
}

/// The choice and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Selection {
    /// The chosen candidate.
    pub chosen: Candidate,
    /// One sentence on why this α.
    pub reason: String,
    /// Every candidate considered, largest α first.
    pub grid: Vec<Candidate>,
}

/// No α satisfies the constraints.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Infeasible(pub String);

fn fails(c: &Candidate, k: &Constraints) -> Vec<String> {
    let mut why = Vec::new();
    let metric = k.metric.unwrap_or(Metric::F1);
    if let Some(keep) = k.keep {
        if c.rel(metric) < keep {
            why.push(format!(
                "predicted {} {:.1} % of base < {:.1} %",
                match metric {
                    Metric::F1 => "F1",
                    Metric::Iu => "IU",
                },
                100.0 * c.rel(metric),
                100.0 * keep
            ));
        }
    }
    if let Some(d) = k.disk {
        if c.disk_bytes > d {
            why.push(format!(
                "file {} bytes > disk budget {} bytes",
                c.disk_bytes, d
            ));
        }
    }
    if let Some(r) = k.ram {
        if c.ram_bytes > r {
            why.push(format!("RAM {} bytes > budget {} bytes", c.ram_bytes, r));
        }
    }
    why
}

/// Chooses α from `grid` (any order) under `k`.
pub fn select(mut grid: Vec<Candidate>, k: &Constraints) -> Result<Selection, Infeasible> {
    if grid.is_empty() {
        return Err(Infeasible("the α grid is empty".into()));
    }
    grid.sort_by(|a, b| b.alpha.value().total_cmp(&a.alpha.value()));
    let feasible: Vec<&Candidate> = grid.iter().filter(|c| fails(c, k).is_empty()).collect();
    let pick = if k.keep.is_some() {
        feasible.last()
    } else {
        feasible.first()
    };
    match pick {
        Some(&c) => {
            let reason = if let Some(keep) = k.keep {
                format!(
                    "smallest α on the grid whose predicted relative accuracy stays ≥ {:.1} %{}",
                    100.0 * keep,
                    if k.disk.is_some() || k.ram.is_some() {
                        " and that fits the budgets"
                    } else {
                        ""
                    }
                )
            } else if k.disk.is_some() || k.ram.is_some() {
                "largest α on the grid that fits the budgets".to_string()
            } else {
                "no constraint given: the largest α on the grid".to_string()
            };
            Ok(Selection {
                chosen: c.clone(),
                reason,
                grid: grid.clone(),
            })
        }
        None => {
            let mut msg = String::from("no width multiplier on the grid meets the constraints:");
            for c in &grid {
                let _ = write!(
                    msg,
                    "\n  α = {:<6} P = {:>10}  {}",
                    c.alpha.to_string(),
                    c.params,
                    fails(c, k).join("; ")
                );
            }
            Err(Infeasible(msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<Candidate> {
        // P ∝ α², 4 bytes per parameter + 1000 bytes of header; RAM ∝ α.
        [1u32, 2, 4, 8, 16, 32]
            .iter()
            .map(|&den| {
                let params = 31_000_000 / u64::from(den * den);
                let mut c = Candidate {
                    alpha: Alpha::new(1, den).unwrap(),
                    params,
                    log10_params: (params as f64).log10(),
                    disk_bytes: params * 4 + 1000,
                    ram_bytes: 8_000_000 / u64::from(den),
                    tile: [256, 256],
                    rel_f1: 0.0,
                    rel_iu: 0.0,
                };
                c.predict(0.03, 0.05, (31_000_000f64).log10());
                c
            })
            .collect()
    }

    #[test]
    fn accuracy_floor_takes_the_ceiling_on_the_grid() {
        // Each halving of α loses log10(4) = 0.602 decades: 1.8 % of F1 per step.
        let k = Constraints {
            keep: Some(0.95),
            ..Constraints::default()
        };
        let s = select(grid(), &k).unwrap();
        assert_eq!(s.chosen.alpha, Alpha::new(1, 4).unwrap());
        assert!(s.chosen.rel_f1 >= 0.95);
        let next = s
            .grid
            .iter()
            .find(|c| c.alpha == Alpha::new(1, 8).unwrap())
            .unwrap();
        assert!(next.rel_f1 < 0.95);
        // On IU (steeper) the floor needs a wider network.
        let k_iu = Constraints {
            metric: Some(Metric::Iu),
            ..k
        };
        assert_eq!(
            select(grid(), &k_iu).unwrap().chosen.alpha,
            Alpha::new(1, 2).unwrap()
        );
    }

    #[test]
    fn budgets_take_the_largest_fitting_alpha() {
        let k = Constraints {
            disk: Some(1_000_000),
            ..Constraints::default()
        };
        let s = select(grid(), &k).unwrap();
        assert_eq!(s.chosen.alpha, Alpha::new(1, 16).unwrap());
        assert!(s.chosen.disk_bytes <= 1_000_000);
        let k = Constraints {
            ram: Some(2_000_000),
            disk: Some(1_000_000_000),
            ..Constraints::default()
        };
        assert_eq!(
            select(grid(), &k).unwrap().chosen.alpha,
            Alpha::new(1, 4).unwrap()
        );
    }

    #[test]
    fn combined_constraints_and_infeasible_ones() {
        let k = Constraints {
            keep: Some(0.95),
            disk: Some(10_000_000),
            ..Constraints::default()
        };
        assert_eq!(
            select(grid(), &k).unwrap().chosen.alpha,
            Alpha::new(1, 4).unwrap()
        );
        let k = Constraints {
            keep: Some(0.95),
            disk: Some(1_000_000),
            ..Constraints::default()
        };
        let e = select(grid(), &k).unwrap_err().0;
        assert!(
            e.contains("α = 1/4") && e.contains("> disk budget 1000000 bytes"),
            "{e}"
        );
        assert!(e.contains("α = 1/16") && e.contains("< 95.0 %"), "{e}");
    }
}
