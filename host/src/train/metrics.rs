//! Foreground F1 (Dice) and IU (Jaccard) of binary (or multi-class, foreground = any
//! class ≠ 0) predictions.

use serde::{Deserialize, Serialize};

/// Pixel counts of one image's foreground confusion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Foreground predicted and true.
    pub tp: u64,
    /// Foreground predicted, background true.
    pub fp: u64,
    /// Background predicted, foreground true.
    pub fn_: u64,
    /// Pixels.
    pub total: u64,
}

impl Confusion {
    /// Counts `pred` against `truth` (same length; non-zero = foreground).
    pub fn of(pred: &[u8], truth: &[u8]) -> Confusion {
        assert_eq!(pred.len(), truth.len(), "prediction and mask sizes differ");
        let mut c = Confusion {
            total: pred.len() as u64,
            ..Confusion::default()
        };
        for (&p, &t) in pred.iter().zip(truth) {
            match (p != 0, t != 0) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                _ => {}
            }
        }
        c
    }

    /// F1 = Dice = 2TP / (2TP + FP + FN); 1 when both prediction and truth are empty.
    pub fn f1(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 {
            1.0
        } else {
            (2 * self.tp) as f64 / d as f64
        }
    }

    /// IU = Jaccard = TP / (TP + FP + FN); 1 when both are empty.
    pub fn iu(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 {
            1.0
        } else {
            self.tp as f64 / d as f64
        }
    }

    /// Whether nothing was predicted as foreground.
    pub fn empty_prediction(&self) -> bool {
        self.tp + self.fp == 0
    }
}

/// Mean F1 and IU over images, and how many predictions were empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Mean per-image F1.
    pub f1: f64,
    /// Mean per-image IU.
    pub iu: f64,
    /// Images whose prediction holds no foreground.
    pub empty_predictions: usize,
    /// Images.
    pub images: usize,
    /// True when every prediction is empty: the network collapsed to background.
    pub collapsed: bool,
}

/// Summarises per-image confusions.
pub fn summarize(per_image: &[Confusion]) -> Summary {
    let n = per_image.len();
    if n == 0 {
        return Summary::default();
    }
    let empty = per_image.iter().filter(|c| c.empty_prediction()).count();
    Summary {
        f1: per_image.iter().map(Confusion::f1).sum::<f64>() / n as f64,
        iu: per_image.iter().map(Confusion::iu).sum::<f64>() / n as f64,
        empty_predictions: empty,
        images: n,
        collapsed: empty == n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_masks() {
        let truth = [1, 1, 1, 1, 0, 0, 0, 0];
        let pred = [1, 1, 0, 0, 1, 0, 0, 0];
        let c = Confusion::of(&pred, &truth);
        assert_eq!((c.tp, c.fp, c.fn_), (2, 1, 2));
        assert!((c.f1() - 4.0 / 7.0).abs() < 1e-12);
        assert!((c.iu() - 2.0 / 5.0).abs() < 1e-12);
        let perfect = Confusion::of(&truth, &truth);
        assert_eq!((perfect.f1(), perfect.iu()), (1.0, 1.0));
        let empty = Confusion::of(&[0; 8], &truth);
        assert!(empty.empty_prediction());
        assert_eq!(empty.f1(), 0.0);
        let s = summarize(&[c, empty]);
        assert!((s.f1 - 2.0 / 7.0).abs() < 1e-12);
        assert_eq!(s.empty_predictions, 1);
        assert!(!s.collapsed);
        assert!(summarize(&[empty, empty]).collapsed);
    }
}
