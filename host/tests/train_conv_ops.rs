//! The fast CPU convolutions (`train::conv`: im2col / col2im custom ops + candle matmul)
//! agree with candle's own `conv2d` / `conv_transpose2d`: forward values and the
//! gradients of input, weight and bias, on random shapes; plus finite differences on a
//! tiny case.

use candle_core::{Device, Tensor, Var};
use ccnet_host::train::conv::{self, Geom};
use ccnet_host::train::executor;
use ccnet_host::train::rng::Rng;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Max |a − b| relative to max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

struct Case {
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

/// Forward and gradients (x, w, b) of `f_fast` vs `f_ref` for a loss `Σ y ⊙ r` with a
/// random `r`.
fn compare(
    what: &str,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    rng: &mut Rng,
    f_fast: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    f_ref: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y_ref = f_ref(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    let y_fast = f_fast(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    assert_eq!(y_fast.dims(), y_ref.dims(), "{what}: output shape");
    let e = rel_err(&y_fast, &y_ref);
    assert!(e < 1e-5, "{what}: forward error {e}");
    let r = randn(rng, y_ref.dims());
    let g_ref = y_ref
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_fast = y_fast
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in [("x", &xv), ("w", &wv), ("b", &bv)] {
        let a = g_fast.get(v.as_tensor()).unwrap();
        let b = g_ref.get(v.as_tensor()).unwrap();
        let e = rel_err(a, b);
        assert!(e < 1e-5, "{what}: gradient of {name}: error {e}");
    }
}

#[test]
fn conv2d_matches_candle_on_random_shapes() {
    let mut rng = Rng::new(7, 1);
    let mut cases = vec![
        // The U-Net's layers: 3×3 same, 1×1 head.
        Case {
            n: 2,
            cin: 3,
            cout: 4,
            h: 16,
            w: 16,
            k: 3,
            stride: 1,
            padding: 1,
        },
        Case {
            n: 1,
            cin: 5,
            cout: 2,
            h: 8,
            w: 12,
            k: 1,
            stride: 1,
            padding: 0,
        },
        // Strided, unpadded, odd sizes.
        Case {
            n: 3,
            cin: 2,
            cout: 3,
            h: 9,
            w: 7,
            k: 3,
            stride: 2,
            padding: 1,
        },
        Case {
            n: 2,
            cin: 4,
            cout: 5,
            h: 10,
            w: 11,
            k: 3,
            stride: 2,
            padding: 0,
        },
        Case {
            n: 1,
            cin: 3,
            cout: 2,
            h: 7,
            w: 9,
            k: 1,
            stride: 2,
            padding: 0,
        },
        Case {
            n: 2,
            cin: 2,
            cout: 3,
            h: 6,
            w: 5,
            k: 1,
            stride: 1,
            padding: 1,
        },
    ];
    for _ in 0..12 {
        let k = [1, 3][rng.below(2)];
        cases.push(Case {
            n: 1 + rng.below(3),
            cin: 1 + rng.below(6),
            cout: 1 + rng.below(6),
            h: 3 + rng.below(14),
            w: 3 + rng.below(14),
            k,
            stride: 1 + rng.below(2),
            padding: rng.below(2),
        });
    }
    for c in &mut cases {
        // candle's conv2d backward takes the output padding of its transposed convolution
        // from the height alone, so the reference fails unless both sides leave the same
        // remainder: keep to such shapes.
        if (c.h + 2 * c.padding - c.k) % c.stride != (c.w + 2 * c.padding - c.k) % c.stride {
            c.w += 1;
        }
        let what = format!(
            "conv2d n={} cin={} cout={} {}×{} k={} s={} p={}",
            c.n, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.padding
        );
        let x = randn(&mut rng, &[c.n, c.cin, c.h, c.w]);
        let w = randn(&mut rng, &[c.cout, c.cin, c.k, c.k]);
        let b = randn(&mut rng, &[c.cout]);
        let (p, s) = (c.padding, c.stride);
        compare(
            &format!("im2col {what}"),
            &x,
            &w,
            &b,
            &mut rng,
            &|x, w, b| {
                let y = conv::conv2d_im2col(x, w, p, s, 1).unwrap();
                y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                    .unwrap()
            },
            &|x, w, b| {
                let y = x.conv2d(w, p, s, 1, 1).unwrap();
                y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                    .unwrap()
            },
        );
        compare(
            &what,
            &x,
            &w,
            &b,
            &mut rng,
            &|x, w, b| {
                let y = conv::conv2d(x, w, p, s, 1).unwrap();
                y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                    .unwrap()
            },
            &|x, w, b| {
                let y = x.conv2d(w, p, s, 1, 1).unwrap();
                y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                    .unwrap()
            },
        );
        // The executor's entry point (fast by default) agrees too.
        if std::env::var("CCNET_CONV").map_or(true, |v| v != "candle") {
            compare(
                &format!("executor {what}"),
                &x,
                &w,
                &b,
                &mut rng,
                &|x, w, b| executor::conv2d(x, w, Some(b), p, s, 1).unwrap(),
                &|x, w, b| {
                    let y = x.conv2d(w, p, s, 1, 1).unwrap();
                    y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                        .unwrap()
                },
            );
        }
    }
}

#[test]
fn conv2d_with_dilation_matches_candle_forward() {
    let mut rng = Rng::new(9, 1);
    let x = randn(&mut rng, &[2, 3, 11, 10]);
    let w = randn(&mut rng, &[4, 3, 3, 3]);
    for (p, s) in [(0, 1), (2, 1), (1, 2)] {
        let a = conv::conv2d(&x, &w, p, s, 2).unwrap();
        let b = x.conv2d(&w, p, s, 2, 1).unwrap();
        assert!(rel_err(&a, &b) < 1e-5, "dilation 2, p={p} s={s}");
    }
}

#[test]
fn conv_transpose2d_matches_candle_on_random_shapes() {
    let mut rng = Rng::new(11, 1);
    // (n, cin, cout, h, w, k, stride, padding): FCN's 4×4/2 and 16×16/8 score
    // up-samplers, CUMedVision's 8×8/4, and small random ones.
    let mut cases = vec![
        (2, 3, 2, 5, 6, 4, 2, 1),
        (1, 2, 2, 3, 3, 16, 8, 4),
        (1, 2, 3, 4, 5, 8, 4, 2),
        (2, 4, 3, 6, 5, 3, 1, 1),
        (1, 3, 2, 4, 4, 3, 2, 0),
        (2, 2, 3, 5, 4, 1, 1, 0),
    ];
    for _ in 0..8 {
        let k = [1, 3, 4][rng.below(3)];
        cases.push((
            1 + rng.below(3),
            1 + rng.below(5),
            1 + rng.below(5),
            2 + rng.below(8),
            2 + rng.below(8),
            k,
            1 + rng.below(2),
            rng.below(2).min(k - 1),
        ));
    }
    for &(n, cin, cout, h, w, k, s, p) in &cases {
        let what =
            format!("conv_transpose2d n={n} cin={cin} cout={cout} {h}×{w} k={k} s={s} p={p}");
        let x = randn(&mut rng, &[n, cin, h, w]);
        let wt = randn(&mut rng, &[cin, cout, k, k]);
        let b = randn(&mut rng, &[cout]);
        let bias = |y: Tensor, b: &Tensor| {
            y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                .unwrap()
        };
        compare(
            &what,
            &x,
            &wt,
            &b,
            &mut rng,
            &|x, w, b| bias(conv::conv_transpose2d(x, w, p, s, 1).unwrap(), b),
            &|x, w, b| bias(x.conv_transpose2d(w, p, 0, s, 1).unwrap(), b),
        );
        if std::env::var("CCNET_CONV").map_or(true, |v| v != "candle") {
            compare(
                &format!("executor {what}"),
                &x,
                &wt,
                &b,
                &mut rng,
                &|x, w, b| executor::conv_transpose2d(x, w, Some(b), p, s).unwrap(),
                &|x, w, b| bias(x.conv_transpose2d(w, p, 0, s, 1).unwrap(), b),
            );
        }
    }
}

#[test]
fn im2col_and_col2im_are_adjoint() {
    // <im2col(x), c> == <x, col2im(c)> for random x and c.
    let mut rng = Rng::new(13, 1);
    for &(c, h, w, k, s, p, d) in &[
        (2, 7, 6, 3, 1, 1, 1),
        (3, 9, 8, 3, 2, 0, 1),
        (1, 10, 9, 3, 2, 2, 2),
        (2, 5, 5, 1, 2, 1, 1),
    ] {
        let g = Geom::new(c, h, w, k, k, s, p, d).unwrap();
        let x = randn(&mut rng, &[2, c, h, w]);
        let cols = conv::im2col(&x, g).unwrap();
        let r = randn(&mut rng, cols.dims());
        let back = conv::col2im(&r, g).unwrap();
        let lhs = cols
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rhs = x
            .mul(&back)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
            "{c} {h}×{w} k={k} s={s} p={p} d={d}: {lhs} vs {rhs}"
        );
    }
}

/// Central differences in f64 arithmetic on the f32 op: tolerances allow for f32
/// rounding.
#[test]
fn conv2d_gradients_match_finite_differences() {
    let mut rng = Rng::new(17, 1);
    let xs = [1usize, 2, 5, 4];
    let ws = [3usize, 2, 3, 3];
    let x0 = flat(&randn(&mut rng, &xs));
    let w0 = flat(&randn(&mut rng, &ws));
    let r = randn(&mut rng, &[1, 3, 3, 2]);
    let loss = |x: &[f32], w: &[f32]| -> f64 {
        let x = Tensor::from_vec(x.to_vec(), &xs, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(w.to_vec(), &ws, &Device::Cpu).unwrap();
        let y = conv::conv2d(&x, &w, 1, 2, 1).unwrap();
        f64::from(
            y.mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), &xs, &Device::Cpu).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w0.clone(), &ws, &Device::Cpu).unwrap()).unwrap();
    let y = conv::conv2d(xv.as_tensor(), wv.as_tensor(), 1, 2, 1).unwrap();
    assert_eq!(y.dims(), &[1, 3, 3, 2]);
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(xv.as_tensor()).unwrap());
    let gw = flat(g.get(wv.as_tensor()).unwrap());
    let h = 1e-2f32;
    for i in 0..x0.len() {
        let (mut a, mut b) = (x0.clone(), x0.clone());
        a[i] += h;
        b[i] -= h;
        let fd = (loss(&a, &w0) - loss(&b, &w0)) / (2.0 * f64::from(h));
        assert!(
            (fd - f64::from(gx[i])).abs() < 2e-3,
            "dL/dx[{i}]: fd {fd} vs {}",
            gx[i]
        );
    }
    for i in 0..w0.len() {
        let (mut a, mut b) = (w0.clone(), w0.clone());
        a[i] += h;
        b[i] -= h;
        let fd = (loss(&x0, &a) - loss(&x0, &b)) / (2.0 * f64::from(h));
        assert!(
            (fd - f64::from(gw[i])).abs() < 2e-3,
            "dL/dw[{i}]: fd {fd} vs {}",
            gw[i]
        );
    }
}

