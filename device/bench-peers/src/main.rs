//! The device engine's peers on the host, driven by `device/benches/latency_compare.py`.
//!
//! - `gen DIR SIDE DEN...` writes, for each width multiplier `1/DEN`, the U-Net with
//!   deterministic He-uniform weights (every ReLU fused into its convolution, as packing
//!   does) as an f32 container `unet_aDEN.ccn`, the same graph and weights for PyTorch
//!   (`unet_aDEN.json`: the graph as serde JSON plus every tensor's offset and
//!   dimensions in `unet_aDEN.bin`, little-endian f32), one input `input_SIDE.bin`
//!   (1 × SIDE × SIDE f32) and the device engine's logits for it
//!   (`logits_aDEN.bin`, the node before the arg-max).
//! - `device MODEL.ccn SIDE RUNS` times the device engine (fast kernels, one thread) on
//!   that input and prints `median_ms=…`.
//! - `tract MODEL.onnx SIDE RUNS [INPUT.bin LOGITS.bin]` times tract (one thread) on the
//!   ONNX export of the same model, and compares its logits with the device engine's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ccnet_device::{Input, InputData, Model};
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::{
    align_up, validate_header, Container, DType, Header, InputGeometry, Metadata, Preamble,
    TensorInfo, CRC32,
};
use ccnet_shared::graph::{NodeId, Op, ParamRole};
use tract_onnx::prelude::*;

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("gen") => gen(&args[1..]),
        Some("device") => device(&args[1..]),
        Some("tract") => tract(&args[1..]),
        _ => Err("usage: ccnet-bench-peers gen DIR SIDE DEN... | device MODEL.ccn SIDE RUNS | tract MODEL.onnx SIDE RUNS [INPUT.bin LOGITS.bin]".into()),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn num<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Res<T> {
    args.get(i)
        .ok_or(format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

/// xorshift64 (the same generator as the qemu fixture).
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

/// Fuses every ReLU that is its convolution's only reader into the convolution.
fn fuse_relu(nodes: &[Op]) -> Vec<Op> {
    let mut readers = vec![0usize; nodes.len()];
    for op in nodes {
        for &j in op.inputs().as_slice() {
            readers[j as usize] += 1;
        }
    }
    let mut map: Vec<NodeId> = Vec::with_capacity(nodes.len());
    let mut out: Vec<Op> = Vec::new();
    for op in nodes {
        if let Op::Relu { input } = *op {
            let src = map[input as usize] as usize;
            let fusable = readers[input as usize] == 1;
            match &mut out[src] {
                Op::Conv2d(c) if fusable => {
                    c.relu = true;
                    map.push(src as NodeId);
                    continue;
                }
                Op::ConvTranspose2d(c) if fusable => {
                    c.relu = true;
                    map.push(src as NodeId);
                    continue;
                }
                _ => {}
            }
        }
        let op = remap(*op, &map);
        map.push(out.len() as NodeId);
        out.push(op);
    }
    out
}

/// `op` with every input `j` replaced by `map[j]`.
fn remap(op: Op, map: &[NodeId]) -> Op {
    let m = |j: NodeId| map[j as usize];
    match op {
        Op::Input { .. } => op,
        Op::Conv2d(mut c) => {
            c.input = m(c.input);
            Op::Conv2d(c)
        }
        Op::ConvTranspose2d(mut c) => {
            c.input = m(c.input);
            Op::ConvTranspose2d(c)
        }
        Op::BatchNorm {
            input,
            channels,
            eps,
        } => Op::BatchNorm {
            input: m(input),
            channels,
            eps,
        },
        Op::Relu { input } => Op::Relu { input: m(input) },
        Op::MaxPool {
            input,
            kernel,
            stride,
        } => Op::MaxPool {
            input: m(input),
            kernel,
            stride,
        },
        Op::Upsample { input, factor } => Op::Upsample {
            input: m(input),
            factor,
        },
        Op::Concat { a, b } => Op::Concat { a: m(a), b: m(b) },
        Op::Add { a, b } => Op::Add { a: m(a), b: m(b) },
        Op::Softmax { input } => Op::Softmax { input: m(input) },
        Op::Argmax { input } => Op::Argmax { input: m(input) },
    }
}

#[derive(serde::Serialize)]
struct TensorJson {
    node: NodeId,
    role: String,
    dims: [u32; 4],
    /// Offset in f32 elements into the `.bin` file.
    offset: usize,
    len: usize,
}

#[derive(serde::Serialize)]
struct ModelJson<'a> {
    alpha_den: u32,
    graph: &'a [Op],
    tensors: Vec<TensorJson>,
    logits_node: NodeId,
}

fn gen(args: &[String]) -> Res<()> {
    let dir = PathBuf::from(args.first().ok_or("missing DIR")?);
    let side: u32 = num(args, 1, "SIDE")?;
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let n = (side * side) as usize;
    let mut r = Rng(0x1a7e_0c1e);
    let input: Vec<f32> = (0..n).map(|_| r.unit()).collect();
    write_f32(&dir.join(format!("input_{side}.bin")), &input)?;
    for den in &args[2..] {
        let den: u32 = den.parse().map_err(|_| "bad DEN")?;
        let alpha = Alpha::new(1, den).map_err(|e| e.to_string())?;
        let nodes =
            fuse_relu(&build(&ArchConfig::new(Arch::Unet, alpha)).map_err(|e| e.to_string())?);
        let mut r = Rng(0x5eed_cc4e ^ u64::from(den));
        let mut tensors = Vec::new();
        let mut infos = Vec::new();
        let mut all = Vec::new();
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
                let len: u32 = dims.iter().product();
                let bound = if role == ParamRole::Weight {
                    (6.0 / fan_in as f32).sqrt()
                } else {
                    0.1
                };
                let v: Vec<f32> = (0..len).map(|_| r.unit() * bound).collect();
                infos.push(TensorJson {
                    node: i as NodeId,
                    role: format!("{role:?}"),
                    dims,
                    offset: all.len(),
                    len: v.len(),
                });
                all.extend_from_slice(&v);
                tensors.push((i as NodeId, role, dims, v));
            }
        }
        let bytes = write_container(&nodes, &tensors, side, den)?;
        let logits_node = match nodes.last() {
            Some(Op::Argmax { input }) => *input,
            _ => return Err("the U-Net does not end in an arg-max".into()),
        };
        let stem = format!("unet_a{den}");
        std::fs::write(dir.join(format!("{stem}.ccn")), &bytes).map_err(|e| e.to_string())?;
        write_f32(&dir.join(format!("{stem}.bin")), &all)?;
        let json = ModelJson {
            alpha_den: den,
            graph: &nodes,
            tensors: infos,
            logits_node,
        };
        std::fs::write(
            dir.join(format!("{stem}.json")),
            serde_json::to_string(&json).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        // The device engine's logits on the input.
        let model = Model::parse(&bytes).map_err(|e| e.to_string())?;
        let mut arena = vec![0u8; model.arena_bytes(side, side).map_err(|e| e.to_string())?];
        let shape = model.plan(side, side).map_err(|e| e.to_string())?;
        let s = shape.shape(logits_node).ok_or("no logits shape")?;
        let mut logits = vec![0f32; (s.c * s.h * s.w) as usize];
        model
            .run_node(
                f32_input(&input, side),
                &mut arena,
                logits_node,
                &mut logits,
            )
            .map_err(|e| e.to_string())?;
        write_f32(&dir.join(format!("logits_a{den}.bin")), &logits)?;
        let macs = ccnet_shared::graph::Graph::new(&nodes)
            .map_err(|e| format!("{e:?}"))?
            .stats(side, side)
            .map_err(|e| format!("{e:?}"))?
            .macs;
        println!(
            "{stem}: {} nodes, {} parameters, {:.1} M MACs at {side}x{side}, {} bytes",
            nodes.len(),
            all.len(),
            macs as f64 / 1e6,
            bytes.len()
        );
    }
    Ok(())
}

