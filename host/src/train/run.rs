//! A training run: the run folder's files, the training loop with per-epoch validation,
//! checkpoints and early stopping, and loading a finished run back.
//!
//! Run folder:
//! * `config.json`: [`RunConfig`], everything needed to rebuild the graph and repeat
//!   the run (architecture, α, channels, classes, batch norm, crop size, input
//!   normalisation, recipe, seed, train/validation split).
//! * `weights.safetensors`: the weights of the epoch with the best validation F1.
//! * `metrics.json`: [`RunMetrics`], the per-epoch history and the best epoch.
//! * `run.json`: `{ "config": ..., "metrics": ... }` in one file.
//! * `checkpoint.safetensors`: latest weights + Adam state + RNG and loop state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use ccnet_models::{Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::graph::{Graph, Op};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CONFIG_KEY, STATE_KEY};
use super::data::{self, Sample, INPUT_NORM};
use super::executor::Network;
use super::infer::predict_full;
use super::loss::loss;
use super::metrics::{summarize, Confusion, Summary};
use super::optim::Adam;
use super::recipe::Recipe;
use super::rng::Rng;
use crate::dataset::Dataset;
use crate::fsutil::write_atomic;

/// Version of the run-folder format.
pub const RUN_FORMAT: u32 = 1;

/// The deterministic train/validation split (dataset item ids).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Training images.
    pub train: Vec<String>,
    /// Validation images.
    pub val: Vec<String>,
}

/// `config.json`: everything needed to rebuild the network and repeat the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Run-folder format version.
    pub format: u32,
    /// Dataset name.
    pub dataset: String,
    /// Dataset folder used for training.
    pub dataset_dir: PathBuf,
    /// Architecture (`unet`, `fcn`, `cumed`).
    pub arch: String,
    /// Width multiplier as a fraction (`1/8`).
    pub alpha: String,
    /// Input channels.
    pub in_channels: u32,
    /// Classes (2: background, foreground).
    pub classes: u32,
    /// Whether the graph has batch-norm nodes.
    pub batch_norm: bool,
    /// Training crop `[height, width]`.
    pub size: [u32; 2],
    /// Input normalisation (see [`data`]).
    pub input_norm: String,
    /// Seed of initialisation, split and sampling.
    pub seed: u64,
    /// The recipe.
    pub recipe: Recipe,
    /// The split.
    pub split: Split,
    /// Trainable parameters of the training graph (batch-norm gamma/beta included).
    pub trainable_params: u64,
    /// Parameters of the deployed network (batch norm folded into biases).
    pub deployed_params: u64,
    /// A variant's name (`squeeze 1/2`, `prune round 2`); absent for the architecture's
    /// own network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The variant's training graph, which replaces the architecture's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<Vec<Op>>,
    /// The weights the run started from, when not a fresh initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_weights: Option<PathBuf>,
}

impl RunConfig {
    /// The architecture configuration this run trains.
    pub fn arch_config(&self) -> Result<ArchConfig> {
        let arch: Arch = self
            .arch
            .parse()
            .map_err(|e| anyhow!("config.json: `{}`: {e}", self.arch))?;
        let alpha = Alpha::parse(&self.alpha)
            .map_err(|e| anyhow!("config.json: alpha `{}`: {e}", self.alpha))?;
        Ok(ArchConfig {
            arch,
            alpha,
            in_channels: self.in_channels,
            classes: self.classes,
            batch_norm: self.batch_norm,
        })
    }

    /// The training graph: the variant's, else the architecture's.
    pub fn graph(&self) -> Result<Vec<Op>> {
        if let Some(g) = &self.graph {
            return Ok(g.clone());
        }
        ccnet_models::build(&self.arch_config()?)
            .map_err(|e| anyhow!("cannot build the network: {e}"))
    }
}

/// One epoch's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch (from 1).
    pub epoch: usize,
    /// Steps done at the end of the epoch.
    pub steps: usize,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Mean training cross-entropy over the epoch.
    pub train_ce: f64,
    /// Validation result (full images, tiled).
    pub val: Summary,
    /// Seconds per training step in this epoch.
    pub seconds_per_step: f64,
    /// Seconds of the validation pass.
    pub val_seconds: f64,
}

