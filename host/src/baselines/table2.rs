//! The paper's comparison (Table 2 and Table 3, METHOD.md section 6): CC-Net's one-shot
//! width scaling against squeezing and iterative pruning, on one dataset and one
//! architecture.
//!
//! Rows, each trained once with the same recipe and seed and then packed and evaluated
//! with the device engine on the run's validation images:
//!
//! * **base**: the calibration's base width.
//! * **base + squeeze**: the base network with fire modules ([`super::squeeze`]).
//! * **base + prune**: the trained base network pruned round by round (a fraction of
//!   every layer's filters, then fine-tuning), for as long as the validation F1 stays at
//!   or above the case-1 target (`keep` × base F1); the last round that meets it is
//!   kept. Time counts the base training plus every fine-tuning round tried.
//! * **CC-Net case 1**: the α that `ccnet select --keep` picks on a fine grid (eighths
//!   of the base width, so channel counts stay integers), **case 1 − one step**: the
//!   next smaller α, **case 1 + squeeze / + prune**: those baselines on top of case 1.
//! * **CC-Net case 2**: the largest grid α whose packed file fits the disk budget.
//!
//! Every run is a normal run folder; a rerun skips finished runs and resumes partial
//! ones, so the experiment can be stopped at any time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ccnet_models::Arch;
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::Metadata;
use ccnet_shared::graph::Graph;
use serde::{Deserialize, Serialize};

use super::prune::prune_round;
use super::squeeze::squeeze;
use crate::calib::file::Calibration;
use crate::cli::pack::{calibration_inputs, deployed_model, input_geometry, tile_for};
use crate::cli::select::{report as select_report, SelectArgs};
use crate::fsutil::write_atomic;
use crate::pack::evaluate::evaluate_packed;
use crate::pack::{pack_calibrated, PackInfo, Quant};
use crate::train::recipe::Recipe;
use crate::train::run::{
    self, config_path, read_json, train_to_end, weights_path, LoopOptions, RunConfig, RunMetrics,
    TrainSpec, Variant,
};
use crate::weights::{load_safetensors, save_safetensors};

/// Everything that shapes the experiment's numbers (recorded in `experiment.json`; a
/// folder belongs to one set of settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Architecture.
    pub arch: String,
    /// Training crop side.
    pub size: u32,
    /// Training steps of every network trained from scratch.
    pub steps: usize,
    /// Fine-tuning steps after each pruning round.
    pub finetune_steps: usize,
    /// Share of every prunable layer's filters removed per round.
    pub prune_fraction: f64,
    /// Most pruning rounds.
    pub prune_rounds: usize,
    /// Fire-module squeeze ratio.
    pub squeeze_ratio: f64,
    /// Case 1: keep at least this fraction of the base F1.
    pub keep: f64,
    /// Case 2: disk budget in bytes.
    pub disk: u64,
    /// Bits per stored weight of the packed files.
    pub bits: u32,
    /// Seed of every run.
    pub seed: u64,
    /// Calibration file used for the selection.
    pub calibration: PathBuf,
    /// CRC-32 of that file's contents: a folder belongs to one calibration, wherever
    /// the command is run from.
    pub calibration_crc: u32,
}

/// CRC-32 of a file's contents.
pub fn file_crc(path: &Path) -> Result<u32> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(ccnet_shared::format::CRC32.checksum(&bytes))
}

/// One row of Table 2 with the Table 3 figures of the same network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// Method, as in the paper's table.
    pub method: String,
    /// Width multiplier of the network the row starts from.
    pub alpha: String,
    /// Parameters of the deployed network.
    pub params: u64,
    /// log10 of `params`.
    pub log10_params: f64,
    /// Bytes of the packed file.
    pub file_bytes: u64,
    /// Foreground F1 of the packed file on the validation images (device engine).
    pub f1: f64,
    /// Foreground IU likewise.
    pub iu: f64,
    /// The run's own best validation F1 (candle, float).
    pub float_f1: f64,
    /// Training seconds per epoch of the final network (steps × seconds per step).
    pub seconds_per_epoch: f64,
    /// Fine-tuning epochs spent pruning (0 for rows that do not prune).
    pub pruning_epochs: usize,
    /// Pruning rounds kept / tried.
    pub pruning_rounds: Option<(usize, usize)>,
    /// Wall-clock seconds of all training behind this row (base training included for
    /// pruned rows).
    pub total_seconds: f64,
    /// The run folder of the final network.
    pub run: PathBuf,
}

