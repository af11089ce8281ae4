//! The fast kernels against the reference kernels on random shapes, and the reference
//! kernels against hand-computed values.

use ccnet_device::kernels::*;
use proptest::prelude::*;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Deterministic pseudo-random values from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
    fn i8(&mut self) -> i8 {
        self.next() as i8
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    cin: usize,
    cout: usize,
    ih: usize,
    iw: usize,
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    bias: bool,
    relu: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..5,
        1usize..10,
        1usize..12,
        1usize..80,
        1usize..5,
        1usize..4,
        0usize..4,
        1usize..3,
        any::<bool>(),
        any::<bool>(),
        1u64..u64::MAX,
    )
        .prop_map(
            |(cin, cout, ih, iw, k, stride, pad, dil, bias, relu, seed)| Case {
                cin,
                cout,
                ih,
                iw,
                k,
                stride,
                pad,
                dil,
                bias,
                relu,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn conv_f32_fast_equals_reference(c in case(), f16 in any::<bool>()) {
        let Some(g) = ConvGeom::conv(c.cin, c.cout, c.ih, c.iw, c.k, c.stride, c.pad, c.dil) else {
            return Ok(());
        };
        let mut r = Rng(c.seed);
        let x: Vec<f32> = (0..c.cin * c.ih * c.iw).map(|_| r.f32()).collect();
        let wv: Vec<f32> = (0..c.cin * c.cout * c.k * c.k).map(|_| r.f32()).collect();
        let bv: Vec<f32> = (0..c.cout).map(|_| r.f32()).collect();
        let wb = if f16 {
            wv.iter().flat_map(|v| f32_to_f16_bits(*v).to_le_bytes()).collect()
        } else {
            f32_bytes(&wv)
        };
        let w = if f16 { Params::F16(&wb) } else { Params::F32(&wb) };
        let bb = f32_bytes(&bv);
        let b = c.bias.then_some(Params::F32(&bb));
        let mut y0 = vec![f32::NAN; g.cout * g.oh * g.ow];
        let mut y1 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv2d_f32_ref(&g, &x, w, b, c.relu, &mut y0).unwrap();
        conv2d_f32_fast(&g, &x, w, b, c.relu, &mut y1).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y1));
        let mut y2 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv2d_f32_rows(&g, &x, w, b, c.relu, &mut y2).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y2));
        let mut y3 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv2d_f32_fast_portable(&g, &x, w, b, c.relu, &mut y3).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y3));
        let mut y4 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv2d_f32_blocked(&g, &x, w, b, c.relu, &mut y4).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y4));
    }

    /// Many input channels: the panel kernel's input-channel chunks (partial sums
    /// stored and reloaded between chunks) and partial channel blocks.
    #[test]
    fn conv_f32_fast_equals_reference_deep(
        cin in 15usize..80,
        cout in 1usize..11,
        ih in 1usize..7,
        iw in 1usize..40,
        k in 1usize..6,
        pad in 0usize..3,
        dil in 1usize..3,
        relu in any::<bool>(),
        seed in 1u64..u64::MAX,
    ) {
        let Some(g) = ConvGeom::conv(cin, cout, ih, iw, k, 1, pad, dil) else {
            return Ok(());
        };
        let mut r = Rng(seed);
        let x: Vec<f32> = (0..cin * ih * iw).map(|_| r.f32()).collect();
        let wb = f32_bytes(&(0..cin * cout * k * k).map(|_| r.f32()).collect::<Vec<_>>());
        let bb = f32_bytes(&(0..cout).map(|_| r.f32()).collect::<Vec<_>>());
        let (w, b) = (Params::F32(&wb), Some(Params::F32(&bb)));
        let n = g.cout * g.oh * g.ow;
        let (mut y0, mut y1, mut y2) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        conv2d_f32_ref(&g, &x, w, b, relu, &mut y0).unwrap();
        conv2d_f32_fast(&g, &x, w, b, relu, &mut y1).unwrap();
        conv2d_f32_fast_portable(&g, &x, w, b, relu, &mut y2).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y1));
        prop_assert_eq!(bits(&y0), bits(&y2));
    }

    #[test]
    fn conv_transpose_f32_fast_equals_reference(c in case()) {
        let Some(g) = ConvGeom::transposed(c.cin, c.cout, c.ih, c.iw, c.k, c.stride, c.pad) else {
            return Ok(());
        };
        let mut r = Rng(c.seed);
        let x: Vec<f32> = (0..c.cin * c.ih * c.iw).map(|_| r.f32()).collect();
        let wb = f32_bytes(&(0..c.cin * c.cout * c.k * c.k).map(|_| r.f32()).collect::<Vec<_>>());
        let bb = f32_bytes(&(0..c.cout).map(|_| r.f32()).collect::<Vec<_>>());
        let b = c.bias.then_some(Params::F32(&bb));
        let mut y0 = vec![f32::NAN; g.cout * g.oh * g.ow];
        let mut y1 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv_transpose2d_f32_ref(&g, &x, Params::F32(&wb), b, c.relu, &mut y0).unwrap();
        conv_transpose2d_f32_fast(&g, &x, Params::F32(&wb), b, c.relu, &mut y1).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y1));
        let mut y2 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv_transpose2d_f32_fast_portable(&g, &x, Params::F32(&wb), b, c.relu, &mut y2).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y2));
        let mut y3 = vec![f32::NAN; g.cout * g.oh * g.ow];
        conv_transpose2d_f32_rows(&g, &x, Params::F32(&wb), b, c.relu, &mut y3).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y3));
    }

    /// Up-convolutions (kernel = stride, no padding) with many input channels: the
    /// panel kernel's phases, channel chunks and partial tiles.
    #[test]
    fn conv_transpose_f32_upconv_equals_reference(
        cin in 1usize..200,
        cout in 1usize..11,
        ih in 1usize..6,
        iw in 1usize..40,
        s in 1usize..4,
        bias in any::<bool>(),
        relu in any::<bool>(),
        f16 in any::<bool>(),
        seed in 1u64..u64::MAX,
    ) {
        let g = ConvGeom::transposed(cin, cout, ih, iw, s, s, 0).unwrap();
        let mut r = Rng(seed);
        let x: Vec<f32> = (0..cin * ih * iw).map(|_| r.f32()).collect();
        let wv: Vec<f32> = (0..cin * cout * s * s).map(|_| r.f32()).collect();
        let wb: Vec<u8> = if f16 {
            wv.iter().flat_map(|v| f32_to_f16_bits(*v).to_le_bytes()).collect()
        } else {
            f32_bytes(&wv)
        };
        let w = if f16 { Params::F16(&wb) } else { Params::F32(&wb) };
        let bb = f32_bytes(&(0..cout).map(|_| r.f32()).collect::<Vec<_>>());
        let b = bias.then_some(Params::F32(&bb));
        let n = g.cout * g.oh * g.ow;
        let (mut y0, mut y1, mut y2) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        conv_transpose2d_f32_ref(&g, &x, w, b, relu, &mut y0).unwrap();
        conv_transpose2d_f32_fast(&g, &x, w, b, relu, &mut y1).unwrap();
        conv_transpose2d_f32_fast_portable(&g, &x, w, b, relu, &mut y2).unwrap();
        prop_assert_eq!(bits(&y0), bits(&y1));
        prop_assert_eq!(bits(&y0), bits(&y2));
    }

    #[test]
    fn conv_i8_fast_equals_reference(c in case(), zin in -128i32..128, zout in -128i32..128) {
        let Some(g) = ConvGeom::conv(c.cin, c.cout, c.ih, c.iw, c.k, c.stride, c.pad, c.dil) else {
            return Ok(());
        };
        let mut r = Rng(c.seed);
        let x: Vec<i8> = (0..c.cin * c.ih * c.iw).map(|_| r.i8()).collect();
        let w: Vec<i8> = (0..c.cin * c.cout * c.k * c.k).map(|_| r.i8()).collect();
        let bb = i32_bytes(&(0..c.cout).map(|_| (r.next() % 20001) as i32 - 10000).collect::<Vec<_>>());
        let sb = f32_bytes(&(0..c.cout).map(|_| 0.001 + (r.next() % 100) as f32 * 1e-4).collect::<Vec<_>>());
        let os = OutputScale {
            weight_scales: &sb,
            input: QParams { scale: 0.05, zero_point: zin },
            output: QParams { scale: 0.1, zero_point: zout },
            relu: c.relu,
        };
        let b = c.bias.then_some(&bb[..]);
        let mut y0 = vec![0i8; g.cout * g.oh * g.ow];
        let mut y1 = vec![1i8; g.cout * g.oh * g.ow];
        conv2d_i8_ref(&g, &x, &w, b, &os, &mut y0).unwrap();
        conv2d_i8_fast(&g, &x, &w, b, &os, &mut y1).unwrap();
        prop_assert_eq!(y0, y1);
    }

    #[test]
    fn conv_transpose_i8_fast_equals_reference(c in case(), zin in -128i32..128, zout in -128i32..128) {
        let Some(g) = ConvGeom::transposed(c.cin, c.cout, c.ih, c.iw, c.k, c.stride, c.pad) else {
            return Ok(());
        };
        let mut r = Rng(c.seed);
        let x: Vec<i8> = (0..c.cin * c.ih * c.iw).map(|_| r.i8()).collect();
        let w: Vec<i8> = (0..c.cin * c.cout * c.k * c.k).map(|_| r.i8()).collect();
        let bb = i32_bytes(&(0..c.cout).map(|_| (r.next() % 20001) as i32 - 10000).collect::<Vec<_>>());
        let sb = f32_bytes(&(0..c.cout).map(|_| 0.001 + (r.next() % 100) as f32 * 1e-4).collect::<Vec<_>>());
        let os = OutputScale {
            weight_scales: &sb,
            input: QParams { scale: 0.05, zero_point: zin },
            output: QParams { scale: 0.1, zero_point: zout },
            relu: c.relu,
        };
        let b = c.bias.then_some(&bb[..]);
        let mut y0 = vec![0i8; g.cout * g.oh * g.ow];
        let mut y1 = vec![1i8; g.cout * g.oh * g.ow];
        conv_transpose2d_i8_ref(&g, &x, &w, b, &os, &mut y0).unwrap();
        conv_transpose2d_i8_fast(&g, &x, &w, b, &os, &mut y1).unwrap();
        prop_assert_eq!(y0, y1);
    }

    #[test]
    fn round_to_i32_rounds_half_away_from_zero(v in -1.0e6f32..1.0e6) {
        let got = round_to_i32(v);
        let exact = f64::from(v);
        let want = if exact >= 0.0 { (exact + 0.5).floor() } else { (exact - 0.5).ceil() };
        prop_assert_eq!(f64::from(got), want);
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// f32 → f16 bits (round to nearest even) for test data; values here are normal f16.
fn f32_to_f16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if v == 0.0 || exp <= 0 {
        return sign;
    }
    let man = b & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

#[test]
fn reference_conv_matches_hand_computation() {
    // 1 → 1 channel, 3×3 input, 2×2 kernel, stride 1, padding 1: a 4×4 output.
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let w = f32_bytes(&[1.0, 10.0, 100.0, 1000.0]);
    let b = f32_bytes(&[0.5]);
    let g = ConvGeom::conv(1, 1, 3, 3, 2, 1, 1, 1).unwrap();
    assert_eq!((g.oh, g.ow), (4, 4));
    let mut y = [0.0f32; 16];
    conv2d_f32_ref(
        &g,
        &x,
        Params::F32(&w),
        Some(Params::F32(&b)),
        false,
        &mut y,
    )
    .unwrap();
    // out(0,0) sees only x(0,0) under w(1,1) = 1000.
    assert_eq!(y[0], 1000.5);
    // out(1,1) = 1·x00 + 10·x01 + 100·x10 + 1000·x11.
    assert_eq!(y[5], 0.5 + 1.0 + 20.0 + 400.0 + 5000.0);
    // out(3,3) sees only x(2,2) under w(0,0) = 1.
    assert_eq!(y[15], 9.5);
    // Stride 2 without padding on a 3×3 input gives one output.
    let g = ConvGeom::conv(1, 1, 3, 3, 2, 2, 0, 1).unwrap();
    let mut y = [0.0f32; 1];
    conv2d_f32_ref(&g, &x, Params::F32(&w), None, false, &mut y).unwrap();
    assert_eq!(y[0], 1.0 + 20.0 + 400.0 + 5000.0);
}

#[test]
fn reference_transposed_conv_matches_hand_computation() {
    // 2×2 input, 2×2 kernel, stride 2: each input pixel paints a 2×2 block.
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let w = f32_bytes(&[1.0, 10.0, 100.0, 1000.0]);
    let g = ConvGeom::transposed(1, 1, 2, 2, 2, 2, 0).unwrap();
    assert_eq!((g.oh, g.ow), (4, 4));
    let mut y = [0.0f32; 16];
    conv_transpose2d_f32_ref(&g, &x, Params::F32(&w), None, false, &mut y).unwrap();
    assert_eq!(&y[0..4], &[1.0, 10.0, 2.0, 20.0]);
    assert_eq!(&y[4..8], &[100.0, 1000.0, 200.0, 2000.0]);
    assert_eq!(&y[12..16], &[300.0, 3000.0, 400.0, 4000.0]);
}

#[test]
fn int8_conv_follows_the_written_semantics() {
    // 1×1 conv, one channel: acc = bias + (x − zp_in)·w, then requantize and add zp_out.
    let g = ConvGeom::conv(1, 1, 1, 3, 1, 1, 0, 1).unwrap();
    let x = [10i8, -5, 127];
    let w = [3i8];
    let b = i32_bytes(&[7]);
    let sb = f32_bytes(&[0.5]);
    let os = OutputScale {
        weight_scales: &sb,
        input: QParams {
            scale: 0.25,
            zero_point: 2,
        },
        output: QParams {
            scale: 1.0,
            zero_point: -3,
        },
        relu: true,
    };
    let mut y = [0i8; 3];
    conv2d_i8_ref(&g, &x, &w, Some(&b), &os, &mut y).unwrap();
    // M = 0.125. x=10: acc = 7 + 8·3 = 31 → 3.875 → 4 → 1.
    // x=-5: acc = 7 − 21 = −14 → −1.75 → −2 → −5, ReLU clamps to zp_out −3.
    // x=127: acc = 7 + 125·3 = 382 → 47.75 → 48 → 45.
    assert_eq!(y, [1, -3, 45]);
}

#[test]
fn int8_add_and_rescale_follow_the_written_semantics() {
    let qa = QParams {
        scale: 0.5,
        zero_point: 0,
    };
    let qb = QParams {
        scale: 0.25,
        zero_point: 10,
    };
    let qy = QParams {
        scale: 1.0,
        zero_point: -1,
    };
    let mut y = [0i8; 3];
    add_i8(&[3, 100, -128], qa, &[11, 127, 10], qb, qy, &mut y).unwrap();
    // 1.5 + 0.25 = 1.75 → 2 → 1;  50 + 29.25 = 79.25 → 79 → 78;  −64 + 0 → −65.
    assert_eq!(y, [1, 78, -65]);
    let mut z = [0i8; 2];
    rescale_i8(&[5, -7], qa, qy, &mut z).unwrap();
    // 2.5 → 3 (half up) → 2;  −3.5 → −3 (half up) → −4.
    assert_eq!(z, [2, -4]);
}

#[test]
fn f16_conversion_is_exact() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x0001), 2.0f32.powi(-24));
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert!(f16_to_f32(0x7c00).is_infinite());
    assert!(f16_to_f32(0x7e00).is_nan());
    assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
}