/// `metrics.json`: history and best epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Per-epoch records.
    pub history: Vec<EpochRecord>,
    /// The epoch whose weights are in `weights.safetensors`.
    pub best_epoch: Option<usize>,
    /// Validation F1 of the best epoch.
    pub best_val_f1: f64,
    /// Validation IU of the best epoch.
    pub best_val_iu: f64,
    /// True when the best epoch predicted no foreground on any validation image.
    pub collapsed: bool,
    /// `running`, `early_stop`, `max_epochs` or `interrupted`.
    pub stopped: String,
    /// Training steps done.
    pub steps_done: usize,
    /// Wall-clock seconds of training and validation.
    pub seconds: f64,
}

/// Loop state stored in the checkpoint's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    epoch: usize,
    rng: Rng,
    adam_t: u64,
    bad_epochs: usize,
    metrics: RunMetrics,
}

/// What to train.
#[derive(Clone, Debug)]
pub struct TrainSpec {
    /// Dataset folder (`images/` + `masks/`).
    pub dataset_dir: PathBuf,
    /// Architecture.
    pub arch: Arch,
    /// Width multiplier.
    pub alpha: Alpha,
    /// Seed.
    pub seed: u64,
    /// Recipe.
    pub recipe: Recipe,
}

/// A network other than the architecture's own (the squeeze and prune baselines).
#[derive(Clone, Debug, Default)]
pub struct Variant {
    /// Name recorded in `config.json`.
    pub name: Option<String>,
    /// Training graph replacing the architecture's (same input channels, 2 classes).
    pub graph: Option<Vec<Op>>,
    /// Start from these weights (a safetensors file holding every tensor of the graph).
    pub init_weights: Option<PathBuf>,
}

/// How to run the loop.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Device.
    pub device: Device,
    /// Stop (as if interrupted) after this many epochs of this session.
    pub stop_after_epochs: Option<usize>,
    /// No progress bar or epoch lines.
    pub quiet: bool,
}

/// The device for `--device cpu|cuda`.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(),
        other => bail!("unknown device `{other}` (expected cpu or cuda)"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Device::new_cuda(0).context(
        "cannot open CUDA device 0 (needs an NVIDIA GPU and its driver: check `nvidia-smi`; \
         --device cpu always works)",
    )
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!(
        "--device cuda: this ccnet was built without CUDA support; rebuild with \
         `cargo build --release -p ccnet-host --features cuda` (CPU training always works)"
    )
}

/// Splits dataset ids deterministically by seed: a seeded shuffle, the first
/// `round(n · val_fraction)` (at least 1) ids are validation, each side sorted.
pub fn split(ids: &[String], val_fraction: f64, seed: u64) -> Result<Split> {
    if ids.len() < 2 {
        bail!(
            "{} image(s): training needs at least 2 (one for validation)",
            ids.len()
        );
    }
    let mut v: Vec<String> = ids.to_vec();
    v.sort();
    Rng::new(seed, 0x5B17).shuffle(&mut v);
    let n_val = ((v.len() as f64 * val_fraction).round() as usize).clamp(1, v.len() - 1);
    let mut val = v[..n_val].to_vec();
    let mut train = v[n_val..].to_vec();
    val.sort();
    train.sort();
    Ok(Split { train, val })
}