/// The result for one dataset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatasetResult {
    /// Dataset name.
    pub dataset: String,
    /// Dataset folder.
    pub dataset_dir: PathBuf,
    /// Complexity J and B of the dataset.
    pub j: f64,
    /// Blob density.
    pub b: f64,
    /// Base α.
    pub base_alpha: String,
    /// α chosen for case 1, with its predicted relative F1.
    pub case1: (String, f64),
    /// One grid step smaller, with its predicted relative F1.
    pub case1_minus: Option<(String, f64)>,
    /// α chosen for case 2 (none when no grid α fits the budget).
    pub case2: Option<String>,
    /// Validation F1 the pruning rounds must keep (`keep` × base F1).
    pub prune_target_f1: f64,
    /// The rows.
    pub rows: Vec<Row>,
}

/// The whole experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Settings.
    pub settings: Settings,
    /// Per dataset.
    pub datasets: Vec<DatasetResult>,
}

const SETTINGS_FILE: &str = "experiment.json";

/// Checks that `dir` belongs to `s` (or claims it).
pub fn claim_folder(dir: &Path, s: &Settings) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join(SETTINGS_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let theirs: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid contents", path.display()))?;
        let mine = serde_json::to_value(s)?;
        // The calibration is compared by content (its path depends on where the
        // command runs).
        let differ: Vec<String> = mine
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| k.as_str() != "calibration" && theirs.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} here, {} there",
                    v,
                    theirs.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect();
        if !differ.is_empty() {
            bail!(
                "{}: this folder holds an experiment with other settings ({}); use another --out or the same settings",
                dir.display(),
                differ.join(", ")
            );
        }
    } else {
        write_atomic(&path, serde_json::to_string_pretty(s)?.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// The training recipe for `steps` steps at crop side `size`.
pub fn recipe(size: u32, steps: usize) -> Recipe {
    let mut r = Recipe::robust([size, size]);
    let steps = steps.max(1);
    r.epochs = steps.div_ceil(r.steps_per_epoch.min(steps));
    // Epochs of equal length that add up to `steps` (or at most epochs − 1 more).
    r.steps_per_epoch = steps.div_ceil(r.epochs);
    r.warmup_steps = r.warmup_steps.min(r.total_steps() / 4);
    r.patience = 0;
    r
}

/// The fine-tuning recipe after a pruning round: a third of the learning rate, no
/// warm-up (the network is already trained).
pub fn finetune_recipe(size: u32, steps: usize) -> Recipe {
    let mut r = recipe(size, steps);
    r.lr /= 3.0;
    r.warmup_steps = 0;
    r
}

/// The selection grid: eighths of the base width (`base · k / 8`, k = 1..8).
pub fn grid(base: Alpha) -> Result<Vec<Alpha>> {
    (1..=8u32)
        .rev()
        .map(|k| Alpha::new(base.num() * k, base.den() * 8).map_err(|e| anyhow!("α grid: {e}")))
        .collect()
}

fn alpha_dir(a: Alpha) -> String {
    a.to_string().replace('/', "_")
}

struct Ctx<'a> {
    s: &'a Settings,
    arch: Arch,
    dataset_dir: &'a Path,
    out: &'a Path,
    opts: &'a LoopOptions,
}

impl Ctx<'_> {
    fn spec(&self, alpha: Alpha, recipe: Recipe) -> TrainSpec {
        TrainSpec {
            dataset_dir: self.dataset_dir.to_path_buf(),
            arch: self.arch,
            alpha,
            seed: self.s.seed,
            recipe,
        }
    }

    fn say(&self, line: &str) {
        if !self.opts.quiet {
            eprintln!("{line}");
        }
    }

    /// The plain network at `alpha`.
    fn plain(&self, alpha: Alpha) -> Result<(PathBuf, RunMetrics)> {
        let dir = self.out.join(format!("alpha-{}", alpha_dir(alpha)));
        self.say(&format!("  α = {alpha}: {}", dir.display()));
        let spec = self.spec(alpha, recipe(self.s.size, self.s.steps));
        let m = train_to_end(&spec, &Variant::default(), &dir, self.opts)?;
        Ok((dir, m))
    }

    /// The squeezed network at `alpha`.
    fn squeezed(&self, alpha: Alpha) -> Result<(PathBuf, RunMetrics)> {
        let dir = self.out.join(format!("squeeze-alpha-{}", alpha_dir(alpha)));
        self.say(&format!("  α = {alpha} + squeeze: {}", dir.display()));
        let spec = self.spec(alpha, recipe(self.s.size, self.s.steps));
        let r = &spec.recipe;
        let ds = crate::dataset::Dataset::open(self.dataset_dir, false)?;
        let cfg = ccnet_models::ArchConfig {
            arch: self.arch,
            alpha,
            in_channels: ds.channels()?,
            classes: 2,
            batch_norm: r.batch_norm,
        };
        let g = ccnet_models::build(&cfg).map_err(|e| anyhow!("{e}"))?;
        let (sq, n) = squeeze(&g, self.s.squeeze_ratio)?;
        let variant = Variant {
            name: Some(format!(
                "squeeze ratio {} ({n} fire modules)",
                self.s.squeeze_ratio
            )),
            graph: Some(sq),
            init_weights: None,
        };
        let m = train_to_end(&spec, &variant, &dir, self.opts)?;
        Ok((dir, m))
    }

    /// Prunes the trained run in `start` round by round while the validation F1 stays at
    /// or above `target`. Returns the kept run, (rounds kept, rounds tried), fine-tuning
    /// epochs and seconds.
    fn pruned(
        &self,
        start: &Path,
        alpha: Alpha,
        target: f64,
    ) -> Result<(PathBuf, (usize, usize), usize, f64)> {
        let chain = self.out.join(format!("prune-alpha-{}", alpha_dir(alpha)));
        std::fs::create_dir_all(&chain)
            .with_context(|| format!("{}: cannot create", chain.display()))?;
        let spec = self.spec(alpha, finetune_recipe(self.s.size, self.s.finetune_steps));
        let (mut kept, mut rounds_kept, mut tried) = (start.to_path_buf(), 0, 0);
        let (mut epochs, mut seconds) = (0, 0.0);
        for round in 1..=self.s.prune_rounds {
            let cfg: RunConfig = read_json(&config_path(&kept))?;
            let graph = cfg.graph()?;
            let weights = load_safetensors(&weights_path(&kept))?;
            let (g, w, removed) = prune_round(&graph, &weights, self.s.prune_fraction)?;
            if removed == 0 {
                self.say("  nothing left to prune");
                break;
            }
            let dir = chain.join(format!("round-{round}"));
            let init = chain.join(format!("round-{round}.init.safetensors"));
            if let Ok(done) = read_json::<RunConfig>(&config_path(&dir)) {
                if done.graph.as_ref() != Some(&g) {
                    bail!(
                        "{}: this pruning round was made from another network than the one this \
                         experiment prunes now (was the pruning code or an earlier round changed?); \
                         remove {} to prune again",
                        dir.display(),
                        chain.display()
                    );
                }
            }
            if run::finished(&dir).is_none() && !run::checkpoint_path(&dir).exists() {
                save_safetensors(&init, &w, &HashMap::new())?;
            }
            let params = crate::pack::fold::deployed_params(&g);
            self.say(&format!(
                "  α = {alpha} + prune, round {round}: {removed} filters removed, {params} parameters left, fine-tuning in {}",
                dir.display()
            ));
            let variant = Variant {
                name: Some(format!(
                    "prune round {round} ({} of every layer's filters per round)",
                    self.s.prune_fraction
                )),
                graph: Some(g),
                init_weights: Some(init),
            };
            let m = train_to_end(&spec, &variant, &dir, self.opts)?;
            tried += 1;
            epochs += m.history.len();
            seconds += m.seconds;
            if m.best_val_f1 < target {
                self.say(&format!(
                    "  round {round}: validation F1 {:.4} < target {target:.4}; keeping round {}",
                    m.best_val_f1, rounds_kept
                ));
                break;
            }
            kept = dir;
            rounds_kept = round;
        }
        Ok((kept, (rounds_kept, tried), epochs, seconds))
    }

    /// Packs the run in `dir` and evaluates the file on the run's validation images.
    fn row(&self, method: &str, alpha: Alpha, dir: &Path, total_seconds: f64) -> Result<Row> {
        self.row_within(method, alpha, dir, total_seconds, None)
    }

    /// [`Ctx::row`] whose packed file must fit `budget` bytes.
    fn row_within(
        &self,
        method: &str,
        alpha: Alpha,
        dir: &Path,
        total_seconds: f64,
        budget: Option<u64>,
    ) -> Result<Row> {
        let (cfg, model) = deployed_model(dir)?;
        let metrics: RunMetrics = read_json(&dir.join("metrics.json"))?;
        let tile = tile_for(&model, None)?;
        let geometry = input_geometry(&cfg, tile)?;
        let quant = match self.s.bits {
            32 => Quant::F32,
            16 => Quant::F16,
            _ => Quant::Int8,
        };
        let info = PackInfo {
            input: geometry,
            metadata: Metadata {
                arch: self.arch.name(),
                alpha_num: alpha.num(),
                alpha_den: alpha.den(),
                dataset: &cfg.dataset,
                ..Metadata::default()
            },
        };
        let calibration = if quant == Quant::Int8 {
            calibration_inputs(
                &geometry,
                self.dataset_dir,
                Some(&cfg.split.train),
                8,
                self.arch.input_multiple(),
            )?
        } else {
            Vec::new()
        };
        let bytes = pack_calibrated(&model, quant, budget, &info, &calibration)?;
        write_atomic(&dir.join("model.ccn"), &bytes)
            .with_context(|| format!("{}: cannot write", dir.join("model.ccn").display()))?;
        let eval = evaluate_packed(&bytes, self.dataset_dir, &cfg.split.val)?;
        let params = Graph::new_unchecked(&model.graph).trainable_params();
        let n = metrics.history.len().max(1) as f64;
        let sps = metrics
            .history
            .iter()
            .map(|e| e.seconds_per_step)
            .sum::<f64>()
            / n;
        Ok(Row {
            method: method.to_string(),
            alpha: alpha.to_string(),
            params,
            log10_params: (params as f64).log10(),
            file_bytes: bytes.len() as u64,
            f1: eval.mean.f1,
            iu: eval.mean.iu,
            float_f1: metrics.best_val_f1,
            // One epoch = the from-scratch recipe's epoch, for every row alike.
            seconds_per_epoch: sps * recipe(self.s.size, self.s.steps).steps_per_epoch as f64,
            pruning_epochs: 0,
            pruning_rounds: None,
            total_seconds,
            run: dir.to_path_buf(),
        })
    }
}

