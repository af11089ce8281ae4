//! int8 packing: the host reference interpreter and the device engine agree bit for bit
//! on int8 models; float models agree within a tolerance; quantization stays close to the
//! float network.

use ccnet_device::{Input, InputData, Model};
use ccnet_host::pack::reference::{run_float, run_int8};
use ccnet_host::pack::{pack, pack_calibrated, FloatModel, PackError, PackInfo, Quant};
use ccnet_models::Arch;
use ccnet_shared::format::{Container, InputGeometry, Metadata};
use ccnet_shared::graph::NodeId;
use ccnet_tests::{aligned, random_float_model, Rng};

fn model(arch: Arch, den: u32, channels: u32, seed: u64) -> FloatModel {
    random_float_model(arch, den, channels, seed)
}

fn info(channels: u32, side: u32) -> PackInfo<'static> {
    PackInfo {
        input: InputGeometry {
            channels,
            height: side,
            width: side,
            scale: 2.0,
            offset: -1.0,
            standardize: false,
        },
        metadata: Metadata {
            arch: "test",
            dataset: "generated",
            alpha_num: 1,
            alpha_den: 8,
            ..Metadata::default()
        },
    }
}

/// A smooth random image in [-1, 1] (blobs, so a network has structure to respond to).
fn image(channels: u32, h: u32, w: u32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let centres: Vec<(f32, f32, f32)> = (0..6)
        .map(|_| {
            (
                rng.unit().abs() * h as f32,
                rng.unit().abs() * w as f32,
                rng.unit(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for c in 0..channels {
        for y in 0..h {
            for x in 0..w {
                let v: f32 = centres
                    .iter()
                    .map(|&(cy, cx, a)| {
                        let d2 = (y as f32 - cy).powi(2) + (x as f32 - cx).powi(2);
                        a * (-d2 / (40.0 + 10.0 * c as f32)).exp()
                    })
                    .sum();
                out.push((v + 0.05 * rng.unit()).clamp(-1.0, 1.0));
            }
        }
    }
    out
}

fn device_mask(bytes: &[u8], x: &[f32], h: u32, w: u32) -> Vec<u8> {
    device_run(bytes, InputData::F32(x), h, w)
}

/// The device engine's mask for `data` (an aligned copy of the model, a planned arena).
fn device_run(bytes: &[u8], data: InputData<'_>, h: u32, w: u32) -> Vec<u8> {
    let buf = aligned(bytes);
    let m = Model::parse(buf.as_slice()).unwrap();
    let mut arena = vec![0u8; m.arena_bytes(h, w).unwrap()];
    let mut mask = vec![0u8; (h * w) as usize];
    m.run(
        Input {
            data,
            height: h,
            width: w,
        },
        &mut arena,
        &mut mask,
    )
    .unwrap();
    mask
}

#[test]
fn host_reference_and_device_agree_bit_for_bit_on_int8() {
    for (arch, den, channels, side) in [
        (Arch::Unet, 16, 1, 32),
        (Arch::Unet, 32, 3, 48),
        (Arch::Fcn, 32, 1, 64),
        (Arch::Cumed, 16, 3, 40),
    ] {
        let m = model(arch, den, channels, 11);
        let calib: Vec<_> = (0..3)
            .map(|s| (image(channels, side, side, s), side, side))
            .collect();
        let bytes = pack_calibrated(&m, Quant::Int8, None, &info(channels, side), &calib).unwrap();
        let c = Container::parse(&bytes).unwrap();
        for seed in [100, 101] {
            let x = image(channels, side, side, seed);
            let host = run_int8(&c, &x, side, side).unwrap();
            let host_mask: Vec<u8> = host
                .values
                .last()
                .unwrap()
                .iter()
                .map(|&v| v as u8)
                .collect();
            let dev = device_mask(&bytes, &x, side, side);
            assert_eq!(
                host_mask, dev,
                "{arch} α=1/{den}: device and host int8 masks differ"
            );
            // The logits agree integer for integer (the device dequantizes them).
            let logits = (c.graph().len() - 2) as NodeId;
            let buf = aligned(&bytes);
            let dm = Model::parse(buf.as_slice()).unwrap();
            let mut arena = vec![0u8; dm.arena_bytes(side, side).unwrap()];
            let q = &host.values[logits as usize];
            let (s, z) = host.params[logits as usize];
            let mut real = vec![0f32; q.len()];
            dm.run_node(
                Input {
                    data: InputData::F32(&x),
                    height: side,
                    width: side,
                },
                &mut arena,
                logits,
                &mut real,
            )
            .unwrap();
            for (i, (&qv, &rv)) in q.iter().zip(&real).enumerate() {
                let host_real = s * f64::from(qv - z);
                assert!(
                    (host_real - f64::from(rv)).abs() < 0.25 * s,
                    "{arch}: logit {i}: host q={qv} ({host_real}), device {rv}"
                );
            }
            // The logits vary (the comparison means something).
            assert!(q.iter().any(|&v| v != q[0]), "{arch}: constant logits");
        }
    }
}

#[test]
fn float_reference_and_device_agree_and_int8_tracks_float() {
    let (channels, side) = (1, 64);
    let m = model(Arch::Unet, 16, channels, 5);
    let f32_bytes = pack(&m, Quant::F32, None, &info(channels, side)).unwrap();
    let c = Container::parse(&f32_bytes).unwrap();
    let calib: Vec<_> = (0..4)
        .map(|s| (image(channels, side, side, s), side, side))
        .collect();
    let int8_bytes = pack_calibrated(&m, Quant::Int8, None, &info(channels, side), &calib).unwrap();
    let ci = Container::parse(&int8_bytes).unwrap();
    let mut agree = 0usize;
    let mut total = 0usize;
    for seed in 200..203 {
        let x = image(channels, side, side, seed);
        let host = run_float(&c, &x, side, side).unwrap();
        let host_mask: Vec<u8> = host
            .values
            .last()
            .unwrap()
            .iter()
            .map(|&v| v as u8)
            .collect();
        let dev = device_mask(&f32_bytes, &x, side, side);
        let same = host_mask.iter().zip(&dev).filter(|(a, b)| a == b).count();
        // Float summation order is specified; near-ties may still flip a pixel or two.
        assert!(
            same as f64 >= 0.999 * dev.len() as f64,
            "f32 host/device agree on {same}/{}",
            dev.len()
        );
        let q = run_int8(&ci, &x, side, side).unwrap();
        agree += q
            .values
            .last()
            .unwrap()
            .iter()
            .zip(&host_mask)
            .filter(|(a, b)| **a == i32::from(**b))
            .count();
        total += dev.len();
    }
    let rate = agree as f64 / total as f64;
    assert!(
        rate > 0.9,
        "int8 mask agrees with f32 on only {:.1} % of pixels",
        100.0 * rate
    );
}

#[test]
fn standardized_pixel_input_matches_between_host_and_device() {
    let (channels, side) = (3, 32);
    let m = model(Arch::Cumed, 16, channels, 9);
    let mut inf = info(channels, side);
    inf.input.standardize = true;
    let mut rng = Rng::new(4);
    let pixels: Vec<u8> = (0..channels * side * side)
        .map(|i| ((i % 97) as f32 * 2.0 + 40.0 * rng.unit()).clamp(0.0, 255.0) as u8)
        .collect();
    for quant in [Quant::F32, Quant::Int8] {
        let bytes = pack_calibrated(
            &m,
            quant,
            None,
            &inf,
            &[(image(channels, side, side, 1), side, side)],
        )
        .unwrap();
        let c = Container::parse(&bytes).unwrap();
        let x = ccnet_host::pack::reference::normalise_pixels(&c, &pixels);
        // Standardized: each channel has mean ≈ 0 and deviation ≈ 1.
        let plane = (side * side) as usize;
        for ch in 0..channels as usize {
            let v = &x[ch * plane..(ch + 1) * plane];
            let mean = v.iter().sum::<f32>() / plane as f32;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / plane as f32;
            assert!(
                mean.abs() < 1e-3 && (var.sqrt() - 1.0).abs() < 1e-3,
                "{mean} {var}"
            );
        }
        let host: Vec<u8> = match quant {
            Quant::Int8 => run_int8(&c, &x, side, side)
                .unwrap()
                .values
                .last()
                .unwrap()
                .iter()
                .map(|&v| v as u8)
                .collect(),
            _ => run_float(&c, &x, side, side)
                .unwrap()
                .values
                .last()
                .unwrap()
                .iter()
                .map(|&v| v as u8)
                .collect(),
        };
        let mask = device_run(&bytes, InputData::Pixels(&pixels), side, side);
        assert_eq!(host, mask, "{quant:?}");
    }
}

#[test]
fn int8_needs_calibration_and_fits_budgets_exactly() {
    let m = model(Arch::Unet, 16, 1, 3);
    assert!(matches!(
        pack(&m, Quant::Int8, None, &info(1, 32)),
        Err(PackError::NeedsCalibration)
    ));
    let calib = vec![(image(1, 32, 32, 1), 32, 32)];
    let bytes = pack_calibrated(&m, Quant::Int8, None, &info(1, 32), &calib).unwrap();
    let exact = ccnet_host::pack::packed_len(&m.graph, Quant::Int8, &info(1, 32)).unwrap();
    // The estimate counts the activation table at its largest encoding.
    let acts = Container::parse(&bytes).unwrap().header().activations.len() as u64;
    assert!(
        exact >= bytes.len() as u64 && exact <= bytes.len() as u64 + 8 * acts,
        "estimate {exact}, real {}",
        bytes.len()
    );
    let n = bytes.len() as u64;
    assert!(pack_calibrated(&m, Quant::Int8, Some(n), &info(1, 32), &calib).is_ok());
    assert!(matches!(
        pack_calibrated(&m, Quant::Int8, Some(n - 1), &info(1, 32), &calib),
        Err(PackError::OverBudget { .. })
    ));
    // int8 is about a quarter of f32.
    let f32_len = pack(&m, Quant::F32, None, &info(1, 32)).unwrap().len();
    assert!((bytes.len() as f64) < 0.3 * f32_len as f64);
}