/// Evaluates `net` on full images with tiled inference (metrics at full resolution).
pub fn validate(
    net: &Network,
    samples: &[Sample],
    tile: u32,
    multiple: u32,
) -> Result<Vec<Confusion>> {
    samples
        .iter()
        .map(|s| {
            let pred = predict_full(net, s, tile as usize, multiple as usize)?;
            Ok(Confusion::of(&pred, &s.full_mask))
        })
        .collect()
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    write_atomic(path, s.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

/// Reads a JSON file, naming the file in any error.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{}: invalid contents", path.display()))
}

/// Path of a run's configuration.
pub fn config_path(run: &Path) -> PathBuf {
    run.join("config.json")
}
/// Path of a run's best weights.
pub fn weights_path(run: &Path) -> PathBuf {
    run.join("weights.safetensors")
}
/// Path of a run's checkpoint.
pub fn checkpoint_path(run: &Path) -> PathBuf {
    run.join("checkpoint.safetensors")
}

/// Starts a new run in `out` (which must not hold a checkpointed run) and trains it.
pub fn train(spec: &TrainSpec, out: &Path, opts: &LoopOptions) -> Result<RunMetrics> {
    train_variant(spec, &Variant::default(), out, opts)
}

/// [`train`] for a variant network: its own graph, optionally starting from given
/// weights (fine-tuning).
pub fn train_variant(
    spec: &TrainSpec,
    variant: &Variant,
    out: &Path,
    opts: &LoopOptions,
) -> Result<RunMetrics> {
    // A folder whose run never finished an epoch (no checkpoint) may be started again.
    if checkpoint_path(out).exists() {
        bail!(
            "{}: already holds a run (checkpoint.safetensors); pass --resume to continue it or choose another --out",
            out.display()
        );
    }
    let r = &spec.recipe;
    let [h, w] = r.size;
    spec.arch
        .check_input(h, w)
        .map_err(|e| anyhow!("--size: {e}"))?;
    if r.batch == 0 || r.steps_per_epoch == 0 || r.epochs == 0 {
        bail!("batch, steps per epoch and epochs must be at least 1");
    }
    let ds = Dataset::open(&spec.dataset_dir, true)?;
    let in_channels = ds.channels()?;
    let ids: Vec<String> = ds.items.iter().map(|i| i.id.clone()).collect();
    let split = split(&ids, r.val_fraction, spec.seed)
        .with_context(|| format!("{}", spec.dataset_dir.display()))?;
    let ac = ArchConfig {
        arch: spec.arch,
        alpha: spec.alpha,
        in_channels,
        classes: 2,
        batch_norm: r.batch_norm,
    };
    let nodes = match &variant.graph {
        Some(g) => {
            if g.first()
                != Some(&Op::Input {
                    channels: in_channels,
                })
            {
                bail!(
                    "the variant's graph does not start with an input of {in_channels} channel(s), as {} has",
                    spec.dataset_dir.display()
                );
            }
            g.clone()
        }
        None => ccnet_models::build(&ac)
            .map_err(|e| anyhow!("cannot build {} at α = {}: {e}", spec.arch, spec.alpha))?,
    };
    let deployed_params = crate::pack::fold::deployed_params(&nodes);
    let cfg = RunConfig {
        format: RUN_FORMAT,
        dataset: ds.name.clone(),
        dataset_dir: spec.dataset_dir.clone(),
        arch: spec.arch.name().to_string(),
        alpha: spec.alpha.to_string(),
        in_channels,
        classes: 2,
        batch_norm: r.batch_norm,
        size: r.size,
        input_norm: INPUT_NORM.to_string(),
        seed: spec.seed,
        recipe: r.clone(),
        split,
        trainable_params: Graph::new_unchecked(&nodes).trainable_params(),
        deployed_params,
        variant: variant.name.clone(),
        graph: variant.graph.clone(),
        init_weights: variant.init_weights.clone(),
    };
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut init_rng = Rng::new(spec.seed, 0x1417);
    let net = Network::new(&nodes, &opts.device, &mut init_rng)?;
    if let Some(w) = &variant.init_weights {
        let (tensors, _) = checkpoint::load(w, &opts.device)?;
        net.load(&tensors, &w.display().to_string())?;
    }
    let adam = Adam::new(trainable(&net))?;
    let state = TrainState {
        step: 0,
        epoch: 0,
        rng: Rng::new(spec.seed, 0xDA7A),
        adam_t: 0,
        bad_epochs: 0,
        metrics: RunMetrics {
            stopped: "running".into(),
            ..RunMetrics::default()
        },
    };
    let result = run_loop(&cfg, &ds, net, adam, state, out, opts);
    if result.is_err() && !checkpoint_path(out).exists() {
        // Failed before its first checkpoint (e.g. an unreadable image): leave no
        // half-started run that neither a new run nor --resume could use.
        let _ = std::fs::remove_file(config_path(out));
        let _ = std::fs::remove_dir(out);
    }
    result
}

/// Continues the run in `out` from its checkpoint. `dataset_dir` overrides the folder
/// recorded in `config.json` (the same images must be there).
pub fn resume(out: &Path, dataset_dir: Option<&Path>, opts: &LoopOptions) -> Result<RunMetrics> {
    let mut cfg: RunConfig = read_json(&config_path(out))?;
    if let Some(d) = dataset_dir {
        cfg.dataset_dir = d.to_path_buf();
    }
    let ckpt = checkpoint_path(out);
    if !ckpt.exists() {
        bail!("{}: no checkpoint to resume from", ckpt.display());
    }
    let ds = Dataset::open(&cfg.dataset_dir, true)?;
    let nodes = cfg.graph()?;
    let net = Network::new(&nodes, &opts.device, &mut Rng::new(0, 0))?;
    let (tensors, meta) = checkpoint::load(&ckpt, &opts.device)?;
    let what = ckpt.display().to_string();
    net.load(&tensors, &what)?;
    let state: TrainState = serde_json::from_str(
        meta.get(STATE_KEY)
            .ok_or_else(|| anyhow!("{what}: no training state in the metadata"))?,
    )
    .with_context(|| format!("{what}: invalid training state"))?;
    let mut adam = Adam::new(trainable(&net))?;
    adam.load(&tensors, state.adam_t, &what)?;
    run_loop(&cfg, &ds, net, adam, state, out, opts)
}

/// The metrics of a finished run in `dir` (early stop or all epochs), if it is one.
pub fn finished(dir: &Path) -> Option<RunMetrics> {
    read_json::<RunMetrics>(&dir.join("metrics.json"))
        .ok()
        .filter(|m| m.stopped == "early_stop" || m.stopped == "max_epochs")
}

/// Brings the run in `dir` to its end: a finished run is left as it is, a checkpointed
/// one resumed, one killed before its first checkpoint started over, a missing one
/// trained.
pub fn train_to_end(
    spec: &TrainSpec,
    variant: &Variant,
    dir: &Path,
    opts: &LoopOptions,
) -> Result<RunMetrics> {
    if let Some(m) = finished(dir) {
        return Ok(m);
    }
    if checkpoint_path(dir).exists() {
        return resume(dir, Some(&spec.dataset_dir), opts);
    }
    if config_path(dir).exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot remove the unfinished run", dir.display()))?;
    }
    train_variant(spec, variant, dir, opts)
}

