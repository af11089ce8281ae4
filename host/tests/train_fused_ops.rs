//! The fused ops give what the ops they replace give in turn:
//! * convolution + batch norm (`train::conv_bn`) against `conv::conv2d_banded` then
//!   `batch_norm::fused_train`: the output, the batch statistics and the gradients of x,
//!   the weights, gamma and beta, with and without the ReLU, on planes above and below the
//!   direct-kernel threshold, stride 1 and 2;
//! * up-convolution + concatenation (`train::upcat`) against candle's
//!   `conv_transpose2d`, a broadcast bias add and `Tensor::cat`: the output and the
//!   gradients of the skip connection, the input, the weights and the bias.

mod common;

use candle_core::{Tensor, Var};
use ccnet_host::train::rng::Rng;
use ccnet_host::train::{batch_norm, conv, conv_bn, upcat};
use common::tensors::{self, flat, rel_err_values as rel_err};

const EPS: f32 = 1e-5;

/// A variable of `shape` with normal values `N(offset, scale²)`.
fn randn(rng: &mut Rng, shape: &[usize], scale: f64, offset: f64) -> Var {
    Var::from_tensor(&tensors::randn(rng, shape, scale, offset)).unwrap()
}

#[test]
fn fused_conv_batch_norm_matches_the_two_ops_in_turn() {
    let mut rng = Rng::new(41, 1);
    // (n, cin, cout, h, w, k, stride, padding)
    let shapes = [
        (2, 3, 5, 40, 36, 3, 1, 1),
        (3, 4, 6, 9, 11, 3, 1, 1),
        (2, 2, 4, 17, 16, 3, 2, 1),
        (1, 3, 2, 12, 12, 1, 1, 0),
    ];
    for &(n, cin, cout, h, w, k, s, p) in &shapes {
        for relu in [false, true] {
            let x = randn(&mut rng, &[n, cin, h, w], 1.0, 0.2);
            let wt = randn(&mut rng, &[cout, cin, k, k], 0.4, 0.0);
            let gamma = randn(&mut rng, &[cout], 0.5, 1.0);
            let beta = randn(&mut rng, &[cout], 0.5, 0.0);
            let (y_fused, s_fused) = conv_bn::conv_bn_train(
                x.as_tensor(),
                wt.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                (p, s, 1),
                EPS,
                relu,
            )
            .unwrap();
            let c = conv::conv2d_banded(x.as_tensor(), wt.as_tensor(), p, s, 1).unwrap();
            let (y_ref, s_ref) =
                batch_norm::fused_train(&c, gamma.as_tensor(), beta.as_tensor(), EPS, relu)
                    .unwrap();
            let what = format!("n={n} {cin}→{cout} {h}×{w} k={k} s={s} p={p} relu={relu}");
            assert!(
                rel_err(&flat(&y_fused), &flat(&y_ref)) < 1e-6,
                "{what}: output"
            );
            assert!(rel_err(&s_fused.mean, &s_ref.mean) < 1e-6, "{what}: mean");
            assert!(rel_err(&s_fused.var, &s_ref.var) < 1e-6, "{what}: variance");
            let r = randn(&mut rng, y_ref.dims(), 1.0, 0.0);
            let g_fused = (&y_fused * r.as_tensor()).unwrap().sum_all().unwrap();
            let g_ref = (&y_ref * r.as_tensor()).unwrap().sum_all().unwrap();
            let (gf, gr) = (g_fused.backward().unwrap(), g_ref.backward().unwrap());
            for (name, v) in [("x", &x), ("w", &wt), ("gamma", &gamma), ("beta", &beta)] {
                let a = flat(gf.get(v.as_tensor()).expect("fused gradient"));
                let b = flat(gr.get(v.as_tensor()).expect("reference gradient"));
                assert!(rel_err(&a, &b) < 1e-5, "{what}: d{name}");
            }
        }
    }
}

#[test]
fn fused_upconv_concat_matches_candle() {
    let mut rng = Rng::new(43, 1);
    // (n, skip channels, cin, cout, h, w, stride)
    let shapes = [
        (2, 3, 5, 4, 6, 7, 2),
        (1, 8, 16, 8, 16, 16, 2),
        (3, 2, 3, 5, 4, 5, 3),
        (2, 1, 2, 1, 1, 1, 2),
    ];
    for &(n, cs, cin, cout, h, w, s) in &shapes {
        let skip = randn(&mut rng, &[n, cs, h * s, w * s], 1.0, 0.0);
        let x = randn(&mut rng, &[n, cin, h, w], 1.0, 0.1);
        let wt = randn(&mut rng, &[cin, cout, s, s], 0.5, 0.0);
        let b = randn(&mut rng, &[cout], 0.5, 0.0);
        let fused = upcat::upconv_cat(
            skip.as_tensor(),
            x.as_tensor(),
            wt.as_tensor(),
            b.as_tensor(),
            s,
        )
        .unwrap();
        let up = x
            .as_tensor()
            .conv_transpose2d(wt.as_tensor(), 0, 0, s, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        let want = Tensor::cat(&[skip.as_tensor(), &up], 1).unwrap();
        let what = format!("n={n} skip {cs}, {cin}→{cout} {h}×{w} s={s}");
        assert_eq!(fused.dims(), want.dims(), "{what}");
        assert!(
            rel_err(&flat(&fused), &flat(&want)) < 1e-5,
            "{what}: output"
        );
        let r = randn(&mut rng, want.dims(), 1.0, 0.0);
        let gf = (&fused * r.as_tensor()).unwrap().sum_all().unwrap();
        let gw = (&want * r.as_tensor()).unwrap().sum_all().unwrap();
        let (gf, gw) = (gf.backward().unwrap(), gw.backward().unwrap());
        for (name, v) in [("skip", &skip), ("x", &x), ("w", &wt), ("b", &b)] {
            let a = flat(gf.get(v.as_tensor()).expect("fused gradient"));
            let e = flat(gw.get(v.as_tensor()).expect("reference gradient"));
            assert!(rel_err(&a, &e) < 1e-5, "{what}: d{name}");
        }
    }
}
