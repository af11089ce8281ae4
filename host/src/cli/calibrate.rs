//! `ccnet calibrate`: train the (dataset × α × seed) grid, fit CC-Net's accuracy model
//! and write `models/calibration/<arch>.json` with plots.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ccnet_models::Arch;
use ccnet_shared::alpha::Alpha;
use clap::Args;

use super::train::dataset_dir;
use super::values;
use crate::calib::file::{Calibration, SweepSettings};
use crate::calib::slurm::{self, KeyState};
use crate::calib::sweep::{
    self, collect_points, fit_calibration, Downscale, RunKey, RunState, Sweep,
};
use crate::complexity::{measure_dataset, Settings as ComplexitySettings};
use crate::dataset::Dataset;
use crate::plot::{xy_plot_png, XyPlot, XySeries, XyStyle};
use crate::train::recipe::Recipe;
use crate::train::run::{self, LoopOptions};

/// Arguments of `ccnet calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Architecture: unet, fcn or cumed.
    #[arg(long, value_parser = values::arch, default_value = "unet")]
    pub arch: Arch,
    /// Calibration datasets: names under the datasets folder or folders.
    #[arg(long, num_args = 1.., required = true)]
    pub datasets: Vec<String>,
    /// Width multipliers of the grid; the largest is the base network.
    #[arg(long, value_delimiter = ',', value_parser = values::alpha, default_value = "1/4,1/8,1/16,1/32")]
    pub alphas: Vec<Alpha>,
    /// Seeds per (dataset, α).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// The paper's cheap estimate: the first 2 datasets × the largest and smallest α,
    /// one seed.
    #[arg(long)]
    pub quick: bool,
    /// Training crop size.
    #[arg(long, value_parser = values::size, default_value = "128")]
    pub size: (u32, u32),
    /// Training steps per run (at most; early stopping may end a run sooner).
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Steps per epoch (one validation and checkpoint each).
    #[arg(long, default_value_t = 50)]
    pub epoch_steps: usize,
    /// Integer factor by which images are box-downscaled before training and validation
    /// (CPU-scale sweeps; the slopes are measured at that resolution): one factor for
    /// every dataset (`4`), per dataset (`busi=4,kvasir_seg=4`, others 1), or both
    /// (`2,busi=4`). Complexity is always measured on the full-resolution images.
    #[arg(long, default_value = "1")]
    pub downscale: Downscale,
    /// Folder of the runs (one sub-folder per run key; reruns skip finished runs).
    #[arg(long)]
    pub runs: Option<PathBuf>,
    /// Calibration file to write [default: models/calibration/<arch>.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only this key (e.g. `unet.busi.a1_8.s0`) and stop: one job of a sweep
    /// spread over machines. Fit later with --fit-only.
    #[arg(long)]
    pub only: Option<String>,
    /// Show each run key's state and stop: done, pending, partial (started here, not
    /// finished), or for submitted keys queued, running or failed (asks `squeue`).
    #[arg(long, conflicts_with_all = ["only", "fit_only"])]
    pub status: bool,
    /// Do not train: fit from the runs that have finished (listing the missing ones).
    #[arg(long, conflicts_with = "only")]
    pub fit_only: bool,
    /// Hand the runs to Slurm: write into DIR a job array (task i runs the i-th key that
    /// is neither finished nor queued, with `--only KEY`) and a collect job that depends
    /// on it (`afterany`) and fits the calibration from whatever finished. Prints the
    /// `sbatch` command, or submits with --submit.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["only", "fit_only", "status"])]
    pub slurm: Option<PathBuf>,
    /// Slurm partition of the jobs [default: the cluster's default].
    #[arg(long, requires = "slurm")]
    pub partition: Option<String>,
    /// Generic resources per array task, e.g. `gpu:1` (use with --device cuda).
    #[arg(long, requires = "slurm")]
    pub gres: Option<String>,
    /// Wall-time limit per job [default: 2:00:00].
    #[arg(long, requires = "slurm")]
    pub time: Option<String>,
    /// CPUs per job, also its thread count [default: 1].
    #[arg(long, requires = "slurm")]
    pub cpus_per_task: Option<u32>,
    /// Submit with `sbatch` and print the job ids (instead of printing the command);
    /// submissions are recorded in the run folder for --status and reruns.
    #[arg(long, requires = "slurm")]
    pub submit: bool,
    /// cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

