//! Times a full U-Net training step (forward in training mode, cross-entropy + Dice loss,
//! backward, Adam update) and an inference forward pass on the CPU, with candle's own
//! convolutions and batch norm (`candle`), with the executor's fast ops (`fast`: banded
//! im2col + matmul with its own backward, fused batch norm + ReLU), with the fast
//! convolutions but candle's batch norm (`fast-oldbn`, the state before the fused batch
//! norm) and with im2col + matmul under candle's autograd and candle's batch norm
//! (`im2col`).
//!
//! ```text
//! cargo run --release -p ccnet-host --example train_step_bench -- \
//!     [--alphas 1/16,1/8,1/4] [--sizes 128,256] [--batch 4] [--iters 3] [--warmup 1] \
//!     [--modes candle,fast-oldbn,fast] [--what train,infer] [--phases] [--no-bn]
//! ```
//!
//! Prints one line per measurement:
//! `bench <train|infer> alpha=<a> size=<s> batch=<b> mode=<candle|fast|fast-oldbn|im2col> ms=<median>`;
//! with `--phases` a training step is also split into forward+loss, backward and Adam;
//! `--no-bn` drops the recipe's batch norm (to see what it costs).
//! The PyTorch peer (`train_step_peer.py`) prints the same lines with `mode=torch`, and
//! `train_step_compare.sh` runs both and prints the ratios.

/// The allocator of the `ccnet` binary (see `host/src/main.rs`), so the bench times what
/// training runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use ccnet_host::train::executor::Network;
use ccnet_host::train::loss::{loss, LossKind};
use ccnet_host::train::optim::Adam;
use ccnet_host::train::rng::Rng;
use ccnet_host::train::{batch_norm, conv};
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;