fn f32_input(v: &[f32], side: u32) -> Input<'_> {
    Input {
        data: InputData::F32(v),
        height: side,
        width: side,
    }
}

fn write_f32(p: &Path, v: &[f32]) -> Res<()> {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(p, b).map_err(|e| format!("{}: {e}", p.display()))
}

fn read_f32(p: &str) -> Res<Vec<f32>> {
    let b = std::fs::read(p).map_err(|e| format!("{p}: {e}"))?;
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Writes an f32 container (the layout of `shared/FORMAT.md`) and checks it parses.
fn write_container(
    graph: &[Op],
    tensors: &[(NodeId, ParamRole, [u32; 4], Vec<f32>)],
    side: u32,
    den: u32,
) -> Res<Vec<u8>> {
    let mut header = Header {
        graph: heapless::Vec::new(),
        tensors: heapless::Vec::new(),
        activations: heapless::Vec::new(),
        input: InputGeometry {
            channels: 1,
            height: side,
            width: side,
            scale: 2.0,
            offset: -1.0,
            standardize: false,
        },
        metadata: Metadata {
            arch: "unet",
            alpha_num: 1,
            alpha_den: den,
            dataset: "synthetic (latency benchmark)",
            ..Metadata::default()
        },
    };
    header
        .graph
        .extend_from_slice(graph)
        .map_err(|_| "too many nodes")?;
    let mut data = Vec::new();
    for (node, role, dims, v) in tensors {
        data.resize(align_up(data.len()), 0);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        header
            .tensors
            .push(TensorInfo {
                node: *node,
                role: *role,
                dtype: DType::F32,
                dims: *dims,
                offset: data.len() as u32,
                len: bytes.len() as u32,
            })
            .map_err(|_| "too many tensors")?;
        data.extend_from_slice(&bytes);
    }
    validate_header(&header, data.len()).map_err(|e| format!("invalid container: {e}"))?;
    let hb = postcard::to_allocvec(&header).map_err(|e| e.to_string())?;
    let pre = Preamble::for_lengths(hb.len(), data.len()).ok_or("container too large")?;
    let mut out = pre.encode().to_vec();
    out.extend_from_slice(&hb);
    out.resize(pre.data_offset as usize, 0);
    out.extend_from_slice(&data);
    let crc = CRC32.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Container::parse(&out).map_err(|e| format!("container does not parse: {e}"))?;
    Ok(out)
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn device(args: &[String]) -> Res<()> {
    let path = args.first().ok_or("missing MODEL.ccn")?;
    let side: u32 = num(args, 1, "SIDE")?;
    let runs: usize = num(args, 2, "RUNS")?;
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let model = Model::parse(&bytes).map_err(|e| e.to_string())?;
    let mut r = Rng(0x1a7e_0c1e);
    let input: Vec<f32> = (0..side * side).map(|_| r.unit()).collect();
    let mut arena = vec![0u8; model.arena_bytes(side, side).map_err(|e| e.to_string())?];
    let mut mask = vec![0u8; (side * side) as usize];
    let mut times = Vec::new();
    for i in 0..runs + 2 {
        let t = Instant::now();
        model
            .run(f32_input(&input, side), &mut arena, &mut mask)
            .map_err(|e| e.to_string())?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "median_ms={:.3} min_ms={min:.3} runs={runs} arena_bytes={}",
        median(times),
        arena.len()
    );
    Ok(())
}

fn tract(args: &[String]) -> Res<()> {
    let path = args.first().ok_or("missing MODEL.onnx")?;
    let side: usize = num(args, 1, "SIDE")?;
    let runs: usize = num(args, 2, "RUNS")?;
    let e = |e: TractError| format!("{e:?}");
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(e)?
        .with_input_fact(0, f32::fact([1, 1, side, side]).into())
        .map_err(e)?
        .into_optimized()
        .map_err(e)?
        .into_runnable()
        .map_err(e)?;
    let input: Vec<f32> = match args.get(3) {
        Some(p) => read_f32(p)?,
        None => {
            let mut r = Rng(0x1a7e_0c1e);
            (0..side * side).map(|_| r.unit()).collect()
        }
    };
    let x: Tensor = tract_ndarray::Array4::from_shape_vec((1, 1, side, side), input)
        .map_err(|e| e.to_string())?
        .into();
    let mut times = Vec::new();
    let mut out = None;
    for i in 0..runs + 2 {
        let t = Instant::now();
        let o = model.run(tvec!(x.clone().into())).map_err(e)?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out = Some(o);
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let mut line = format!("median_ms={:.3} min_ms={min:.3}", median(times));
    if let (Some(p), Some(out)) = (args.get(4), out) {
        let want = read_f32(p)?;
        let got = out[0].to_array_view::<f32>().map_err(e)?;
        let got: Vec<f32> = got.iter().copied().collect();
        if got.len() != want.len() {
            return Err(format!(
                "tract logits: {} values, device {}",
                got.len(),
                want.len()
            ));
        }
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        line += &format!(" max_abs_diff_vs_device={diff:.3e}");
    }
    println!("{line}");
    Ok(())
}
