//! Image complexity of segmentation datasets: the CC-Net measures J and B, their
//! combination JB, and the paper's other candidates (signal energy, edge information,
//! key points, visual clutter), per image and as dataset mean ± standard deviation.
//!
//! * [`jpeg`]: J, JPEG bytes / raw bytes at a fixed quality.
//! * [`blobs`]: B, multi-scale LoG blob density, and the Hessian key points (same scale space).
//! * [`energy`], [`edges`], [`clutter`]: the other candidates.
//! * [`filters`]: the hand-written convolution, Gaussian kernels and pyramid they share.
//!
//! Rules, stated once (they are also recorded in every output through [`Settings`]):
//! * J is computed on the gray (BT.601 luma) image by default ([`ColorRule::Gray`]),
//!   raw size `w·h` bytes. Reason: J must be comparable across datasets and within a
//!   dataset that mixes gray and colour images; in colour, the raw size triples while
//!   the chroma adds few JPEG bytes, so the same scene would score about a third of its
//!   gray J. [`ColorRule::Native`] instead encodes each image in its own channels
//!   (raw size `w·h·c`). The counts of gray and colour images are always reported.
//! * Every other measure works on the gray image in [0, 1], except clutter, which by
//!   its definition also uses the chroma of colour images (whatever the rule for J).
//! * Densities (B, key points) are counts per `cell_area` pixels (see
//!   [`BlobSettings::cell_area`]), measured at the image's own resolution.
//! * JB = λ·J + (1 − λ)·B per image; its mean is λ·mean(J) + (1 − λ)·mean(B).
//! * The dataset standard deviation is the sample one (n − 1); 0 for one image.
//!
//! [`measure_dataset`] streams: each parallel task reads, measures and drops one image.

pub mod blobs;
pub mod clutter;
pub mod edges;
pub mod energy;
pub use crate::kernels::filters;
pub mod jpeg;

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use blobs::{BlobSettings, Polarity};

use crate::dataset::{self, Dataset, DatasetError, Image8, Item};
use filters::Plane;

/// Why a measurement failed; every variant names the file or the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComplexityError {
    /// Reading the dataset failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// A measure could not be computed on a file.
    #[error("{path}: {message}")]
    Measure {
        /// The image.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The settings are invalid.
    #[error("invalid complexity settings: {0}")]
    Settings(String),
}

/// Which channels J encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorRule {
    /// Each image in its own channels (gray as 1, colour as 3).
    Native,
    /// Every image converted to gray (BT.601 luma) first (the default).
    Gray,
}

/// Everything a measurement depends on. Printed with every output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// JPEG quality for J (1–100).
    pub jpeg_quality: u8,
    /// λ in JB = λ·J + (1 − λ)·B.
    pub lambda: f64,
    /// Blob (B) and key-point detector parameters.
    pub blob: BlobSettings,
    /// Pyramid levels for edge information.
    pub edge_levels: u32,
    /// Haar levels for sub-band entropy clutter.
    pub clutter_levels: u32,
    /// Histogram bin width for sub-band entropy (coefficients of [0, 1] images).
    pub clutter_bin: f64,
    /// Channels J encodes.
    pub color: ColorRule,
    /// Read and check masks where the dataset has them (pairing, size, binary values).
    pub check_masks: bool,
    /// Mask threshold (`value > t` is foreground) instead of requiring 0/255 masks.
    pub mask_threshold: Option<u16>,
}

/// The defaults, chosen once and kept fixed (reasons in `docs/complexity.md`).
pub const DEFAULT_JPEG_QUALITY: u8 = 75;
/// Default λ for JB until the calibration fits one.
pub const DEFAULT_LAMBDA: f64 = 0.5;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            jpeg_quality: DEFAULT_JPEG_QUALITY,
            lambda: DEFAULT_LAMBDA,
            blob: BlobSettings::default(),
            edge_levels: 4,
            clutter_levels: 3,
            clutter_bin: 1.0 / 256.0,
            color: ColorRule::Gray,
            check_masks: true,
            mask_threshold: None,
        }
    }
}

