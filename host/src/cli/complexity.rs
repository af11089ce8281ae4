//! `ccnet complexity DATASET... [--json] [--plot out.png]`: the complexity measures of
//! each dataset (mean ± std over its images), as a table or JSON, and optionally a bar
//! chart of the measures normalised to [0, 1] across the datasets.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::complexity::{self, BlobSettings, ColorRule, Measures, Polarity, Report, Settings};
use crate::dataset::Dataset;
use crate::fsutil::write_atomic;
use crate::plot;

/// Arguments of `ccnet complexity`.
#[derive(Debug, Args)]
pub struct ComplexityArgs {
    /// Dataset folders (`images/` + `masks/`, or a bare folder of images). A name that is
    /// not a folder is looked up among the real datasets (`CCNET_DATASETS`).
    #[arg(required = true, value_name = "DATASET")]
    pub datasets: Vec<PathBuf>,
    /// Print the full report (settings, per-image values, means, normalised) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Write a PNG bar chart of the measures normalised across the datasets.
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
    /// λ in JB = λ·J + (1 − λ)·B.
    #[arg(long, default_value_t = complexity::DEFAULT_LAMBDA)]
    pub lambda: f64,
    /// JPEG quality for J.
    #[arg(long, default_value_t = complexity::DEFAULT_JPEG_QUALITY)]
    pub jpeg_quality: u8,
    /// Which LoG blobs count for B: bright, dark or both.
    #[arg(long, default_value = "both", value_parser = parse_polarity)]
    pub blob_polarity: Polarity,
    /// Channels J encodes: gray (BT.601 luma of every image) or native (gray images as
    /// 1 channel, colour images as 3).
    #[arg(long, default_value = "gray", value_parser = parse_color)]
    pub j_color: ColorRule,
    /// Accept non-binary masks: `value > T` is foreground (default: only 0 and 255).
    #[arg(long, value_name = "T")]
    pub mask_threshold: Option<u16>,
    /// Ignore masks (measure the images only; masks are then not checked).
    #[arg(long)]
    pub images_only: bool,
}

fn parse_polarity(s: &str) -> Result<Polarity, String> {
    match s {
        "bright" => Ok(Polarity::Bright),
        "dark" => Ok(Polarity::Dark),
        "both" => Ok(Polarity::Both),
        _ => Err(format!("`{s}`: expected bright, dark or both")),
    }
}

fn parse_color(s: &str) -> Result<ColorRule, String> {
    match s {
        "native" => Ok(ColorRule::Native),
        "gray" | "grey" => Ok(ColorRule::Gray),
        _ => Err(format!("`{s}`: expected native or gray")),
    }
}

/// The settings the arguments ask for.
pub fn settings(a: &ComplexityArgs) -> Settings {
    Settings {
        jpeg_quality: a.jpeg_quality,
        lambda: a.lambda,
        blob: BlobSettings {
            polarity: a.blob_polarity,
            ..BlobSettings::default()
        },
        color: a.j_color,
        check_masks: !a.images_only,
        mask_threshold: a.mask_threshold,
        ..Settings::default()
    }
}

fn open(arg: &Path, images_only: bool) -> anyhow::Result<Dataset> {
    let dir = if arg.exists() {
        arg.to_path_buf()
    } else {
        match arg.to_str().and_then(|n| crate::paths::dataset(n).ok()) {
            Some(d) => d,
            None => arg.to_path_buf(),
        }
    };
    let paired = dir.join("images").is_dir() && dir.join("masks").is_dir();
    Ok(Dataset::open(&dir, paired && !images_only)?)
}

/// Runs `ccnet complexity`.
pub fn run(a: &ComplexityArgs) -> anyhow::Result<()> {
    let s = settings(a);
    s.validate()?;
    let datasets = a
        .datasets
        .iter()
        .map(|d| open(d, a.images_only))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total: usize = datasets.iter().map(|d| d.items.len()).sum();
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>16} [{bar:30}] {pos}/{len} images, {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut results = Vec::with_capacity(datasets.len());
    for ds in &datasets {
        pb.set_message(ds.name.clone());
        let r = complexity::measure_dataset(ds, &s, Some(&pb))
            .with_context(|| format!("dataset {}", ds.dir.display()))?;
        results.push(r);
    }
    pb.finish_and_clear();
    let report = Report::new(s, results);
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &a.out {
        write_atomic(out, json.as_bytes()).with_context(|| format!("{}", out.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
        for d in &report.datasets {
            eprintln!(
                "{}: {} images in {:.2} s ({:.1} images/s)",
                d.name,
                d.images,
                d.seconds,
                d.images as f64 / d.seconds.max(1e-9)
            );
        }
    }
    if let Some(path) = &a.plot {
        let png = plot::bar_chart_png(&chart(&report), (1400, 700))?;
        write_atomic(path, &png).with_context(|| format!("{}", path.display()))?;
        if !a.json {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

/// The bar chart of a report: datasets along x, one bar per measure, normalised.
pub fn chart(report: &Report) -> plot::BarChart {
    let s = &report.settings;
    plot::BarChart {
        title: "Dataset complexity, normalised to [0, 1] across datasets".to_string(),
        subtitle: format!(
            "J: JPEG q{} {:?}; B: LoG σ {}–{} px, {} scales, t={}, {:?}; JB λ={}; edges {} levels; clutter {} Haar levels",
            s.jpeg_quality,
            s.color,
            s.blob.sigma_min,
            s.blob.sigma_max,
            s.blob.num_sigma,
            s.blob.log_threshold,
            s.blob.polarity,
            s.lambda,
            s.edge_levels,
            s.clutter_levels
        ),
        y_label: "normalised mean complexity".to_string(),
        categories: report.datasets.iter().map(|d| d.name.clone()).collect(),
        series: Measures::NAMES
            .iter()
            .enumerate()
            .map(|(k, n)| {
                (
                    n.to_string(),
                    report.normalised.iter().map(|m| m.values()[k]).collect(),
                )
            })
            .collect(),
        y_range: Some((0.0, 1.0)),
    }
}