/// The direct path (a 32 × 34 plane: fused-multiply-add kernels for the forward pass and
/// the input gradient, the direct weight gradient) against central differences. The
/// convolution is linear in `x` and in `w`, so a large step is exact up to f32 rounding
/// of the loss; every weight and a spread of inputs (corners, borders, interior) are
/// checked.
#[test]
fn direct_conv2d_gradients_match_finite_differences() {
    let mut rng = Rng::new(37, 1);
    let xs = [2usize, 2, 32, 34];
    let ws = [3usize, 2, 3, 3];
    let x0 = flat(&randn(&mut rng, &xs));
    let w0 = flat(&randn(&mut rng, &ws));
    let r = randn(&mut rng, &[2, 3, 32, 34]);
    let loss = |x: &[f32], w: &[f32]| -> f64 {
        let x = Tensor::from_vec(x.to_vec(), &xs, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(w.to_vec(), &ws, &Device::Cpu).unwrap();
        let y = conv::conv2d(&x, &w, 1, 1, 1).unwrap();
        let p: Vec<f32> = flat(&y.mul(&r).unwrap());
        p.iter().map(|&v| f64::from(v)).sum()
    };
    let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), &xs, &Device::Cpu).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w0.clone(), &ws, &Device::Cpu).unwrap()).unwrap();
    let y = conv::conv2d(xv.as_tensor(), wv.as_tensor(), 1, 1, 1).unwrap();
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(xv.as_tensor()).unwrap());
    let gw = flat(g.get(wv.as_tensor()).unwrap());
    let h = 0.5f32;
    let fd = |x: &[f32], w: &[f32], xi: Option<usize>, wi: Option<usize>| {
        let (mut xa, mut xb, mut wa, mut wb) = (x.to_vec(), x.to_vec(), w.to_vec(), w.to_vec());
        if let Some(i) = xi {
            xa[i] += h;
            xb[i] -= h;
        }
        if let Some(i) = wi {
            wa[i] += h;
            wb[i] -= h;
        }
        (loss(&xa, &wa) - loss(&xb, &wb)) / (2.0 * f64::from(h))
    };
    for (i, &g) in gw.iter().enumerate() {
        let d = fd(&x0, &w0, None, Some(i));
        assert!(
            (d - f64::from(g)).abs() < 2e-4 * d.abs().max(1.0),
            "dL/dw[{i}]: fd {d} vs {g}"
        );
    }
    let plane = 32 * 34;
    let picks = [
        0,
        33,
        34 * 31,
        plane - 1,
        5 * 34 + 17,
        plane + 34,
        2 * plane + 16 * 34 + 33,
        3 * plane + 31 * 34 + 1,
    ];
    for &i in &picks {
        let d = fd(&x0, &w0, Some(i), None);
        assert!(
            (d - f64::from(gx[i])).abs() < 2e-4 * d.abs().max(1.0),
            "dL/dx[{i}]: fd {d} vs {}",
            gx[i]
        );
    }
}