impl Settings {
    /// Checks every parameter.
    pub fn validate(&self) -> Result<(), ComplexityError> {
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(ComplexityError::Settings(format!(
                "JPEG quality must be 1..=100 (got {})",
                self.jpeg_quality
            )));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return Err(ComplexityError::Settings(format!(
                "lambda must be in [0, 1] (got {})",
                self.lambda
            )));
        }
        if self.edge_levels == 0 || self.clutter_levels == 0 || self.clutter_bin <= 0.0 {
            return Err(ComplexityError::Settings(
                "edge_levels and clutter_levels must be >= 1, clutter_bin > 0".to_string(),
            ));
        }
        self.blob.validate().map_err(ComplexityError::Settings)
    }

    /// One line stating the settings, for tables and plots.
    pub fn describe(&self) -> String {
        let b = &self.blob;
        format!(
            "J: JPEG quality {} (4:4:4, baseline), channels {:?}; B: LoG sigma {}..{} px, {} log-spaced scales, \
             threshold {}, overlap {}, polarity {:?}, per {} px^2; keypoints: DoH threshold {}; \
             JB lambda {}; edges: {} pyramid levels; clutter: {} Haar levels, bin {:.5}",
            self.jpeg_quality,
            self.color,
            b.sigma_min,
            b.sigma_max,
            b.num_sigma,
            b.log_threshold,
            b.overlap,
            b.polarity,
            b.cell_area(),
            b.doh_threshold,
            self.lambda,
            self.edge_levels,
            self.clutter_levels,
            self.clutter_bin
        )
    }
}

/// The measures of one image, or a dataset's mean or standard deviation of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Measures {
    /// JPEG complexity J.
    pub j: f64,
    /// Blob density B.
    pub b: f64,
    /// λ·J + (1 − λ)·B.
    pub jb: f64,
    /// Signal energy (variance of the gray signal in [0, 1]).
    pub energy: f64,
    /// Mean Sobel gradient magnitude over the pyramid.
    pub edge_sobel: f64,
    /// Mean Scharr gradient magnitude over the pyramid.
    pub edge_scharr: f64,
    /// Hessian key-point density.
    pub keypoints: f64,
    /// Sub-band entropy clutter (bits).
    pub clutter: f64,
}

impl Measures {
    /// Short names, in the order of [`Measures::values`].
    pub const NAMES: [&'static str; 8] = [
        "J",
        "B",
        "JB",
        "energy",
        "edge_sobel",
        "edge_scharr",
        "keypoints",
        "clutter",
    ];

    /// The values in the order of [`Measures::NAMES`].
    pub fn values(&self) -> [f64; 8] {
        [
            self.j,
            self.b,
            self.jb,
            self.energy,
            self.edge_sobel,
            self.edge_scharr,
            self.keypoints,
            self.clutter,
        ]
    }

    /// Builds from values in the order of [`Measures::NAMES`].
    pub fn from_values(v: [f64; 8]) -> Measures {
        Measures {
            j: v[0],
            b: v[1],
            jb: v[2],
            energy: v[3],
            edge_sobel: v[4],
            edge_scharr: v[5],
            keypoints: v[6],
            clutter: v[7],
        }
    }
}

/// The measures of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageComplexity {
    /// Item id (file stem).
    pub id: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Channels as read (1 or 3).
    pub channels: u32,
    /// Number of blobs found (before dividing by the area).
    pub blob_count: usize,
    /// Number of key points found.
    pub keypoint_count: usize,
    /// The measures.
    pub measures: Measures,
}

/// The complexity of one dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetComplexity {
    /// Dataset name (folder name).
    pub name: String,
    /// Dataset folder as given.
    pub dir: PathBuf,
    /// Number of images.
    pub images: usize,
    /// Images read as gray.
    pub gray_images: usize,
    /// Images read as colour.
    pub rgb_images: usize,
    /// Mean over images.
    pub mean: Measures,
    /// Sample standard deviation over images.
    pub std: Measures,
    /// Wall-clock seconds the measurement took.
    pub seconds: f64,
    /// Per-image values, in item order.
    pub per_image: Vec<ImageComplexity>,
}

