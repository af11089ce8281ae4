//! Hostile model bytes through the device engine, the seeds of the fuzz corpus
//! (`device/fuzz/`), and regression cases found by fuzzing.

use ccnet_device::{Input, InputData, Kernels, Model};
use ccnet_host::container::{write, ModelSpec, TensorData};
use ccnet_shared::format::{ActivationQuant, DType, InputGeometry, Metadata, CRC32, CRC_LEN};
use ccnet_shared::graph::{Conv2d, Op, ParamRole};
use ccnet_tests::{aligned, container_bytes};

/// Input(1) → 3×3 conv (2 channels, bias, ReLU) → 2×2 max pool → ×2 upsample →
/// 1×1 conv (2 classes) → arg-max: every kind of step in a few hundred bytes.
fn tiny_graph() -> Vec<Op> {
    vec![
        Op::Input { channels: 1 },
        Op::Conv2d(Conv2d {
            input: 0,
            in_channels: 1,
            out_channels: 2,
            kernel: 3,
            stride: 1,
            padding: 1,
            dilation: 1,
            bias: true,
            relu: true,
        }),
        Op::MaxPool {
            input: 1,
            kernel: 2,
            stride: 2,
        },
        Op::Upsample {
            input: 2,
            factor: 2,
        },
        Op::Conv2d(Conv2d {
            input: 3,
            in_channels: 2,
            out_channels: 2,
            kernel: 1,
            stride: 1,
            padding: 0,
            dilation: 1,
            bias: true,
            relu: false,
        }),
        Op::Argmax { input: 4 },
    ]
}

/// The int8 version of [`tiny_graph`] (fused ReLU, per-channel weight scales, `i32`
/// biases, activation ranges on the input and both convolutions).
fn tiny_int8() -> Vec<u8> {
    let graph = tiny_graph();
    let acts = [
        ActivationQuant {
            node: 0,
            scale: 1.0 / 255.0,
            zero_point: -128,
        },
        ActivationQuant {
            node: 1,
            scale: 0.02,
            zero_point: -128,
        },
        ActivationQuant {
            node: 4,
            scale: 0.05,
            zero_point: 0,
        },
    ];
    let w1: Vec<u8> = (0..18).map(|i| ((i * 37 % 255) as i8) as u8).collect();
    let w2: Vec<u8> = [90i8, -60, -70, 80].iter().map(|&v| v as u8).collect();
    let bias = |v: &[i32]| v.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<u8>>();
    let tensors = vec![
        TensorData {
            node: 1,
            role: ParamRole::Weight,
            dtype: DType::I8,
            dims: [2, 1, 3, 3],
            bytes: w1,
        },
        TensorData::f32(1, ParamRole::WeightScale, [2, 1, 1, 1], &[0.01, 0.02]),
        TensorData {
            node: 1,
            role: ParamRole::Bias,
            dtype: DType::I32,
            dims: [2, 1, 1, 1],
            bytes: bias(&[100, -200]),
        },
        TensorData {
            node: 4,
            role: ParamRole::Weight,
            dtype: DType::I8,
            dims: [2, 2, 1, 1],
            bytes: w2,
        },
        TensorData::f32(4, ParamRole::WeightScale, [2, 1, 1, 1], &[0.01, 0.01]),
        TensorData {
            node: 4,
            role: ParamRole::Bias,
            dtype: DType::I32,
            dims: [2, 1, 1, 1],
            bytes: bias(&[5, -5]),
        },
    ];
    let spec = ModelSpec {
        graph: &graph,
        activations: &acts,
        input: InputGeometry {
            channels: 1,
            height: 16,
            width: 16,
            scale: 1.0,
            offset: 0.0,
            standardize: false,
        },
        metadata: Metadata {
            arch: "fuzz-seed",
            alpha_num: 1,
            alpha_den: 1,
            dataset: "generated",
            ..Metadata::default()
        },
    };
    write(&spec, &tensors).expect("int8 seed writes")
}

/// The seed models: f32, f16 and int8 versions of the tiny graph.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "tiny_f32.ccn",
            container_bytes(&tiny_graph(), DType::F32, 1),
        ),
        (
            "tiny_f16.ccn",
            container_bytes(&tiny_graph(), DType::F16, 2),
        ),
        ("tiny_int8.ccn", tiny_int8()),
    ]
}