#[test]
fn conv_transpose2d_gradients_match_finite_differences() {
    let mut rng = Rng::new(19, 1);
    let xs = [1usize, 2, 3, 3];
    let ws = [2usize, 2, 4, 4];
    let x0 = flat(&randn(&mut rng, &xs));
    let w0 = flat(&randn(&mut rng, &ws));
    // (3 − 1)·2 + 4 − 2 = 6.
    let r = randn(&mut rng, &[1, 2, 6, 6]);
    let loss = |x: &[f32], w: &[f32]| -> f64 {
        let x = Tensor::from_vec(x.to_vec(), &xs, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(w.to_vec(), &ws, &Device::Cpu).unwrap();
        let y = conv::conv_transpose2d(&x, &w, 1, 2, 1).unwrap();
        f64::from(
            y.mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), &xs, &Device::Cpu).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w0.clone(), &ws, &Device::Cpu).unwrap()).unwrap();
    let y = conv::conv_transpose2d(xv.as_tensor(), wv.as_tensor(), 1, 2, 1).unwrap();
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(xv.as_tensor()).unwrap());
    let gw = flat(g.get(wv.as_tensor()).unwrap());
    let h = 1e-2f32;
    for i in 0..x0.len() {
        let (mut a, mut b) = (x0.clone(), x0.clone());
        a[i] += h;
        b[i] -= h;
        let fd = (loss(&a, &w0) - loss(&b, &w0)) / (2.0 * f64::from(h));
        assert!(
            (fd - f64::from(gx[i])).abs() < 2e-3,
            "dL/dx[{i}]: fd {fd} vs {}",
            gx[i]
        );
    }
    for i in 0..w0.len() {
        let (mut a, mut b) = (w0.clone(), w0.clone());
        a[i] += h;
        b[i] -= h;
        let fd = (loss(&x0, &a) - loss(&x0, &b)) / (2.0 * f64::from(h));
        assert!(
            (fd - f64::from(gw[i])).abs() < 2e-3,
            "dL/dw[{i}]: fd {fd} vs {}",
            gw[i]
        );
    }
}