/// Measures one 8-bit image (gray or RGB) with `s`.
pub fn measure_image(img: &Image8, s: &Settings) -> Result<(Measures, usize, usize), String> {
    if img.width == 0 || img.height == 0 {
        return Err("empty image".to_string());
    }
    let gray = img.to_gray();
    let j = match s.color {
        ColorRule::Gray => jpeg::jpeg_ratio(&gray, s.jpeg_quality)?,
        ColorRule::Native => jpeg::jpeg_ratio(img, s.jpeg_quality)?,
    };
    let (w, h) = (img.width as usize, img.height as usize);
    let plane = Plane::from_u8(w, h, &gray.data);
    drop(gray);
    let det = blobs::detect(&plane, &s.blob);
    let per_cell = s.blob.cell_area() / (w * h) as f64;
    let b = det.blobs.len() as f64 * per_cell;
    let keypoints = det.keypoints.len() as f64 * per_cell;
    let energy = energy::signal_energy(&plane);
    let (edge_sobel, edge_scharr) = edges::edge_information(&plane, s.edge_levels);
    let clutter = clutter::clutter_with_luma(img, &plane, s.clutter_levels, s.clutter_bin);
    Ok((
        Measures {
            j,
            b,
            jb: s.lambda * j + (1.0 - s.lambda) * b,
            energy,
            edge_sobel,
            edge_scharr,
            keypoints,
            clutter,
        },
        det.blobs.len(),
        det.keypoints.len(),
    ))
}

/// Reads (and, with `check_masks`, validates the mask of) one item and measures it.
pub fn measure_item(item: &Item, s: &Settings) -> Result<ImageComplexity, ComplexityError> {
    let img = match (&item.mask, s.check_masks) {
        (Some(_), true) => dataset::load_pair(item, s.mask_threshold)?.0,
        _ => dataset::load_image(&item.image)?,
    };
    let (measures, blob_count, keypoint_count) =
        measure_image(&img, s).map_err(|message| ComplexityError::Measure {
            path: item.image.clone(),
            message,
        })?;
    Ok(ImageComplexity {
        id: item.id.clone(),
        width: img.width,
        height: img.height,
        channels: img.channels,
        blob_count,
        keypoint_count,
        measures,
    })
}

/// Mean and sample standard deviation of each measure.
pub fn mean_std(per_image: &[ImageComplexity]) -> (Measures, Measures) {
    let n = per_image.len();
    if n == 0 {
        return (Measures::default(), Measures::default());
    }
    let mut mean = [0.0; 8];
    for m in per_image {
        for (a, v) in mean.iter_mut().zip(m.measures.values()) {
            *a += v / n as f64;
        }
    }
    let mut var = [0.0; 8];
    if n > 1 {
        for m in per_image {
            for ((a, v), mu) in var.iter_mut().zip(m.measures.values()).zip(mean) {
                *a += (v - mu).powi(2) / (n - 1) as f64;
            }
        }
    }
    (
        Measures::from_values(mean),
        Measures::from_values(var.map(f64::sqrt)),
    )
}

