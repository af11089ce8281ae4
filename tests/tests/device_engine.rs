//! The device engine on containers written by the host: validation of good and hostile
//! bytes, exact arena sizes, agreement with an independent f32 interpreter, fast and
//! reference kernels, f16 storage, int8 execution, and overlap-tile inference on real
//! architecture graphs.

use ccnet_device::{DeviceError, Input, InputData, Kernels, Model, Precision, ARENA_ALIGN};
use ccnet_host::container::{write, ModelSpec, TensorData};
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::{ActivationQuant, DType, InputGeometry, Metadata, CRC32};
use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole, Shape, MAX_NODES};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------

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

fn arch_graph(arch: Arch, alpha_den: u32) -> Vec<Op> {
    let cfg = ArchConfig::new(arch, Alpha::new(1, alpha_den).unwrap());
    build(&cfg).unwrap()
}

/// Deterministic He-uniform weights and small biases for every parameter tensor.
fn float_params(nodes: &[Op], seed: u64) -> Vec<(NodeId, ParamRole, [u32; 4], Vec<f32>)> {
    let mut r = Rng(seed);
    let mut out = Vec::new();
    for (i, op) in nodes.iter().enumerate() {
        for &(role, dims) in op.param_tensors().as_slice() {
            let n: u32 = dims.iter().product();
            let fan_in = match op {
                Op::Conv2d(c) => c.in_channels * u32::from(c.kernel).pow(2),
                Op::ConvTranspose2d(c) => {
                    c.in_channels * u32::from(c.kernel).pow(2) / u32::from(c.stride).pow(2)
                }
                _ => 1,
            }
            .max(1);
            let bound = match role {
                ParamRole::Weight => (6.0 / fan_in as f32).sqrt(),
                _ => 0.1,
            };
            let v = (0..n).map(|_| r.unit() * bound).collect();
            out.push((i as NodeId, role, dims, v));
        }
    }
    out
}

fn geometry(nodes: &[Op], tile: (u32, u32)) -> InputGeometry {
    InputGeometry {
        channels: Graph::new_unchecked(nodes).input_channels(),
        height: tile.0,
        width: tile.1,
        scale: 2.0,
        offset: -1.0,
        standardize: false,
    }
}

fn metadata() -> Metadata<'static> {
    Metadata {
        arch: "test",
        alpha_num: 1,
        alpha_den: 16,
        dataset: "synthetic",
        ..Metadata::default()
    }
}

fn f16_bits(v: f32) -> u16 {
    half_from_f32(v)
}

/// f32 → binary16, round to nearest even (normal range; subnormals flush to zero).
fn half_from_f32(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
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

fn float_container(nodes: &[Op], tile: (u32, u32), seed: u64, f16: bool) -> Vec<u8> {
    let tensors: Vec<TensorData> = float_params(nodes, seed)
        .into_iter()
        .map(|(node, role, dims, v)| {
            if f16 {
                TensorData {
                    node,
                    role,
                    dtype: DType::F16,
                    dims,
                    bytes: v.iter().flat_map(|x| f16_bits(*x).to_le_bytes()).collect(),
                }
            } else {
                TensorData::f32(node, role, dims, &v)
            }
        })
        .collect();
    let spec = ModelSpec {
        graph: nodes,
        activations: &[],
        input: geometry(nodes, tile),
        metadata: metadata(),
    };
    write(&spec, &tensors).unwrap()
}

/// A deterministic test image: gradients plus bright discs, planar C × H × W.
fn image(c: u32, h: u32, w: u32, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let discs: Vec<(f32, f32, f32)> = (0..(h * w / 400).max(3))
        .map(|_| {
            (
                (r.unit() * 0.5 + 0.5) * h as f32,
                (r.unit() * 0.5 + 0.5) * w as f32,
                3.0 + (r.unit() * 0.5 + 0.5) * 8.0,
            )
        })
        .collect();
    let mut out = Vec::with_capacity((c * h * w) as usize);
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let inside = discs.iter().any(|&(cy, cx, rad)| {
                    (y as f32 - cy).powi(2) + (x as f32 - cx).powi(2) < rad * rad
                });
                let base = ((x * 3 + y * 2 + ch * 40) % 90) as u8;
                let noise = (r.next() % 24) as u8;
                out.push(if inside { 170 + noise } else { base + noise });
            }
        }
    }
    out
}

fn pixels(data: &[u8], h: u32, w: u32) -> Input<'_> {
    Input {
        data: InputData::Pixels(data),
        height: h,
        width: w,
    }
}

fn run_mask(model: &Model<'_>, img: &[u8], h: u32, w: u32) -> Vec<u8> {
    let mut arena = vec![0u8; model.arena_bytes(h, w).unwrap()];
    let mut mask = vec![0u8; (h * w) as usize];
    model.run(pixels(img, h, w), &mut arena, &mut mask).unwrap();
    mask
}