fn select(
    s: &Settings,
    arch: Arch,
    dataset_dir: &Path,
    grid: &[Alpha],
    case1: bool,
) -> Result<crate::cli::select::SelectReport> {
    select_report(&SelectArgs {
        dataset: dataset_dir.display().to_string(),
        arch,
        calibration: Some(s.calibration.clone()),
        keep: case1.then_some(s.keep),
        accuracy: None,
        base_accuracy: None,
        metric: "f1".into(),
        disk: (!case1).then_some(s.disk),
        bits: s.bits,
        ram: None,
        weights_in_ram: false,
        input: None,
        alphas: grid.to_vec(),
        json: false,
    })
}

/// Runs (or resumes) the experiment for one dataset; `out` is the dataset's folder.
pub fn run_dataset(
    s: &Settings,
    dataset_dir: &Path,
    out: &Path,
    opts: &LoopOptions,
) -> Result<DatasetResult> {
    let arch: Arch = s.arch.parse().map_err(|e| anyhow!("{}: {e}", s.arch))?;
    let cal = Calibration::load(&s.calibration)?;
    let base = Alpha::parse(&cal.base_alpha).map_err(|e| {
        anyhow!(
            "{}: base α `{}`: {e}",
            s.calibration.display(),
            cal.base_alpha
        )
    })?;
    let grid = grid(base)?;
    let c1 = select(s, arch, dataset_dir, &grid, true)?;
    // A disk budget no grid α meets leaves out the case-2 row (with the reason), not the
    // whole dataset.
    let c2 = match select(s, arch, dataset_dir, &grid, false) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("case 2 left out: {e:#}");
            None
        }
    };
    let case1 = c1.selection.chosen.alpha;
    let minus = c1
        .selection
        .grid
        .iter()
        .filter(|c| c.alpha.value() < case1.value())
        .max_by(|a, b| a.alpha.value().total_cmp(&b.alpha.value()))
        .cloned();
    let case2 = c2.map(|c| c.selection.chosen.alpha);
    let ctx = Ctx {
        s,
        arch,
        dataset_dir,
        out,
        opts,
    };
    ctx.say(&format!(
        "{}: base α {base}, case 1 α {case1} (predicted {:.1} % of base F1), case 1 − one step {}, case 2 α {}",
        c1.dataset,
        100.0 * c1.selection.chosen.rel_f1,
        minus.as_ref().map(|m| m.alpha.to_string()).unwrap_or_else(|| "none".into()),
        case2.map(|a| a.to_string()).unwrap_or_else(|| "none".into())
    ));
    let (base_dir, base_m) = ctx.plain(base)?;
    let target = s.keep * base_m.best_val_f1;
    let mut rows = vec![ctx.row("base", base, &base_dir, base_m.seconds)?];
    let (d, m) = ctx.squeezed(base)?;
    rows.push(ctx.row("base + squeeze", base, &d, m.seconds)?);
    let (d, rounds, epochs, secs) = ctx.pruned(&base_dir, base, target)?;
    let mut r = ctx.row("base + prune", base, &d, base_m.seconds + secs)?;
    r.pruning_epochs = epochs;
    r.pruning_rounds = Some(rounds);
    rows.push(r);
    let (c1_dir, c1_m) = ctx.plain(case1)?;
    rows.push(ctx.row("CC-Net case 1", case1, &c1_dir, c1_m.seconds)?);
    if let Some(mc) = &minus {
        let (d, m) = ctx.plain(mc.alpha)?;
        rows.push(ctx.row("CC-Net case 1 − one step", mc.alpha, &d, m.seconds)?);
    }
    let (d, m) = ctx.squeezed(case1)?;
    rows.push(ctx.row("CC-Net case 1 + squeeze", case1, &d, m.seconds)?);
    let (d, rounds, epochs, secs) = ctx.pruned(&c1_dir, case1, target)?;
    let mut r = ctx.row("CC-Net case 1 + prune", case1, &d, c1_m.seconds + secs)?;
    r.pruning_epochs = epochs;
    r.pruning_rounds = Some(rounds);
    rows.push(r);
    if let Some(case2) = case2 {
        let (d, m) = ctx.plain(case2)?;
        rows.push(ctx.row_within(
            &format!("CC-Net case 2 ({})", human_bytes(s.disk)),
            case2,
            &d,
            m.seconds,
            Some(s.disk),
        )?);
    }
    Ok(DatasetResult {
        dataset: c1.dataset.clone(),
        dataset_dir: dataset_dir.to_path_buf(),
        j: c1.j,
        b: c1.b,
        base_alpha: base.to_string(),
        case1: (case1.to_string(), c1.selection.chosen.rel_f1),
        case1_minus: minus.map(|m| (m.alpha.to_string(), m.rel_f1)),
        case2: case2.map(|a| a.to_string()),
        prune_target_f1: target,
        rows,
    })
}