/// A convolution's shape: `(n, cin, cout, h, w, k, stride, padding)`.
type ConvShape = (usize, usize, usize, usize, usize, usize, usize, usize);

/// [`conv::conv2d_banded`] (plus a bias) against candle's `conv2d`, outputs and every
/// gradient.
fn banded_matches_candle(seed: u64, what: &str, shapes: &[ConvShape]) {
    let mut rng = Rng::new(seed, 1);
    let bias = |y: Tensor, b: &Tensor| {
        y.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
            .unwrap()
    };
    for &(n, cin, cout, h, w, k, s, p) in shapes {
        let x = randn(&mut rng, &[n, cin, h, w]);
        let wt = randn(&mut rng, &[cout, cin, k, k]);
        let b = randn(&mut rng, &[cout]);
        compare(
            &format!("{what} n={n} {cin}→{cout} {h}×{w} k={k} s={s} p={p}"),
            &x,
            &wt,
            &b,
            &mut rng,
            &|x, w, b| bias(conv::conv2d_banded(x, w, p, s, 1).unwrap(), b),
            &|x, w, b| bias(x.conv2d(w, p, s, 1, 1).unwrap(), b),
        );
    }
}

/// Shapes large enough that the fused op splits each image into several bands of output
/// rows (a band holds about 2^20 column-matrix elements).
#[test]
fn banded_conv2d_matches_candle_across_band_boundaries() {
    banded_matches_candle(
        23,
        "banded",
        &[(2, 16, 3, 150, 64, 3, 1, 1), (1, 32, 2, 301, 65, 3, 2, 1)],
    );
}