fn run_node(model: &Model<'_>, img: &[u8], h: u32, w: u32, node: NodeId) -> (Shape, Vec<f32>) {
    let plan = model.plan(h, w).unwrap();
    let shape = plan.shape(node).unwrap();
    let mut arena = vec![0u8; model.arena_bytes(h, w).unwrap()];
    let mut out = vec![0f32; shape.elements() as usize];
    let s = model
        .run_node(pixels(img, h, w), &mut arena, node, &mut out)
        .unwrap();
    assert_eq!(s, shape);
    (shape, out)
}

/// An int8 container from the same float weights: symmetric per-output-channel weights,
/// biases at `s_in · s_w`, activation ranges calibrated on `calib` with the f32 model.
fn int8_container(nodes: &[Op], tile: (u32, u32), seed: u64, calib: &[u8]) -> Vec<u8> {
    let fbytes = float_container(nodes, tile, seed, false);
    let fm = Model::parse(&fbytes).unwrap();
    let (h, w) = tile;
    let mut acts: Vec<ActivationQuant> = Vec::new();
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
        let (_, v) = run_node(&fm, calib, h, w, i as NodeId);
        let lo = v.iter().cloned().fold(0.0f32, f32::min);
        let hi = v.iter().cloned().fold(0.0f32, f32::max);
        let scale = ((hi - lo) / 255.0).max(1e-6);
        let zp = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i32;
        acts.push(ActivationQuant {
            node: i as NodeId,
            scale,
            zero_point: zp,
        });
    }
    // Effective input scale of each node (pass-through nodes inherit).
    let mut eff = vec![0f32; nodes.len()];
    for (i, op) in nodes.iter().enumerate() {
        eff[i] = match acts.iter().find(|a| a.node as usize == i) {
            Some(a) => a.scale,
            None => eff[op.inputs().as_slice()[0] as usize],
        };
    }
    let params = float_params(nodes, seed);
    let mut tensors = Vec::new();
    for (node, role, dims, v) in &params {
        let op = nodes[*node as usize];
        let (cout, out_axis_is_0) = match op {
            Op::Conv2d(c) => (c.out_channels as usize, true),
            Op::ConvTranspose2d(c) => (c.out_channels as usize, false),
            _ => unreachable!(),
        };
        let s_in = eff[op.inputs().as_slice()[0] as usize];
        let wv = &params
            .iter()
            .find(|p| p.0 == *node && p.1 == ParamRole::Weight)
            .unwrap()
            .3;
        let k2 = (dims[2] * dims[3]) as usize;
        let oc_of = |idx: usize| {
            if out_axis_is_0 {
                idx / (wv.len() / cout)
            } else {
                (idx / k2) % cout
            }
        };
        let mut sw = vec![0f32; cout];
        for (idx, x) in wv.iter().enumerate() {
            sw[oc_of(idx)] = sw[oc_of(idx)].max(x.abs() / 127.0);
        }
        for s in sw.iter_mut() {
            if *s == 0.0 {
                *s = 1.0;
            }
        }
        match role {
            ParamRole::Weight => {
                let q: Vec<u8> = v
                    .iter()
                    .enumerate()
                    .map(|(idx, x)| ((x / sw[oc_of(idx)]).round().clamp(-127.0, 127.0) as i8) as u8)
                    .collect();
                tensors.push(TensorData {
                    node: *node,
                    role: ParamRole::Weight,
                    dtype: DType::I8,
                    dims: *dims,
                    bytes: q,
                });
                tensors.push(TensorData::f32(
                    *node,
                    ParamRole::WeightScale,
                    [cout as u32, 1, 1, 1],
                    &sw,
                ));
            }
            ParamRole::Bias => {
                let q: Vec<u8> = v
                    .iter()
                    .enumerate()
                    .flat_map(|(oc, b)| ((b / (s_in * sw[oc])).round() as i32).to_le_bytes())
                    .collect();
                tensors.push(TensorData {
                    node: *node,
                    role: ParamRole::Bias,
                    dtype: DType::I32,
                    dims: *dims,
                    bytes: q,
                });
            }
            _ => unreachable!(),
        }
    }
    let spec = ModelSpec {
        graph: nodes,
        activations: &acts,
        input: geometry(nodes, tile),
        metadata: metadata(),
    };
    write(&spec, &tensors).unwrap()
}

// ------------------------------------------------------------------------------------
// An independent f32 interpreter (one Vec per node, direct loops)
// ------------------------------------------------------------------------------------

