//! The fused batch norm (`train::batch_norm::BatchNormOp`, with and without the fused
//! ReLU) agrees with the candle-composed batch norm it replaces: forward values, batch
//! statistics and the gradients of x, gamma and beta, in training and inference mode, on
//! random shapes (N = 1, H×W = 1, planes that are not a multiple of the vector width, a
//! large mean); with central finite differences; and a tiny U-Net trains along the same
//! loss trajectory with either batch norm.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use ccnet_host::train::batch_norm::{self, Mode};
use ccnet_host::train::conv;
use ccnet_host::train::executor::{self, Network};
use ccnet_host::train::rng::Rng;
use common::tensors::{flat, randn, rel_err};
use common::tiny_unet;

const EPS: f32 = 1e-5;

/// (n, c, h, w, scale, offset) of the inputs.
const SHAPES: &[(usize, usize, usize, usize, f64, f64)] = &[
    (2, 3, 8, 8, 1.0, 0.0),
    (1, 4, 5, 7, 2.0, 0.5),
    (3, 2, 9, 11, 0.5, -1.0),
    (4, 5, 16, 16, 1.0, 0.0),
    (2, 6, 3, 33, 1.5, 2.0),
    // H×W = 1: statistics over the batch only.
    (3, 4, 1, 1, 1.0, 0.0),
    // N = 1 and H×W = 1: variance 0, the output is beta.
    (1, 3, 1, 1, 1.0, 0.0),
    // N = 1, a single row.
    (1, 2, 1, 13, 1.0, 0.0),
    // A large mean against a small spread.
    (2, 3, 12, 10, 0.1, 100.0),
    // Plane larger than one rayon task.
    (2, 2, 128, 160, 1.0, 0.3),
];

struct Inputs {
    x: Var,
    gamma: Var,
    beta: Var,
    r: Tensor,
}

fn inputs(
    rng: &mut Rng,
    &(n, c, h, w, scale, offset): &(usize, usize, usize, usize, f64, f64),
) -> Inputs {
    Inputs {
        x: Var::from_tensor(&randn(rng, &[n, c, h, w], scale, offset)).unwrap(),
        gamma: Var::from_tensor(&randn(rng, &[c], 0.5, 1.0)).unwrap(),
        beta: Var::from_tensor(&randn(rng, &[c], 0.5, 0.0)).unwrap(),
        r: randn(rng, &[n, c, h, w], 1.0, 0.0),
    }
}

/// Gradients of `Σ y ⊙ r` with respect to x, gamma, beta.
fn grads(y: &Tensor, i: &Inputs) -> [Tensor; 3] {
    let g = y.mul(&i.r).unwrap().sum_all().unwrap().backward().unwrap();
    [&i.x, &i.gamma, &i.beta].map(|v| g.get(v.as_tensor()).unwrap().clone())
}

fn check_grads(what: &str, a: &[Tensor; 3], b: &[Tensor; 3], tol: f32) {
    for (k, name) in ["x", "gamma", "beta"].iter().enumerate() {
        let e = rel_err(&a[k], &b[k]);
        assert!(e < tol, "{what}: gradient of {name}: error {e}");
    }
}

#[test]
fn training_mode_matches_composed_batch_norm() {
    let mut rng = Rng::new(31, 1);
    for shape in SHAPES {
        for relu in [false, true] {
            let what = format!("{shape:?} relu={relu}");
            let i = inputs(&mut rng, shape);
            let (x, g, b) = (i.x.as_tensor(), i.gamma.as_tensor(), i.beta.as_tensor());
            let (y_ref, mean_ref, var_ref) = batch_norm::composed_train(x, g, b, EPS).unwrap();
            let y_ref = if relu { y_ref.relu().unwrap() } else { y_ref };
            let (y, stats) = batch_norm::fused_train(x, g, b, EPS, relu).unwrap();
            let c = shape.1;
            let mean = Tensor::from_vec(stats.mean.clone(), c, &Device::Cpu).unwrap();
            let var = Tensor::from_vec(stats.var.clone(), c, &Device::Cpu).unwrap();
            let e = rel_err(&mean, &mean_ref.flatten_all().unwrap());
            assert!(e < 1e-5, "{what}: mean error {e}");
            // Relative to the variance itself (the composed f32 sum is the less exact one).
            let var_ref = var_ref.flatten_all().unwrap();
            for (a, r) in flat(&var).iter().zip(flat(&var_ref)) {
                assert!(
                    (a - r).abs() <= 1e-4 * r.abs() + 1e-6,
                    "{what}: variance {a} vs {r}"
                );
            }
            // The large-mean case loses digits in the composed f32 mean.
            let tol = if shape.5 > 10.0 { 2e-3 } else { 2e-5 };
            let e = rel_err(&y, &y_ref);
            assert!(e < tol, "{what}: forward error {e}");
            let ga = grads(&y, &i);
            let gb = grads(&y_ref, &i);
            let tol = if shape.5 > 10.0 { 5e-3 } else { 1e-4 };
            check_grads(&what, &ga, &gb, tol);
        }
    }
}