fn sweep_of(a: &CalibrateArgs) -> Result<Sweep> {
    let mut datasets = a
        .datasets
        .iter()
        .map(|d| dataset_dir(d))
        .collect::<Result<Vec<_>>>()?;
    let mut alphas = a.alphas.clone();
    alphas.sort_by(|x, y| y.value().total_cmp(&x.value()));
    alphas.dedup();
    let mut seeds = a.seeds;
    if a.quick {
        if datasets.len() < 2 || alphas.len() < 2 {
            bail!("--quick needs at least 2 datasets and 2 multipliers");
        }
        datasets.truncate(2);
        alphas = vec![alphas[0], alphas[alphas.len() - 1]];
        seeds = 1;
    }
    if seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    for &al in &alphas {
        ccnet_models::build(&ccnet_models::ArchConfig::new(a.arch, al))
            .map_err(|e| anyhow!("--alphas {al}: {e}"))?;
    }
    let size = [a.size.0, a.size.1];
    a.arch
        .check_input(size[0], size[1])
        .map_err(|e| anyhow!("--size: {e}"))?;
    if a.epoch_steps == 0 || a.steps == 0 {
        bail!("--steps and --epoch-steps must be at least 1");
    }
    let mut recipe = Recipe::robust(size);
    recipe.steps_per_epoch = a.epoch_steps;
    recipe.epochs = a.steps.div_ceil(a.epoch_steps);
    let names: Vec<String> = datasets.iter().map(|d| sweep::dataset_name(d)).collect();
    if let Some(unknown) = a.downscale.per_dataset.keys().find(|k| !names.contains(k)) {
        bail!(
            "--downscale names `{unknown}`, which is not among the datasets ({})",
            names.join(", ")
        );
    }
    recipe.downscale = a.downscale.default;
    let runs_dir = a.runs.clone().unwrap_or_else(|| {
        PathBuf::from("target")
            .join("ccnet")
            .join("calibration")
            .join(a.arch.name())
    });
    Ok(Sweep {
        arch: a.arch,
        datasets,
        alphas,
        seeds,
        recipe,
        downscale: a.downscale.clone(),
        runs_dir,
    })
}

/// Runs `ccnet calibrate`.
pub fn run(a: &CalibrateArgs) -> Result<()> {
    let sweep = sweep_of(a)?;
    let keys = sweep.keys();
    if a.status {
        sweep.check_owner(false)?;
        return print_status(&sweep);
    }
    sweep.check_owner(!a.fit_only)?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("models")
            .join("calibration")
            .join(format!("{}.json", a.arch.name()))
    });
    if let Some(dir) = &a.slurm {
        return hand_to_slurm(a, &sweep, &out, dir);
    }
    let opts = LoopOptions {
        device: run::device(&a.device)?,
        stop_after_epochs: None,
        quiet: a.quiet,
    };
    if let Some(only) = &a.only {
        let key = RunKey::parse(only)?;
        let (k, dir) = keys
            .iter()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| anyhow!("`{only}` is not a key of this sweep (see --status)"))?;
        return sweep
            .run_one(k, dir, &opts)
            .with_context(|| format!("run {only}"));
    }
    if !a.fit_only {
        let todo: Vec<_> = keys
            .iter()
            .filter(|(k, _)| sweep.state(k) != RunState::Done)
            .collect();
        eprintln!(
            "{} runs in the sweep, {} finished, {} to train (runs in {})",
            keys.len(),
            keys.len() - todo.len(),
            todo.len(),
            sweep.runs_dir.display()
        );
        for (i, (k, dir)) in todo.iter().enumerate() {
            eprintln!("[{}/{}] {}", i + 1, todo.len(), k.id());
            sweep
                .run_one(k, dir, &opts)
                .with_context(|| format!("run {}", k.id()))?;
        }
    }
    let missing: Vec<String> = keys
        .iter()
        .filter(|(k, _)| sweep.state(k) != RunState::Done)
        .map(|(k, _)| k.id())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "fitting without {} unfinished run(s): {}",
            missing.len(),
            missing.join(", ")
        );
    }
    let cal = fit(&sweep)?;
    cal.save(&out)?;
    let plots = out.with_extension("");
    write_plots(&cal, &plots)?;
    println!("{}", summary(&cal));
    println!(
        "wrote {} and plots {}-*.png",
        out.display(),
        plots.display()
    );
    Ok(())
}