fn human_bytes(b: u64) -> String {
    if b.is_multiple_of(1_000_000) {
        format!("{} MB", b / 1_000_000)
    } else if b.is_multiple_of(1000) {
        format!("{} kB", b / 1000)
    } else {
        format!("{b} B")
    }
}

/// Table 2 and Table 3 as Markdown.
pub fn markdown(r: &Report) -> String {
    let s = &r.settings;
    let mut md = format!(
        "Settings: {} · {}×{} crops · {} steps per network · pruning {} of every layer's filters per round, \
         ≤ {} rounds, {} fine-tuning steps each · squeeze ratio {} · case 1 keeps {} × base F1 · \
         case 2 {} at {}-bit weights · seed {} · calibration `{}`.\n\n",
        s.arch,
        s.size,
        s.size,
        s.steps,
        s.prune_fraction,
        s.prune_rounds,
        s.finetune_steps,
        s.squeeze_ratio,
        s.keep,
        human_bytes(s.disk),
        s.bits,
        s.seed,
        s.calibration.display()
    );
    md += "### Table 2\n\nF1 and IU of the packed file on the validation images (device engine); \
           log10 P of the deployed network; bytes of the packed file.\n\n";
    md += "| method |";
    for d in &r.datasets {
        md += &format!(" {} F1 | IU | log10 P | α | bytes |", d.dataset);
    }
    md += "\n|---|";
    for _ in &r.datasets {
        md += "---|---|---|---|---|";
    }
    md += "\n";
    let methods: Vec<String> = r
        .datasets
        .iter()
        .flat_map(|d| d.rows.iter().map(|x| x.method.clone()))
        .fold(Vec::new(), |mut v, m| {
            if !v.contains(&m) {
                v.push(m);
            }
            v
        });
    for m in &methods {
        md += &format!("| {m} |");
        for d in &r.datasets {
            match d.rows.iter().find(|x| &x.method == m) {
                Some(x) => {
                    let rounds = x
                        .pruning_rounds
                        .map(|(k, t)| format!(" ({k}/{t} rounds)"))
                        .unwrap_or_default();
                    md += &format!(
                        " {:.3} | {:.3} | {:.3} | {}{} | {} |",
                        x.f1, x.iu, x.log10_params, x.alpha, rounds, x.file_bytes
                    )
                }
                None => md += " – | – | – | – | – |",
            }
        }
        md += "\n";
    }
    md += "\n";
    for d in &r.datasets {
        md += &format!(
            "{}: J = {:.4}; case 1 α = {} (predicted {:.1} % of base F1){}; case 2 α = {}; pruning kept rounds whose validation F1 ≥ {:.4}.\n",
            d.dataset,
            d.j,
            d.case1.0,
            100.0 * d.case1.1,
            d.case1_minus
                .as_ref()
                .map(|(a, p)| format!(", one step smaller α = {a} (predicted {:.1} %)", 100.0 * p))
                .unwrap_or_default(),
            d.case2.as_deref().unwrap_or("none (no grid α fits)"),
            d.prune_target_f1
        );
    }
    md += "\n### Table 3\n\nTraining time on this machine's CPU: seconds per epoch of the final network \
           (training steps only; one epoch = the from-scratch recipe's epoch for every row), \
           fine-tuning epochs spent pruning, and total wall time of training with its \
           validation passes (for pruned rows: the base network's plus every pruning round tried).\n\n";
    md +=
        "| dataset | method | s / epoch | pruning epochs | total wall s |\n|---|---|---|---|---|\n";
    for d in &r.datasets {
        for x in &d.rows {
            md += &format!(
                "| {} | {} | {:.1} | {} | {:.1} |\n",
                d.dataset, x.method, x.seconds_per_epoch, x.pruning_epochs, x.total_seconds
            );
        }
    }
    md
}

