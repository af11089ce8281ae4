//! Training on generated data: validation F1 rises clearly, checkpoint + resume equals
//! an uninterrupted run, and evaluation reports the metrics of its own predictions.
//! Run in release mode (`cargo test --release -p ccnet-host --test train_pipeline`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use ccnet_host::train::data::{load_samples, sample};
use ccnet_host::train::evaluate::{evaluate, EvalOptions, Images};
use ccnet_host::train::infer::predict;
use ccnet_host::train::metrics::Confusion;
use ccnet_host::train::recipe::Recipe;
use ccnet_host::train::rng::Rng;
use ccnet_host::train::run::{self, load_run, LoopOptions, TrainSpec};
use ccnet_models::Arch;
use ccnet_shared::alpha::Alpha;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccnet-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` gray images (80×72, textured background) with 1–3 bright disks as foreground
/// (about 10–20 % of the pixels).
fn synthetic_dataset(dir: &Path, n: usize, seed: u64) {
    let (w, h) = (80u32, 72u32);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    let mut rng = Rng::new(seed, 9);
    for i in 0..n {
        let disks: Vec<(f64, f64, f64)> = (0..1 + rng.below(3))
            .map(|_| {
                (
                    rng.range_f(8.0, f64::from(w) - 8.0),
                    rng.range_f(8.0, f64::from(h) - 8.0),
                    rng.range_f(5.0, 11.0),
                )
            })
            .collect();
        let mut img = image::GrayImage::new(w, h);
        let mut mask = image::GrayImage::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let inside = disks.iter().any(|&(cx, cy, r)| {
                    (f64::from(x) - cx).powi(2) + (f64::from(y) - cy).powi(2) <= r * r
                });
                let texture = 20.0 * ((f64::from(x) * 0.7).sin() * (f64::from(y) * 0.5).cos());
                let v = if inside { 150.0 } else { 90.0 } + texture + 18.0 * rng.normal();
                img.put_pixel(x, y, image::Luma([v.clamp(0.0, 255.0) as u8]));
                mask.put_pixel(x, y, image::Luma([if inside { 255 } else { 0 }]));
            }
        }
        img.save(dir.join(format!("images/s{i:02}.png"))).unwrap();
        mask.save(dir.join(format!("masks/s{i:02}.png"))).unwrap();
    }
}

fn recipe(epochs: usize, steps: usize) -> Recipe {
    let mut r = Recipe::robust([64, 64]);
    r.epochs = epochs;
    r.steps_per_epoch = steps;
    r.warmup_steps = 10;
    r.patience = 0;
    r.val_fraction = 0.25;
    r.tile = 64;
    r
}

fn quiet() -> LoopOptions {
    LoopOptions {
        device: Device::Cpu,
        stop_after_epochs: None,
        quiet: true,
    }
}

#[test]
fn validation_f1_rises_and_eval_reports_its_predictions() {
    let root = scratch("rise");
    let data = root.join("data");
    synthetic_dataset(&data, 12, 1);
    let spec = TrainSpec {
        dataset_dir: data.clone(),
        arch: Arch::Unet,
        alpha: Alpha::new(1, 16).unwrap(),
        seed: 3,
        recipe: recipe(5, 20),
    };
    let out = root.join("run");
    let m = run::train(&spec, &out, &quiet()).unwrap();
    assert_eq!(m.history.len(), 5);
    let first = m.history[0].val.f1;
    let best = m.best_val_f1;
    eprintln!(
        "val F1 per epoch: {:?}",
        m.history.iter().map(|e| e.val.f1).collect::<Vec<_>>()
    );
    assert!(best >= 0.75, "best validation F1 {best}");
    assert!(
        best > first + 0.1,
        "F1 did not rise clearly: {first} -> {best}"
    );
    assert!(m.history.last().unwrap().train_loss < m.history[0].train_loss);
    assert!(!m.collapsed);
    for f in [
        "config.json",
        "metrics.json",
        "run.json",
        "weights.safetensors",
        "checkpoint.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }

    // The loaded best weights reproduce the best epoch's validation F1.
    let (cfg, net) = load_run(&out, &Device::Cpu).unwrap();
    assert_eq!(cfg.split.val.len(), 3);
    let ds = ccnet_host::dataset::Dataset::open(&data, true).unwrap();
    let val = load_samples(&ds, &cfg.split.val, 1, 1).unwrap();
    let conf = run::validate(&net, &val, 64, 16).unwrap();
    let f1 = conf.iter().map(Confusion::f1).sum::<f64>() / conf.len() as f64;
    assert!((f1 - best).abs() < 1e-9, "{f1} vs {best}");

    // Evaluation: per-image metrics are those of the predictions, overlays are written.
    let report = evaluate(
        &out,
        &data,
        &EvalOptions {
            images: Images::All,
            tile: Some(64),
            overlays: 2,
            out: None,
            device: Device::Cpu,
        },
    )
    .unwrap();
    assert_eq!(report.per_image.len(), 12);
    assert_eq!(report.overlays.len(), 2);
    for p in &report.overlays {
        let im = image::open(p).unwrap();
        assert_eq!((im.width(), im.height()), (3 * 80, 72));
    }
    assert!(out.join("eval-data/metrics.json").is_file());
    let item = &ds.items[5];
    let (img, mask) = ccnet_host::dataset::load_pair(item, None).unwrap();
    let s = sample(&item.id, &img, &mask, 1, 1);
    let c = Confusion::of(&predict(&net, &s, 64, 16).unwrap(), &mask.data);
    let r = &report.per_image[5];
    assert_eq!(r.id, item.id);
    assert!((r.f1 - c.f1()).abs() < 1e-12 && (r.iu - c.iu()).abs() < 1e-12);
    assert!(r.latency_ms > 0.0);
    let mean = report.per_image.iter().map(|r| r.f1).sum::<f64>() / 12.0;
    assert!((report.mean.f1 - mean).abs() < 1e-12);
    // Tiles smaller than the image give nearly the same answer as one tile.
    let tiled = evaluate(
        &out,
        &data,
        &EvalOptions {
            images: Images::Val,
            tile: Some(48),
            overlays: 0,
            out: Some(root.join("tiled")),
            device: Device::Cpu,
        },
    )
    .unwrap();
    assert_eq!(tiled.per_image.len(), 3);
    assert!(
        (tiled.mean.f1 - best).abs() < 0.1,
        "{} vs {best}",
        tiled.mean.f1
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn resume_continues_exactly() {
    let root = scratch("resume");
    let data = root.join("data");
    synthetic_dataset(&data, 6, 2);
    let spec = TrainSpec {
        dataset_dir: data.clone(),
        arch: Arch::Cumed,
        alpha: Alpha::new(1, 16).unwrap(),
        seed: 5,
        recipe: recipe(3, 4),
    };
    let a = run::train(&spec, &root.join("a"), &quiet()).unwrap();
    let mut opts = quiet();
    opts.stop_after_epochs = Some(1);
    let b1 = run::train(&spec, &root.join("b"), &opts).unwrap();
    assert_eq!(b1.history.len(), 1);
    assert_eq!(b1.stopped, "interrupted");
    // Starting again without --resume is refused.
    let e = run::train(&spec, &root.join("b"), &quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    let b2 = run::resume(&root.join("b"), None, &opts).unwrap();
    assert_eq!(b2.history.len(), 2);
    let b = run::resume(&root.join("b"), None, &quiet()).unwrap();
    assert_eq!(b.history.len(), 3);
    assert_eq!(a.steps_done, b.steps_done);
    for (x, y) in a.history.iter().zip(&b.history) {
        assert_eq!(x.steps, y.steps);
        // Values of epochs before the interruption went through JSON (last-digit
        // rounding); the weights below are compared exactly.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(1.0);
        assert!(close(x.train_loss, y.train_loss), "epoch {}", x.epoch);
        assert!(
            close(x.val.f1, y.val.f1) && close(x.val.iu, y.val.iu),
            "epoch {}",
            x.epoch
        );
        assert_eq!(x.val.empty_predictions, y.val.empty_predictions);
    }
    let wa =
        ccnet_host::train::checkpoint::load(&root.join("a/checkpoint.safetensors"), &Device::Cpu)
            .unwrap()
            .0;
    let wb =
        ccnet_host::train::checkpoint::load(&root.join("b/checkpoint.safetensors"), &Device::Cpu)
            .unwrap()
            .0;
    assert_eq!(wa.len(), wb.len());
    assert!(wa.keys().any(|k| k.starts_with("adam.m.")));
    assert!(wa.keys().any(|k| k.ends_with(".running_var")));
    for (k, ta) in &wa {
        let d = (ta - &wb[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    // Resuming a finished run changes nothing.
    let again = run::resume(&root.join("b"), None, &quiet()).unwrap();
    assert_eq!(again.history.len(), 3);
    let _ = std::fs::remove_dir_all(&root);
}