/// Stride-1 convolutions on planes of at least 32 × 32 output pixels take the direct
/// path (fused-multiply-add kernels for the forward pass, the input gradient and the
/// weight gradient; a 1 × 1 kernel has no direct weight-gradient instance and uses
/// column matrices for it): square kernels of 1, 3 and 5 with "same" and "valid"
/// padding, widths on and off the kernels' 16-pixel tiles, against candle.
#[test]
fn direct_conv2d_matches_candle() {
    banded_matches_candle(
        29,
        "direct",
        &[
            (2, 3, 5, 64, 70, 3, 1, 1),
            (1, 4, 2, 65, 64, 1, 1, 0),
            (1, 2, 3, 70, 66, 3, 1, 0),
            (2, 2, 6, 68, 64, 5, 1, 2),
            (2, 5, 7, 33, 40, 3, 1, 1),
            (1, 3, 4, 36, 36, 5, 1, 2),
            (3, 2, 13, 32, 34, 3, 1, 0),
        ],
    );
}

/// Planes below 32 × 32 output pixels use column matrices for everything, against
/// candle (the 8 × 8 and 16 × 16 levels of a U-Net).
#[test]
fn small_plane_conv2d_matches_candle() {
    banded_matches_candle(
        31,
        "small plane",
        &[
            (2, 8, 6, 16, 16, 3, 1, 1),
            (3, 5, 4, 8, 8, 3, 1, 1),
            (1, 3, 2, 20, 12, 5, 1, 2),
        ],
    );
}