#[test]
fn large_kernels_take_the_row_path_and_still_match() {
    // k = 23: too large for the register-blocked kernel's weight buffer.
    let g = ConvGeom::conv(2, 5, 30, 27, 23, 1, 11, 1).unwrap();
    let mut r = Rng(42);
    let x: Vec<f32> = (0..2 * 30 * 27).map(|_| r.f32()).collect();
    let w = f32_bytes(&(0..2 * 5 * 23 * 23).map(|_| r.f32()).collect::<Vec<_>>());
    let mut y0 = vec![0.0; 5 * g.oh * g.ow];
    let mut y1 = vec![1.0; 5 * g.oh * g.ow];
    conv2d_f32_ref(&g, &x, Params::F32(&w), None, true, &mut y0).unwrap();
    conv2d_f32_fast(&g, &x, Params::F32(&w), None, true, &mut y1).unwrap();
    assert_eq!(bits(&y0), bits(&y1));
}

#[test]
fn kernels_reject_mismatched_buffers() {
    let g = ConvGeom::conv(2, 2, 4, 4, 3, 1, 1, 1).unwrap();
    let w = f32_bytes(&[0.0; 36]);
    let mut y = vec![0.0; 32];
    assert_eq!(
        conv2d_f32_fast(&g, &[0.0; 31], Params::F32(&w), None, false, &mut y),
        Err(ShapeError)
    );
    assert_eq!(
        conv2d_f32_ref(&g, &[0.0; 32], Params::F32(&w[..140]), None, false, &mut y),
        Err(ShapeError)
    );
}