fn trainable(net: &Network) -> Vec<(&String, &candle_core::Var)> {
    net.trainable_names()
        .iter()
        .map(|n| (n, &net.params()[n]))
        .collect()
}

fn run_loop(
    cfg: &RunConfig,
    ds: &Dataset,
    net: Network,
    mut adam: Adam,
    mut st: TrainState,
    out: &Path,
    opts: &LoopOptions,
) -> Result<RunMetrics> {
    let r = &cfg.recipe;
    if st.metrics.stopped == "early_stop" || st.epoch >= r.epochs {
        // Finished; killed perhaps between the last checkpoint and its metrics file,
        // which is written again so the run reads as finished.
        if st.metrics.stopped == "running" || st.metrics.stopped == "interrupted" {
            st.metrics.stopped = "max_epochs".into();
        }
        write_metrics(out, cfg, &st.metrics)?;
        return Ok(st.metrics);
    }
    let ac = cfg.arch_config()?;
    let (arch, alpha) = (ac.arch, ac.alpha.value());
    let multiple = arch.input_multiple();
    let train_s = data::load_samples(ds, &cfg.split.train, cfg.in_channels, cfg.recipe.downscale)?;
    let val_s = data::load_samples(ds, &cfg.split.val, cfg.in_channels, cfg.recipe.downscale)?;
    if st.step == 0 {
        // Written once the images have loaded, so a dataset error leaves no run behind.
        write_json(&config_path(out), cfg)?;
    }
    let aug = r.augment();
    let size = (r.size[0] as usize, r.size[1] as usize);
    let total = r.total_steps();
    let pb = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_position(st.step as u64);
        pb
    };
    let show = |line: String| {
        if opts.quiet {
        } else if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    };
    let weights_meta = HashMap::from([(CONFIG_KEY.to_string(), serde_json::to_string(cfg)?)]);
    let mut session_epochs = 0;
    let started = Instant::now();
    let seconds_before = st.metrics.seconds;
    let mut last_val_f1 = st.metrics.history.last().map(|e| e.val.f1);
    while st.epoch < r.epochs {
        let t0 = Instant::now();
        let (mut sum_loss, mut sum_ce) = (0.0, 0.0);
        let mut lr = r.peak_lr(alpha);
        for _ in 0..r.steps_per_epoch {
            lr = r.lr_for(alpha, st.step);
            let b = data::random_batch(
                &train_s,
                r.batch,
                size,
                cfg.classes as usize,
                &aug,
                &mut st.rng,
                &opts.device,
            )?;
            let logits = net.forward(&b.x, true)?;
            let (l, ce) = loss(r.loss, &logits, &b.onehot)?;
            let grads = l.backward()?;
            adam.step(trainable(&net), &grads, lr)?;
            let lv = f64::from(l.to_scalar::<f32>()?);
            if !lv.is_finite() {
                bail!(
                    "training diverged at step {} (loss {lv}); try a smaller --lr",
                    st.step + 1
                );
            }
            sum_loss += lv;
            sum_ce += f64::from(ce.to_scalar::<f32>()?);
            st.step += 1;
            pb.inc(1);
            let val = last_val_f1
                .map(|f| format!("{f:.3}"))
                .unwrap_or_else(|| "-".into());
            pb.set_message(format!("loss {lv:.4} val F1 {val}"));
        }
        let seconds_per_step = t0.elapsed().as_secs_f64() / r.steps_per_epoch as f64;
        st.epoch += 1;
        let tv = Instant::now();
        let conf = validate(&net, &val_s, r.tile, multiple)?;
        let val = summarize(&conf);
        let rec = EpochRecord {
            epoch: st.epoch,
            steps: st.step,
            lr,
            train_loss: sum_loss / r.steps_per_epoch as f64,
            train_ce: sum_ce / r.steps_per_epoch as f64,
            val,
            seconds_per_step,
            val_seconds: tv.elapsed().as_secs_f64(),
        };
        last_val_f1 = Some(val.f1);
        show(format!(
            "epoch {:>3}: loss {:.4} (ce {:.4}) lr {:.2e} | val F1 {:.4} IU {:.4}{} | {:.3} s/step",
            rec.epoch,
            rec.train_loss,
            rec.train_ce,
            rec.lr,
            val.f1,
            val.iu,
            if val.collapsed {
                " COLLAPSED (no foreground predicted)".to_string()
            } else if val.empty_predictions > 0 {
                format!(" ({} empty predictions)", val.empty_predictions)
            } else {
                String::new()
            },
            seconds_per_step
        ));
        st.metrics.history.push(rec);
        let better = st.metrics.best_epoch.is_none() || val.f1 > st.metrics.best_val_f1;
        if better {
            st.metrics.best_epoch = Some(st.epoch);
            st.metrics.best_val_f1 = val.f1;
            st.metrics.best_val_iu = val.iu;
            st.metrics.collapsed = val.collapsed;
            st.bad_epochs = 0;
            checkpoint::save(&weights_path(out), &net.tensors(), weights_meta.clone())?;
        } else {
            st.bad_epochs += 1;
        }
        session_epochs += 1;
        st.metrics.steps_done = st.step;
        st.metrics.seconds = seconds_before + started.elapsed().as_secs_f64();
        let early = r.patience > 0 && st.bad_epochs >= r.patience;
        st.metrics.stopped = if early {
            "early_stop"
        } else if st.epoch >= r.epochs {
            "max_epochs"
        } else {
            "running"
        }
        .into();
        st.adam_t = adam.t;
        let mut ck = net.tensors();
        ck.extend(adam.tensors());
        let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(&st)?)]);
        checkpoint::save(&checkpoint_path(out), &ck, meta)?;
        write_metrics(out, cfg, &st.metrics)?;
        if early {
            show(format!(
                "early stop: no better validation F1 for {} epochs",
                r.patience
            ));
            break;
        }
        if opts.stop_after_epochs.is_some_and(|n| session_epochs >= n) && st.epoch < r.epochs {
            st.metrics.stopped = "interrupted".into();
            write_metrics(out, cfg, &st.metrics)?;
            break;
        }
    }
    pb.finish_and_clear();
    if st.metrics.collapsed {
        show(format!(
            "warning: the best epoch predicts no foreground on any of the {} validation images (collapsed)",
            cfg.split.val.len()
        ));
    }
    Ok(st.metrics)
}

fn write_metrics(out: &Path, cfg: &RunConfig, m: &RunMetrics) -> Result<()> {
    write_json(&out.join("metrics.json"), m)?;
    #[derive(Serialize)]
    struct Both<'a> {
        config: &'a RunConfig,
        metrics: &'a RunMetrics,
    }
    write_json(
        &out.join("run.json"),
        &Both {
            config: cfg,
            metrics: m,
        },
    )
}

/// Loads a finished run: its configuration and its best weights.
pub fn load_run(run: &Path, device: &Device) -> Result<(RunConfig, Network)> {
    let cfg: RunConfig = read_json(&config_path(run))?;
    if cfg.format != RUN_FORMAT {
        bail!(
            "{}: run format {} is not supported (expected {RUN_FORMAT})",
            config_path(run).display(),
            cfg.format
        );
    }
    let nodes = cfg.graph()?;
    let net = Network::new(&nodes, device, &mut Rng::new(0, 0))?;
    let wp = weights_path(run);
    let (tensors, _) = checkpoint::load(&wp, device)?;
    net.load(&tensors, &wp.display().to_string())?;
    Ok((cfg, net))
}