/// Runs the experiment over `datasets` and writes `tables.md` and `tables.json` in `out`.
pub fn run_experiment(
    s: &Settings,
    datasets: &[PathBuf],
    out: &Path,
    opts: &LoopOptions,
) -> Result<Report> {
    claim_folder(out, s)?;
    let mut report = Report {
        settings: s.clone(),
        datasets: Vec::new(),
    };
    for d in datasets {
        let name = crate::dataset::Dataset::open(d, false)?.name;
        let dir = out.join(&name);
        let r = run_dataset(s, d, &dir, opts).with_context(|| format!("dataset {name}"))?;
        report.datasets.push(r);
        // Written after every dataset, so a long experiment shows its progress.
        let md = markdown(&report);
        write_atomic(&out.join("tables.md"), md.as_bytes())
            .with_context(|| format!("{}: cannot write", out.join("tables.md").display()))?;
        let mut json = serde_json::to_string_pretty(&report)?;
        json.push('\n');
        write_atomic(&out.join("tables.json"), json.as_bytes())
            .with_context(|| format!("{}: cannot write", out.join("tables.json").display()))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_eighths_of_the_base_width() {
        let g = grid(Alpha::parse("1/8").unwrap()).unwrap();
        let names: Vec<String> = g.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            names,
            ["1/8", "7/64", "3/32", "5/64", "1/16", "3/64", "1/32", "1/64"]
        );
    }

    #[test]
    fn recipes_fit_the_step_counts() {
        let r = recipe(64, 400);
        assert_eq!((r.steps_per_epoch, r.epochs, r.total_steps()), (50, 8, 400));
        let r = recipe(64, 120);
        assert_eq!((r.steps_per_epoch, r.epochs, r.total_steps()), (40, 3, 120));
        let r = recipe(64, 6);
        assert_eq!((r.steps_per_epoch, r.epochs), (6, 1));
        assert!(r.warmup_steps <= 1);
        let f = finetune_recipe(64, 100);
        assert_eq!(f.warmup_steps, 0);
        assert!((f.lr - r.lr / 3.0).abs() < 1e-12);
    }
}