fn print_status(sweep: &Sweep) -> Result<()> {
    let record = slurm::Record::load(&sweep.runs_dir)?;
    let (states, queue_error) = slurm::key_states(sweep, &record);
    if let Some(e) = queue_error {
        eprintln!("warning: {e}");
    }
    let mut counts = std::collections::BTreeMap::new();
    for (k, st) in &states {
        *counts.entry(st.name()).or_insert(0) += 1;
        match record
            .latest_task(&k.id())
            .filter(|_| *st != KeyState::Done)
        {
            Some(task) => println!("{:<8} {}  (slurm job {task})", st.name(), k.id()),
            None => println!("{:<8} {}", st.name(), k.id()),
        }
    }
    eprintln!(
        "{} runs: {}",
        states.len(),
        counts
            .iter()
            .map(|(n, c)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The `ccnet calibrate` command line that reproduces this sweep on any machine that
/// sees the same paths (absolute), without --quick, --slurm or --status.
fn worker_command(a: &CalibrateArgs, sweep: &Sweep, out: &Path) -> Result<Vec<String>> {
    let abs = |p: &Path| -> Result<String> {
        Ok(std::path::absolute(p)
            .with_context(|| format!("{}: cannot make the path absolute", p.display()))?
            .to_string_lossy()
            .into_owned())
    };
    let exe = std::env::current_exe().context("cannot locate the ccnet executable")?;
    let mut cmd = vec![
        abs(&exe)?,
        "calibrate".into(),
        "--arch".into(),
        a.arch.name().into(),
    ];
    cmd.push("--datasets".into());
    for d in &sweep.datasets {
        cmd.push(abs(d)?);
    }
    let alphas: Vec<String> = sweep.alphas.iter().map(|x| x.to_string()).collect();
    cmd.extend([
        "--alphas".into(),
        alphas.join(","),
        "--seeds".into(),
        sweep.seeds.to_string(),
        "--size".into(),
        format!("{}x{}", a.size.0, a.size.1),
        "--steps".into(),
        a.steps.to_string(),
        "--epoch-steps".into(),
        a.epoch_steps.to_string(),
        "--downscale".into(),
        a.downscale.to_string(),
        "--runs".into(),
        abs(&sweep.runs_dir)?,
        "--out".into(),
        abs(out)?,
        "--device".into(),
        a.device.clone(),
    ]);
    Ok(cmd)
}

/// `--slurm DIR`: writes the array and collect scripts for the keys that need a run,
/// and prints the `sbatch` command or (with --submit) submits and records the jobs.
fn hand_to_slurm(a: &CalibrateArgs, sweep: &Sweep, out: &Path, dir: &Path) -> Result<()> {
    let sbatch = if a.submit {
        Some(slurm::find_on_path("sbatch").ok_or_else(|| {
            anyhow!(
                "--submit: `sbatch` is not on PATH; install Slurm's client commands, or \
                 leave out --submit to write the scripts and print the command"
            )
        })?)
    } else {
        None
    };
    let job = slurm::JobSettings {
        partition: a.partition.clone(),
        gres: a.gres.clone(),
        time: a.time.clone().unwrap_or_else(|| "2:00:00".into()),
        cpus_per_task: a.cpus_per_task.unwrap_or(1),
    };
    if job.cpus_per_task == 0 {
        bail!("--cpus-per-task must be at least 1");
    }
    let record = slurm::Record::load(&sweep.runs_dir)?;
    let (states, queue_error) = slurm::key_states(sweep, &record);
    if let Some(e) = queue_error {
        bail!("cannot tell which submitted runs are still queued: {e}");
    }
    let todo: Vec<String> = states
        .iter()
        .filter(|(_, st)| st.needs_submission())
        .map(|(k, _)| k.id())
        .collect();
    let in_queue = states
        .iter()
        .filter(|(_, st)| matches!(st, KeyState::Queued | KeyState::Running))
        .count();
    let done = states
        .iter()
        .filter(|(_, st)| *st == KeyState::Done)
        .count();
    eprintln!(
        "{} runs in the sweep: {done} finished, {in_queue} queued or running, {} to submit",
        states.len(),
        todo.len()
    );
    if todo.is_empty() {
        eprintln!(
            "nothing to submit; fit with the same command and --fit-only once the queue is empty"
        );
        return Ok(());
    }
    let cmd = worker_command(a, sweep, out)?;
    let workdir = std::env::current_dir().context("cannot read the current folder")?;
    let dir = std::path::absolute(dir)
        .with_context(|| format!("{}: cannot make the path absolute", dir.display()))?;
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("{}: cannot create the folder", dir.join("logs").display()))?;
    let array = dir.join("calibrate-array.sh");
    let collect = dir.join("calibrate-collect.sh");
    for (path, text) in [
        (
            &array,
            slurm::array_script(&todo, &cmd, &dir, &workdir, &job),
        ),
        (&collect, slurm::collect_script(&cmd, &dir, &workdir, &job)),
    ] {
        crate::fsutil::write_atomic(path, text.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    let q = |p: &Path| slurm::shell_quote(&p.to_string_lossy());
    let Some(sbatch) = sbatch else {
        println!(
            "ARRAY=$(sbatch --parsable {}) && sbatch --dependency=afterany:${{ARRAY%%;*}} {}",
            q(&array),
            q(&collect)
        );
        eprintln!(
            "wrote {} ({} tasks) and {}; submit with the command above, or rerun with --submit \
             to have the jobs recorded for --status",
            array.display(),
            todo.len(),
            collect.display()
        );
        return Ok(());
    };
    let array_job = slurm::sbatch(&sbatch, &array, &[])?;
    let collect_job = slurm::sbatch(
        &sbatch,
        &collect,
        &[format!("--dependency=afterany:{array_job}")],
    )
    .with_context(|| format!("the array job {array_job} was submitted; its collect job was not"));
    let mut record = record;
    record.submissions.push(slurm::Submission {
        array_job: array_job.clone(),
        collect_job: collect_job.as_ref().cloned().unwrap_or_default(),
        keys: todo.clone(),
        submitted_unix: slurm::now_unix(),
    });
    record.save(&sweep.runs_dir)?;
    let collect_job = collect_job?;
    println!(
        "array job {array_job} ({} tasks), collect job {collect_job}",
        todo.len()
    );
    Ok(())
}

fn fit(sweep: &Sweep) -> Result<Calibration> {
    let cs = ComplexitySettings::default();
    let mut points = Vec::new();
    for (dir, pts) in collect_points(sweep)? {
        let ds = Dataset::open(&dir, true)?;
        let c = measure_dataset(&ds, &cs, None)?;
        points.push((ds.name.clone(), c.mean.j, c.mean.b, pts));
    }
    let settings = SweepSettings {
        alphas: sweep.alphas.iter().map(|x| x.to_string()).collect(),
        seeds: sweep.seeds,
        size: sweep.recipe.size,
        steps: sweep.recipe.total_steps(),
        recipe: serde_json::to_value(&sweep.recipe)?,
        downscale_per_dataset: sweep.downscale.per_dataset.clone(),
        complexity: serde_json::to_value(&cs)?,
    };
    fit_calibration(sweep.arch, settings, points)
}

/// A table of the fits.
pub fn summary(cal: &Calibration) -> String {
    let mut s = format!(
        "{} calibration (base α = {}):\n  dataset            J       B      m_F1    R²     m_IU    R²\n",
        cal.arch, cal.base_alpha
    );
    for d in &cal.datasets {
        let f = |x: Option<crate::calib::fit::Degradation>| {
            x.map(|x| format!("{:>7.4} {:>5.3}", x.m, x.line.r2))
                .unwrap_or_else(|| "      -     -".into())
        };
        s += &format!(
            "  {:<16} {:>6.4} {:>7.4} {} {}\n",
            d.name,
            d.j,
            d.b,
            f(d.f1),
            f(d.iu)
        );
    }
    s += &format!(
        "  m_F1 = {:.4}·J + {:.4} (R² {:.3});  m_IU = {:.4}·JB + {:.4} (R² {:.3}), JB = {:.2}·J + {:.2}·B",
        cal.f1_vs_j.slope,
        cal.f1_vs_j.intercept,
        cal.f1_vs_j.r2,
        cal.iu_vs_jb.slope,
        cal.iu_vs_jb.intercept,
        cal.iu_vs_jb.r2,
        cal.lambda,
        1.0 - cal.lambda
    );
    s
}

/// The paper's Fig. 6/7: relative accuracy against log10 P per dataset, and slopes
/// against complexity, as `<stem>-f1.png`, `<stem>-iu.png`, `<stem>-slopes.png`.
pub fn write_plots(cal: &Calibration, stem: &Path) -> Result<()> {
    let default_downscale = cal.settings.recipe["downscale"].as_u64().unwrap_or(1);
    let mut downscale: Vec<String> = cal
        .settings
        .downscale_per_dataset
        .iter()
        .map(|(name, f)| format!("{name} /{f}"))
        .collect();
    if default_downscale > 1 {
        downscale.insert(0, format!("images /{default_downscale}"));
    }
    let subtitle = format!(
        "{} · base α {} · {} seeds · crops {}x{} · ≤ {} steps{}",
        cal.arch,
        cal.base_alpha,
        cal.settings.seeds,
        cal.settings.size[0],
        cal.settings.size[1],
        cal.settings.steps,
        if downscale.is_empty() {
            String::new()
        } else {
            format!(" · downscaled: {}", downscale.join(", "))
        }
    );
    for (metric, name) in [("f1", "F1"), ("iu", "IU")] {
        let series = cal
            .datasets
            .iter()
            .filter(|d| !d.points.is_empty())
            .map(|d| {
                let base = if metric == "f1" {
                    d.points[0].f1_mean
                } else {
                    d.points[0].iu_mean
                };
                XySeries {
                    name: d.name.clone(),
                    points: d
                        .points
                        .iter()
                        .map(|p| {
                            let v = if metric == "f1" { p.f1_mean } else { p.iu_mean };
                            (p.log10_params, if base > 0.0 { v / base } else { 0.0 })
                        })
                        .collect(),
                    style: XyStyle::PointsWithFit,
                }
            })
            .collect();
        let plot = XyPlot {
            title: format!("Relative {name} against network size"),
            subtitle: subtitle.clone(),
            x_label: "log10 P (parameters)".into(),
            y_label: format!("{name} / base {name}"),
            series,
        };
        write_png(
            &plot,
            &stem.with_file_name(format!("{}-{metric}.png", file_stem(stem))),
        )?;
    }
    let slopes = XyPlot {
        title: "Degree of degradation against complexity".into(),
        subtitle,
        x_label: "complexity (J for F1, JB for IU)".into(),
        y_label: "slope m of relative accuracy per decade".into(),
        series: vec![
            XySeries {
                name: "m_F1 vs J".into(),
                points: cal
                    .datasets
                    .iter()
                    .filter_map(|d| d.f1.map(|f| (d.j, f.m)))
                    .collect(),
                style: XyStyle::PointsWithFit,
            },
            XySeries {
                name: format!("m_IU vs JB (λ = {:.2})", cal.lambda),
                points: cal
                    .datasets
                    .iter()
                    .filter_map(|d| {
                        d.iu.map(|f| (cal.lambda * d.j + (1.0 - cal.lambda) * d.b, f.m))
                    })
                    .collect(),
                style: XyStyle::PointsWithFit,
            },
        ],
    };
    write_png(
        &slopes,
        &stem.with_file_name(format!("{}-slopes.png", file_stem(stem))),
    )
}

fn file_stem(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "calibration".into())
}

fn write_png(plot: &XyPlot, path: &Path) -> Result<()> {
    let png = xy_plot_png(plot, (1100, 600)).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    crate::fsutil::write_atomic(path, &png)
        .with_context(|| format!("{}: cannot write", path.display()))
}