fn interpret_f32(
    nodes: &[Op],
    params: &[(NodeId, ParamRole, [u32; 4], Vec<f32>)],
    x: &[f32],
    h: u32,
    w: u32,
) -> Vec<Vec<f32>> {
    let g = Graph::new(nodes).unwrap();
    let mut shapes = [Shape::default(); MAX_NODES];
    g.infer_shapes(h, w, &mut shapes).unwrap();
    let p = |n: usize, role| {
        params
            .iter()
            .find(|t| t.0 as usize == n && t.1 == role)
            .map(|t| t.3.clone())
    };
    let mut vals: Vec<Vec<f32>> = Vec::new();
    for (i, op) in nodes.iter().enumerate() {
        let o = shapes[i];
        let (oc_n, oh, ow) = (o.c as usize, o.h as usize, o.w as usize);
        let src = |k: usize| op.inputs().as_slice()[k] as usize;
        let v = match *op {
            Op::Input { .. } => x.to_vec(),
            Op::Conv2d(c) => {
                let s = shapes[src(0)];
                let (ih, iw) = (s.h as i64, s.w as i64);
                let inp = &vals[src(0)];
                let wt = p(i, ParamRole::Weight).unwrap();
                let b = p(i, ParamRole::Bias);
                let k = c.kernel as usize;
                let mut y = vec![0f32; oc_n * oh * ow];
                for oc in 0..oc_n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let mut acc = b.as_ref().map_or(0.0, |b| b[oc]);
                            for ic in 0..c.in_channels as usize {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (oy * c.stride as usize + ky * c.dilation as usize)
                                            as i64
                                            - c.padding as i64;
                                        let ix = (ox * c.stride as usize + kx * c.dilation as usize)
                                            as i64
                                            - c.padding as i64;
                                        if iy < 0 || ix < 0 || iy >= ih || ix >= iw {
                                            continue;
                                        }
                                        let xv = inp[((ic as i64 * ih + iy) * iw + ix) as usize];
                                        acc += wt[((oc * c.in_channels as usize + ic) * k + ky)
                                            * k
                                            + kx]
                                            * xv;
                                    }
                                }
                            }
                            y[(oc * oh + oy) * ow + ox] = if c.relu { acc.max(0.0) } else { acc };
                        }
                    }
                }
                y
            }
            Op::ConvTranspose2d(c) => {
                let s = shapes[src(0)];
                let (ih, iw) = (s.h as usize, s.w as usize);
                let inp = &vals[src(0)];
                let wt = p(i, ParamRole::Weight).unwrap();
                let b = p(i, ParamRole::Bias);
                let (k, st, pad) = (c.kernel as usize, c.stride as usize, c.padding as usize);
                let mut y = vec![0f32; oc_n * oh * ow];
                for oc in 0..oc_n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let mut acc = b.as_ref().map_or(0.0, |b| b[oc]);
                            for ic in 0..c.in_channels as usize {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let ty = oy as i64 + pad as i64 - ky as i64;
                                        let tx = ox as i64 + pad as i64 - kx as i64;
                                        if ty < 0
                                            || tx < 0
                                            || ty % st as i64 != 0
                                            || tx % st as i64 != 0
                                        {
                                            continue;
                                        }
                                        let (iy, ix) =
                                            ((ty / st as i64) as usize, (tx / st as i64) as usize);
                                        if iy >= ih || ix >= iw {
                                            continue;
                                        }
                                        acc += wt[((ic * oc_n + oc) * k + ky) * k + kx]
                                            * inp[(ic * ih + iy) * iw + ix];
                                    }
                                }
                            }
                            y[(oc * oh + oy) * ow + ox] = if c.relu { acc.max(0.0) } else { acc };
                        }
                    }
                }
                y
            }
            Op::Relu { input } => vals[input as usize].iter().map(|v| v.max(0.0)).collect(),
            Op::MaxPool {
                input,
                kernel,
                stride,
            } => {
                let s = shapes[input as usize];
                let inp = &vals[input as usize];
                let mut y = vec![f32::NEG_INFINITY; oc_n * oh * ow];
                for c in 0..oc_n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            for ky in 0..kernel as usize {
                                for kx in 0..kernel as usize {
                                    let v = inp[(c * s.h as usize + oy * stride as usize + ky)
                                        * s.w as usize
                                        + ox * stride as usize
                                        + kx];
                                    let d = &mut y[(c * oh + oy) * ow + ox];
                                    *d = d.max(v);
                                }
                            }
                        }
                    }
                }
                y
            }
            Op::Upsample { input, factor } => {
                let s = shapes[input as usize];
                let f = factor as usize;
                let inp = &vals[input as usize];
                let mut y = vec![0f32; oc_n * oh * ow];
                for c in 0..oc_n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            y[(c * oh + oy) * ow + ox] =
                                inp[(c * s.h as usize + oy / f) * s.w as usize + ox / f];
                        }
                    }
                }
                y
            }
            Op::Concat { a, b } => [vals[a as usize].clone(), vals[b as usize].clone()].concat(),
            Op::Add { a, b } => vals[a as usize]
                .iter()
                .zip(&vals[b as usize])
                .map(|(x, y)| x + y)
                .collect(),
            Op::Softmax { .. } | Op::BatchNorm { .. } => {
                unimplemented!("not in the builders' deployed graphs")
            }
            Op::Argmax { input } => {
                let inp = &vals[input as usize];
                let s = shapes[input as usize];
                let n = (s.h * s.w) as usize;
                (0..n)
                    .map(|px| {
                        let mut best = 0;
                        for c in 1..s.c as usize {
                            if inp[c * n + px] > inp[best * n + px] {
                                best = c;
                            }
                        }
                        best as f32
                    })
                    .collect()
            }
        };
        vals.push(v);
    }
    vals
}

fn assert_close(a: &[f32], b: &[f32], rel: f32) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= rel * scale, "element {i}: {x} vs {y}");
    }
}

fn class_fractions(mask: &[u8]) -> (f64, f64) {
    let ones = mask.iter().filter(|&&v| v == 1).count() as f64;
    (1.0 - ones / mask.len() as f64, ones / mask.len() as f64)
}

