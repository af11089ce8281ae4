//! `cargo xtask qemu [--timeout SECS]`: builds the fixture (a U-Net at α = 1/16 with
//! deterministic weights, packed once with f16 weights and once as int8, plus a test
//! image and the mask checksums the host computes with `ccnet-device`), builds the
//! Cortex-M4F example firmware in `device/firmware` around it, runs it in
//! `qemu-system-arm -machine mps2-an386` with a timeout, and fails when the firmware
//! does. Also reports the firmware's flash footprint.

use std::path::Path;
use std::time::Duration;

use ccnet_device::{Input, InputData, Model};

use crate::firmware;
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::{
    align_up, validate_header, ActivationQuant, Container, DType, Header, InputGeometry, Metadata,
    Preamble, TensorInfo, CRC32,
};
use ccnet_shared::graph::{NodeId, Op, ParamRole};

/// Side of the square test image (and planned tile) of the fixture.
const SIDE: u32 = 64;
/// Seed of the fixture's weights and image.
const SEED: u64 = 0x5eed_cc4e;

/// Runs the task.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut timeout = 300u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                println!(
                    "usage: cargo xtask qemu [--timeout SECS]\n\n  builds the Cortex-M4F example firmware with a small packed model and runs it\n  in qemu-system-arm (mps2-an386); fails on a mask mismatch [default timeout 300 s]"
                );
                return Ok(());
            }
            "--timeout" => {
                timeout = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--timeout needs a number of seconds")?;
            }
            other => {
                return Err(format!(
                    "unknown argument `{other}` (usage: qemu [--timeout SECS])"
                ))
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?
        .to_path_buf();
    let fixture = root.join("target").join("qemu-fixture");
    write_fixture(&fixture)?;
    let elf = firmware::build(&root, &fixture)?;
    println!(
        "firmware footprint (release, opt-level \"z\", LTO): {} (the models and image are in .rodata)",
        firmware::describe(&firmware::footprint(&elf)?)
    );
    firmware::run_qemu(&elf, Duration::from_secs(timeout)).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// xorshift64: deterministic values without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// One stored tensor.
struct Tensor {
    node: NodeId,
    role: ParamRole,
    dtype: DType,
    dims: [u32; 4],
    bytes: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 → IEEE binary16 bits, round to nearest even (subnormals flush to zero).
fn f16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    if exp >= 31 {
        return sign | 0x7c00;
    }
    let man = b & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// He-uniform weights and small biases for every parameter tensor, in graph order.
fn float_params(nodes: &[Op], seed: u64) -> Vec<(NodeId, ParamRole, [u32; 4], Vec<f32>)> {
    let mut r = Rng(seed);
    let mut out = Vec::new();
    for (i, op) in nodes.iter().enumerate() {
        let fan_in = match op {
            Op::Conv2d(c) => c.in_channels * u32::from(c.kernel).pow(2),
            Op::ConvTranspose2d(c) => {
                c.in_channels * u32::from(c.kernel).pow(2) / u32::from(c.stride).pow(2)
            }
            _ => 1,
        }
        .max(1);
        for &(role, dims) in op.param_tensors().as_slice() {
            let n: u32 = dims.iter().product();
            let bound = if role == ParamRole::Weight {
                (6.0 / fan_in as f32).sqrt()
            } else {
                0.1
            };
            out.push((
                i as NodeId,
                role,
                dims,
                (0..n).map(|_| r.unit() * bound).collect(),
            ));
        }
    }
    out
}

/// Writes a container (the layout of `shared/FORMAT.md`) and validates it with the reader.
fn write_container(
    graph: &[Op],
    tensors: &[Tensor],
    activations: &[ActivationQuant],
    input: InputGeometry,
) -> Result<Vec<u8>, String> {
    let mut header = Header {
        graph: heapless::Vec::new(),
        tensors: heapless::Vec::new(),
        activations: heapless::Vec::new(),
        input,
        metadata: Metadata {
            arch: "unet",
            alpha_num: 1,
            alpha_den: 16,
            dataset: "synthetic (qemu fixture)",
            ..Metadata::default()
        },
    };
    header
        .graph
        .extend_from_slice(graph)
        .map_err(|_| "too many nodes")?;
    header
        .activations
        .extend_from_slice(activations)
        .map_err(|_| "too many activation entries")?;
    let mut data = Vec::new();
    for t in tensors {
        data.resize(align_up(data.len()), 0);
        header
            .tensors
            .push(TensorInfo {
                node: t.node,
                role: t.role,
                dtype: t.dtype,
                dims: t.dims,
                offset: data.len() as u32,
                len: t.bytes.len() as u32,
            })
            .map_err(|_| "too many tensors")?;
        data.extend_from_slice(&t.bytes);
    }
    validate_header(&header, data.len()).map_err(|e| format!("invalid fixture: {e}"))?;
    let hb = postcard::to_allocvec(&header).map_err(|e| e.to_string())?;
    let pre = Preamble::for_lengths(hb.len(), data.len()).ok_or("fixture too large")?;
    let mut out = pre.encode().to_vec();
    out.extend_from_slice(&hb);
    out.resize(pre.data_offset as usize, 0);
    out.extend_from_slice(&data);
    let crc = CRC32.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Container::parse(&out).map_err(|e| format!("fixture does not parse: {e}"))?;
    Ok(out)
}

/// A deterministic gray test image with bright discs on a textured background.
fn test_image(side: u32, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let discs: Vec<(f32, f32, f32)> = (0..8)
        .map(|_| {
            let c = |r: &mut Rng| (r.unit() * 0.5 + 0.5) * side as f32;
            (c(&mut r), c(&mut r), 3.0 + (r.unit() * 0.5 + 0.5) * 6.0)
        })
        .collect();
    let mut img = Vec::with_capacity((side * side) as usize);
    for y in 0..side {
        for x in 0..side {
            let inside = discs.iter().any(|&(cy, cx, rad)| {
                (y as f32 - cy).powi(2) + (x as f32 - cx).powi(2) < rad * rad
            });
            let noise = (r.next() % 24) as u8;
            img.push(if inside {
                170 + noise
            } else {
                ((x * 3 + y * 2) % 90) as u8 + noise
            });
        }
    }
    img
}

/// Quantizes the float weights to int8 (symmetric, per output channel), calibrating
/// every activation's range on `image` with the float model.
fn int8_model(
    nodes: &[Op],
    params: &[(NodeId, ParamRole, [u32; 4], Vec<f32>)],
    float_bytes: &[u8],
    image: &[u8],
    input: InputGeometry,
) -> Result<Vec<u8>, String> {
    let fm = Model::parse(float_bytes).map_err(|e| e.to_string())?;
    let mut arena = vec![0u8; fm.arena_bytes(SIDE, SIDE).map_err(|e| e.to_string())?];
    let plan = fm.plan(SIDE, SIDE).map_err(|e| e.to_string())?;
    let mut acts = Vec::new();
    for (i, op) in nodes.iter().enumerate() {
        if !matches!(
            op,
            Op::Input { .. }
                | Op::Conv2d(_)
                | Op::ConvTranspose2d(_)
                | Op::Concat { .. }
                | Op::Add { .. }
        ) {
            continue;
        }
        let shape = plan.shape(i as NodeId).ok_or("no shape")?;
        let mut v = vec![0f32; shape.elements() as usize];
        let inp = Input {
            data: InputData::Pixels(image),
            height: SIDE,
            width: SIDE,
        };
        fm.run_node(inp, &mut arena, i as NodeId, &mut v)
            .map_err(|e| e.to_string())?;
        let lo = v.iter().copied().fold(0f32, f32::min);
        let hi = v.iter().copied().fold(0f32, f32::max);
        let scale = ((hi - lo) / 255.0).max(1e-6);
        let zero_point = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i32;
        acts.push(ActivationQuant {
            node: i as NodeId,
            scale,
            zero_point,
        });
    }
    let mut in_scale = vec![0f32; nodes.len()];
    for (i, op) in nodes.iter().enumerate() {
        in_scale[i] = match acts.iter().find(|a| usize::from(a.node) == i) {
            Some(a) => a.scale,
            None => in_scale[op.inputs().as_slice()[0] as usize],
        };
    }
    let mut tensors = Vec::new();
    for (node, role, dims, v) in params {
        let op = nodes[*node as usize];
        let (cout, out_first) = match op {
            Op::Conv2d(c) => (c.out_channels as usize, true),
            Op::ConvTranspose2d(c) => (c.out_channels as usize, false),
            _ => return Err("parameters on a node without weights".into()),
        };
        let w = &params
            .iter()
            .find(|p| p.0 == *node && p.1 == ParamRole::Weight)
            .ok_or("missing weight")?
            .3;
        let k2 = (dims[2] * dims[3]) as usize;
        let per_out = w.len() / cout;
        let oc_of = |i: usize| {
            if out_first {
                i / per_out
            } else {
                (i / k2) % cout
            }
        };
        let mut sw = vec![0f32; cout];
        for (i, x) in w.iter().enumerate() {
            sw[oc_of(i)] = sw[oc_of(i)].max(x.abs() / 127.0);
        }
        for s in &mut sw {
            if *s == 0.0 {
                *s = 1.0;
            }
        }
        let s_in = in_scale[op.inputs().as_slice()[0] as usize];
        match role {
            ParamRole::Weight => {
                tensors.push(Tensor {
                    node: *node,
                    role: *role,
                    dtype: DType::I8,
                    dims: *dims,
                    bytes: v
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (x / sw[oc_of(i)]).round().clamp(-127.0, 127.0) as i8 as u8)
                        .collect(),
                });
                tensors.push(Tensor {
                    node: *node,
                    role: ParamRole::WeightScale,
                    dtype: DType::F32,
                    dims: [cout as u32, 1, 1, 1],
                    bytes: f32_bytes(&sw),
                });
            }
            _ => tensors.push(Tensor {
                node: *node,
                role: *role,
                dtype: DType::I32,
                dims: *dims,
                bytes: v
                    .iter()
                    .enumerate()
                    .flat_map(|(oc, b)| ((b / (s_in * sw[oc])).round() as i32).to_le_bytes())
                    .collect(),
            }),
        }
    }
    write_container(nodes, &tensors, &acts, input)
}

/// Writes the fixture (a U-Net α = 1/16 in f16 and int8, a test image) into `dir`.
fn write_fixture(dir: &Path) -> Result<(), String> {
    let cfg = ArchConfig::new(Arch::Unet, Alpha::new(1, 16).map_err(|e| e.to_string())?);
    let nodes = build(&cfg).map_err(|e| e.to_string())?;
    let input = InputGeometry {
        channels: 1,
        height: SIDE,
        width: SIDE,
        scale: 2.0,
        offset: -1.0,
        standardize: false,
    };
    let params = float_params(&nodes, SEED);
    let f16_tensors: Vec<Tensor> = params
        .iter()
        .map(|(node, role, dims, v)| Tensor {
            node: *node,
            role: *role,
            dtype: DType::F16,
            dims: *dims,
            bytes: v.iter().flat_map(|x| f16_bits(*x).to_le_bytes()).collect(),
        })
        .collect();
    let f16_model = write_container(&nodes, &f16_tensors, &[], input)?;
    let image = test_image(SIDE, SEED ^ 1);
    let f32_tensors: Vec<Tensor> = params
        .iter()
        .map(|(node, role, dims, v)| Tensor {
            node: *node,
            role: *role,
            dtype: DType::F32,
            dims: *dims,
            bytes: f32_bytes(v),
        })
        .collect();
    let f32_model = write_container(&nodes, &f32_tensors, &[], input)?;
    let i8_model = int8_model(&nodes, &params, &f32_model, &image, input)?;
    let results = firmware::write_fixture(
        dir,
        &[
            firmware::FixtureModel {
                name: "unet f16".into(),
                bytes: f16_model,
            },
            firmware::FixtureModel {
                name: "unet int8".into(),
                bytes: i8_model,
            },
        ],
        &image,
        SIDE,
        SIDE,
    )?;
    for r in &results {
        println!(
            "fixture: U-Net a=1/16 {SIDE}x{SIDE}, {}: mask crc32 {:#010x} ({} fg px), arena {} B",
            r.name, r.crc, r.foreground, r.arena
        );
    }
    Ok(())
}