#[test]
fn inference_mode_matches_composed_batch_norm() {
    let mut rng = Rng::new(37, 1);
    for shape in SHAPES {
        for relu in [false, true] {
            let what = format!("{shape:?} relu={relu} eval");
            let i = inputs(&mut rng, shape);
            let c = shape.1;
            let mean = randn(&mut rng, &[c], shape.4, shape.5);
            let var = randn(&mut rng, &[c], 0.3, 0.0).abs().unwrap();
            let (x, g, b) = (i.x.as_tensor(), i.gamma.as_tensor(), i.beta.as_tensor());
            let y_ref = batch_norm::composed_eval(x, g, b, &mean, &var, EPS).unwrap();
            let y_ref = if relu { y_ref.relu().unwrap() } else { y_ref };
            let y = batch_norm::fused_eval(x, g, b, &mean, &var, EPS, relu).unwrap();
            let e = rel_err(&y, &y_ref);
            assert!(e < 1e-5, "{what}: forward error {e}");
            check_grads(&what, &grads(&y, &i), &grads(&y_ref, &i), 1e-4);
        }
    }
}

/// Central differences in f64 arithmetic on the f32 op.
fn finite_differences(train: bool, relu: bool) {
    let mut rng = Rng::new(41, 1);
    let shape = (2, 3, 3, 2, 1.0, 0.5);
    let i = inputs(&mut rng, &shape);
    let c = shape.1;
    let mean = randn(&mut rng, &[c], 1.0, 0.0);
    let var = randn(&mut rng, &[c], 0.3, 1.0).abs().unwrap();
    let run = |x: &Tensor, g: &Tensor, b: &Tensor| -> Tensor {
        if train {
            batch_norm::fused_train(x, g, b, EPS, relu).unwrap().0
        } else {
            batch_norm::fused_eval(x, g, b, &mean, &var, EPS, relu).unwrap()
        }
    };
    let loss = |x: &Tensor, g: &Tensor, b: &Tensor| -> f64 {
        let y = flat(&run(x, g, b));
        y.iter()
            .zip(flat(&i.r))
            .map(|(a, r)| f64::from(*a) * f64::from(r))
            .sum()
    };
    let y = run(i.x.as_tensor(), i.gamma.as_tensor(), i.beta.as_tensor());
    let g = grads(&y, &i);
    let base = [&i.x, &i.gamma, &i.beta].map(|v| flat(v.as_tensor()));
    // Smaller steps with ReLU, so that no step crosses its kink (fixed seed: checked).
    let h = if relu { 1e-3f32 } else { 1e-2 };
    for (k, name) in ["x", "gamma", "beta"].iter().enumerate() {
        let analytic = flat(&g[k]);
        for j in 0..base[k].len() {
            let with = |d: f32| -> f64 {
                let mut args = base.clone();
                args[k][j] += d;
                let t = |v: &Vec<f32>, like: &Var| {
                    Tensor::from_vec(v.clone(), like.dims(), &Device::Cpu).unwrap()
                };
                loss(
                    &t(&args[0], &i.x),
                    &t(&args[1], &i.gamma),
                    &t(&args[2], &i.beta),
                )
            };
            let fd = (with(h) - with(-h)) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(analytic[j])).abs() < 3e-3 * (1.0 + fd.abs()),
                "train={train} relu={relu}: dL/d{name}[{j}]: fd {fd} vs {}",
                analytic[j]
            );
        }
    }
}

#[test]
fn training_mode_gradients_match_finite_differences() {
    finite_differences(true, false);
    finite_differences(true, true);
}

#[test]
fn inference_mode_gradients_match_finite_differences() {
    finite_differences(false, false);
    finite_differences(false, true);
}