struct Args {
    alphas: Vec<String>,
    sizes: Vec<usize>,
    batch: usize,
    iters: usize,
    warmup: usize,
    modes: Vec<String>,
    what: Vec<String>,
    phases: bool,
    batch_norm: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        alphas: vec!["1/16".into(), "1/8".into(), "1/4".into()],
        sizes: vec![128, 256],
        batch: 4,
        iters: 3,
        warmup: 1,
        modes: vec!["candle".into(), "fast".into()],
        what: vec!["train".into(), "infer".into()],
        phases: false,
        batch_norm: true,
    };
    let mut it = std::env::args().skip(1);
    let list = |s: String| -> Vec<String> { s.split(',').map(|x| x.trim().to_string()).collect() };
    while let Some(k) = it.next() {
        if k == "--phases" {
            a.phases = true;
            continue;
        }
        if k == "--no-bn" {
            a.batch_norm = false;
            continue;
        }
        let v = it.next().ok_or_else(|| anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--alphas" => a.alphas = list(v),
            "--sizes" => {
                a.sizes = list(v)
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--batch" => a.batch = v.parse()?,
            "--iters" => a.iters = v.parse()?,
            "--warmup" => a.warmup = v.parse()?,
            "--modes" => a.modes = list(v),
            "--what" => a.what = list(v),
            other => return Err(anyhow!("unknown option {other}")),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// A random batch `(N, 1, s, s)` and random one-hot targets `(N, 2, s, s)`.
fn batch(rng: &mut Rng, n: usize, s: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..n * s * s).map(|_| rng.normal() as f32).collect();
    let fg: Vec<f32> = (0..n * s * s)
        .map(|_| if rng.uniform() < 0.3 { 1.0 } else { 0.0 })
        .collect();
    let bg: Vec<f32> = fg.iter().map(|v| 1.0 - v).collect();
    let x = Tensor::from_vec(x, (n, 1, s, s), &Device::Cpu)?;
    let fg = Tensor::from_vec(fg, (n, 1, s, s), &Device::Cpu)?;
    let bg = Tensor::from_vec(bg, (n, 1, s, s), &Device::Cpu)?;
    Ok((x, Tensor::cat(&[&bg, &fg], 1)?))
}

/// Seconds of (forward + loss, backward, Adam) for one step.
fn train_step(net: &Network, adam: &mut Adam, x: &Tensor, y: &Tensor) -> Result<[f64; 3]> {
    let t0 = Instant::now();
    let logits = net.forward(x, true)?;
    let (l, _) = loss(LossKind::CrossEntropyDice, &logits, y)?;
    let lv = l.to_scalar::<f32>()?;
    let t1 = Instant::now();
    let grads = l.backward()?;
    let t2 = Instant::now();
    let vars = net
        .trainable_names()
        .iter()
        .map(|n| (n, &net.params()[n]))
        .collect::<Vec<_>>();
    adam.step(vars, &grads, 1e-3)?;
    // Force the update (candle is eager, this only makes sure nothing is pending).
    let _ = net
        .params()
        .values()
        .next()
        .map(|v| v.as_tensor().dims().len());
    let t3 = Instant::now();
    if !lv.is_finite() {
        return Err(anyhow!("loss is not finite"));
    }
    Ok([
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
    ])
}

fn main() -> Result<()> {
    ccnet_host::kernels::allocator::keep_freed_memory();
    let a = parse_args()?;
    println!(
        "# candle CPU, {} rayon threads, batch {}, median of {} after {} warm-up",
        rayon::current_num_threads(),
        a.batch,
        a.iters,
        a.warmup
    );
    for alpha_s in &a.alphas {
        let alpha = Alpha::parse(alpha_s).map_err(|e| anyhow!("alpha {alpha_s}: {e}"))?;
        let cfg = ArchConfig {
            arch: Arch::Unet,
            alpha,
            in_channels: 1,
            classes: 2,
            batch_norm: a.batch_norm,
        };
        let nodes = build(&cfg).map_err(|e| anyhow!("{e}"))?;
        for &s in &a.sizes {
            let mut rng = Rng::new(1, 1);
            let (x, y) = batch(&mut rng, a.batch, s)?;
            for what in &a.what {
                for mode in &a.modes {
                    let (cm, bm) = match mode.as_str() {
                        "fast" => (conv::Mode::Fast, batch_norm::Mode::Fused),
                        "fast-oldbn" => (conv::Mode::Fast, batch_norm::Mode::Candle),
                        "im2col" => (conv::Mode::Im2col, batch_norm::Mode::Candle),
                        "candle" => (conv::Mode::Candle, batch_norm::Mode::Candle),
                        other => return Err(anyhow!("unknown mode {other}")),
                    };
                    conv::set_mode(cm);
                    batch_norm::set_mode(Some(bm));
                    let net = Network::new(&nodes, &Device::Cpu, &mut Rng::new(2, 1))?;
                    let mut adam =
                        Adam::new(net.trainable_names().iter().map(|n| (n, &net.params()[n])))?;
                    let mut times = Vec::new();
                    let mut phases = Vec::new();
                    for i in 0..a.warmup + a.iters {
                        let t = Instant::now();
                        let ph = if what == "train" {
                            train_step(&net, &mut adam, &x, &y)?
                        } else {
                            let out = net.forward(&x, false)?;
                            let _ = out.sum_all()?.to_scalar::<f32>()?;
                            [0.0; 3]
                        };
                        let dt = t.elapsed().as_secs_f64();
                        if i >= a.warmup {
                            times.push(dt);
                            phases.push(ph);
                        }
                    }
                    println!(
                        "bench {what} alpha={alpha_s} size={s} batch={} mode={mode} ms={:.1}",
                        a.batch,
                        1e3 * median(times)
                    );
                    if a.phases && what == "train" {
                        let m = |k: usize| 1e3 * median(phases.iter().map(|p| p[k]).collect());
                        println!(
                            "phases train alpha={alpha_s} size={s} mode={mode} forward_loss_ms={:.1} backward_ms={:.1} adam_ms={:.1}",
                            m(0),
                            m(1),
                            m(2)
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