// ------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------

#[test]
fn f32_engine_matches_an_independent_interpreter_on_all_architectures() {
    for (arch, h, w) in [
        (Arch::Unet, 32, 48),
        (Arch::Fcn, 64, 32),
        (Arch::Cumed, 24, 40),
    ] {
        let nodes = arch_graph(arch, 16);
        let bytes = float_container(&nodes, (h, w), 7, false);
        let model = Model::parse(&bytes).unwrap();
        assert_eq!(model.precision(), Precision::Float);
        let img = image(1, h, w, 3);
        let geo = geometry(&nodes, (h, w));
        let x: Vec<f32> = img
            .iter()
            .map(|&p| (f32::from(p) / 255.0) * geo.scale + geo.offset)
            .collect();
        let want = interpret_f32(&nodes, &float_params(&nodes, 7), &x, h, w);
        let logits = nodes.len() - 2;
        let (_, got) = run_node(&model, &img, h, w, logits as NodeId);
        assert_close(&got, &want[logits], 1e-5);
        let mask = run_mask(&model, &img, h, w);
        let want_mask: Vec<u8> = want[nodes.len() - 1].iter().map(|&c| c as u8).collect();
        let differing = mask.iter().zip(&want_mask).filter(|(a, b)| a != b).count();
        assert!(
            differing * 1000 <= mask.len(),
            "{arch}: {differing} pixels differ"
        );
        // F32 input gives the same as pixels normalised the same way.
        let mut arena = vec![0u8; model.arena_bytes(h, w).unwrap()];
        let mut mask2 = vec![0u8; (h * w) as usize];
        let input = Input {
            data: InputData::F32(&x),
            height: h,
            width: w,
        };
        model.run(input, &mut arena, &mut mask2).unwrap();
        assert_eq!(mask, mask2);
    }
}

#[test]
fn fast_and_reference_kernels_agree_on_whole_graphs() {
    for arch in Arch::ALL {
        let (h, w) = (32, 32);
        let nodes = arch_graph(arch, 16);
        let img = image(1, h, w, 11);
        let fbytes = float_container(&nodes, (h, w), 5, false);
        let ibytes = int8_container(&nodes, (h, w), 5, &img);
        for bytes in [&fbytes, &ibytes] {
            let mut model = Model::parse(bytes).unwrap();
            let logits = (nodes.len() - 2) as NodeId;
            let (_, fast) = run_node(&model, &img, h, w, logits);
            model.set_kernels(Kernels::Reference);
            let (_, reference) = run_node(&model, &img, h, w, logits);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&reference), "{arch}");
        }
    }
}

#[test]
fn f16_weights_compute_exactly_like_their_f32_values() {
    let nodes = arch_graph(Arch::Unet, 16);
    let (h, w) = (32, 32);
    let img = image(1, h, w, 5);
    let half = float_container(&nodes, (h, w), 9, true);
    // The same weights rounded to f16 and stored as f32.
    let tensors: Vec<TensorData> = float_params(&nodes, 9)
        .into_iter()
        .map(|(node, role, dims, v)| {
            let r: Vec<f32> = v
                .iter()
                .map(|x| ccnet_device::kernels::f16_to_f32(f16_bits(*x)))
                .collect();
            TensorData::f32(node, role, dims, &r)
        })
        .collect();
    let spec = ModelSpec {
        graph: &nodes,
        activations: &[],
        input: geometry(&nodes, (h, w)),
        metadata: metadata(),
    };
    let full = write(&spec, &tensors).unwrap();
    assert!(half.len() < full.len() * 6 / 10);
    let (a, b) = (Model::parse(&half).unwrap(), Model::parse(&full).unwrap());
    let logits = (nodes.len() - 2) as NodeId;
    assert_eq!(
        run_node(&a, &img, h, w, logits).1,
        run_node(&b, &img, h, w, logits).1
    );
}

#[test]
fn int8_models_run_and_mostly_agree_with_f32() {
    for arch in Arch::ALL {
        let (h, w) = (64, 64);
        let nodes = arch_graph(arch, 16);
        let img = image(1, h, w, 21);
        let f = float_container(&nodes, (h, w), 3, false);
        let q = int8_container(&nodes, (h, w), 3, &img);
        let (fm, qm) = (Model::parse(&f).unwrap(), Model::parse(&q).unwrap());
        assert_eq!(qm.precision(), Precision::Int8);
        // int8 activations take a quarter of the f32 arena.
        let (pf, pq) = (fm.plan(h, w).unwrap(), qm.plan(h, w).unwrap());
        assert!(pq.planned_bytes() * 4 <= pf.planned_bytes() + 16 * nodes.len());
        let (mf, mq) = (run_mask(&fm, &img, h, w), run_mask(&qm, &img, h, w));
        let agree = mf.iter().zip(&mq).filter(|(a, b)| a == b).count() as f64 / mf.len() as f64;
        eprintln!(
            "{arch}: int8/f32 mask agreement {agree:.4}, f32 classes {:?}",
            class_fractions(&mf)
        );
        assert!(agree > 0.9, "{arch}: agreement {agree}");
        // Dequantized logits track the f32 logits.
        let logits = (nodes.len() - 2) as NodeId;
        let (_, lf) = run_node(&fm, &img, h, w, logits);
        let (_, lq) = run_node(&qm, &img, h, w, logits);
        let range = lf.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mean_err =
            lf.iter().zip(&lq).map(|(a, b)| (a - b).abs()).sum::<f32>() / lf.len() as f32;
        assert!(
            mean_err < 0.05 * range,
            "{arch}: mean error {mean_err} of range {range}"
        );
    }
}