/// Runs the `parse_run` fuzz target's logic on one input (same layout as
/// `device/fuzz/fuzz_targets/parse_run.rs`, without the CRC fix-up).
fn run_case(model: &[u8], h: u32, w: u32, tiled: bool, arena_len: usize, mask_len: usize) {
    let a = aligned(model);
    let Ok(mut m) = Model::parse(a.as_slice()) else {
        return;
    };
    for kernels in [Kernels::Fast, Kernels::Reference] {
        m.set_kernels(kernels);
        let px = vec![77u8; (h * w) as usize];
        let input = Input {
            data: InputData::Pixels(&px),
            height: h,
            width: w,
        };
        let mut arena = vec![0u8; arena_len];
        let mut mask = vec![0u8; mask_len];
        let _ = if tiled {
            m.run_tiled(input, &mut arena, &mut mask)
        } else {
            m.run(input, &mut arena, &mut mask)
        };
    }
}

#[test]
fn seed_models_parse_and_run() {
    for (name, bytes) in seeds() {
        let a = aligned(&bytes);
        let m = Model::parse(a.as_slice()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        for (h, w) in [(16, 16), (32, 48), (8, 8)] {
            let px: Vec<u8> = (0..h * w).map(|i| (i * 7 % 256) as u8).collect();
            let input = Input {
                data: InputData::Pixels(&px),
                height: h,
                width: w,
            };
            let mut arena = vec![0u8; m.arena_bytes(h, w).unwrap()];
            let mut mask = vec![9u8; (h * w) as usize];
            m.run(input, &mut arena, &mut mask)
                .unwrap_or_else(|e| panic!("{name} {h}x{w}: {e:?}"));
            assert!(mask.iter().all(|&c| c < 2), "{name}: class out of range");
            // An arena one byte short of the plan is an error, not an out-of-bounds write.
            let mut short = vec![0u8; m.arena_bytes(h, w).unwrap() - ccnet_device::ARENA_ALIGN];
            assert!(m.run(input, &mut short, &mut mask).is_err(), "{name}");
            let mut tiled_arena = vec![0u8; m.tiled_arena_bytes(h, w).unwrap()];
            let mut tiled_mask = vec![9u8; (h * w) as usize];
            m.run_tiled(input, &mut tiled_arena, &mut tiled_mask)
                .unwrap_or_else(|e| panic!("{name} tiled {h}x{w}: {e:?}"));
            assert_eq!(mask, tiled_mask, "{name} {h}x{w}");
        }
    }
}

/// Writes the fuzz seeds: `CCNET_FUZZ_SEEDS=device/fuzz/corpus cargo test -p ccnet-tests
/// --test bad_input -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes the fuzz corpus seeds; run on demand"]
fn write_fuzz_seeds() {
    let dir = std::path::PathBuf::from(
        std::env::var("CCNET_FUZZ_SEEDS").expect("set CCNET_FUZZ_SEEDS to the corpus folder"),
    );
    let parse = dir.join("parse");
    let run = dir.join("parse_run");
    std::fs::create_dir_all(&parse).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(parse.join(name), &bytes).unwrap();
        // parse_run: flags (CRC fix-up), 16×16, seed 1, planned arena, exact mask and
        // input, then the model; a tiled variant at 40×24 with f32 inputs.
        let mut whole = vec![0x01, 16, 16, 1, 0, 0, 0, 0];
        whole.extend_from_slice(&bytes);
        std::fs::write(run.join(name), &whole).unwrap();
        let mut tiled = vec![0x0B, 40, 24, 7, 0, 0, 0, 0];
        tiled.extend_from_slice(&bytes);
        std::fs::write(run.join(format!("tiled_{name}")), &tiled).unwrap();
    }
}

#[test]
fn every_truncation_and_byte_flip_of_the_seeds_is_an_error() {
    for (name, bytes) in seeds() {
        for n in 0..bytes.len() {
            let a = aligned(&bytes[..n]);
            assert!(Model::parse(a.as_slice()).is_err(), "{name} cut at {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x41;
            let a = aligned(&b);
            assert!(Model::parse(a.as_slice()).is_err(), "{name} byte {i}");
        }
    }
}

/// Every single-byte change of the seeds' header and graph with the CRC recomputed
/// (what the `parse_run` target explores): parse and run never panic, whatever the
/// arena and mask sizes.
#[test]
fn resealed_byte_changes_never_panic() {
    for (_, bytes) in seeds() {
        let end = bytes.len() - CRC_LEN;
        let data_offset = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        for i in 0..data_offset.min(end) {
            for v in [0x00, 0xFF, bytes[i].wrapping_add(1), bytes[i] ^ 0x80] {
                let mut b = bytes.clone();
                b[i] = v;
                let crc = CRC32.checksum(&b[..end]);
                b[end..].copy_from_slice(&crc.to_le_bytes());
                run_case(&b, 16, 16, false, 4096, 256);
                run_case(&b, 24, 40, true, 4096, 24 * 40);
                run_case(&b, 16, 16, false, 0, 255);
            }
        }
    }
}