/// A tiny U-Net (α = 1/16, with batch norm; batch 2 of 32×32 crops, so the bottleneck's
/// batch norm sees 2×2 planes), six Adam steps with each batch norm from the same seed:
/// the same losses, parameters, running statistics and inference outputs within float
/// tolerance. (With 16×16 crops the bottleneck's batch norm normalises two values per
/// channel, whose input gradient is zero up to rounding; Adam's first steps turn that
/// rounding noise into full-size updates of either sign, so the two runs part ways after
/// two steps without either being wrong.)
#[test]
fn tiny_unet_trains_the_same_with_either_batch_norm() -> Result<()> {
    let (nodes, x, y) = tiny_unet::batch(0.2)?;
    let mut runs = Vec::new();
    // Only the batch norms differ between the two runs: candle's pool in both (the
    // exact pool's sharper gradients amplify rounding differences past the tolerance).
    ccnet_host::train::pool::set_mode(Some(ccnet_host::train::pool::Mode::Candle));
    for mode in [Mode::Candle, Mode::Fused] {
        batch_norm::set_mode(Some(mode));
        let net = Network::new(&nodes, &Device::Cpu, &mut Rng::new(2, 1))?;
        let losses = tiny_unet::adam_steps(&net, &x, &y, 6, |_, _| {})?;
        let eval = net.forward(&x, false)?;
        runs.push((losses, net.tensors(), eval));
    }
    batch_norm::set_mode(None);
    let (l0, t0, e0) = &runs[0];
    let (l1, t1, e1) = &runs[1];
    for (k, (a, b)) in l0.iter().zip(l1).enumerate() {
        assert!(
            (a - b).abs() < 1e-5 * (1.0 + a.abs()),
            "step {k}: loss {a} (candle) vs {b} (fused)"
        );
    }
    assert!(l1[5] < l1[0], "the loss goes down: {l1:?}");
    for (name, a) in t0 {
        let e = rel_err(&t1[name], a);
        assert!(e < 1e-4, "{name}: error {e} after training");
    }
    let e = rel_err(e1, e0);
    assert!(e < 1e-4, "inference output error {e}");
    Ok(())
}

/// Forward and gradients of `f_fast` vs `f_ref` for `Σ y ⊙ r` over the given variables.
fn compare_fn(
    what: &str,
    vars: &[&Var],
    rng: &mut Rng,
    f_fast: &dyn Fn() -> Tensor,
    f_ref: &dyn Fn() -> Tensor,
    tol: f32,
) {
    let (y, y_ref) = (f_fast(), f_ref());
    let e = rel_err(&y, &y_ref);
    assert!(e < tol, "{what}: forward error {e}");
    let r = randn(rng, y_ref.dims(), 1.0, 0.0);
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = y_ref
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (k, v) in vars.iter().enumerate() {
        let e = rel_err(
            g.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
        );
        assert!(e < tol, "{what}: gradient of variable {k}: error {e}");
    }
}

/// The bias-add op (`conv::BiasAdd`) against candle's broadcast add.
#[test]
fn bias_add_matches_broadcast_add() {
    let mut rng = Rng::new(43, 1);
    for &(n, c, h, w, _, _) in SHAPES {
        let y = Var::from_tensor(&randn(&mut rng, &[n, c, h, w], 1.0, 0.0)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[c], 1.0, 0.0)).unwrap();
        compare_fn(
            &format!("bias add {:?}", (n, c, h, w)),
            &[&y, &b],
            &mut rng,
            &|| conv::add_bias(y.as_tensor(), b.as_tensor()).unwrap(),
            &|| {
                y.as_tensor()
                    .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1)).unwrap())
                    .unwrap()
            },
            1e-5,
        );
    }
}

/// The up-convolution op (`conv::UpConvOp`, kernel = stride, no padding) and the
/// executor's `conv_transpose2d` with bias against candle's `conv_transpose2d`.
#[test]
fn upconv_matches_candle_conv_transpose2d() {
    let mut rng = Rng::new(47, 1);
    for &(n, cin, cout, h, w, s) in &[
        (2, 3, 4, 5, 6, 2),
        (1, 2, 3, 1, 1, 2),
        (3, 4, 2, 7, 3, 3),
        (2, 8, 4, 16, 16, 2),
        (1, 1, 1, 4, 5, 1),
    ] {
        let x = Var::from_tensor(&randn(&mut rng, &[n, cin, h, w], 1.0, 0.0)).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[cin, cout, s, s], 1.0, 0.0)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[cout], 1.0, 0.0)).unwrap();
        let what = format!("upconv {:?}", (n, cin, cout, h, w, s));
        compare_fn(
            &what,
            &[&x, &wt],
            &mut rng,
            &|| conv::upconv(x.as_tensor(), wt.as_tensor(), s).unwrap(),
            &|| {
                x.as_tensor()
                    .conv_transpose2d(wt.as_tensor(), 0, 0, s, 1)
                    .unwrap()
            },
            1e-5,
        );
        compare_fn(
            &format!("{what} + bias via the executor"),
            &[&x, &wt, &b],
            &mut rng,
            &|| {
                executor::conv_transpose2d(x.as_tensor(), wt.as_tensor(), Some(b.as_tensor()), 0, s)
                    .unwrap()
            },
            &|| {
                x.as_tensor()
                    .conv_transpose2d(wt.as_tensor(), 0, 0, s, 1)
                    .unwrap()
                    .broadcast_add(&b.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                    .unwrap()
            },
            1e-5,
        );
    }
}