#[test]
fn arena_size_is_exact_and_reported_against_the_lower_bound() {
    for arch in Arch::ALL {
        let nodes = arch_graph(arch, 16);
        let (h, w) = (64, 64);
        let img = image(1, h, w, 1);
        let bytes = float_container(&nodes, (h, w), 1, false);
        let model = Model::parse(&bytes).unwrap();
        let plan = model.plan(h, w).unwrap();
        let need = model.arena_bytes(h, w).unwrap();
        assert_eq!(need, plan.planned_bytes() + ARENA_ALIGN - 1);
        let lb = plan.lower_bound_bytes();
        let g = Graph::new(&nodes).unwrap();
        let total: u64 = g.stats(h, w).unwrap().activation_elements * 4;
        eprintln!(
            "{arch} a=1/16 {h}x{w} f32: planned {} B, lower bound {lb} B, no reuse {total} B",
            plan.planned_bytes()
        );
        assert!((plan.planned_bytes() as u64) < total / 2);
        // Liveness plus placement reaches the bound up to buffer alignment.
        let slack = (ARENA_ALIGN * nodes.len()) as u64;
        assert!((plan.planned_bytes() as u64) <= lb + slack, "{arch}");
        let want = run_mask(&model, &img, h, w);
        // Any alignment works with arena_bytes; one byte less than the plan fails.
        let mut buf = vec![0u8; need + ARENA_ALIGN];
        let mut mask = vec![0u8; (h * w) as usize];
        for off in 0..ARENA_ALIGN {
            mask.fill(9);
            model
                .run(pixels(&img, h, w), &mut buf[off..off + need], &mut mask)
                .unwrap();
            assert_eq!(mask, want);
        }
        let skip = (ARENA_ALIGN - buf.as_ptr() as usize % ARENA_ALIGN) % ARENA_ALIGN;
        let aligned = &mut buf[skip..];
        let exact = plan.planned_bytes();
        model
            .run(pixels(&img, h, w), &mut aligned[..exact], &mut mask)
            .unwrap();
        assert!(matches!(
            model.run(pixels(&img, h, w), &mut aligned[..exact - 1], &mut mask),
            Err(DeviceError::ArenaTooSmall { .. })
        ));
        assert!(matches!(
            model.run(pixels(&img, h, w), &mut [], &mut mask),
            Err(DeviceError::ArenaTooSmall { .. })
        ));
    }
}

#[test]
fn unet_skips_stay_alive_and_other_buffers_are_reused() {
    let nodes = arch_graph(Arch::Unet, 16);
    let bytes = float_container(&nodes, (64, 64), 1, false);
    let model = Model::parse(&bytes).unwrap();
    let plan = model.plan(64, 64).unwrap();
    let overlap =
        |a: &std::ops::Range<usize>, b: &std::ops::Range<usize>| a.start < b.end && b.start < a.end;
    // Every concat's skip input must not share memory with any node computed between it
    // and the concat (other than in-place successors of the same buffer).
    let mut reused = 0;
    for (i, op) in nodes.iter().enumerate() {
        if let Op::Concat { a, .. } = op {
            let skip = plan.range(*a).unwrap();
            for j in (*a as usize + 1)..i {
                let r = plan.range(j as NodeId).unwrap();
                assert!(!overlap(&skip, &r), "skip {a} overwritten by node {j}");
            }
        }
        for j in 0..i {
            if plan.range(j as NodeId).unwrap() == plan.range(i as NodeId).unwrap() {
                reused += 1;
            }
        }
    }
    assert!(reused > 5);
}

#[test]
fn overlap_tiling_equals_whole_image_inference() {
    // (architecture, α denominator, planned tile, image)
    for (arch, den, tile, (h, w)) in [
        (Arch::Cumed, 16, (192, 192), (192, 256)),
        (Arch::Cumed, 16, (160, 160), (240, 160)),
        (Arch::Unet, 32, (288, 288), (288, 320)),
    ] {
        let nodes = arch_graph(arch, den);
        let img = image(1, h, w, 17);
        for int8 in [false, true] {
            let bytes = if int8 {
                int8_container(&nodes, tile, 4, &img[..(tile.0 * tile.1) as usize])
            } else {
                float_container(&nodes, tile, 4, false)
            };
            let model = Model::parse(&bytes).unwrap();
            let tp = model.tile_plan(h, w).unwrap();
            assert!(tp.tiles_x * tp.tiles_y > 1);
            let whole = run_mask(&model, &img, h, w);
            let (bg, fg) = class_fractions(&whole);
            assert!(bg > 0.02 && fg > 0.02, "{arch}: degenerate mask {bg} {fg}");
            let need = model.tiled_arena_bytes(h, w).unwrap();
            assert!(need < model.arena_bytes(h, w).unwrap());
            let mut arena = vec![0u8; need];
            let mut mask = vec![7u8; (h * w) as usize];
            let info = model
                .run_tiled(pixels(&img, h, w), &mut arena, &mut mask)
                .unwrap();
            eprintln!(
                "{arch} int8={int8} {h}x{w} in {} tiles of {}x{} (halo {}): arena {} B vs whole {} B",
                info.tiles,
                tp.tile_h,
                tp.tile_w,
                tp.geometry.halo,
                need,
                model.arena_bytes(h, w).unwrap()
            );
            assert_eq!(info.tiles, tp.tiles_x * tp.tiles_y);
            assert!(mask == whole, "{arch} int8={int8}: tiled mask differs");
        }
    }
}