/// Planes too large for the AVX2 instance's padded buffer: the panel path with its
/// in-place interior tiles and padded border tiles, against the reference.
#[test]
fn large_planes_take_the_panel_path_and_still_match() {
    // (cin, cout, ih, iw, k, pad, dil)
    let shapes = [
        (3, 5, 131, 127, 3, 1, 1),
        (2, 4, 140, 120, 5, 2, 2),
        (25, 3, 129, 129, 3, 1, 1),
        (1, 1, 200, 90, 1, 0, 1),
        (4, 6, 130, 133, 3, 0, 1),
    ];
    for (i, &(cin, cout, ih, iw, k, pad, dil)) in shapes.iter().enumerate() {
        let g = ConvGeom::conv(cin, cout, ih, iw, k, 1, pad, dil).unwrap();
        let mut r = Rng(0x9e37_79b9 + i as u64);
        let x: Vec<f32> = (0..cin * ih * iw).map(|_| r.f32()).collect();
        let wb = f32_bytes(&(0..cin * cout * k * k).map(|_| r.f32()).collect::<Vec<_>>());
        let bb = f32_bytes(&(0..cout).map(|_| r.f32()).collect::<Vec<_>>());
        let (w, b) = (Params::F32(&wb), Some(Params::F32(&bb)));
        let n = g.cout * g.oh * g.ow;
        let (mut y0, mut y1, mut y2) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        conv2d_f32_ref(&g, &x, w, b, i % 2 == 0, &mut y0).unwrap();
        conv2d_f32_fast(&g, &x, w, b, i % 2 == 0, &mut y1).unwrap();
        conv2d_f32_fast_portable(&g, &x, w, b, i % 2 == 0, &mut y2).unwrap();
        assert_eq!(bits(&y0), bits(&y1), "shape {i}");
        assert_eq!(bits(&y0), bits(&y2), "shape {i}");
    }
}