/// Measures every image of a dataset in parallel (rayon), one image in memory per task,
/// ticking `progress` once per image. Fails on the first unreadable or invalid file,
/// naming it.
pub fn measure_dataset(
    ds: &Dataset,
    s: &Settings,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<DatasetComplexity, ComplexityError> {
    s.validate()?;
    let start = Instant::now();
    let per_image: Vec<ImageComplexity> = ds
        .items
        .par_iter()
        .map(|item| {
            let r = measure_item(item, s);
            if let Some(p) = progress {
                p.inc(1);
            }
            r
        })
        .collect::<Result<_, _>>()?;
    let (mean, std) = mean_std(&per_image);
    let gray_images = per_image.iter().filter(|m| m.channels == 1).count();
    Ok(DatasetComplexity {
        name: ds.name.clone(),
        dir: ds.dir.clone(),
        images: per_image.len(),
        gray_images,
        rgb_images: per_image.len() - gray_images,
        mean,
        std,
        seconds: start.elapsed().as_secs_f64(),
        per_image,
    })
}

/// Each measure's dataset means mapped to [0, 1] across the datasets (min → 0,
/// max → 1; a measure equal on every dataset maps to 0.5), as in the paper's Fig. 4.
pub fn normalise_across(datasets: &[DatasetComplexity]) -> Vec<Measures> {
    let mut out = vec![[0.0; 8]; datasets.len()];
    for k in 0..8 {
        let vals: Vec<f64> = datasets.iter().map(|d| d.mean.values()[k]).collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for (o, v) in out.iter_mut().zip(&vals) {
            o[k] = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        }
    }
    out.into_iter().map(Measures::from_values).collect()
}

/// A full report: the settings and every dataset, with the normalised means.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The settings every number was computed with.
    pub settings: Settings,
    /// One entry per dataset, in the order given.
    pub datasets: Vec<DatasetComplexity>,
    /// Dataset means normalised to [0, 1] across the datasets, same order.
    pub normalised: Vec<Measures>,
}

impl Report {
    /// Builds a report (computes the normalised means).
    pub fn new(settings: Settings, datasets: Vec<DatasetComplexity>) -> Report {
        let normalised = normalise_across(&datasets);
        Report {
            settings,
            datasets,
            normalised,
        }
    }

    /// The table of dataset means ± standard deviations, with the settings above it.
    pub fn table(&self) -> String {
        let mut s = format!("settings: {}\n", self.settings.describe());
        let mut header = format!("{:<16} {:>5} {:>7}", "dataset", "n", "gray/rgb");
        for n in Measures::NAMES {
            header.push_str(&format!(" {:>17}", n));
        }
        s.push_str(&header);
        s.push('\n');
        for d in &self.datasets {
            let mut row = format!(
                "{:<16} {:>5} {:>8}",
                d.name,
                d.images,
                format!("{}/{}", d.gray_images, d.rgb_images)
            );
            for (m, sd) in d.mean.values().iter().zip(d.std.values()) {
                row.push_str(&format!(" {:>17}", fmt_pm(*m, sd)));
            }
            s.push_str(&row);
            s.push('\n');
        }
        s
    }
}

fn fmt_pm(m: f64, sd: f64) -> String {
    if m.abs() >= 100.0 {
        format!("{m:.1}±{sd:.1}")
    } else {
        format!("{m:.4}±{sd:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item_result(v: f64) -> ImageComplexity {
        ImageComplexity {
            id: String::new(),
            width: 1,
            height: 1,
            channels: 1,
            blob_count: 0,
            keypoint_count: 0,
            measures: Measures::from_values([v; 8]),
        }
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[item_result(1.0), item_result(3.0)]);
        assert_eq!(m.j, 2.0);
        assert!((s.clutter - 2f64.sqrt()).abs() < 1e-12);
        let (m, s) = mean_std(&[item_result(5.0)]);
        assert_eq!((m.b, s.b), (5.0, 0.0));
    }

    #[test]
    fn settings_are_checked() {
        assert!(Settings::default().validate().is_ok());
        let bad = Settings {
            lambda: 1.5,
            ..Settings::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("lambda"));
        let bad = Settings {
            jpeg_quality: 0,
            ..Settings::default()
        };
        assert!(bad.validate().is_err());
        assert!(Settings::default().describe().contains("quality 75"));
    }

    #[test]
    fn jb_mixes_j_and_b() {
        let img = Image8 {
            width: 40,
            height: 40,
            channels: 1,
            data: (0..1600).map(|i| ((i * 31) % 256) as u8).collect(),
        };
        for lambda in [0.0, 0.3, 1.0] {
            let s = Settings {
                lambda,
                ..Settings::default()
            };
            let (m, _, _) = measure_image(&img, &s).unwrap();
            assert!((m.jb - (lambda * m.j + (1.0 - lambda) * m.b)).abs() < 1e-12);
        }
    }
}