#[test]
fn tiling_geometry_of_the_architectures() {
    let geo =
        |arch| ccnet_device::tile::geometry(&Graph::new(&arch_graph(arch, 16)).unwrap()).unwrap();
    let u = geo(Arch::Unet);
    assert_eq!(u.multiple, 16);
    assert_eq!(u.halo, 128); // 122 rounded up to 16
    assert_eq!(geo(Arch::Cumed).multiple, 8);
    assert_eq!(geo(Arch::Fcn).multiple, 32);
    // A tile too small for the halo is refused, not silently wrong.
    let nodes = arch_graph(Arch::Unet, 16);
    let bytes = float_container(&nodes, (128, 128), 1, false);
    let model = Model::parse(&bytes).unwrap();
    assert_eq!(
        model.tile_plan(256, 256).unwrap_err(),
        DeviceError::NotTileable
    );
    assert_eq!(
        model.tile_plan(100, 256).unwrap_err(),
        DeviceError::ImageSize { multiple: 16 }
    );
}

#[test]
fn invalid_models_are_rejected_with_specific_errors() {
    // Batch norm must be folded by packing.
    let cfg = ArchConfig {
        batch_norm: true,
        ..ArchConfig::new(Arch::Cumed, Alpha::new(1, 16).unwrap())
    };
    let bn = build(&cfg).unwrap();
    let bytes = float_container(&bn, (32, 32), 1, false);
    assert!(matches!(
        Model::parse(&bytes),
        Err(DeviceError::UnfoldedBatchNorm { .. })
    ));

    let nodes = arch_graph(Arch::Cumed, 16);
    let img = image(1, 32, 32, 1);
    let good = int8_container(&nodes, (32, 32), 1, &img);
    Model::parse(&good).unwrap();
    // An int8 model without the activation entry of a convolution.
    let rebuild = |edit: &dyn Fn(&mut Vec<ActivationQuant>, &mut Vec<TensorData>)| {
        let m = Model::parse(&good).unwrap();
        let h = m.container().header();
        let mut acts: Vec<ActivationQuant> = h.activations.to_vec();
        let mut tensors: Vec<TensorData> = (0..h.tensors.len())
            .map(|i| {
                let t = h.tensors[i];
                TensorData {
                    node: t.node,
                    role: t.role,
                    dtype: t.dtype,
                    dims: t.dims,
                    bytes: m.container().tensor_bytes(i).unwrap().to_vec(),
                }
            })
            .collect();
        edit(&mut acts, &mut tensors);
        let spec = ModelSpec {
            graph: &nodes,
            activations: &acts,
            input: h.input,
            metadata: metadata(),
        };
        write(&spec, &tensors).unwrap()
    };
    let missing = rebuild(&|a, _| a.retain(|q| q.node != 1));
    assert_eq!(
        Model::parse(&missing).unwrap_err(),
        DeviceError::BadQuant { node: 1 }
    );
    let zero_scale = rebuild(&|a, _| a[2].scale = 0.0);
    assert!(matches!(
        Model::parse(&zero_scale),
        Err(DeviceError::BadQuant { .. })
    ));
    let bad_zp = rebuild(&|a, _| a[0].zero_point = 200);
    assert!(matches!(
        Model::parse(&bad_zp),
        Err(DeviceError::BadQuant { .. })
    ));
    let dup = rebuild(&|a, _| {
        let first = a[0];
        a.push(first)
    });
    assert!(matches!(
        Model::parse(&dup),
        Err(DeviceError::BadQuant { .. })
    ));
    let bad_weight_scale = rebuild(&|_, t| {
        let s = t
            .iter_mut()
            .find(|t| t.role == ParamRole::WeightScale)
            .unwrap();
        s.bytes[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(matches!(
        Model::parse(&bad_weight_scale),
        Err(DeviceError::BadQuant { .. })
    ));
    // A float bias in an int8 model.
    let mixed = rebuild(&|_, t| {
        let b = t.iter_mut().find(|t| t.role == ParamRole::Bias).unwrap();
        b.dtype = DType::F32;
    });
    assert!(matches!(
        Model::parse(&mixed),
        Err(DeviceError::UnsupportedDType { .. })
    ));

    // Inputs and outputs of the wrong size are errors, not panics.
    let f = float_container(&nodes, (32, 32), 1, false);
    let model = Model::parse(&f).unwrap();
    let mut arena = vec![0u8; model.arena_bytes(32, 32).unwrap()];
    let mut mask = vec![0u8; 32 * 32];
    assert!(matches!(
        model.run(pixels(&img[..100], 32, 32), &mut arena, &mut mask),
        Err(DeviceError::InputLength { .. })
    ));
    assert!(matches!(
        model.run(pixels(&img, 32, 32), &mut arena, &mut mask[..5]),
        Err(DeviceError::OutputLength { .. })
    ));
    assert!(matches!(
        model.run(
            pixels(&img[..30 * 32], 30, 32),
            &mut arena,
            &mut mask[..30 * 32]
        ),
        Err(DeviceError::Graph(_))
    ));
    let mut out = vec![0f32; 4];
    assert_eq!(
        model
            .run_node(pixels(&img, 32, 32), &mut arena, 200, &mut out)
            .unwrap_err(),
        DeviceError::BadNode { node: 200 }
    );
}

#[test]
fn truncated_and_corrupted_bytes_are_errors() {
    let nodes = arch_graph(Arch::Cumed, 32);
    let bytes = float_container(&nodes, (16, 16), 2, false);
    for len in 0..bytes.len() {
        assert!(
            Model::parse(&bytes[..len]).is_err(),
            "prefix of {len} bytes accepted"
        );
    }
    let mut r = Rng(99);
    for _ in 0..300 {
        let mut b = bytes.clone();
        let i = (r.next() as usize) % b.len();
        b[i] ^= 1 << (r.next() % 8);
        assert!(Model::parse(&b).is_err(), "bit flip at {i} accepted");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Hostile bytes with a correct checksum: parse must not panic, and whatever parses
    /// must run (or fail cleanly) on any input size and arena.
    #[test]
    fn hostile_bytes_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        h in 0u32..40, w in 0u32..40, arena_len in 0usize..200_000,
    ) {
        let nodes = arch_graph(Arch::Cumed, 32);
        let mut b = float_container(&nodes, (16, 16), 2, false);
        let body = b.len() - 4;
        for (pos, val) in edits {
            // Mostly the preamble and header, where structure lives.
            let i = if pos % 4 == 0 { pos % body } else { pos % 600.min(body) };
            b[i] = val;
        }
        let crc = CRC32.checksum(&b[..body]);
        b[body..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(model) = Model::parse(&b) {
            let c = model.graph().input_channels() as usize;
            if c <= 4 {
                let img = vec![100u8; c * (h * w) as usize];
                let mut arena = vec![0u8; arena_len];
                let mut mask = vec![0u8; (h * w) as usize];
                let _ = model.run(pixels(&img, h, w), &mut arena, &mut mask);
                let _ = model.run_tiled(pixels(&img, h, w), &mut arena, &mut mask);
            }
        }
    }
}

/// A random graph over every operation with odd geometry (strides, dilation, padding
/// larger than the kernel, transposed convolutions with padding), ending in an arg-max.
fn random_graph(seed: u64) -> Vec<Op> {
    use ccnet_shared::graph::{Conv2d, ConvTranspose2d};
    let mut r = Rng(seed | 1);
    let mut pick = |n: u64| (r.next() % n) as u32;
    let mut nodes = vec![Op::Input {
        channels: 1 + pick(3),
    }];
    let mut channels = vec![match nodes[0] {
        Op::Input { channels } => channels,
        _ => unreachable!(),
    }];
    let count = 2 + pick(7);
    for _ in 0..count {
        let x = pick(nodes.len() as u64) as NodeId;
        let cx = channels[x as usize];
        let (op, c) = match pick(9) {
            0 | 1 => {
                let out = 1 + pick(5);
                let op = Op::Conv2d(Conv2d {
                    input: x,
                    in_channels: cx,
                    out_channels: out,
                    kernel: 1 + pick(4) as u16,
                    stride: 1 + pick(3) as u16,
                    padding: pick(4) as u16,
                    dilation: 1 + pick(2) as u16,
                    bias: pick(2) == 1,
                    relu: pick(2) == 1,
                });
                (op, out)
            }
            2 => {
                let out = 1 + pick(5);
                let op = Op::ConvTranspose2d(ConvTranspose2d {
                    input: x,
                    in_channels: cx,
                    out_channels: out,
                    kernel: 1 + pick(4) as u16,
                    stride: 1 + pick(3) as u16,
                    padding: pick(2) as u16,
                    bias: pick(2) == 1,
                    relu: pick(2) == 1,
                });
                (op, out)
            }
            3 => (Op::Relu { input: x }, cx),
            4 => (
                Op::MaxPool {
                    input: x,
                    kernel: 1 + pick(3) as u16,
                    stride: 1 + pick(3) as u16,
                },
                cx,
            ),
            5 => (
                Op::Upsample {
                    input: x,
                    factor: 1 + pick(3) as u16,
                },
                cx,
            ),
            6 => {
                let b = pick(nodes.len() as u64) as NodeId;
                (Op::Concat { a: x, b }, cx + channels[b as usize])
            }
            7 => {
                let same: Vec<NodeId> = (0..nodes.len())
                    .filter(|&j| channels[j] == cx)
                    .map(|j| j as NodeId)
                    .collect();
                let b = same[pick(same.len() as u64) as usize];
                (Op::Add { a: x, b }, cx)
            }
            _ => (Op::Softmax { input: x }, cx),
        };
        nodes.push(op);
        channels.push(c);
    }
    nodes.push(Op::Argmax {
        input: (nodes.len() - 1) as NodeId,
    });
    nodes
}

/// Random activation quantization for every node that needs (or may have) an entry.
fn random_acts(nodes: &[Op], seed: u64) -> Vec<ActivationQuant> {
    let mut r = Rng(seed | 1);
    let mut out = Vec::new();
    for (i, op) in nodes.iter().enumerate() {
        let wanted = match op {
            Op::Input { .. }
            | Op::Conv2d(_)
            | Op::ConvTranspose2d(_)
            | Op::Concat { .. }
            | Op::Add { .. } => true,
            Op::Relu { .. } | Op::MaxPool { .. } | Op::Upsample { .. } => r.next() & 1 == 0,
            _ => false,
        };
        if wanted {
            out.push(ActivationQuant {
                node: i as NodeId,
                scale: 0.005 + (r.next() % 1000) as f32 * 1e-4,
                zero_point: (r.next() % 256) as i32 - 128,
            });
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// Random graphs in both precisions: the model either is refused at parse time or
    /// runs; with exactly the planned arena it succeeds, with one byte less it fails;
    /// fast and reference kernels give the same mask; tiling never panics.
    #[test]
    fn random_graphs_run_or_fail_cleanly(seed in any::<u64>(), h in 1u32..20, w in 1u32..20, int8 in any::<bool>()) {
        let nodes = random_graph(seed);
        let params = float_params(&nodes, seed);
        let tensors: Vec<TensorData> = if int8 {
            params
                .iter()
                .flat_map(|(node, role, dims, v)| {
                    let mut out = vec![];
                    match role {
                        ParamRole::Weight => {
                            let cout = match nodes[*node as usize] {
                                Op::Conv2d(c) => c.out_channels,
                                Op::ConvTranspose2d(c) => c.out_channels,
                                _ => unreachable!(),
                            };
                            out.push(TensorData {
                                node: *node,
                                role: *role,
                                dtype: DType::I8,
                                dims: *dims,
                                bytes: v.iter().map(|x| (x * 100.0) as i8 as u8).collect(),
                            });
                            let scales = vec![0.01f32; cout as usize];
                            out.push(TensorData::f32(*node, ParamRole::WeightScale, [cout, 1, 1, 1], &scales));
                        }
                        _ => out.push(TensorData {
                            node: *node,
                            role: *role,
                            dtype: DType::I32,
                            dims: *dims,
                            bytes: v.iter().flat_map(|x| ((x * 1000.0) as i32).to_le_bytes()).collect(),
                        }),
                    }
                    out
                })
                .collect()
        } else {
            params.iter().map(|(n, r, d, v)| TensorData::f32(*n, *r, *d, v)).collect()
        };
        let acts = if int8 { random_acts(&nodes, seed ^ 5) } else { vec![] };
        let spec = ModelSpec {
            graph: &nodes,
            activations: &acts,
            input: geometry(&nodes, (h, w)),
            metadata: metadata(),
        };
        let bytes = write(&spec, &tensors).unwrap();
        let Ok(mut model) = Model::parse(&bytes) else {
            // Refused (for example, the planned tile does not fit the graph).
            return Ok(());
        };
        let c = model.graph().input_channels();
        let img = image(c, h, w, seed);
        let plan = model.plan(h, w).unwrap();
        let exact = plan.planned_bytes();
        let mut buf = vec![0u8; exact + ARENA_ALIGN];
        let skip = (ARENA_ALIGN - buf.as_ptr() as usize % ARENA_ALIGN) % ARENA_ALIGN;
        let arena = &mut buf[skip..];
        let out_shape = plan.shape(plan.target()).unwrap();
        let mut mask = vec![0u8; (out_shape.h * out_shape.w) as usize];
        let classes_ok = model.run(pixels(&img, h, w), &mut arena[..exact], &mut mask);
        if classes_ok == Err(DeviceError::NoMask) {
            return Ok(());
        }
        prop_assert!(classes_ok.is_ok(), "{:?}", classes_ok);
        if exact > 0 {
            let short = model.run(pixels(&img, h, w), &mut arena[..exact - 1], &mut mask);
            let too_small = matches!(short, Err(DeviceError::ArenaTooSmall { .. }));
            prop_assert!(too_small, "{:?}", short);
        }
        let fast = mask.clone();
        model.set_kernels(Kernels::Reference);
        model.run(pixels(&img, h, w), &mut arena[..exact], &mut mask).unwrap();
        prop_assert_eq!(fast, mask.clone());
        let mut full = vec![0u8; (h * w) as usize];
        let _ = model.run_tiled(pixels(&img, h, w), &mut buf, &mut full);
    }
}