proptest! {
    /// Max-pooling (the 2×2 fast path and the general loop) against a direct definition.
    #[test]
    fn max_pool_matches_definition(
        c in 1usize..4,
        ih in 1usize..20,
        iw in 1usize..40,
        k in 1usize..4,
        s in 1usize..4,
        seed in 1u64..u64::MAX,
    ) {
        prop_assume!(k <= ih && k <= iw);
        let (oh, ow) = ((ih - k) / s + 1, (iw - k) / s + 1);
        let mut r = Rng(seed);
        let x: Vec<f32> = (0..c * ih * iw).map(|_| r.f32()).collect();
        let xi: Vec<i8> = (0..c * ih * iw).map(|_| r.i8()).collect();
        let mut y = vec![f32::NAN; c * oh * ow];
        let mut yi = vec![0i8; c * oh * ow];
        max_pool(c, ih, iw, k, s, &x, oh, ow, &mut y).unwrap();
        max_pool(c, ih, iw, k, s, &xi, oh, ow, &mut yi).unwrap();
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    let mut mi = i8::MIN;
                    for ky in 0..k {
                        for kx in 0..k {
                            let idx = (ch * ih + oy * s + ky) * iw + ox * s + kx;
                            m = m.max(x[idx]);
                            mi = mi.max(xi[idx]);
                        }
                    }
                    prop_assert_eq!(y[(ch * oh + oy) * ow + ox].to_bits(), m.to_bits());
                    prop_assert_eq!(yi[(ch * oh + oy) * ow + ox], mi);
                }
            }
        }
    }
}
